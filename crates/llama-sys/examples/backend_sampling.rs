//! Measures llama.cpp's experimental backend-sampling API against sampling on the host, in raw
//! FFI: the same 128-token generation with the sampler chain either attached to the context
//! (`llama_context_params.samplers`: the token is sampled inside the decode's graph) or run by
//! `llama_sampler_sample` on the logits row afterwards. Rounds are interleaved; medians and the
//! ratio's range are printed.
//!
//! ```text
//! cargo run --release -p exsa-llama-sys --example backend_sampling [-- MODEL.gguf [ROUNDS]]
//! ```
//!
//! The model defaults to `$EXSA_MODEL` (set by the workspace's .cargo/config.toml).

use std::ffi::CString;
use std::time::Instant;

use llama_sys as sys;

const PROMPT: &str = "Write a short story about a lighthouse keeper who finds a message in a bottle.";
const N_GEN: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Chain {
    Greedy,
    /// top-k 40, top-p 0.95, min-p 0.05, temperature 0.8, seeded dist.
    Common,
}

fn chain(kind: Chain) -> *mut sys::llama_sampler {
    // SAFETY: constructors that copy their arguments; the chain takes ownership of each stage.
    unsafe {
        let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
        match kind {
            Chain::Greedy => sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy()),
            Chain::Common => {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(40));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(0.95, 1));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_min_p(0.05, 1));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(0.8));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(42));
            }
        }
        chain
    }
}

/// One generation: returns (tokens/s over the generated tokens, the tokens, whether the backend
/// sampled them).
fn generate(model: *mut sys::llama_model, prompt: &[sys::llama_token], kind: Chain, on_backend: bool) -> (f64, Vec<sys::llama_token>, bool) {
    let sampler = chain(kind);
    let mut config = sys::llama_sampler_seq_config { seq_id: 0, sampler };
    // SAFETY: plain FFI on a live model. The sampler config and chain outlive the context (the
    // context is freed first); every batch points at live token storage for its decode.
    unsafe {
        let mut params = sys::llama_context_default_params();
        params.n_ctx = 512;
        params.n_batch = 512;
        params.n_ubatch = 512;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
        params.n_threads = threads;
        params.n_threads_batch = threads;
        if on_backend {
            params.samplers = &mut config;
            params.n_samplers = 1;
        }
        let ctx = sys::llama_init_from_model(model, params);
        assert!(!ctx.is_null(), "context creation failed");
        let mut prompt = prompt.to_vec();
        assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(prompt.as_mut_ptr(), prompt.len() as i32)), 0);
        let mut out = Vec::with_capacity(N_GEN);
        let mut backend_sampled = true;
        let start = Instant::now();
        for _ in 0..N_GEN {
            backend_sampled &= sys::llama_get_sampled_token_ith(ctx, -1) != sys::LLAMA_TOKEN_NULL;
            let mut token = sys::llama_sampler_sample(sampler, ctx, -1);
            out.push(token);
            assert_eq!(sys::llama_decode(ctx, sys::llama_batch_get_one(&mut token, 1)), 0);
        }
        let seconds = start.elapsed().as_secs_f64();
        sys::llama_free(ctx);
        sys::llama_sampler_free(sampler);
        (N_GEN as f64 / seconds, out, backend_sampled)
    }
}

/// llama.cpp's log is silenced: only this program's results are printed.
unsafe extern "C" fn quiet(_level: sys::ggml_log_level, _text: *const std::ffi::c_char, _user: *mut std::ffi::c_void) {}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().or_else(|| std::env::var("EXSA_MODEL").ok()).expect("pass a GGUF path or set EXSA_MODEL");
    let rounds: usize = args.next().map_or(5, |r| r.parse().expect("ROUNDS is a number"));
    let c_path = CString::new(path.clone()).expect("no NUL in the path");
    let c_prompt = CString::new(PROMPT).unwrap();
    // SAFETY: plain FFI; the path and prompt outlive the calls, the token buffer is as large as
    // passed, and the model is freed last.
    let (model, prompt) = unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::llama_backend_init();
        let model = sys::llama_model_load_from_file(c_path.as_ptr(), sys::llama_model_default_params());
        assert!(!model.is_null(), "cannot load {path}");
        let vocab = sys::llama_model_get_vocab(model);
        let mut tokens = vec![0; 256];
        let n = sys::llama_tokenize(vocab, c_prompt.as_ptr(), PROMPT.len() as i32, tokens.as_mut_ptr(), tokens.len() as i32, true, false);
        assert!(n > 0);
        tokens.truncate(n as usize);
        (model, tokens)
    };
    println!("backend sampling vs host sampling, {N_GEN} tokens, {rounds} interleaved rounds, {path}");
    for kind in [Chain::Greedy, Chain::Common] {
        let (mut host, mut backend, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut same_tokens = true;
        let mut all_on_backend = true;
        for round in 0..rounds {
            // Alternate which goes first, so drift on a shared machine hits both alike.
            let order = if round % 2 == 0 { [false, true] } else { [true, false] };
            let mut pair = [(0.0, Vec::new(), false), (0.0, Vec::new(), false)];
            for on_backend in order {
                pair[on_backend as usize] = generate(model, &prompt, kind, on_backend);
            }
            let [(h, h_tokens, _), (b, b_tokens, sampled)] = pair;
            same_tokens &= h_tokens == b_tokens;
            all_on_backend &= sampled;
            host.push(h);
            backend.push(b);
            ratios.push(b / h);
        }
        let (lo, hi) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        println!(
            "{kind:?}: host {:.1} t/s, backend {:.1} t/s, backend/host median {:.3} (range {lo:.3}..{hi:.3}); sampled in the graph: {all_on_backend}; same tokens: {same_tokens}",
            median(&mut host),
            median(&mut backend),
            median(&mut ratios),
        );
    }
    // SAFETY: every context is gone.
    unsafe { sys::llama_model_free(model) };
}
