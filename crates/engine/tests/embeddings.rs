//! Embeddings and reranking on the synthetic encoder (`bert-tiny`, CLS pooling in its file) and
//! reranker (`bert-tiny-rerank`, rank pooling and a classification head), both from `cargo xtask
//! synth-models`, and on the default model (a generative model: mean pooling). Vectors are
//! checked against llama.cpp's own `llama-embedding` program, run here on the same model and
//! texts (built by `cargo xtask test` from the llama-cpp-python 0.3.36 sdist, as llama-server
//! is); texts decoded together must give what each gives alone. Rerank scores are compared with
//! llama-server's, asked live, in tests/http.rs.

use std::path::PathBuf;

use exsa_engine::*;

fn engine(path: PathBuf, pooling: Option<Pooling>) -> Engine {
    engine_with(path, pooling, FlashAttention::Auto)
}

fn engine_with(path: PathBuf, pooling: Option<Pooling>, flash_attention: FlashAttention) -> Engine {
    assert!(path.is_file(), "model missing at {}: run `cargo xtask synth-models` / `fetch-model`", path.display());
    let mut config = EngineConfig::new(path);
    config.session = SessionConfig::default()
        .n_ctx(512)
        .n_batch(512)
        .n_ubatch(512)
        .n_threads(2)
        .n_threads_batch(2)
        .pooling(pooling)
        .flash_attention(flash_attention);
    Engine::load(config).unwrap()
}

fn synth(name: &str) -> Engine {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    engine(dir.join(format!("{name}.gguf")), None)
}

/// What llama.cpp's `llama-embedding` gives for `texts` (one per line) on `model` with
/// `pooling`: each vector L2-normalised (`--embd-normalize 2`), printed with 7 decimals.
fn llama_embeddings(model: &std::path::Path, texts: &[&str], pooling: &str, flash_attention: bool) -> Vec<Vec<f32>> {
    let program = PathBuf::from(std::env::var("EXSA_LLAMA_EMBEDDING").expect("EXSA_LLAMA_EMBEDDING is set by .cargo/config.toml"));
    assert!(program.is_file(), "llama.cpp's llama-embedding is missing at {}: run `cargo xtask test` (it builds it)", program.display());
    let out = std::process::Command::new(&program)
        .arg("-m")
        .arg(model)
        .args(["-p", &texts.join("\n"), "--pooling", pooling, "--embd-output-format", "array", "--embd-normalize", "2"])
        .args(["-c", "512", "-b", "512", "-ub", "512", "-t", "2", "-fa", if flash_attention { "on" } else { "off" }])
        .output()
        .unwrap();
    assert!(out.status.success(), "llama-embedding failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let array = &stdout[stdout.find("[[").expect("an array of vectors")..=stdout.rfind("]]").unwrap() + 1];
    serde_json::from_str(array).unwrap()
}

/// How far two computations of the same vectors may differ and still be float rounding: the
/// encoder's components by 5e-4 (llama-embedding's own flash-attention-on and -off vectors differ
/// by up to 1e-4 there; ours, built with other flags, by up to 2.1e-4); the default model's
/// (Gemma 3: a few components carry most of the norm, and 18 layers amplify an f16 rounding)
/// by a cosine of 0.997, a little more than llama-embedding's flash-attention-on and -off vectors do (0.9979).
/// A wrong pooling, token or text moves them far more (the nearest-text check below).
fn tolerance(model: &std::path::Path) -> (f32, f32) {
    let default = model == exsa_engine::default_model_path();
    if default { (0.997, 0.05) } else { (0.99999, 5e-4) }
}

/// Our vectors are llama-embedding's for every text, with flash attention on and off: on the
/// encoder with the pooling its file names (CLS) and with others forced, and on the default
/// model (mean); each of ours is nearest to llama-embedding's vector of the same text.
#[test]
fn vectors_equal_those_of_llama_cpps_llama_embedding() {
    let texts = ["hello world", "goodbye moon", "A longer sentence about ships that sail in the rain.", "x", "Ünïcödé and emoji 🦀 too"];
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let cases: [(PathBuf, Option<Pooling>, &str); 4] = [
        (dir.join("bert-tiny.gguf"), None, "cls"),
        (dir.join("bert-tiny.gguf"), Some(Pooling::Mean), "mean"),
        (dir.join("bert-tiny.gguf"), Some(Pooling::Last), "last"),
        (exsa_engine::default_model_path(), None, "mean"),
    ];
    for ((path, pooling, name), flash_attention) in cases.into_iter().flat_map(|case| [(case.clone(), true), (case, false)]) {
        let (min_cosine, max_difference) = tolerance(&path);
        let ours =
            engine_with(path.clone(), pooling, if flash_attention { FlashAttention::On } else { FlashAttention::Off }).embed_many(&texts).unwrap();
        let theirs = llama_embeddings(&path, &texts, name, flash_attention);
        assert_eq!(theirs.len(), texts.len());
        let case = format!("{} ({name}, flash attention {flash_attention})", path.file_name().unwrap().to_string_lossy());
        let (mut worst, mut lowest) = (0.0_f32, 1.0_f32);
        for (i, ours) in ours.iter().enumerate() {
            assert_eq!(ours.len(), theirs[i].len(), "{case}, text {i}: width");
            let c = cosine(ours, &theirs[i]);
            assert!(c >= min_cosine, "{case}, text {i}: cosine {c} with llama-embedding's");
            let nearest = (0..texts.len()).max_by(|&a, &b| cosine(ours, &theirs[a]).total_cmp(&cosine(ours, &theirs[b]))).unwrap();
            assert_eq!(nearest, i, "{case}: our vector of text {i} is nearest to llama-embedding's of text {nearest}");
            for (j, (a, b)) in normalized(ours).iter().zip(&theirs[i]).enumerate() {
                let d = (a - b).abs();
                assert!(d < max_difference, "{case}, text {i}, component {j}: {a} vs llama-embedding's {b}");
                worst = worst.max(d);
            }
            lowest = lowest.min(c);
        }
        eprintln!("{case}: largest difference {worst:e}, lowest cosine {lowest}");
    }
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

/// Texts embedded together (decoded together, more than fit one decode) give what each gives
/// alone, within float rounding ([`tolerance`]), on the encoder and on the default model (mean
/// pooling: its file names none).
#[test]
fn texts_embedded_together_give_what_each_gives_alone() {
    let texts: Vec<String> =
        (0..40).map(|i| format!("Text {i}: {}", ["a cat on a mat", "rain over the sea", "bread and butter", "ships in port"][i % 4])).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let default = engine(exsa_engine::default_model_path(), None);
    assert_eq!(default.pooling(), Pooling::Mean);
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    for (path, engine) in [(dir.join("bert-tiny.gguf"), synth("bert-tiny")), (exsa_engine::default_model_path(), default)] {
        let (min_cosine, _) = tolerance(&path);
        let name = path.display();
        let together = engine.embed_many(&refs).unwrap();
        assert_eq!(together.len(), texts.len());
        let mut lowest = 1.0_f32;
        for (i, text) in texts.iter().enumerate() {
            let alone = engine.embed(text).unwrap();
            let c = cosine(&together[i], &alone);
            assert!(c >= min_cosine, "{name}, text {i}: cosine {c} between together and alone");
            lowest = lowest.min(c);
        }
        eprintln!("{name}: lowest cosine between together and alone {lowest}");
        assert!(cosine(&together[0], &together[1]) < min_cosine, "{name}: different texts, different vectors");
    }
}

/// The reranker scores each pair (its prompt: BOS, query, EOS, SEP, document, EOS, as
/// llama-server builds it), the same document the same score, different ones different scores;
/// an encoder is no reranker.
#[test]
fn a_reranker_scores_pairs() {
    let reranker = synth("bert-tiny-rerank");
    assert_eq!(reranker.pooling(), Pooling::Rank);
    let scored = reranker.rerank("a cat", &["cats purr", "stocks fell", "a kitten", "cats purr"]);
    if Engine::backend_name() == "crate" {
        // llama-cpp-2 reads every pooled row as n_embd floats: rank pooling is refused there.
        assert!(matches!(scored, Err(EngineError::Unsupported { .. })), "{scored:?}");
        return;
    }
    let scored = scored.unwrap();
    let scores: Vec<f32> = scored.iter().map(|s| s.score).collect();
    assert!(scores.iter().all(|s| s.is_finite()), "{scores:?}");
    assert_eq!(scores[0], scores[3], "the same document, the same score");
    assert!(scores[0] != scores[1] && scores[1] != scores[2] && scores[0] != scores[2], "{scores:?}");
    // "<bos>a cat<eos>[SEP]cats purr<eos>": 4 specials around the texts' tokens.
    let plain = |text| reranker.tokenize(text, TokenizeOptions::default().add_special(false)).unwrap().len();
    let pair = plain("a cat") + plain("cats purr") + 4;
    assert_eq!(scored[0].tokens, pair);
    let e = synth("bert-tiny").rerank("a cat", &["cats purr"]).unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest { field: "model", .. }), "{e}");
}

/// [`Engine::embed_tokens`] of a text's tokens is the text's vector; an empty list, a list longer
/// than a batch and an id outside the vocabulary are each refused by a typed error; so are
/// adapter scales for adapters the engine does not have ([`EmbedOptions::lora_scales`]).
#[test]
fn token_lists_embed_as_their_texts_and_bad_ones_are_typed_errors() {
    let engine = synth("bert-tiny");
    let text = "a cat on a mat";
    let tokens = engine.tokenize(text, TokenizeOptions::default()).unwrap();
    let from_tokens = engine.embed_tokens(std::slice::from_ref(&tokens), &EmbedOptions::default()).unwrap();
    assert_eq!(from_tokens, [engine.embed(text).unwrap()]);
    let n_vocab = engine.model_info().n_vocab;
    let cases: [(Vec<Token>, &str); 3] =
        [(Vec::new(), "empty"), (vec![tokens[0]; 513], "longer than a batch"), (vec![Token(n_vocab)], "outside the vocabulary")];
    for (input, what) in cases {
        match engine.embed_tokens(&[input], &EmbedOptions::default()) {
            Err(EngineError::EmptyPrompt) if what == "empty" => {}
            Err(EngineError::EmbedTooLong { tokens: 513, n_batch: 512 }) if what == "longer than a batch" => {}
            Err(EngineError::InvalidRequest { field: "tokens", .. }) if what == "outside the vocabulary" => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    match engine.embed_many_with(&[text], &EmbedOptions::default().lora_scales(vec![1.0])) {
        Err(EngineError::InvalidRequest { field: "lora_scales", .. }) => {}
        other => panic!("scales of an adapter the engine lacks: {other:?}"),
    }
}

/// [`Engine::token_embeddings`] gives a vector per token, whatever the engine pools: on an
/// encoder their mean is the mean-pooled embedding. An engine that pools none refuses the
/// calls that give one vector per text.
#[test]
fn token_embeddings_give_a_vector_per_token_whose_mean_is_the_mean_pooled_one() {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let mean = engine(dir.join("bert-tiny.gguf"), Some(Pooling::Mean));
    let texts = ["a cat on a mat", "rain over the sea tonight"];
    let tokens: Vec<Vec<Token>> = texts.iter().map(|t| mean.tokenize(t, TokenizeOptions::default()).unwrap()).collect();
    let rows = mean.token_embeddings(&tokens, &EmbedOptions::default()).unwrap();
    let pooled = mean.embed_tokens(&tokens, &EmbedOptions::default()).unwrap();
    for ((rows, tokens), pooled) in rows.iter().zip(&tokens).zip(&pooled) {
        assert_eq!(rows.len(), tokens.len(), "a vector per token");
        let average: Vec<f32> = (0..pooled.len()).map(|i| rows.iter().map(|r| r[i]).sum::<f32>() / rows.len() as f32).collect();
        for (a, b) in average.iter().zip(pooled) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "mean of the token vectors {a}, mean-pooled {b}");
        }
    }
    assert_ne!(rows[0][0], rows[0][1], "different tokens, different vectors");
    let none = engine(dir.join("bert-tiny.gguf"), Some(Pooling::None));
    assert_eq!(none.token_embeddings(&tokens, &EmbedOptions::default()).unwrap(), rows);
    match none.embed(texts[0]) {
        Err(EngineError::InvalidRequest { field: "pooling", .. }) => {}
        other => panic!("one vector per text from an engine that pools none: {other:?}"),
    }
}
