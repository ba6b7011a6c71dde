//! Embeddings and reranking with the engine as a library.
//!
//! Texts are embedded on a generative model (its token vectors mean-pooled, as its file names no
//! pooling) and compared by cosine similarity; then a reranker (a model whose pooling is `rank`)
//! scores documents for a query, and they are ranked by score.
//!
//!     cargo run -p exsa-engine --example embeddings [-- --model PATH] [--reranker PATH]
//!
//! `--model` defaults to the project's default model (`EXSA_MODEL`), `--reranker` to the
//! random-weight reranker of `cargo xtask synth-models`: its scores are noise, so only the
//! shape of the answer is checked here, not which document wins. The program checks what it
//! prints and fails if it is wrong.

use std::path::PathBuf;

use exsa_engine::{Engine, EngineConfig, Pooling, l2_normalize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (model, reranker) = parse_args()?;

    // Embeddings: any model embeds; the engine pools each text's token vectors as the model's
    // file says (mean for a generative model). The vectors come back as the model made them, not
    // scaled to length 1: `l2_normalize` them, and their dot product is their cosine similarity.
    let engine = Engine::load(EngineConfig::new(model))?;
    println!("embedding model pools by {:?}", engine.pooling());
    let texts = ["The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window.", "Stock markets fell sharply on Monday."];
    // One call decodes the texts together, each in a sequence of its own.
    let vectors = engine.embed_many(&texts)?;
    check(vectors.len() == texts.len(), format!("{} vectors for {} texts", vectors.len(), texts.len()))?;
    let width = vectors[0].len();
    let mut unit = Vec::new();
    for (text, v) in texts.iter().zip(&vectors) {
        check(v.len() == width && width > 0, format!("vector widths differ: {} and {width}", v.len()))?;
        let norm = l2_norm(v);
        check(norm.is_finite() && norm > 0.0, format!("{text:?}: vector norm {norm}"))?;
        let mut normalized = v.clone();
        l2_normalize(&mut normalized);
        let unit_norm = l2_norm(&normalized);
        check((unit_norm - 1.0).abs() < 1e-5, format!("{text:?}: normalised vector has norm {unit_norm}"))?;
        println!("{width} floats, norm {norm:8.3} (normalised: {unit_norm:.6}): {text:?}");
        unit.push(normalized);
    }
    for i in 0..texts.len() {
        for j in i + 1..texts.len() {
            println!("cosine {:.4}: {:?} / {:?}", dot(&unit[i], &unit[j]), texts[i], texts[j]);
        }
    }
    // The two texts about cats are nearer each other than either is to the one about stocks.
    let cats = dot(&unit[0], &unit[1]);
    check(cats > dot(&unit[0], &unit[2]) && cats > dot(&unit[1], &unit[2]), "the texts about cats are not the nearest pair".into())?;
    // A text embedded alone gives what it gave in the batch, up to float rounding (the default
    // model's tests allow a cosine of 0.997 between the two), and different texts differ by more.
    let mut alone = engine.embed(texts[0])?;
    l2_normalize(&mut alone);
    let same = dot(&alone, &unit[0]);
    println!("cosine {same:.6}: {:?} alone / in the batch", texts[0]);
    check(same >= 0.997, format!("the same text alone and in a batch: cosine {same}"))?;
    check(dot(&unit[0], &unit[2]) < 0.997, "two unrelated texts got the same vector".into())?;

    // Reranking: a reranker's pooling is `rank` (its file says so), and `rerank` returns one
    // `RerankScore` per document, in the documents' order: its `score` and the pair's length in
    // `tokens`.
    let reranker = Engine::load(EngineConfig::new(reranker))?;
    check(reranker.pooling() == Pooling::Rank, format!("the reranker pools by {:?}, not Rank", reranker.pooling()))?;
    let query = "Where do cats like to sleep?";
    let documents = [
        "Cats often sleep in warm, sunny spots.",
        "The stock market closed lower.",
        "Kittens sleep up to twenty hours a day.",
        "Cats often sleep in warm, sunny spots.",
    ];
    let scored = reranker.rerank(query, &documents)?;
    check(scored.len() == documents.len(), format!("{} scores for {} documents", scored.len(), documents.len()))?;
    check(scored.iter().all(|s| s.score.is_finite() && s.tokens > 0), format!("scores and lengths: {scored:?}"))?;
    // The same document scores the same, up to float rounding (where a pair sits in the batch
    // changes the order of some sums): pairs decoded together do not leak into each other.
    let (first, again) = (scored[0].score, scored[3].score);
    check((first - again).abs() < 1e-3, format!("one document, two scores: {first} and {again}"))?;
    // Higher is more relevant: rank by score, best first (as llama-server's /rerank answers).
    let mut ranking: Vec<usize> = (0..documents.len()).collect();
    ranking.sort_by(|&a, &b| scored[b].score.total_cmp(&scored[a].score));
    println!("query {query:?}, ranked:");
    for (rank, &i) in ranking.iter().enumerate() {
        println!("  {}. score {:+.5} ({} tokens): {:?}", rank + 1, scored[i].score, scored[i].tokens, documents[i]);
    }
    let mut seen = ranking.clone();
    seen.sort_unstable();
    check(seen == (0..documents.len()).collect::<Vec<_>>(), format!("the ranking {ranking:?} is not a permutation of the documents"))?;
    check(ranking.windows(2).all(|w| scored[w[0]].score >= scored[w[1]].score), format!("the ranking {ranking:?} is not by descending score"))?;
    Ok(())
}

/// `--model PATH` and `--reranker PATH`, each optional.
fn parse_args() -> Result<(PathBuf, PathBuf), String> {
    let mut model = exsa_engine::default_model_path();
    let mut reranker = std::env::var_os("EXSA_SYNTH_MODELS").map(|dir| PathBuf::from(dir).join("bert-tiny-rerank.gguf"));
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().map(PathBuf::from).ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => model = value,
            "--reranker" => reranker = Some(value),
            _ => return Err(format!("unknown option {flag}; usage: embeddings [--model PATH] [--reranker PATH]")),
        }
    }
    Ok((model, reranker.ok_or("pass --reranker PATH (or set EXSA_SYNTH_MODELS, where `cargo xtask synth-models` writes one)")?))
}

/// Ok, or the error `what` (the program then exits non-zero).
fn check(ok: bool, what: String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what) }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn l2_norm(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}
