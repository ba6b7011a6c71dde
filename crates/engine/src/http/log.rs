//! What the server says about each request: one log line and the counters of a finished
//! request, and of a refused or failed one.

use std::time::Instant;

use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::openai::finish_reason;
use crate::outcome::Completion;

/// One log line and the counters of a finished request.
pub(super) fn finished(state: &AppState, model: &str, id: &str, c: &Completion, received: Instant) {
    state.metrics.count_ok(&c.stats);
    tracing::info!(
        id,
        model,
        prompt_tokens = c.stats.prompt_tokens,
        reused = c.stats.prompt_tokens_reused,
        completion_tokens = c.stats.completion_tokens,
        ttft_ms = format!("{:.1}", c.stats.time_to_first_token_ms),
        tokens_per_s = format!("{:.1}", c.stats.generation_tokens_per_s),
        total_ms = received.elapsed().as_millis() as u64,
        finish = finish_reason(c.finish_reason, false),
        "request done"
    );
}

/// An error answer, counted and logged.
pub(super) fn refused(state: &AppState, error: ApiError) -> Response {
    state.metrics.count_error(error.status);
    tracing::info!(status = error.status.as_u16(), "request refused: {}", error.message);
    error.into_response()
}
