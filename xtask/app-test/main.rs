//! An app outside the exsa workspace that depends on the packaged `llama` crate: it loads a
//! GGUF, generates a few greedy tokens and says which llama.cpp tree it was built from.

use llama::{Batch, Context, ContextParams, Model, ModelParams, Output, SamplerChain, SpecialTokens, TokenizeOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: app MODEL.gguf")?;
    let model = Model::load(&path, &ModelParams::default())?;
    let mut ctx = Context::new(&model, &ContextParams::default().n_ctx(256))?;
    let mut sampler = SamplerChain::new().greedy().build(&model)?;
    let vocab = model.vocab();
    let prompt = vocab.tokenize("The capital of France is", TokenizeOptions::default())?;
    let mut batch = Batch::new(prompt.len(), 1)?;
    batch.add_sequence(&prompt, 0, 0, Output::Compute)?;
    let mut text = Vec::new();
    for pos in prompt.len()..prompt.len() + 8 {
        ctx.decode(&batch)?;
        let token = sampler.sample_last(&ctx)?;
        vocab.piece_into(token, SpecialTokens::Omit, &mut text)?;
        batch.clear();
        batch.add_output(token, pos as i32, 0)?;
    }
    println!("source_dir={}", llama::sys::BUILD_INFO.source_dir);
    println!("llama_cpp={}", llama::sys::BUILD_INFO.llama_cpp);
    println!("generated={}", String::from_utf8_lossy(&text));
    Ok(())
}
