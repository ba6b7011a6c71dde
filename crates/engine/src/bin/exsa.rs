//! `exsa`: the engine on the command line. `generate` streams text, `chat` is interactive,
//! `info` describes model, devices and build, `bench` runs the measurement harness as JSON.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use exsa_engine::harness::{self, Test};
use exsa_engine::{
    BuildInfo, ChatMessage, ChatTemplating, Engine, EngineConfig, EngineError, GenerateOptions, GenerateRequest, LoadOptions, LogLevel, LoraConfig,
    Placement, SamplingParams, SessionConfig, Speculation, set_llama_log_level,
};

#[derive(Parser)]
#[command(name = "exsa", version, about = "Local LLM inference over llama.cpp")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// GGUF model (default: the project's default model, see `cargo xtask fetch-model`).
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    /// Context length.
    #[arg(long, global = true, default_value_t = 4096)]
    ctx: u32,
    /// Threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<i32>,
    /// Layers to offload to GPUs and rpc-servers (-1: all).
    #[arg(long, global = true, default_value_t = -1)]
    gpu_layers: i32,
    /// ggml rpc-servers (HOST:PORT, comma-separated; see `exsa rpc-server`) that take offloaded
    /// layers beside the local GPUs; the layers not offloaded run on this machine's CPU.
    #[arg(long, global = true, value_delimiter = ',', value_name = "HOST:PORT")]
    rpc: Vec<String>,
    /// Proportions of the offloaded layers per device (local GPUs, then each rpc-server's), e.g.
    /// 1,1; default: by free memory.
    #[arg(long, global = true, value_delimiter = ',')]
    tensor_split: Vec<f32>,
    /// A LoRA adapter (llama.cpp's adapter GGUF) applied at scale 1 to every context of every
    /// model loaded; repeatable.
    #[arg(long, global = true, value_name = "PATH")]
    lora: Vec<PathBuf>,
    /// A LoRA adapter at SCALE (0 turns it off); repeatable.
    #[arg(long, global = true, num_args = 2, value_names = ["PATH", "SCALE"], allow_negative_numbers = true)]
    lora_scaled: Vec<String>,
    /// Load the adapters at scale 0, applied to nothing until `POST /lora-adapters` or a
    /// request's `lora` sets a scale (llama-server's option). Adapter ids follow the command
    /// line's order of `--lora` and `--lora-scaled`, as llama-server numbers them.
    #[arg(long, global = true)]
    lora_init_without_apply: bool,
    /// Every `--lora` and `--lora-scaled`, in the command line's order, before and after the
    /// command alike (see [`read_repeated_globals`]).
    #[arg(skip)]
    adapters: Vec<AdapterOption>,
    /// Read the model into memory instead of mapping its file.
    #[arg(long, global = true)]
    no_mmap: bool,
    /// Lock the model's memory in RAM, so that it is never swapped out.
    #[arg(long, global = true)]
    mlock: bool,
    /// Flash attention: on, off or auto.
    #[arg(long, global = true, default_value = "auto")]
    flash_attn: String,
    /// Element type of the KV cache's keys: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0 or
    /// q5_1 (the quantized ones hold a token in less memory and round what attention reads).
    #[arg(long, global = true, default_value = "f16")]
    cache_type_k: exsa_engine::CacheType,
    /// Element type of the KV cache's values, as --cache-type-k (a quantized one needs flash
    /// attention: --flash-attn on or auto).
    #[arg(long, global = true, default_value = "f16")]
    cache_type_v: exsa_engine::CacheType,
    /// Recurrent-state snapshots per sequence on models that take them (LFM2): a speculative
    /// round drops its rejected drafts (at most this many) instead of returning to a checkpoint
    /// taken before the round and decoding its kept tokens again; drafts are capped at this
    /// length there. 0 (default): none. They cost every token some speed (5-12 % for 8 on the
    /// LFM2-1.2B shape here), speculating or not.
    #[arg(long, global = true, default_value_t = exsa_engine::SessionConfig::DEFAULT_RECURRENT_SNAPSHOTS)]
    recurrent_snapshots: u32,
    /// How embeddings pool a text's token vectors: mean, cls, last, rank (a reranker's score)
    /// or none (a vector per token, at llama-server's native `/embeddings` only). Default: what
    /// the model's file says, mean where it says nothing.
    #[arg(long, global = true)]
    pooling: Option<exsa_engine::Pooling>,
    /// Show llama.cpp's log at this level and above (debug, info, warn, error).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// Show exsa's own log (a line per served request, model loads) at this level and above.
    #[arg(long, global = true, default_value = "info")]
    server_log: String,
    /// How log lines are written to stderr: `text` (one readable line each) or `json` (one JSON
    /// object per line, a request's id in its `request_id` field, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct Sampling {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: i32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u32,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Speculative decoding: drafts verified several per decode, the output drawn as without.
    #[arg(long, value_enum, default_value_t = SpeculativeKind::Off)]
    speculative: SpeculativeKind,
    /// Most tokens drafted per round with --speculative.
    #[arg(long, default_value_t = 8)]
    draft_max: u32,
    /// The model that drafts for `--speculative draft`: smaller, with the main model's
    /// vocabulary (checked at load).
    #[arg(long)]
    draft_model: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SpeculativeKind {
    /// One decode per token.
    Off,
    /// Prompt lookup: drafts what followed the last few tokens earlier in the prompt or output.
    Ngram,
    /// A draft model (--draft-model) drafts greedily.
    Draft,
}

impl Sampling {
    /// The generation options these flags ask for.
    fn options(&self) -> GenerateOptions {
        GenerateOptions::default().max_tokens(self.max_tokens).stop(self.stop.clone()).sampling(self.params()).speculation(self.speculation())
    }

    fn speculation(&self) -> Speculation {
        match self.speculative {
            SpeculativeKind::Off => Speculation::Off,
            SpeculativeKind::Ngram => Speculation::Ngram { max_draft: self.draft_max },
            SpeculativeKind::Draft => Speculation::Draft { max_draft: self.draft_max },
        }
    }

    fn params(&self) -> SamplingParams {
        SamplingParams::default()
            .temperature(self.temperature)
            .top_k(self.top_k)
            .top_p(self.top_p)
            .min_p(self.min_p)
            .repeat_penalty(self.repeat_penalty)
            .seed(self.seed)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Stream a continuation of a prompt to stdout.
    Generate {
        prompt: String,
        #[command(flatten)]
        sampling: Sampling,
        /// Print the stats as JSON on stderr at the end.
        #[arg(long)]
        stats: bool,
    },
    /// Chat on the terminal (one line per turn; the KV cache is reused between turns).
    Chat {
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Describe the model, the devices and the build.
    Info,
    /// Serve this machine's devices (GPUs, else the CPU) to models loaded elsewhere with --rpc:
    /// ggml's RPC server. It has no authentication: keep it on 127.0.0.1 (the default), a
    /// private network or an SSH tunnel.
    RpcServer {
        /// Address to bind; anything but a loopback address exposes it (a warning says so).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, default_value_t = 50052)]
        port: u16,
        /// Keep tensors clients send, by hash, in DIR: a client that loads the same model again
        /// sends only their hashes.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Run the measurement harness and print JSON.
    Bench(BenchArgs),
    /// Serve an OpenAI-style HTTP API (chat and text completions, streaming) with continuous
    /// batching over --parallel slots.
    Serve(Box<ServeArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// Addresses to bind (comma-separated, e.g. 127.0.0.1,::1: each serves the same routes on
    /// --port). 127.0.0.1 keeps the server to this machine; anything else exposes it.
    #[arg(long, default_value = "127.0.0.1", value_delimiter = ',')]
    host: Vec<std::net::IpAddr>,
    /// Port (0: any free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together (slots sharing one KV cache of --ctx tokens). Default: one
    /// per 1,024 tokens of --ctx, 1 to 16 (4 at the default --ctx of 4096).
    #[arg(long)]
    parallel: Option<u32>,
    /// Requests that may wait for a slot; more are answered 503 at once.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Require `Authorization: Bearer <KEY>` (except on /health). Also read from EXSA_API_KEY.
    #[arg(long, env = "EXSA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Most tokens one decode step takes (prompt chunks included).
    #[arg(long, default_value_t = 512)]
    batch: u32,
    /// Most prompt tokens in a step while other requests generate (each of their next tokens
    /// waits for the step). Default: as many as --batch has room for. A bound trades the long
    /// prompts' time to first token and some throughput for the others' inter-token latency.
    #[arg(long)]
    prefill_chunk: Option<u32>,
    /// Recurrent checkpoints each slot keeps on models whose memory holds a recurrent state
    /// (LFM2, Mamba), taken at the end of each prompt: a chat's next turn returns to one and
    /// decodes only what follows (llama-server's --ctx-checkpoints). 0: none. (A speculating
    /// request holds one more while it runs, the point a rejected round returns to.)
    #[arg(long, default_value_t = exsa_engine::serving::ServingConfig::DEFAULT_CTX_CHECKPOINTS)]
    ctx_checkpoints: u32,
    /// The id of --model in the API (default: the GGUF's file name without extension).
    /// Several, comma-separated, are names requests may use for it (llama-server's --alias):
    /// the first in sort order is its id, as llama-server lists it.
    #[arg(long, value_delimiter = ',')]
    model_id: Vec<String>,
    /// Labels /v1/models lists with --model (comma-separated; llama-server's --tags).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// Also serve every .gguf file in DIR (id: the file name without .gguf), each loaded on
    /// its first request. Without --model, only these are served.
    #[arg(long, value_name = "DIR")]
    models_dir: Option<std::path::PathBuf>,
    /// Models from --models-dir loaded at once, at most; a request for another unloads the one
    /// used longest ago (503 if every one is busy).
    #[arg(long, default_value_t = 1)]
    max_loaded: usize,
    /// Seconds a --models-dir model stays loaded without requests.
    #[arg(long, default_value_t = 300)]
    keep_alive: u64,
    /// Speculation for requests that do not set `speculative`: `ngram` (prompt lookup) or
    /// `off` (a draft model is not served).
    #[arg(long, value_enum, default_value_t = SpeculativeKind::Off)]
    speculative: SpeculativeKind,
    /// Most tokens drafted per round with --speculative ngram.
    #[arg(long, default_value_t = 8)]
    draft_max: u32,
    /// Render chats with llama.cpp's built-in formats instead of the model's Jinja template
    /// (no tools then). Builds without the chat layer (backends crate and raw) always do.
    #[arg(long)]
    no_jinja: bool,
    /// The chat template instead of the model's: a file of Jinja source, Jinja source itself or
    /// `chatml`; with --no-jinja, the name of one of llama.cpp's built-in formats (llama3,
    /// command-r, ...).
    #[arg(long, value_name = "NAME|FILE")]
    chat_template: Option<String>,
    /// The chat template instead of the model's, from a file of Jinja source.
    #[arg(long, value_name = "PATH", conflicts_with = "chat_template")]
    chat_template_file: Option<PathBuf>,
    /// How reasoning text is returned when a request does not say: `auto` splits it into
    /// `reasoning_content` where the template's format has it, `none` leaves it in `content`.
    #[arg(long, default_value = "auto")]
    reasoning_format: exsa_engine::ReasoningFormat,
    /// Temperature of requests that do not set one.
    #[arg(long, default_value_t = SamplingParams::default().temperature)]
    temp: f32,
    /// Sampling seed of requests that do not set one.
    #[arg(long, default_value_t = SamplingParams::default().seed)]
    seed: u32,
    /// Most tokens generated for requests that do not set max_tokens (default: the rest of the
    /// context).
    #[arg(long)]
    n_predict: Option<usize>,
    /// Every response also carries `__verbose`: the prompt as decoded, the settings and timings
    /// (llama-server's debugging aid; a request's `verbose` field overrides it).
    #[arg(long)]
    verbose: bool,
    /// List the slots' states at GET /slots (llama-server's --slots).
    #[arg(long)]
    slots: bool,
    /// Folder of slot state files: POST /slots/{id}?action=save|restore|erase saves a slot's KV
    /// cache to a file there, restores one into a slot, or empties a slot (created if missing;
    /// requests name files in it, never paths).
    #[arg(long, value_name = "DIR")]
    slot_save_path: Option<PathBuf>,
    /// Let web pages of ORIGIN (`scheme://host[:port]`) call the server (CORS; repeatable; `*`:
    /// any page, with a warning). Default: none, and no CORS headers.
    #[arg(long, value_name = "ORIGIN")]
    cors_origin: Vec<String>,
    /// Stop a request that runs longer than SECS, its wait for a slot included, with an error
    /// (504 before its answer starts, an error event in a stream), freeing its slot. Default: no
    /// limit.
    #[arg(long, value_name = "SECS")]
    request_timeout: Option<f64>,
    /// Send an SSE comment on a stream with nothing to send for SECS (proxies close streams
    /// that stay silent, e.g. while a request waits for a slot); 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    sse_keep_alive: f64,
}

#[derive(Args)]
struct BenchArgs {
    /// Tests: ppN, tgN, ppN+tgM, `e2e[N]` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "pp512,tg128")]
    tests: Vec<Test>,
    /// Timed runs of each test in this process.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Skip the untimed warm-up run.
    #[arg(long)]
    no_warmup: bool,
    #[arg(long, default_value_t = 2048)]
    batch: u32,
    #[arg(long, default_value_t = 512)]
    ubatch: u32,
    /// Also report the greedy token ids of a fixed prompt (the equivalence check).
    #[arg(long, default_value_t = 0)]
    greedy_tokens: usize,
    /// Run no timed test: only the equivalence check (with --greedy-tokens).
    #[arg(long)]
    greedy_only: bool,
    /// Print what each task test of --tests runs (chat prompt, sampling; one JSON line each)
    /// and time nothing: for reference programs that run the same tasks.
    #[arg(long)]
    task_setup: bool,
}

fn main() {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = read_repeated_globals(&matches, &mut cli.common) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let (log, own) = (&cli.common.log, &cli.common.server_log);
    // llama.cpp's lines: target `llama_cpp` (ours), `llama-cpp-2` (the crate baseline's, whose
    // callsites name the crate, dashes included).
    let filter = format!("warn,exsa_engine={own},exsa={own},llama_cpp={log},llama-cpp-2={log}");
    // Colour only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match cli.common.log_format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        // The request's span (its id) as fields of each line, not as a list of every span.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    // The filter only narrows what reaches it; the bindings drop lines below their own level first.
    match log.parse::<LogLevel>() {
        Ok(level) => set_llama_log_level(level),
        Err(e) => {
            eprintln!("error: --log: {e}");
            std::process::exit(2);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn session_config(common: &Common) -> Result<SessionConfig, EngineError> {
    let mut config = SessionConfig::default()
        .n_ctx(common.ctx)
        .pooling(common.pooling)
        .cache_type_k(common.cache_type_k)
        .cache_type_v(common.cache_type_v)
        .recurrent_snapshots(common.recurrent_snapshots);
    if let Some(t) = common.threads {
        config.n_threads = t;
        config.n_threads_batch = t;
    }
    config.flash_attention = common.flash_attn.parse()?;
    Ok(config)
}

fn load(common: &Common, session: SessionConfig) -> Result<Engine, EngineError> {
    load_with_draft(common, session, None)
}

fn load_with_draft(common: &Common, session: SessionConfig, draft_model: Option<PathBuf>) -> Result<Engine, EngineError> {
    let model = common.model.clone().unwrap_or_else(exsa_engine::default_model_path);
    let mut config = engine_config(common, session, model)?;
    config.draft_model = draft_model;
    Engine::load(config)
}

/// A `--lora PATH` or a `--lora-scaled PATH SCALE`.
#[derive(Clone, Debug, PartialEq)]
enum AdapterOption {
    Plain(PathBuf),
    Scaled(String, String),
}

/// Each occurrence of the global option `id`, with its position in the command line and its
/// values, in the command line's order. Read from every level of the matches, since clap keeps
/// a global option's values given after the command in the command's matches only (and the
/// ones before in the top level's); an occurrence seen at both levels (propagated) is counted
/// once, by its position.
fn occurrences<T: Clone + Send + Sync + 'static>(matches: &ArgMatches, id: &str) -> Vec<(usize, Vec<T>)> {
    let mut found = Vec::new();
    let mut level = Some(matches);
    while let Some(m) = level {
        if let (Ok(Some(each)), Some(mut at)) = (m.try_get_occurrences::<T>(id), m.indices_of(id)) {
            for values in each {
                let values: Vec<T> = values.cloned().collect();
                // One index per value (a delimited list's too): the first one stands for the
                // occurrence.
                let first = at.next();
                at.by_ref().take(values.len().saturating_sub(1)).for_each(drop);
                found.extend(first.map(|first| (first, values)));
            }
        }
        level = m.subcommand().map(|(_, sub)| sub);
    }
    found.sort_by_key(|(at, _)| *at);
    found.dedup_by_key(|(at, _)| *at);
    found
}

/// Reads the repeatable global options (`--lora`, `--lora-scaled`, `--rpc`, `--tensor-split`)
/// from both sides of the command, in the command line's order: adapter ids follow the order of
/// `--lora` and `--lora-scaled` together, as llama-server numbers them (requests name adapters
/// by id).
///
/// # Errors
///
/// An option given both before and after the command: clap keeps one side's values only, so
/// the other side's would be dropped without a word.
fn read_repeated_globals(matches: &ArgMatches, common: &mut Common) -> Result<(), String> {
    let plain = occurrences::<PathBuf>(matches, "lora");
    let scaled = occurrences::<String>(matches, "lora_scaled");
    let rpc = occurrences::<String>(matches, "rpc");
    let tensor_split = occurrences::<f32>(matches, "tensor_split");
    let argv: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    for (flag, read) in [("--lora", plain.len()), ("--lora-scaled", scaled.len()), ("--rpc", rpc.len()), ("--tensor-split", tensor_split.len())] {
        let given = count_option(&argv, flag);
        if given > read {
            return Err(format!("{flag}: give every one before the command or every one after it ({given} given, {read} read)"));
        }
    }
    let mut adapters: Vec<(usize, AdapterOption)> =
        plain.into_iter().filter_map(|(at, paths)| Some((at, AdapterOption::Plain(paths.into_iter().next()?)))).collect();
    adapters.extend(scaled.into_iter().filter_map(|(at, v)| match <[String; 2]>::try_from(v) {
        Ok([path, scale]) => Some((at, AdapterOption::Scaled(path, scale))),
        Err(_) => None,
    }));
    adapters.sort_by_key(|(at, _)| *at);
    common.adapters = adapters.into_iter().map(|(_, adapter)| adapter).collect();
    common.rpc = rpc.into_iter().flat_map(|(_, v)| v).collect();
    common.tensor_split = tensor_split.into_iter().flat_map(|(_, v)| v).collect();
    Ok(())
}

/// How many times the option `flag` occurs in `args` (up to a `--`, after which nothing is an
/// option).
fn count_option(args: &[String], flag: &str) -> usize {
    args.iter().take_while(|a| *a != "--").filter(|a| *a == flag || a.strip_prefix(flag).is_some_and(|rest| rest.starts_with('='))).count()
}

/// The engine configuration the common options describe, its adapters in the command line's
/// order (their ids); a `--lora-scaled` scale that is no number is an error naming the option.
fn engine_config(common: &Common, session: SessionConfig, model: PathBuf) -> Result<EngineConfig, EngineError> {
    let placement = Placement::default().n_gpu_layers(common.gpu_layers).rpc_servers(common.rpc.clone()).tensor_split(common.tensor_split.clone());
    let mut lora = Vec::with_capacity(common.adapters.len());
    for adapter in &common.adapters {
        lora.push(match adapter {
            AdapterOption::Plain(path) => LoraConfig::new(path),
            AdapterOption::Scaled(path, scale) => {
                let scale = scale.parse::<f32>().map_err(|_| EngineError::InvalidConfig {
                    field: "lora_scaled",
                    value: scale.clone(),
                    reason: "the scale after the adapter's path must be a number",
                })?;
                LoraConfig::new(path).scale(scale)
            }
        });
    }
    if common.lora_init_without_apply {
        lora.iter_mut().for_each(|adapter| adapter.scale = 0.0);
    }
    let load = LoadOptions::default().mmap(!common.no_mmap).mlock(common.mlock);
    Ok(EngineConfig::new(model).session(session).placement(placement).lora(lora).load(load))
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let session = session_config(&cli.common)?;
    match cli.command {
        Command::Serve(args) => serve(&cli.common, session, *args)?,
        Command::Generate { prompt, sampling, stats } => {
            let engine = load_with_draft(&cli.common, session, sampling.draft_model.clone())?;
            let mut s = engine.session()?;
            let mut generation = s.generate(&GenerateRequest::new(prompt).with(sampling.options()))?;
            let mut out = std::io::stdout().lock();
            while let Some(delta) = generation.next_text() {
                out.write_all(delta?.as_bytes())?;
                out.flush()?;
            }
            writeln!(out)?;
            if stats {
                eprintln!("{}", serde_json::to_string(generation.stats())?);
            }
        }
        Command::Chat { system, sampling } => {
            let engine = load_with_draft(&cli.common, session, sampling.draft_model.clone())?;
            let mut s = engine.session()?;
            let mut history: Vec<ChatMessage> = system.into_iter().map(|c| ChatMessage::new("system", c)).collect();
            let stdin = std::io::stdin();
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 {
                    break;
                }
                history.push(ChatMessage::new("user", line.trim()));
                let mut reply = String::new();
                let mut generation = s.chat(&history, sampling.options())?;
                while let Some(delta) = generation.next_text() {
                    let delta = delta?;
                    print!("{delta}");
                    std::io::stdout().flush()?;
                    reply.push_str(delta);
                }
                let st = generation.stats().clone();
                println!();
                eprintln!(
                    "[{} tokens, {:.1} t/s, {} prompt tokens reused]",
                    st.completion_tokens, st.generation_tokens_per_s, st.prompt_tokens_reused
                );
                history.push(ChatMessage::new("assistant", reply));
            }
        }
        Command::RpcServer { host, port, cache } => {
            let endpoint = std::net::SocketAddr::new(host, port).to_string();
            if !host.is_loopback() {
                eprintln!(
                    "warning: the RPC protocol has no authentication; on {host} anyone who reaches port {port} can run code on this machine's devices and read their memory (use a private network or an SSH tunnel)"
                );
            }
            let threads = session.n_threads.max(1) as usize;
            return Err(Engine::serve_rpc(&endpoint, cache.as_deref(), threads).into());
        }
        Command::Info => {
            let engine = load(&cli.common, session)?;
            let info = serde_json::json!({
                "backend": Engine::backend_name(),
                "model": engine.model_info(),
                "chat_template": engine.chat_template(),
                "system_info": Engine::system_info(),
                "build_info": Engine::build_info(),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Command::Bench(args) => {
            let session = session.n_batch(args.batch).n_ubatch(args.ubatch);
            let engine = load(&cli.common, session.clone())?;
            if args.task_setup {
                for test in args.tests.iter().filter(|t| matches!(t, Test::Task(..))) {
                    println!("{}", serde_json::to_string(&harness::task_setup(&engine, *test)?)?);
                }
                return Ok(());
            }
            let tests = if args.greedy_only { Vec::new() } else { args.tests.clone() };
            if !args.no_warmup && !tests.is_empty() {
                // llama-bench's warm-up: one short prompt and one token, untimed.
                harness::run(&engine, &session, Test::PromptGenerate(16, 1))?;
            }
            let mut samples = Vec::new();
            for _ in 0..args.reps {
                for test in &tests {
                    samples.push(harness::run(&engine, &session, *test)?);
                }
            }
            let greedy = if args.greedy_tokens > 0 {
                Some(harness::greedy_trace(&engine, &session, harness::EQUIVALENCE_PROMPT, args.greedy_tokens)?)
            } else {
                None
            };
            let report = harness::BenchReport {
                backend: Engine::backend_name().into(),
                model: engine.model_info().into(),
                threads: session.n_threads,
                n_batch: session.n_batch,
                n_ubatch: session.n_ubatch,
                flash_attn: cli.common.flash_attn.clone(),
                samples,
                greedy,
                system_info: Engine::system_info(),
                build_info: serde_json::to_value(Engine::build_info())?,
            };
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

fn serve(common: &Common, session: SessionConfig, args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    use exsa_engine::http::{self, ModelPolicy, ModelSource, ServerConfig};

    let mut sources = Vec::new();
    // --model (or the default model) unless only a directory was given.
    if common.model.is_some() || args.models_dir.is_none() {
        let path = common.model.clone().unwrap_or_else(exsa_engine::default_model_path);
        let mut aliases = args.model_id.clone();
        aliases.sort();
        aliases.dedup();
        let id = aliases.first().cloned().unwrap_or_else(|| path.file_stem().map_or("default".into(), |s| s.to_string_lossy().into_owned()));
        sources.push(ModelSource { aliases, tags: args.tags.clone(), ..ModelSource::new(id, path, true) });
    }
    if let Some(dir) = &args.models_dir {
        let found = ModelSource::scan(dir).map_err(|e| format!("--models-dir {}: {e}", dir.display()))?;
        if found.is_empty() && sources.is_empty() {
            return Err(format!("--models-dir {}: no .gguf files in it", dir.display()).into());
        }
        sources.extend(found);
    }
    if args.max_loaded == 0 {
        return Err("--max-loaded must be at least 1".into());
    }
    let session = session.n_batch(args.batch).n_ubatch(args.batch.min(512));
    let engine = engine_config(common, session, PathBuf::new())?.chat_templating(chat_templating(&args)?);
    let policy = ModelPolicy {
        engine,
        slots: args.parallel.unwrap_or_else(|| exsa_engine::serving::ServingConfig::default_slots(common.ctx)),
        max_queue: args.max_queue,
        prefill_chunk: args.prefill_chunk,
        ctx_checkpoints: args.ctx_checkpoints,
        max_loaded: args.max_loaded,
        keep_alive: std::time::Duration::from_secs(args.keep_alive),
    };
    let speculation = match args.speculative {
        SpeculativeKind::Off => Speculation::Off,
        SpeculativeKind::Ngram => Speculation::Ngram { max_draft: args.draft_max },
        SpeculativeKind::Draft => {
            return Err(
                "exsa serve drafts by prompt lookup: use --speculative ngram or off (a draft model is for `exsa generate --draft-model`)".into()
            );
        }
    };
    GenerateOptions::default().speculation(speculation).validate()?;
    if let Some(dir) = &args.slot_save_path {
        std::fs::create_dir_all(dir).map_err(|e| format!("--slot-save-path {}: {e}", dir.display()))?;
    }
    let config = ServerConfig {
        addrs: args.host.iter().map(|&host| (host, args.port).into()).collect(),
        api_key: args.api_key,
        max_body_bytes: args.max_body,
        speculation,
        reasoning_format: args.reasoning_format,
        sampling: SamplingParams::default().temperature(args.temp).seed(args.seed),
        max_tokens: args.n_predict,
        verbose: args.verbose,
        slots_endpoint: args.slots,
        slot_save_path: args.slot_save_path,
        cors_origins: args.cors_origin,
        request_timeout: match args.request_timeout.map(|s| seconds("--request-timeout", s)).transpose()? {
            Some(d) if d.is_zero() => return Err("--request-timeout 0 would stop every request: leave it out for no limit".into()),
            limit => limit,
        },
        sse_keep_alive: Some(seconds("--sse-keep-alive", args.sse_keep_alive)?).filter(|d| !d.is_zero()),
    };
    // A refused CPU variant would fail every model load to come: said now, once.
    let build_info = Engine::build_info();
    if let Some(line) = cpu_variant(&build_info)? {
        tracing::info!("{line}");
    }
    for line in other_backend_modules(&build_info) {
        tracing::info!("{line}");
    }
    http::run(sources, policy, config, |addr| {
        // One line on stdout per address, for scripts (and tests) that ask for port 0. A reader
        // that took the first and went away is no reason to stop.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })?;
    Ok(())
}

/// What CPU code a dynamic-backend build (a bundle) runs, and why, in one line; None in a static
/// build (its CPU code is the build machine's). An error where the choice was refused.
fn cpu_variant(info: &BuildInfo) -> Result<Option<String>, String> {
    let Some(cpu) = info.details.get("cpu_variant") else { return Ok(None) };
    if let Some(refused) = cpu["refused"].as_str() {
        return Err(refused.to_owned());
    }
    let Some(variant) = cpu["variant"].as_str() else { return Ok(None) };
    let features: Vec<&str> = cpu["cpu_features"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).collect();
    Ok(Some(format!(
        "CPU variant {} (by {}; this CPU has {}), from {}",
        if variant.is_empty() { "(libggml-cpu)" } else { variant },
        cpu["chosen_by"].as_str().unwrap_or("?"),
        features.join(" "),
        cpu["file"].as_str().unwrap_or("?")
    )))
}

/// One line per backend module other than the CPU's in a dynamic-backend build (a bundle's
/// CUDA module): loaded, or not and why, so that a machine without the CUDA runtime says why it
/// runs on the CPU.
fn other_backend_modules(info: &BuildInfo) -> Vec<String> {
    let Some(modules) = info.details.get("other_backend_modules").and_then(|m| m.as_array()) else { return Vec::new() };
    modules
        .iter()
        .map(|m| {
            let (backend, file) = (m["backend"].as_str().unwrap_or("?"), m["file"].as_str().unwrap_or("?"));
            match m["error"].as_str() {
                None => format!("backend {backend}: loaded {file}"),
                Some(error) => format!("backend {backend}: not loaded ({error})"),
            }
        })
        .collect()
}

/// `secs` of the flag `flag` as a duration: finite and not negative.
fn seconds(flag: &str, secs: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| format!("{flag} {secs}: not a number of seconds"))
}

/// How the server renders chats: the model's Jinja template (or the override) where the build has
/// the chat layer, unless --no-jinja.
fn chat_templating(args: &ServeArgs) -> Result<ChatTemplating, Box<dyn std::error::Error>> {
    let jinja = !args.no_jinja && Engine::has_jinja();
    let override_source = match (&args.chat_template, &args.chat_template_file) {
        (Some(value), _) if std::path::Path::new(value).is_file() => Some(read_template(std::path::Path::new(value))?),
        // Without Jinja, a name is one of llama.cpp's built-in formats (as llama-server takes it).
        (Some(name), _) if !jinja => return Ok(ChatTemplating::Named(name.clone())),
        // With Jinja, anything else is the template's source (`chatml` names ChatML).
        (Some(value), _) => Some(value.clone()),
        (None, Some(path)) => Some(read_template(path)?),
        (None, None) => None,
    };
    if !jinja {
        if override_source.is_some() {
            return Err("--chat-template-file needs Jinja templates (backend source, without --no-jinja)".into());
        }
        return Ok(ChatTemplating::Builtin);
    }
    Ok(ChatTemplating::Jinja { override_source })
}

fn read_template(path: &std::path::Path) -> Result<String, Box<dyn std::error::Error>> {
    std::fs::read_to_string(path).map_err(|e| format!("chat template {}: {e}", path.display()).into())
}
