//! LoRA adapters: loading, applying, dropping, and loading while other threads decode on the
//! same model (llama.cpp keeps a set of adapters inside the model that every decode reads; the
//! wrapper serialises writers against readers). The adapter is written here: a rank-4 F32
//! adapter of the default model's `blk.0.ffn_up.weight`.

mod common;

use std::path::{Path, PathBuf};

use common::{model, small_params, temp_path};
use llama::*;

/// Writes a minimal GGUF v3 LoRA adapter for `tensor` of shape ggml ne = [n_in, n_out].
fn write_adapter(path: &Path, arch: &str, tensor: &str, n_in: u64, n_out: u64, rank: u64, scale: f32) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(2u64.to_le_bytes()); // tensors
    out.extend(4u64.to_le_bytes()); // key/value pairs
    for (key, value) in [("general.type", "adapter"), ("general.architecture", arch), ("adapter.type", "lora")] {
        string(&mut out, key);
        out.extend(8u32.to_le_bytes()); // string
        string(&mut out, value);
    }
    string(&mut out, "adapter.lora.alpha");
    out.extend(6u32.to_le_bytes()); // f32
    out.extend((rank as f32).to_le_bytes());
    // lora_a: ne [n_in, rank]; lora_b: ne [rank, n_out]; F32, data aligned to 32 bytes.
    let a_len = n_in * rank * 4;
    for (suffix, dims, offset) in [("lora_a", [n_in, rank], 0u64), ("lora_b", [rank, n_out], a_len.next_multiple_of(32))] {
        string(&mut out, &format!("{tensor}.{suffix}"));
        out.extend(2u32.to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(0u32.to_le_bytes()); // GGML_TYPE_F32
        out.extend(offset.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(32), 0);
    let values = |n: u64, seed: u64| (0..n).flat_map(move |i| ((((i * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5) * scale).to_le_bytes());
    out.extend(values(n_in * rank, 1));
    out.resize(out.len().next_multiple_of(32), 0);
    out.extend(values(rank * n_out, 7));
    std::fs::write(path, out).unwrap();
}

fn adapter_file(name: &str) -> PathBuf {
    let path = temp_path(name);
    let n_ff: u64 = model().meta("gemma3.feed_forward_length").unwrap().parse().unwrap();
    write_adapter(&path, "gemma3", "blk.0.ffn_up.weight", model().n_embd() as u64, n_ff, 4, 0.5);
    path
}

fn last_logits(ctx: &mut Context<'_>) -> Vec<f32> {
    ctx.clear_memory(MemoryData::Zero);
    let tokens = model().vocab().tokenize("The capital of France is", TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    ctx.last_logits().unwrap().to_vec()
}

#[test]
fn an_applied_adapter_changes_the_logits_and_outlives_its_handle() {
    let path = adapter_file("lora-apply.gguf");
    let mut ctx = Context::new(model(), &small_params()).unwrap();
    let base = last_logits(&mut ctx);
    let adapter = LoraAdapter::load(model(), &path).unwrap();
    ctx.set_lora_adapters(&[(&adapter, 1.0)]).unwrap();
    let adapted = last_logits(&mut ctx);
    assert_ne!(base, adapted, "the adapter changes the output");
    // The context keeps what it applies alive: dropping the handle frees nothing it uses.
    drop(adapter);
    assert_eq!(last_logits(&mut ctx), adapted);
    ctx.set_lora_adapters(&[]).unwrap();
    assert_eq!(last_logits(&mut ctx), base);
}

#[test]
fn a_wrong_adapter_is_a_typed_error() {
    let path = temp_path("lora-wrong-shape.gguf");
    write_adapter(&path, "gemma3", "blk.0.ffn_up.weight", 3, 5, 2, 1.0);
    assert!(matches!(LoraAdapter::load(model(), &path).unwrap_err(), LoraError::Load { .. }));
    write_adapter(&path, "llama", "blk.0.ffn_up.weight", 640, 2048, 2, 1.0);
    assert!(matches!(LoraAdapter::load(model(), &path).unwrap_err(), LoraError::Load { .. }));
    assert!(matches!(LoraAdapter::load(model(), temp_path("no-such-adapter.gguf")).unwrap_err(), LoraError::NotFound(_)));
}

#[test]
fn adapters_load_and_drop_while_other_threads_decode_the_same_model() {
    // Before the lock, an adapter load inserted into the model's adapter set while a decode on
    // another thread iterated it: a data race on a std::set.
    let path = adapter_file("lora-threads.gguf");
    std::thread::scope(|scope| {
        let decoder = scope.spawn(|| {
            let mut ctx = Context::new(model(), &small_params()).unwrap();
            (0..6).map(|_| last_logits(&mut ctx)).collect::<Vec<_>>()
        });
        for _ in 0..20 {
            let adapter = LoraAdapter::load(model(), &path).unwrap();
            let again = adapter.clone();
            drop(adapter);
            assert!(std::ptr::eq(again.model(), model()));
        }
        let runs = decoder.join().unwrap();
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "decodes without an applied adapter are unaffected by loads");
    });
}
