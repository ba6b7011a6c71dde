//! A thread that loaded a model, or computed in a context it has dropped, keeps no OpenMP team
//! behind (src/openmp.rs). libgomp keeps a team for as long as the thread that opened it lives,
//! and while the teams outnumber the cores every team's workers sleep early: a model loaded on
//! one server thread and decoded on another decoded at half speed. Counted as this process's
//! threads; the binary has this one test, so nothing else starts any meanwhile.

mod common;

use std::sync::mpsc;

use llama::*;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_thread_done_computing_keeps_no_openmp_team() {
    // The release acts on libgomp's teams only (clang's libomp has no such throttling).
    let gomp = std::fs::read_to_string("/proc/self/maps").is_ok_and(|maps| maps.contains("libgomp"));
    if !gomp {
        eprintln!("skipped: not a Linux build with libgomp");
        return;
    }
    // (A load opens a parallel region only where ggml converts weights, as for AMX; the
    // context's check below holds on every CPU.)
    let base = threads();
    let (said, heard) = mpsc::channel::<&str>();
    let (go, wait) = mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let model = Model::load(common::model_path(), &ModelParams::default()).unwrap();
        said.send("loaded").unwrap();
        wait.recv().unwrap();
        let mut context = Context::new(&model, &common::small_params()).unwrap();
        let tokens = model.vocab().tokenize("The history of the printing press", TokenizeOptions::default()).unwrap();
        let mut sampler = SamplerChain::new().greedy().build(&model).unwrap();
        let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
        for pos in (tokens.len() as i32..).take(4) {
            context.decode(&batch).unwrap();
            let token = sampler.sample_last(&context).unwrap();
            batch.clear();
            batch.add_output(token, pos, 0).unwrap();
        }
        said.send("decoded").unwrap();
        wait.recv().unwrap();
        drop(sampler);
        drop(context);
        said.send("dropped").unwrap();
        wait.recv().unwrap();
    });
    assert_eq!(heard.recv().unwrap(), "loaded");
    assert_eq!(threads(), base + 1, "the loading thread kept an OpenMP team");
    go.send(()).unwrap();
    assert_eq!(heard.recv().unwrap(), "decoded");
    // The check can fail: a live context's decodes (two threads) have a team of one worker.
    assert_eq!(threads(), base + 2, "a decoding thread with n_threads 2 has one OpenMP worker");
    go.send(()).unwrap();
    assert_eq!(heard.recv().unwrap(), "dropped");
    assert_eq!(threads(), base + 1, "the thread kept its OpenMP team after dropping its context");
    go.send(()).unwrap();
    worker.join().unwrap();
}
