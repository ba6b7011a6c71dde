//! The engine's hot steps on the default model, through whichever backend this build has:
//! tokenize 1,000 characters, detokenize, fill a batch, one decode step, one sampling step
//! (greedy and the usual chain) on the model's 262,144-wide logits.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use exsa_engine::backend::{Active, Backend, BackendModel, BackendSession, Outputs};
use exsa_engine::{EngineConfig, SamplingParams, SessionConfig, Utf8Decoder};

const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting \
the steps as his father had taught him: one hundred and twelve, no more, no fewer. Tonight the sea \
was restless, throwing spray against the rocks, and the wind carried the smell of salt and rain. \
He trimmed the wick, polished the great lens until it gleamed, and watched the first beam sweep \
across the water. Far out, a fishing boat turned for home. Below, on the narrow strip of shingle, \
something glinted in the fading light: a green bottle, its neck sealed with wax, rolling gently \
in the surf. He hurried down, heart quickening, and pulled it from the foam. Inside, rolled tight \
and tied with a faded ribbon, was a letter written in a careful hand, dated forty years before.";

fn steps(c: &mut Criterion) {
    let model = Active::load(&EngineConfig::new(exsa_engine::default_model_path())).expect("the default model: run `cargo xtask fetch-model`");
    let text: String = TEXT.chars().cycle().take(1000).collect();
    let mut tokens = Vec::new();
    // One group name for every backend, so criterion compares B against the saved A baseline.
    let mut group = c.benchmark_group("steps");
    eprintln!("micro-benchmarks over backend `{}`", Active::NAME);

    group.bench_function("tokenize_1000_chars", |b| b.iter(|| model.tokenize(black_box(&text), true, false, &mut tokens).unwrap()));

    model.tokenize(&text, true, false, &mut tokens).unwrap();
    let mut piece = Vec::new();
    let mut out = String::new();
    group.bench_function("detokenize_stream", |b| {
        b.iter(|| {
            let mut utf8 = Utf8Decoder::new();
            out.clear();
            for &t in &tokens {
                piece.clear();
                model.piece(t, false, &mut piece).unwrap();
                utf8.push(&piece, &mut out);
            }
            black_box(&out);
        })
    });

    let config = SessionConfig::default().n_ctx(1024).n_batch(512).n_ubatch(512);
    let mut session = model.session(&config).unwrap();
    let batch: Vec<_> = tokens.iter().copied().cycle().take(512).collect();
    group.bench_function("fill_batch_512", |b| b.iter(|| session.fill(black_box(&batch), 0, Outputs::Last).unwrap()));

    // One generation step at position 256 of a filled cache, as in tg.
    session.decode(&tokens[..tokens.len().min(256)], 0, Outputs::Last).unwrap();
    let pos = tokens.len().min(256) as i32;
    group.bench_function("decode_one_token", |b| {
        b.iter(|| {
            session.decode(&[tokens[1]], pos, Outputs::Last).unwrap();
            session.seq_truncate(0, pos);
        })
    });

    // The one-token decode's output is at batch index 0.
    session.decode(&[tokens[1]], pos, Outputs::Last).unwrap();
    let mut greedy = model.sampler(&SamplingParams::greedy()).unwrap();
    group.bench_function("sample_greedy", |b| b.iter(|| black_box(session.sample_with(&mut greedy, 0).unwrap())));
    // The default chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8), seeded.
    let mut chain = model.sampler(&SamplingParams::default().seed(1)).unwrap();
    group.bench_function("sample_chain_topk40_topp_minp_temp_dist", |b| b.iter(|| black_box(session.sample_with(&mut chain, 0).unwrap())));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = steps
}
criterion_main!(benches);
