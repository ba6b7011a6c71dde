//! The engine: a loaded model that prepares requests and makes sessions ([`Session`],
//! `session.rs`), which run streaming generations ([`Generation`], `generation.rs`) through the
//! scheduler that serves the server's requests too.

mod generation;
mod session;

use std::time::Instant;

use crate::backend::{Active, Backend, BackendModel, BackendSession, ModelInfo, SamplerOf, Token};
use crate::chat::{ChatMessage, ChatOptions, Continuation};
use crate::config::{ChatTemplating, EngineConfig, GenerateOptions, GenerateRequest, Prompt, SessionConfig, SpecialText};
use crate::error::EngineError;
use crate::outcome::GenerationStats;
use crate::scheduler::{AdapterPlan, DraftModel, Prepared};
use crate::templates::{JinjaTemplates, RenderedChat, ReplyParser};

pub use generation::Generation;
pub use session::{Session, SessionState};

pub(crate) type Model = <Active as Backend>::Model;
/// The sampler type of the engine's backend.
pub(crate) type Sampler<'m> = SamplerOf<'m, Model>;

/// A loaded model, ready to make sessions.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    config: EngineConfig,
    /// Resolved once at load: every chat request uses it.
    chat_template: String,
    /// The model's Jinja templates, with [`ChatTemplating::Jinja`].
    templates: Option<JinjaTemplates>,
    /// The model that drafts for [`crate::Speculation::Draft`], its vocabulary checked.
    draft: Option<Box<Engine>>,
}

/// How much of llama.cpp's own log reaches `tracing` (default: warnings and errors), for every
/// backend; `tracing`'s filters apply on top.
pub fn set_llama_log_level(level: crate::backend::LogLevel) {
    <crate::backend::Active as crate::backend::Backend>::set_llama_log_level(level);
}

/// Texts embedded in one decode at most (each its own sequence of the context).
const MAX_EMBEDDED_TOGETHER: usize = 64;

/// `texts` in order, cut into groups that fit one decode: at most `n_batch` tokens and
/// `max_seqs` texts each.
fn batches(texts: &[Vec<Token>], n_batch: usize, max_seqs: usize) -> Vec<&[Vec<Token>]> {
    let mut groups = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, text) in texts.iter().enumerate() {
        if i > start && (tokens + text.len() > n_batch || i - start == max_seqs) {
            groups.push(&texts[start..i]);
            (start, tokens) = (i, 0);
        }
        tokens += text.len();
    }
    if start < texts.len() {
        groups.push(&texts[start..]);
    }
    groups
}

impl Engine {
    /// Loads the model named in `config`, read as [`EngineConfig::load`] says, then its LoRA
    /// adapters ([`EngineConfig::lora`]) and its draft model.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidConfig`] naming a bad session parameter (`lora_scales` of another
    /// length than `lora`, too), a LoRA scale that is not finite or an unknown chat format;
    /// [`EngineError::Load`] when the model cannot be loaded or the progress callback cancelled
    /// the load; [`EngineError::Lora`] naming an adapter that is missing or not made for the
    /// model; [`EngineError::DraftModel`] when the draft model cannot draft for it;
    /// [`EngineError::Unsupported`] for what the backend lacks (rpc-servers outside backend
    /// `source`, more than one adapter on backend `crate`).
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        config.session.validate()?;
        config.session.lora_scales_for(&config.adapter_scales()?)?;
        let model = Active::load(&config)?;
        let chat_template = match &config.chat_templating {
            ChatTemplating::Named(name) => {
                // An unknown name fails here, not at the first chat.
                model.apply_chat_template(name, &[("user".to_owned(), "hi".to_owned())]).map_err(|_| EngineError::InvalidConfig {
                    field: "chat_templating",
                    value: name.clone(),
                    reason: "not a chat format llama.cpp has built in",
                })?;
                name.clone()
            }
            _ => chat_template_for(&model, config.chat_template_fallback.as_deref()),
        };
        let templates = match &config.chat_templating {
            ChatTemplating::Builtin | ChatTemplating::Named(_) => None,
            ChatTemplating::Jinja { override_source } => {
                // A model without a template of its own gets its architecture's, as Jinja.
                let source = override_source.clone().or_else(|| model.chat_template().is_none().then(|| fallback_template(&model).jinja.to_owned()));
                Some(JinjaTemplates::load(&model, source.as_deref())?)
            }
        };
        let draft = match &config.draft_model {
            Some(path) => {
                // The draft model only drafts tokens: it renders no chat, and the adapters are
                // the main model's.
                let draft_config = EngineConfig {
                    model: path.clone(),
                    draft_model: None,
                    chat_templating: ChatTemplating::Builtin,
                    lora: Vec::new(),
                    session: SessionConfig { lora_scales: None, ..config.session.clone() },
                    ..config.clone()
                };
                let draft = Engine::load(draft_config)?;
                if let Some(reason) = vocabulary_difference(&model, &draft.model)? {
                    return Err(EngineError::DraftModel { path: path.clone(), reason });
                }
                Some(Box::new(draft))
            }
            None => None,
        };
        Ok(Engine { model, config, chat_template, templates, draft })
    }

    /// The draft model's engine, when one was loaded.
    pub fn draft(&self) -> Option<&Engine> {
        self.draft.as_deref()
    }

    /// A context of the draft model for a scheduler whose sessions hold `n_ctx` tokens (greedy,
    /// one sequence, the draft model's other settings); None without a draft model.
    pub(crate) fn draft_context(&self, n_ctx: u32) -> Option<Result<DraftModel<'_, Model>, EngineError>> {
        let draft = self.draft()?;
        let config = SessionConfig { n_ctx, ..draft.session_config().clone() };
        Some(DraftModel::new(draft.model(), &config))
    }

    /// The backend this build runs on: `source`, `crate` or `raw`.
    pub fn backend_name() -> &'static str {
        Active::NAME
    }

    /// Whether this build renders chats by their Jinja templates ([`ChatTemplating::Jinja`]):
    /// backend `source` with feature `jinja`.
    pub fn has_jinja() -> bool {
        cfg!(all(feature = "source", feature = "jinja"))
    }

    /// How llama.cpp was built for this program: the backend, the llama.cpp tree, and in
    /// [`BuildInfo::details`](crate::BuildInfo::details) the flags and the CPU variant a dynamic build chose.
    pub fn build_info() -> crate::BuildInfo {
        Active::build_info()
    }

    /// Serves this process's devices (GPUs, else the CPU with `threads` threads) as a ggml
    /// rpc-server on `endpoint` (`HOST:PORT`), for models loaded elsewhere with
    /// [`crate::Placement::rpc_servers`]. Runs until the process ends; returns only the reason it
    /// could not serve. The protocol has no authentication: see `llama::rpc`.
    pub fn serve_rpc(endpoint: &str, cache_dir: Option<&std::path::Path>, threads: usize) -> EngineError {
        Active::serve_rpc(endpoint, cache_dir, threads)
    }

    /// llama.cpp's one-line system report (the CPU features and backends it uses).
    pub fn system_info() -> String {
        Active::system_info()
    }

    /// The model's description: its file, architecture, size and shape.
    pub fn model_info(&self) -> ModelInfo {
        self.model.info()
    }

    /// The bytes of a token's text (special tokens render as empty), for token-level output
    /// such as log-probabilities.
    pub fn token_bytes(&self, token: Token) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::new();
        self.model.piece(token, false, &mut out)?;
        Ok(out)
    }

    /// The text of `tokens` with control tokens written out (`<bos>`, `<start_of_turn>`, ...), as
    /// llama-server shows a prompt; invalid UTF-8 (a character cut between tokens) replaced.
    pub fn tokens_to_text_with_specials(&self, tokens: &[Token]) -> Result<String, EngineError> {
        let mut out = Vec::new();
        for &t in tokens {
            self.model.piece(t, true, &mut out)?;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The vocabulary's fill-in-the-middle tokens (code models have them).
    pub fn fim_tokens(&self) -> crate::FimTokens {
        self.model.fim_tokens()
    }

    /// The context parameters sessions get by default.
    pub fn session_config(&self) -> &SessionConfig {
        &self.config.session
    }

    /// The LoRA adapters loaded with the model, in order, with the scales they were configured
    /// with ([`EngineConfig::lora`]).
    pub fn lora(&self) -> &[crate::LoraConfig] {
        &self.config.lora
    }

    /// Refuses token ids outside this model's vocabulary: [`EngineError::InvalidRequest`]
    /// naming `field` and the first such id.
    fn check_in_vocab(&self, tokens: &[Token], field: &'static str) -> Result<(), EngineError> {
        let n_vocab = self.model.n_vocab();
        match tokens.iter().find(|t| !t.in_vocab(n_vocab)) {
            Some(bad) => Err(EngineError::InvalidRequest { field, value: bad.to_string(), reason: "is not a token of this model" }),
            None => Ok(()),
        }
    }

    /// A metadata value of the file of LoRA adapter `adapter` (an index of [`Engine::lora`]), as
    /// text: llama-server lists `adapter.lora.task_name` and `adapter.lora.prompt_prefix`. None
    /// for a key the file lacks, an index past the adapters, or on backend `crate` (which reads
    /// no adapter metadata).
    pub fn lora_meta(&self, adapter: usize, key: &str) -> Option<String> {
        self.model.adapter_meta(adapter, key)
    }

    /// The invocation tokens of LoRA adapter `adapter` (an index of [`Engine::lora`]) where it is
    /// an activated LoRA (aLoRA): a request that enables it decodes its prompt without it up to
    /// the token before the last place these tokens occur, and from there on (the generation
    /// too) with it, as llama-server does; without them in the prompt it does not apply. A
    /// request may enable one such adapter (beside plain ones). Empty for a plain adapter, an
    /// index past the adapters, and on backend `crate` (which cannot read them, and applies such
    /// an adapter to every token).
    pub fn lora_invocation(&self, adapter: usize) -> &[Token] {
        self.model.adapter_invocation(adapter)
    }

    /// Checks scales to apply the engine's LoRA adapters with: one per adapter, each finite.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidRequest`] naming `lora_scales`.
    pub(crate) fn check_adapter_scales(&self, scales: &[f32]) -> Result<(), EngineError> {
        let bad = |reason| Err(EngineError::InvalidRequest { field: "lora_scales", value: format!("{scales:?}"), reason });
        if scales.len() != self.config.lora.len() {
            return bad("needs one scale per LoRA adapter of the engine (EngineConfig::lora)");
        }
        if !scales.iter().all(|s| s.is_finite()) {
            return bad("LoRA scales must be finite");
        }
        Ok(())
    }

    /// The adapter scales a session of `config` is made with (the scales of requests that set
    /// none; see [`crate::GenerateOptions::lora_scales`]).
    pub(crate) fn session_adapter_scales(&self, config: &SessionConfig) -> Result<Vec<f32>, EngineError> {
        Ok(config.lora_scales_for(&self.config.adapter_scales()?)?.to_vec())
    }

    /// A session with the engine's default context parameters.
    pub fn session(&self) -> Result<Session<'_>, EngineError> {
        self.session_with(&self.config.session)
    }

    /// A session with `config`'s context parameters.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] naming a bad parameter, or [`EngineError::Session`] when
    /// llama.cpp cannot make the context (out of memory, a size it refuses).
    pub fn session_with(&self, config: &SessionConfig) -> Result<Session<'_>, EngineError> {
        Session::new(self, config)
    }

    /// One-shot generation to a string, in a fresh session.
    pub fn generate(&self, request: &GenerateRequest) -> Result<(String, GenerationStats), EngineError> {
        self.session()?.generate_text(request)
    }

    /// How this engine's embeddings pool a text's token vectors: the session config's choice
    /// (`--pooling`), else what the model's file says (`<arch>.pooling_type`), else mean (a
    /// generative model's file says nothing).
    pub fn pooling(&self) -> crate::Pooling {
        let declared = || {
            let arch = self.model.info().architecture;
            self.model.meta(&format!("{arch}.pooling_type")).and_then(|v| v.trim().parse().ok()).and_then(crate::Pooling::from_gguf)
        };
        self.config.session.pooling.or_else(declared).unwrap_or(crate::Pooling::Mean)
    }

    /// A metadata value of the model's file, as text (`general.file_type`, `<arch>.pooling_type`).
    pub fn meta(&self, key: &str) -> Option<String> {
        self.model.meta(key)
    }

    /// The embedding of `text`, pooled as [`Engine::pooling`] says (see [`Engine::embed_many`]),
    /// as llama.cpp gives it: not normalised ([`crate::l2_normalize`] it to compare by cosine).
    ///
    /// # Errors
    ///
    /// As [`Engine::embed_many`].
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let mut one = self.embed_many(&[text])?;
        Ok(one.pop().unwrap_or_default())
    }

    /// Each text's embedding, pooled as [`Engine::pooling`] says (a reranker's: its scores).
    /// Texts are decoded together, as many per decode as fit one batch (n_batch tokens), each
    /// in a sequence of its own. Each text
    /// must fit one batch (pooling covers one decode, so a longer text would be pooled over its
    /// last part only).
    ///
    /// The vectors are llama.cpp's pooled output, not normalised: for cosine similarity (what
    /// OpenAI's and Ollama's embeddings, which `exsa serve` normalises, are compared by), scale
    /// each with [`crate::l2_normalize`] and compare by dot product.
    ///
    /// # Errors
    ///
    /// [`EngineError::EmptyPrompt`] for a text with no tokens, [`EngineError::EmbedTooLong`] for
    /// one longer than a batch; [`EngineError::InvalidConfig`] for a bad session parameter;
    /// [`EngineError::Tokenize`], [`EngineError::Session`] or [`EngineError::Decode`] when
    /// llama.cpp fails.
    pub fn embed_many(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.embed_many_with(texts, &crate::EmbedOptions::default())
    }

    /// [`Engine::embed_many`] with `options` (e.g. other LoRA adapter scales).
    ///
    /// # Errors
    ///
    /// As [`Engine::embed_many`]; [`EngineError::InvalidRequest`] naming `lora_scales` for
    /// scales that are not one finite number per adapter, or that enable an activated LoRA
    /// whose invocation occurs in a text (or two such adapters: see [`Engine::lora_invocation`]).
    pub fn embed_many_with(&self, texts: &[&str], options: &crate::EmbedOptions) -> Result<Vec<Vec<f32>>, EngineError> {
        let tokenized = texts.iter().map(|text| self.embedding_tokens(text)).collect::<Result<Vec<_>, _>>()?;
        self.embed_tokens(&tokenized, options)
    }

    /// A text to embed as [`Engine::embed_many`] tokenizes it: BOS where the model wants one,
    /// control-token text left as text.
    pub(crate) fn embedding_tokens(&self, text: &str) -> Result<Vec<Token>, EngineError> {
        self.tokenize(text, TokenizeOptions::default())
    }

    /// [`Engine::embed_many_with`] of texts already tokenized (as [`Engine::tokenize`] gives
    /// them, or token ids from elsewhere): each list's embedding.
    ///
    /// # Errors
    ///
    /// As [`Engine::embed_many_with`]; [`EngineError::InvalidRequest`] naming `tokens` for an
    /// id that is not a token of this model, or naming `pooling` for an engine that pools none
    /// ([`crate::Pooling::None`]: see [`Engine::token_embeddings`]).
    pub fn embed_tokens(&self, inputs: &[Vec<Token>], options: &crate::EmbedOptions) -> Result<Vec<Vec<f32>>, EngineError> {
        let pooling = self.pooling();
        if pooling == crate::Pooling::None {
            return Err(EngineError::InvalidRequest {
                field: "pooling",
                value: "none".into(),
                reason: "gives a vector per token, not per text: see Engine::token_embeddings",
            });
        }
        let rows = self.embedding_rows(inputs, options, pooling)?;
        Ok(rows.into_iter().map(|mut one| one.pop().unwrap_or_default()).collect())
    }

    /// Each token's embedding, for each list of tokens (as [`Engine::tokenize`] gives them):
    /// llama.cpp's output for the token, pooled with nothing and not normalised (llama-server's
    /// `--pooling none`), whatever [`Engine::pooling`] says. Decoded as [`Engine::embed_many`]
    /// decodes texts.
    ///
    /// # Errors
    ///
    /// As [`Engine::embed_tokens`].
    pub fn token_embeddings(&self, inputs: &[Vec<Token>], options: &crate::EmbedOptions) -> Result<Vec<Vec<Vec<f32>>>, EngineError> {
        self.embedding_rows(inputs, options, crate::Pooling::None)
    }

    /// A reranker's relevance score of each document for `query` (a model whose pooling is
    /// rank), one [`RerankScore`](crate::RerankScore) per document in the documents' order
    /// (higher is more relevant; sort them to rank), with the length of the pair's prompt in
    /// tokens. Each pair is the prompt
    /// llama-server builds: the model's `rerank` template with `{query}` and `{document}`
    /// filled in, else `[BOS] query [EOS] [SEP] document [EOS]` (each special token where the
    /// vocabulary adds it). The pairs are decoded together as embeddings are.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidRequest`] naming `model` when the model is no reranker; as
    /// [`Engine::embed_many`] otherwise (a pair longer than a batch: [`EngineError::EmbedTooLong`]);
    /// [`EngineError::Unsupported`] on backend `crate`.
    pub fn rerank(&self, query: &str, documents: &[&str]) -> Result<Vec<crate::RerankScore>, EngineError> {
        self.rerank_with(query, documents, &crate::EmbedOptions::default())
    }

    /// [`Engine::rerank`] with `options` (e.g. other LoRA adapter scales).
    ///
    /// # Errors
    ///
    /// As [`Engine::rerank`] and [`Engine::embed_many_with`].
    pub fn rerank_with(&self, query: &str, documents: &[&str], options: &crate::EmbedOptions) -> Result<Vec<crate::RerankScore>, EngineError> {
        if self.pooling() != crate::Pooling::Rank {
            return Err(EngineError::InvalidRequest {
                field: "model",
                value: self.model.info().architecture,
                reason: "is not a reranker (its pooling is not rank; a reranker's GGUF says so, or --pooling rank)",
            });
        }
        let template = self.model.named_template("rerank");
        let pair = self.model.pair_tokens();
        let mut prompts = Vec::with_capacity(documents.len());
        for document in documents {
            let mut tokens = Vec::new();
            match &template {
                Some(t) => {
                    let text = t.replace("{query}", query).replace("{document}", document);
                    self.model.tokenize(&text, false, true, &mut tokens)?;
                }
                None => {
                    // (`tokenize` replaces what its output holds.)
                    let (mut q, mut d) = (Vec::new(), Vec::new());
                    self.model.tokenize(query, false, false, &mut q)?;
                    self.model.tokenize(document, false, false, &mut d)?;
                    tokens.extend(pair.bos);
                    tokens.extend(q);
                    tokens.extend(pair.eos);
                    tokens.extend(pair.sep);
                    tokens.extend(d);
                    tokens.extend(pair.eos);
                }
            }
            prompts.push(tokens);
        }
        let scores = self.embed_tokens(&prompts, options)?;
        Ok(scores
            .into_iter()
            .zip(&prompts)
            .map(|(s, p)| crate::RerankScore { score: s.first().copied().unwrap_or(f32::NAN), tokens: p.len() })
            .collect())
    }

    /// The LoRA adapter scales embeddings of `texts` decode with: `options`', else the session's.
    /// An activated LoRA applies from its invocation on, which one decode of whole texts with
    /// one set of adapters cannot do: it is left out where no text holds its invocation (as for
    /// a prompt without it), and the request is refused where one does.
    fn embedding_scales(&self, texts: &[Vec<Token>], options: &crate::EmbedOptions) -> Result<Vec<f32>, EngineError> {
        let scales = match &options.lora_scales {
            Some(scales) => {
                self.check_adapter_scales(scales)?;
                scales.clone()
            }
            None => self.session_adapter_scales(&self.config.session)?,
        };
        let plan = |tokens: &[Token]| AdapterPlan::for_model(scales.clone(), tokens, &self.model);
        // What a text without an invocation gets: every activated LoRA left out.
        let without = plan(&[])?;
        for tokens in texts {
            if plan(tokens)? != without {
                return Err(EngineError::InvalidRequest {
                    field: "lora_scales",
                    value: format!("{scales:?}"),
                    reason: "enables an activated LoRA (aLoRA) whose invocation occurs in a text to embed: it would apply from there on, which embeddings cannot do (they decode a text with one set of adapters)",
                });
            }
        }
        Ok(without.base().to_vec())
    }

    /// Each token list's rows from an embedding context of `pooling`: its pooled row, or with
    /// [`crate::Pooling::None`] a row per token. Lists that are empty, longer than a batch or
    /// hold an id outside the vocabulary are refused.
    fn embedding_rows(
        &self,
        texts: &[Vec<Token>],
        options: &crate::EmbedOptions,
        pooling: crate::Pooling,
    ) -> Result<Vec<Vec<Vec<f32>>>, EngineError> {
        let base = &self.config.session;
        for tokens in texts {
            if tokens.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
            if tokens.len() > base.n_batch as usize {
                return Err(EngineError::EmbedTooLong { tokens: tokens.len(), n_batch: base.n_batch });
            }
            self.check_in_vocab(tokens, "tokens")?;
        }
        let lora_scales = self.embedding_scales(texts, options)?;
        let per_token = pooling == crate::Pooling::None;
        // Sequences per decode: as many as there are texts, up to a bound, and a divisor of the
        // batch: llama.cpp aborts creating a mean- or rank-pooled context whose micro-batch
        // (one batch here) is not a multiple of its sequences (`llama::ContextParams`' check).
        let n_batch = base.n_batch as usize;
        let n_seq_max = (1..=texts.len().clamp(1, MAX_EMBEDDED_TOGETHER)).rev().find(|n| n_batch.is_multiple_of(*n)).unwrap_or(1) as u32;
        // One micro-batch per batch, so models that attend both ways take a whole batch too; a
        // context of one batch's cells, emptied after each decode, since nothing is kept.
        let config = SessionConfig {
            embeddings: true,
            n_ubatch: base.n_batch,
            n_ctx: base.n_batch.saturating_add(1),
            n_seq_max,
            pooling: Some(pooling),
            lora_scales: Some(lora_scales),
            ..base.clone()
        };
        config.validate()?;
        let mut session = self.model.session(&config)?;
        let mut out = Vec::with_capacity(texts.len());
        for group in batches(texts, config.n_batch as usize, n_seq_max as usize) {
            session.batch_clear();
            for (seq, tokens) in group.iter().enumerate() {
                for (pos, &token) in tokens.iter().enumerate() {
                    // Pooled: the last token's output stands for the sequence; none: every one.
                    session.batch_push(token, pos as i32, seq as i32, per_token || pos + 1 == tokens.len())?;
                }
            }
            session.batch_decode()?;
            let mut index = 0;
            for (seq, tokens) in group.iter().enumerate() {
                out.push(if per_token {
                    (index..index + tokens.len()).map(|i| session.token_embedding(i as i32)).collect::<Result<Vec<_>, _>>()?
                } else {
                    vec![session.sequence_embedding(seq as i32)?]
                });
                index += tokens.len();
                session.seq_clear(seq as i32);
            }
        }
        Ok(out)
    }

    /// A request ready for a scheduler: its prompt tokenized as its kind asks, its options
    /// checked, its sampler built (a grammar parsed here, once); and, for a chat rendered by its
    /// Jinja template, the parser of its reply.
    pub(crate) fn prepare(&self, request: &GenerateRequest) -> Result<(Prepared<Sampler<'_>>, Option<ReplyParser>), EngineError> {
        let arrived = Instant::now();
        request.validate()?;
        if let Some(scales) = &request.options.lora_scales {
            self.check_adapter_scales(scales)?;
        }
        let mut options = request.options.clone();
        let mut parser = None;
        let tokens = match &request.prompt {
            // BOS alone is no prompt.
            Prompt::Text { text, .. } if text.is_empty() => return Err(EngineError::EmptyPrompt),
            Prompt::Text { text, specials } => self.tokenize(text, TokenizeOptions::default().specials(*specials))?,
            Prompt::Chat { messages, specials, options: chat } => match &self.templates {
                Some(templates) => {
                    if messages.is_empty() {
                        return Err(EngineError::EmptyPrompt);
                    }
                    let rendered = templates.render(messages, chat)?;
                    let tokens = self.rendered_chat_tokens(&rendered.prompt, messages, *specials)?;
                    self.apply_format(&rendered, &mut options)?;
                    parser = Some(rendered.parser);
                    tokens
                }
                None => self.rendered_chat_tokens(&self.builtin_render(messages, chat)?, messages, *specials)?,
            },
            Prompt::Tokens(tokens) => {
                self.check_in_vocab(tokens, "prompt")?;
                tokens.clone()
            }
        };
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if options.ignore_eos {
            // Biases add up: -inf wins over any bias the request gave the same token.
            let banned = self.end_of_generation_tokens().into_iter().map(|t| (t, f32::NEG_INFINITY));
            options.sampling.logit_bias.extend(banned);
        }
        let sampler = self.model.sampler(&options.sampling)?;
        Ok((Prepared { tokens, options, sampler, arrived }, parser))
    }

    /// What a rendered chat's format asks of the generation: its grammar (a request's own
    /// grammar cannot be combined with it), stop strings and special tokens written as text.
    fn apply_format(&self, rendered: &RenderedChat, options: &mut GenerateOptions) -> Result<(), EngineError> {
        let word_tokens = |text: &str| self.tokenize(text, TokenizeOptions { add_special: false, specials: SpecialText::Parse });
        for text in &rendered.preserved {
            if let [token] = word_tokens(text)?.as_slice() {
                options.preserved_tokens.push(*token);
            }
        }
        for stop in &rendered.stops {
            if !options.stop.contains(stop) {
                options.stop.push(stop.clone());
            }
        }
        if let Some((grammar, start)) = &rendered.grammar {
            if options.sampling.grammar.is_some() {
                return Err(EngineError::InvalidRequest {
                    field: "grammar",
                    value: "(given)".into(),
                    reason: "cannot be combined with the grammar of tool calls (or response_format) of the chat's template",
                });
            }
            let piece = |token| {
                let mut bytes = Vec::new();
                self.model.piece(token, true, &mut bytes)?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            };
            options.sampling.grammar_start = start.to_start(word_tokens, piece, &options.preserved_tokens)?;
            options.sampling.grammar = Some(grammar.clone());
        }
        Ok(())
    }

    /// The template for chats: the model's own, the configured fallback, or one chosen by
    /// architecture.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// The prompt tokens of a chat, as [`Session::chat`] decodes them: the template's control
    /// tokens parsed, control-token text in message contents as `specials` says.
    pub fn chat_tokens(&self, messages: &[ChatMessage], specials: SpecialText) -> Result<Vec<Token>, EngineError> {
        let rendered = self.format_chat(messages)?;
        self.rendered_chat_tokens(&rendered, messages, specials)
    }

    fn rendered_chat_tokens(&self, rendered: &str, messages: &[ChatMessage], specials: SpecialText) -> Result<Vec<Token>, EngineError> {
        let mut tokens = Vec::new();
        crate::chat_tokens::tokenize(&self.model, rendered, messages, specials, &mut tokens)?;
        Ok(tokens)
    }

    /// Tokenizes text: `TokenizeOptions::default()` for a prompt (BOS added where the model wants
    /// one, control-token text left as text), `.add_special(false)` for a fragment,
    /// `.specials(SpecialText::Parse)` to read `<start_of_turn>` and the like as their tokens.
    ///
    /// # Errors
    /// [`EngineError::Tokenize`] when llama.cpp's tokenizer fails.
    pub fn tokenize(&self, text: &str, options: TokenizeOptions) -> Result<Vec<Token>, EngineError> {
        let mut tokens = Vec::new();
        self.model.tokenize(text, options.add_special, options.specials == SpecialText::Parse, &mut tokens)?;
        Ok(tokens)
    }

    /// Every token that ends a generation (end of sequence, end of turn, ...): to ban them with
    /// a logit bias when a fixed number of tokens is wanted.
    pub fn end_of_generation_tokens(&self) -> Vec<Token> {
        (0..self.model.n_vocab()).map(Token).filter(|&t| self.model.is_eog(t)).collect()
    }

    /// [`EngineError::Rpc`] once an rpc-server holding the model's layers was lost: every
    /// generation fails from then on, and the model must be loaded again (the server does that
    /// itself, see `exsa serve`). Ok for a model without rpc-servers.
    pub fn check_servers(&self) -> Result<(), EngineError> {
        self.model.check_servers()
    }

    /// Formats a chat with [`Engine::chat_template`], opening the assistant's turn.
    pub fn format_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.format_chat_with(messages, &ChatOptions::default())
    }

    /// Formats a chat with its options (tools, ...) as generation would, without generating
    /// (llama-server's `/apply-template`): by the Jinja template where the engine has one.
    pub fn format_chat_with(&self, messages: &[ChatMessage], options: &ChatOptions) -> Result<String, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        match &self.templates {
            Some(templates) => Ok(templates.render(messages, options)?.prompt),
            None => self.builtin_render(messages, options),
        }
    }

    /// A chat by llama.cpp's built-in format ([`Engine::chat_template`]): plain messages, the
    /// assistant's turn opened; a last assistant message to continue is rendered as that turn's
    /// beginning (the messages before it, the turn opened, its text). Anything else needs the Jinja
    /// templates.
    fn builtin_render(&self, messages: &[ChatMessage], options: &ChatOptions) -> Result<String, EngineError> {
        let unsupported = || EngineError::Unsupported {
            what: "tools, tool calls and template options in a chat without Jinja templates (ChatTemplating::Jinja, exsa serve --jinja)",
            backend: Active::NAME,
        };
        if !messages.iter().all(ChatMessage::is_plain) {
            return Err(unsupported());
        }
        let plain = ChatOptions { continuation: Continuation::None, add_generation_prompt: true, ..options.clone() };
        if !plain.is_plain() {
            return Err(unsupported());
        }
        let pairs = |m: &[ChatMessage]| m.iter().map(|m| (m.role.clone(), m.content.clone())).collect::<Vec<_>>();
        match (options.continuation, options.add_generation_prompt, messages.split_last()) {
            (Continuation::None, true, _) => self.model.apply_chat_template(&self.chat_template, &pairs(messages)),
            (Continuation::Auto | Continuation::Content, false, Some((last, before))) if last.role == "assistant" && !before.is_empty() => {
                Ok(self.model.apply_chat_template(&self.chat_template, &pairs(before))? + &last.content)
            }
            _ => Err(unsupported()),
        }
    }

    pub(crate) fn model(&self) -> &Model {
        &self.model
    }
}

/// The template for chats: the model's own, else `fallback`, else one chosen by architecture.
fn chat_template_for(model: &Model, fallback: Option<&str>) -> String {
    if let Some(t) = model.chat_template() {
        return t;
    }
    if let Some(t) = fallback {
        return t.to_string();
    }
    fallback_template(model).builtin.to_owned()
}

/// A chat format for models whose file has no template, by architecture: llama.cpp's built-in
/// name, and the same format as Jinja source (for [`ChatTemplating::Jinja`]).
struct FallbackTemplate {
    builtin: &'static str,
    jinja: &'static str,
}

fn fallback_template(model: &Model) -> FallbackTemplate {
    let arch = model.info().architecture;
    if arch.starts_with("gemma") {
        FallbackTemplate { builtin: "gemma", jinja: include_str!("../templates_fallback/gemma.jinja") }
    } else if arch.starts_with("llama") {
        FallbackTemplate { builtin: "llama3", jinja: include_str!("../templates_fallback/llama3.jinja") }
    } else {
        // llama.cpp's chat layer knows "chatml" by name.
        FallbackTemplate { builtin: "chatml", jinja: "chatml" }
    }
}

/// Why `draft` cannot draft for `target`, or None when it can: its token ids must mean the same
/// text and the same end-of-generation tokens, since drafts are handed over as ids.
fn vocabulary_difference(target: &Model, draft: &Model) -> Result<Option<String>, EngineError> {
    let (n_target, n_draft) = (target.n_vocab(), draft.n_vocab());
    if n_target != n_draft {
        return Ok(Some(format!("its vocabulary has {n_draft} tokens, the main model's {n_target}")));
    }
    if target.bos() != draft.bos() {
        return Ok(Some(format!("its BOS token is {}, the main model's {}", draft.bos(), target.bos())));
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for token in (0..n_target).map(Token) {
        a.clear();
        b.clear();
        target.piece(token, false, &mut a)?;
        draft.piece(token, false, &mut b)?;
        if a != b {
            let (a, b) = (String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
            return Ok(Some(format!("token {token} is {b:?} in it, {a:?} in the main model")));
        }
        if target.is_eog(token) != draft.is_eog(token) {
            return Ok(Some(format!("token {token} ends a generation in one model and not in the other")));
        }
    }
    Ok(None)
}

/// How [`Engine::tokenize`] treats text. (`llama::TokenizeOptions` says the same for the
/// safe wrapper; the engine has its own because backend `crate` does not link `llama`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenizeOptions {
    /// Add BOS (and whatever else the model adds around a whole text).
    pub add_special: bool,
    /// What becomes of control-token text (`<start_of_turn>`, ...): text (the default), or the
    /// control tokens it spells.
    pub specials: SpecialText,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { add_special: true, specials: SpecialText::Plain }
    }
}

impl TokenizeOptions {
    /// Sets [`TokenizeOptions::add_special`].
    #[must_use]
    pub fn add_special(mut self, add_special: bool) -> Self {
        self.add_special = add_special;
        self
    }

    /// Sets [`TokenizeOptions::specials`].
    #[must_use]
    pub fn specials(mut self, specials: SpecialText) -> Self {
        self.specials = specials;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_texts_are_grouped_by_batch_room_and_sequence_count() {
        let texts: Vec<Vec<Token>> = [3, 4, 2, 6, 1, 1, 1].iter().map(|&n| vec![Token(1); n]).collect();
        let sizes = |groups: Vec<&[Vec<Token>]>| groups.iter().map(|g| g.iter().map(Vec::len).collect::<Vec<_>>()).collect::<Vec<_>>();
        assert_eq!(sizes(batches(&texts, 8, 64)), vec![vec![3, 4], vec![2, 6], vec![1, 1, 1]]);
        assert_eq!(sizes(batches(&texts, 8, 2)), vec![vec![3, 4], vec![2, 6], vec![1, 1], vec![1]]);
        assert_eq!(sizes(batches(&texts, 100, 64)), vec![vec![3, 4, 2, 6, 1, 1, 1]]);
        assert!(batches(&[], 8, 4).is_empty());
    }
}
