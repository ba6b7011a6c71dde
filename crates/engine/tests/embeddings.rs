//! Embeddings and reranking on the synthetic encoder (`bert-tiny`, CLS pooling in its file) and
//! reranker (`bert-tiny-rerank`, rank pooling and a classification head), both from `cargo xtask
//! synth-models`, and on the default model (a generative model: mean pooling). Each is checked
//! against what llama.cpp's own server answered for the same model and texts (recorded below:
//! `llama-server --embeddings --pooling cls` and `llama-server --reranking` built from the
//! llama-cpp-python 0.3.36 sdist, on the models this generator writes), and texts decoded
//! together must give what each gives alone.

use std::path::PathBuf;

use exsa_engine::*;

fn engine(path: PathBuf, pooling: Option<Pooling>) -> Engine {
    assert!(path.is_file(), "model missing at {}: run `cargo xtask synth-models` / `fetch-model`", path.display());
    let mut config = EngineConfig::new(path);
    config.session = SessionConfig { n_ctx: 512, n_batch: 512, n_ubatch: 512, n_threads: 2, n_threads_batch: 2, pooling, ..Default::default() };
    Engine::load(config).unwrap()
}

fn synth(name: &str) -> Engine {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    engine(dir.join(format!("{name}.gguf")), None)
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    normalized(a).iter().zip(normalized(b)).map(|(x, y)| x * y).sum()
}

/// The encoder pools by its file's CLS setting; its vector for "hello world" starts as
/// llama-server's did (llama-server returns it L2-normalised).
#[test]
fn an_encoder_pools_as_its_file_says_and_matches_llama_server() {
    let bert = synth("bert-tiny");
    assert_eq!(bert.pooling(), Pooling::Cls);
    let v = bert.embed("hello world").unwrap();
    assert_eq!(v.len(), 64);
    let recorded = [-0.20033_f32, 0.015218, 0.0016799, -0.29321, 0.021543];
    for (i, (ours, theirs)) in normalized(&v).iter().zip(recorded).enumerate() {
        assert!((ours - theirs).abs() < 1e-4, "component {i}: {ours} vs llama-server's {theirs}");
    }
    let other = bert.embed("goodbye moon").unwrap();
    assert!((normalized(&other)[0] - -0.12377).abs() < 1e-4, "{}", normalized(&other)[0]);
}

/// Texts embedded together (on the encoder decoded together, more than fit one decode) give
/// what each gives alone, on the encoder and on the default model (mean pooling: its file names
/// none; decoded one text at a time, see `Engine::embed_many`).
#[test]
fn texts_embedded_together_give_what_each_gives_alone() {
    let texts: Vec<String> =
        (0..40).map(|i| format!("Text {i}: {}", ["a cat on a mat", "rain over the sea", "bread and butter", "ships in port"][i % 4])).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let default = engine(exsa_engine::default_model_path(), None);
    assert_eq!(default.pooling(), Pooling::Mean);
    for (name, engine) in [("bert-tiny", synth("bert-tiny")), ("default", default)] {
        let together = engine.embed_many(&refs).unwrap();
        assert_eq!(together.len(), texts.len());
        for (i, text) in texts.iter().enumerate() {
            let alone = engine.embed(text).unwrap();
            let c = cosine(&together[i], &alone);
            assert!(c > 0.9999, "{name}, text {i}: cosine {c} between together and alone");
        }
        assert!(cosine(&together[0], &together[1]) < 0.9999, "{name}: different texts, different vectors");
    }
}

/// The reranker scores each pair as llama-server did (the same prompt: BOS, query, EOS, SEP,
/// document, EOS), the same document the same score; an encoder is no reranker, and a reranker
/// gives no embeddings through the server (its scores are not vectors).
#[test]
fn a_reranker_scores_pairs_as_llama_server_does() {
    let reranker = synth("bert-tiny-rerank");
    assert_eq!(reranker.pooling(), Pooling::Rank);
    let scored = reranker.rerank("a cat", &["cats purr", "stocks fell", "a kitten", "cats purr"]);
    if Engine::backend_name() == "crate" {
        // llama-cpp-2 reads every pooled row as n_embd floats: rank pooling is refused there.
        assert!(matches!(scored, Err(EngineError::Unsupported { .. })), "{scored:?}");
        return;
    }
    let scored = scored.unwrap();
    let scores: Vec<f32> = scored.iter().map(|&(s, _)| s).collect();
    // llama-server ran with one thread, this with two: the sums round in another order.
    let recorded = [-1.281_004_7_f32, -1.137_446_4, -1.224_280_1, -1.281_004_7];
    for (i, (ours, theirs)) in scores.iter().zip(recorded).enumerate() {
        assert!((ours - theirs).abs() < 5e-4, "document {i}: {ours} vs llama-server's {theirs}");
    }
    assert_eq!(scores[0], scores[3], "the same document, the same score");
    // "<bos>a cat<eos>[SEP]cats purr<eos>": 4 specials around the texts' tokens.
    let plain = |text| reranker.tokenize_with(text, TokenizeOptions { add_special: false, parse_special: false }).unwrap().len();
    let pair = plain("a cat") + plain("cats purr") + 4;
    assert_eq!(scored[0].1, pair);
    let e = synth("bert-tiny").rerank("a cat", &["cats purr"]).unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest { field: "model", .. }), "{e}");
}
