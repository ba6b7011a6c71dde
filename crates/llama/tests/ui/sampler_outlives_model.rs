// A Sampler holds its model's vocabulary (grammar, DRY): it cannot outlive the model.
use llama::{Model, ModelParams, SamplerChain};

fn main() {
    let sampler;
    {
        let model = Model::load("m.gguf", &ModelParams::default()).unwrap();
        sampler = SamplerChain::new().greedy().build(&model).unwrap();
    }
    drop(sampler);
}
