//! `/metrics`: the server's counters and latency histograms, and each loaded model's decode-loop
//! counters, in Prometheus' text format.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;
use crate::outcome::GenerationStats;
use crate::serving::ServingStatus;

/// Counters for `/metrics`, beside the decode loops' own.
#[derive(Debug, Default)]
pub struct Metrics {
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// From the request's arrival to its first generated token.
    ttft: Histogram,
    /// Between consecutive tokens of a stream, as the stream sees them.
    inter_token: Histogram,
}

impl Metrics {
    /// A request answered in full.
    pub(super) fn count_ok(&self, stats: &GenerationStats) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(stats.prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(stats.completion_tokens as u64, Ordering::Relaxed);
    }

    /// An answer without its result (a refusal, or a failure mid-stream).
    pub(super) fn count_error(&self, status: StatusCode) {
        let counter = if status.is_client_error() { &self.client_errors } else { &self.server_errors };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn observe_ttft(&self, ms: f64) {
        self.ttft.observe(ms);
    }

    pub(super) fn observe_inter_token(&self, ms: f64) {
        self.inter_token.observe(ms);
    }
}

/// A Prometheus histogram of milliseconds over fixed buckets.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

const BUCKETS_MS: [f64; 12] = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0];

impl Histogram {
    fn observe(&self, ms: f64) {
        if let Some(i) = BUCKETS_MS.iter().position(|&b| ms <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
    }

    /// The histogram in Prometheus' text format (buckets cumulative, `le` in seconds).
    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, le) in self.buckets.iter().zip(BUCKETS_MS) {
            cumulative += b.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", le / 1000.0);
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// `GET /metrics`: Prometheus' text format.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let m = &state.metrics;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut body = format!(
        "# TYPE exsa_requests_total counter\n\
         exsa_requests_total{{status=\"ok\"}} {}\n\
         exsa_requests_total{{status=\"client_error\"}} {}\n\
         exsa_requests_total{{status=\"server_error\"}} {}\n\
         # TYPE exsa_prompt_tokens_total counter\nexsa_prompt_tokens_total {}\n\
         # TYPE exsa_completion_tokens_total counter\nexsa_completion_tokens_total {}\n",
        load(&m.ok),
        load(&m.client_errors),
        load(&m.server_errors),
        load(&m.prompt_tokens),
        load(&m.completion_tokens),
    );
    render_decode_loops(&state.models.statuses(), &mut body);
    m.ttft.render("exsa_time_to_first_token_seconds", "From a request's arrival to its first token.", &mut body);
    m.inter_token.render("exsa_inter_token_seconds", "Between consecutive streamed tokens.", &mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// The decode loops' own counters, one series per loaded model.
fn render_decode_loops(loaded: &[(String, ServingStatus, usize)], out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(out, "# TYPE exsa_models_loaded gauge\nexsa_models_loaded {}", loaded.len());
    /// Name, type, help, and how to read it.
    type Series = (&'static str, &'static str, &'static str, fn(&ServingStatus, usize) -> u64);
    let series: [Series; 14] = [
        ("exsa_prompt_tokens_reused_total", "counter", "Prompt tokens found in a slot's cache, not decoded again.", |s, _| s.prompt_tokens_reused),
        (
            "exsa_prompt_tokens_copied_total",
            "counter",
            "Of the reused prompt tokens, those a slot took from another slot's cache (a shared prefix computed once).",
            |s, _| s.prompt_tokens_copied,
        ),
        ("exsa_decode_steps_total", "counter", "Decodes run (each carries every busy slot's next token).", |s, _| s.steps),
        ("exsa_queue_depth", "gauge", "Requests accepted and waiting for a slot.", |s, _| s.queued as u64),
        ("exsa_busy_slots", "gauge", "Slots with a request.", |s, _| s.busy_slots as u64),
        ("exsa_kv_used_tokens", "gauge", "KV cache cells the slots hold (finished requests' caches kept for reuse included).", |s, _| {
            s.kv_used as u64
        }),
        ("exsa_kv_capacity_tokens", "gauge", "KV cache cells the slots share.", |_, n_ctx| n_ctx as u64),
        ("exsa_ctx_checkpoints", "gauge", "Recurrent-state checkpoints the slots keep (models with a recurrent state).", |s, _| s.checkpoints as u64),
        ("exsa_ctx_checkpoints_bytes", "gauge", "Host memory of the recurrent-state checkpoints.", |s, _| s.checkpoint_bytes as u64),
        ("exsa_slots", "gauge", "Slots of the model's decode loop.", |s, _| s.slots as u64),
        ("exsa_draft_tokens_total", "counter", "Tokens drafted by prompt lookup (speculative requests).", |s, _| s.drafted_tokens),
        ("exsa_draft_tokens_accepted_total", "counter", "Drafted tokens the sampler drew too (kept).", |s, _| s.accepted_tokens),
        ("exsa_draft_tokens_replayed_total", "counter", "Tokens decoded again after rejected drafts a recurrent state could not drop.", |s, _| {
            s.replayed_tokens
        }),
        ("exsa_steps_without_drafts_total", "counter", "Steps built again without drafts: the KV cache had no room for them.", |s, _| {
            s.steps_without_drafts
        }),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, status, n_ctx) in loaded {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", id.replace(['\\', '"', '\n'], "_"), value(status, *n_ctx));
        }
    }
}
