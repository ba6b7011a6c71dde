//! An interactive chat on the terminal. Each turn decodes only the tokens the KV cache does not
//! already hold.
//!
//!     cargo run --release -p exsa-llama --example chat [-- --model PATH] [--template NAME]
//!
//! The model's own chat template is used when it has one, else `--template` (default "gemma").

use std::io::{BufRead, Write};

use llama::{
    Batch, ChatEnding, ChatMessage, Context, ContextParams, Model, ModelParams, Penalties, SamplerChain, SpecialTokens, Token, TokenizeOptions,
    Utf8Decoder,
};

fn flag(args: &mut Vec<String>, name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.remove(i);
    (i < args.len()).then(|| args.remove(i))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = flag(&mut args, "--model").or_else(|| std::env::var("EXSA_MODEL").ok()).ok_or("pass --model PATH")?;
    let fallback = flag(&mut args, "--template").unwrap_or_else(|| "gemma".into());

    let model = Model::load(&model_path, &ModelParams::default())?;
    let template = model.chat_template(None).unwrap_or(fallback);
    let mut ctx = Context::new(&model, &ContextParams::default().n_ctx(4096))?;
    let vocab = model.vocab();
    let mut sampler = SamplerChain::new().penalties(Penalties::default().repeat(1.15)).top_k(40).top_p(0.95, 1).temp(0.7).dist(1234).build(&model)?;

    let mut history: Vec<ChatMessage> = Vec::new();
    let mut cached: Vec<Token> = Vec::new();
    let special = TokenizeOptions { add_special: true, parse_special: true };
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        history.push(ChatMessage::new("user", line.trim()));
        let prompt = llama::apply_template(&template, &history, ChatEnding::AssistantTurn)?;
        let tokens = vocab.tokenize(&prompt, special)?;
        // Reuse the longest prefix already in the KV cache; decode the rest.
        let common = cached.iter().zip(&tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        ctx.remove_range(0, common as i32, -1)?;
        cached.truncate(common);
        let mut reply = String::new();
        let (mut utf8, mut piece) = (Utf8Decoder::new(), Vec::new());
        for chunk in tokens[common..].chunks(ctx.n_batch() as usize) {
            let start = cached.len() as i32;
            ctx.decode(&Batch::from_tokens(chunk, start, 0)?)?;
            cached.extend_from_slice(chunk);
        }
        let mut batch = Batch::new(1, 1)?;
        loop {
            let token = sampler.sample_last(&ctx)?;
            if vocab.is_eog(token) || cached.len() + 1 >= ctx.n_ctx() as usize {
                break;
            }
            piece.clear();
            vocab.piece_into(token, SpecialTokens::Omit, &mut piece)?;
            let before = reply.len();
            utf8.push(&piece, &mut reply);
            print!("{}", &reply[before..]);
            std::io::stdout().flush()?;
            batch.clear();
            batch.add_output(token, cached.len() as i32, 0)?;
            ctx.decode(&batch)?;
            cached.push(token);
        }
        utf8.finish(&mut reply);
        println!();
        history.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}
