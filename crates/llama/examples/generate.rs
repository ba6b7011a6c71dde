//! Streams a greedy or sampled continuation of a prompt.
//!
//!     cargo run --release -p exsa-llama --example generate -- "Once upon a time" [max_tokens] [seed]
//!
//! The model is `EXSA_MODEL` (the default model, set by .cargo/config.toml) or `--model PATH`.

use std::io::Write;

use llama::{Batch, Context, ContextParams, Model, ModelParams, Output, SamplerChain, SpecialTokens, TokenizeOptions, Utf8Decoder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = match args.iter().position(|a| a == "--model") {
        Some(i) => {
            args.remove(i);
            args.remove(i)
        }
        None => std::env::var("EXSA_MODEL").map_err(|_| "pass --model PATH or set EXSA_MODEL")?,
    };
    let prompt = args.first().cloned().unwrap_or_else(|| "Once upon a time".into());
    let max_tokens: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let seed: Option<u32> = args.get(2).map(|s| s.parse()).transpose()?;

    let model = Model::load(&model_path, &ModelParams::default())?;
    let mut ctx = Context::new(&model, &ContextParams::default().n_ctx(2048))?;
    let vocab = model.vocab();
    let chain = SamplerChain::new();
    let mut sampler = match seed {
        Some(seed) => chain.top_k(40).top_p(0.95, 1).min_p(0.05, 1).temp(0.8).dist(seed),
        None => chain.greedy(),
    }
    .build(&model)?;

    let tokens = vocab.tokenize(&prompt, TokenizeOptions::default())?;
    let mut batch = Batch::new(tokens.len().max(1), 1)?;
    batch.add_sequence(&tokens, 0, 0, Output::Compute)?;
    let (mut utf8, mut piece, mut text) = (Utf8Decoder::new(), Vec::new(), String::new());
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    for pos in tokens.len()..tokens.len() + max_tokens {
        ctx.decode(&batch)?;
        let token = sampler.sample_last(&ctx)?;
        if vocab.is_eog(token) {
            break;
        }
        piece.clear();
        vocab.piece_into(token, SpecialTokens::Omit, &mut piece)?;
        text.clear();
        utf8.push(&piece, &mut text);
        write!(out, "{text}")?;
        out.flush()?;
        batch.clear();
        batch.add_output(token, pos as i32, 0)?;
    }
    text.clear();
    utf8.finish(&mut text);
    writeln!(out, "{text}")?;
    let perf = ctx.perf();
    eprintln!(
        "prompt: {} tokens in {:.1} ms; generation: {} tokens at {:.1} t/s",
        perf.n_prompt_tokens,
        perf.prompt_ms,
        perf.n_eval_tokens,
        perf.n_eval_tokens as f64 / (perf.eval_ms / 1000.0)
    );
    Ok(())
}
