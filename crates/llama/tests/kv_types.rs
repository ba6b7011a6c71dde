//! The KV cache's element types (`ContextParams::type_k/type_v`) on the default model: each one
//! llama-server offers makes a context that decodes; each holds a token in the memory its block
//! layout says (measured as what a saved state grows by per token); q8_0 keeps the f16 cache's
//! greedy choices, compared at every step; and a quantized V cache without flash attention is a
//! typed error, not llama.cpp's null context.

mod common;

use common::model;
use llama::*;

const PROMPT: &str = "The history of the printing press begins in Mainz, where Johannes Gutenberg";
/// A q8_0 cache moves logits by rounding what attention reads; where the f16 cache's top two were
/// this close, the two caches may pick differently.
const NEAR_TIE: f32 = 0.5;

fn params(t: KvType) -> ContextParams {
    common::small_params().type_k(t).type_v(t)
}

/// Bytes per value: the type's block size over its values per block (ggml's layouts).
fn bytes_per_value(t: KvType) -> f64 {
    match t {
        KvType::F32 => 4.0,
        KvType::F16 | KvType::Bf16 => 2.0,
        KvType::Q8_0 => 34.0 / 32.0,
        KvType::Q4_0 | KvType::Iq4Nl => 18.0 / 32.0,
        KvType::Q4_1 => 20.0 / 32.0,
        KvType::Q5_0 => 22.0 / 32.0,
        KvType::Q5_1 => 24.0 / 32.0,
    }
}

const ALL: [KvType; 9] =
    [KvType::F32, KvType::F16, KvType::Bf16, KvType::Q8_0, KvType::Q4_0, KvType::Q4_1, KvType::Iq4Nl, KvType::Q5_0, KvType::Q5_1];

/// What the saved state grows by when the context takes 32 more tokens: their cells in every
/// layer, nothing else.
fn state_growth(t: KvType) -> usize {
    let mut ctx = Context::new(model(), &params(t)).unwrap_or_else(|e| panic!("{t:?}: {e}"));
    let tokens = model().vocab().tokenize(PROMPT, TokenizeOptions::default()).unwrap();
    let mut sizes = Vec::new();
    for start in [0, 32] {
        let chunk: Vec<Token> = (0..32).map(|i| tokens[(start + i) % tokens.len()]).collect();
        let mut batch = Batch::new(32, 1).unwrap();
        for (i, &token) in chunk.iter().enumerate() {
            batch.add(token, (start + i) as i32, &[0], if i == 31 { Output::Compute } else { Output::Skip }).unwrap();
        }
        ctx.decode(&batch).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        sizes.push(ctx.save_state().unwrap().len());
    }
    sizes[1] - sizes[0]
}

#[test]
fn each_cache_type_decodes_and_holds_a_token_in_the_memory_its_layout_says() {
    let f16 = state_growth(KvType::F16) as f64;
    assert!(f16 > 0.0);
    for t in ALL {
        let ratio = state_growth(t) as f64 / f16;
        let want = bytes_per_value(t) / 2.0;
        assert!((ratio - want).abs() < 0.01, "{t:?}: a token takes {ratio:.3} of f16's memory, its layout says {want:.3}");
    }
}

/// Greedy tokens and each step's top-two margin.
fn greedy(ctx: &mut Context<'_>, steps: usize) -> Vec<(Token, f32)> {
    let tokens = model().vocab().tokenize(PROMPT, TokenizeOptions::default()).unwrap();
    let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    let mut out = Vec::new();
    for pos in (tokens.len() as i32..).take(steps) {
        ctx.decode(&batch).unwrap();
        let picked = pick(ctx.last_logits().unwrap());
        out.push(picked);
        batch.clear();
        batch.add_output(picked.0, pos, 0).unwrap();
    }
    out
}

/// The best token and its margin over the second.
fn pick(logits: &[f32]) -> (Token, f32) {
    let (best, second) = common::top_two(logits);
    (best, logits[best.0 as usize] - logits[second.0 as usize])
}

/// Forces `want`'s tokens through `ctx` and returns its own pick and margin at each step.
fn forced(ctx: &mut Context<'_>, want: &[(Token, f32)]) -> Vec<(Token, f32)> {
    let tokens = model().vocab().tokenize(PROMPT, TokenizeOptions::default()).unwrap();
    let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    let mut out = Vec::new();
    for (pos, &(token, _)) in (tokens.len() as i32..).zip(want) {
        ctx.decode(&batch).unwrap();
        out.push(pick(ctx.last_logits().unwrap()));
        batch.clear();
        batch.add_output(token, pos, 0).unwrap();
    }
    out
}

#[test]
fn a_q8_0_cache_keeps_the_f16_caches_greedy_choices_at_every_step() {
    let want = greedy(&mut Context::new(model(), &params(KvType::F16)).unwrap(), 48);
    let got = forced(&mut Context::new(model(), &params(KvType::Q8_0)).unwrap(), &want);
    let parted: Vec<String> = want
        .iter()
        .zip(&got)
        .enumerate()
        .filter(|(_, (w, g))| w.0 != g.0 && w.1 >= NEAR_TIE && g.1 >= NEAR_TIE)
        .map(|(step, (w, g))| format!("step {step}: f16 {:?}, q8_0 {:?}", w, g))
        .collect();
    assert!(parted.is_empty(), "q8_0 chose otherwise where the choice was clear: {parted:?}");
}

#[test]
fn a_quantized_v_cache_without_flash_attention_is_a_typed_error() {
    let off = params(KvType::Q8_0).flash_attention(FlashAttention::Off);
    match Context::new(model(), &off) {
        Err(ContextError::InvalidParam { name, .. }) => assert_eq!(name, "type_v"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a quantized V cache without flash attention was accepted"),
    }
    // Keys alone may be quantized without it.
    let keys = common::small_params().flash_attention(FlashAttention::Off).type_k(KvType::Q8_0);
    Context::new(model(), &keys).expect("a q8_0 K cache with f16 values needs no flash attention");
}
