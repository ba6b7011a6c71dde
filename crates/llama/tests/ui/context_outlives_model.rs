// A Context borrows its Model: it cannot outlive it.
use llama::{Context, ContextParams, Model, ModelParams};

fn main() {
    let ctx;
    {
        let model = Model::load("m.gguf", &ModelParams::default()).unwrap();
        ctx = Context::new(&model, &ContextParams::default()).unwrap();
    }
    drop(ctx);
}
