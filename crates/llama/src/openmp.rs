//! OpenMP thread teams, where the build computes with libgomp's.
//!
//! libgomp gives each thread that opens a parallel region a team of worker threads and keeps it
//! for as long as that thread lives. While the teams hold more threads than the process has
//! cores, every worker spins a thousandth as long before it sleeps, so a graph's steps wait on
//! wake-ups. A model loaded on one thread (whose load runs ggml's AMX weight conversion in
//! parallel) and decoded on another thus halved `exsa serve`'s decode speed on two cores: the
//! loading thread, a pooled server thread, kept its team. The work here that runs on whatever
//! thread calls it (a load, a context's life) ends that thread's team when it is done.

use crate::sys;

/// Ends the calling thread's OpenMP team, if it has one; a later parallel region on this thread
/// makes a new one (a thread start, microseconds). A no-op unless the build links libgomp.
pub(crate) fn release_this_threads_team() {
    // SAFETY: takes no arguments. libgomp's pause (its behaviour, not the OpenMP spec's) ends
    // only the calling thread's own team, waiting for its idle workers to exit, and returns an
    // error without doing anything inside a parallel region (the abort callback runs in one).
    unsafe { sys::exsa_openmp_release_team() }
}
