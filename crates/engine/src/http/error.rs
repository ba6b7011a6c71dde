//! Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{DecodeFailure, EngineError, SlotFileAction};
use crate::serving::SubmitError;

#[derive(Debug)]
/// An error response: the HTTP status and OpenAI's error object (`message`, `type`, `param`,
/// `code`). A 503 response carries `Retry-After: 1`.
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's error `type` (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault (a client's own field name for an unknown one).
    pub param: Option<std::borrow::Cow<'static, str>>,
    /// A machine-readable `code` (`context_length_exceeded`, `queue_full`, ...); None: null.
    pub code: Option<&'static str>,
    /// Fields beside `message` and `type` that say more (llama-server's context overflow gives
    /// `n_prompt_tokens` and `n_ctx`).
    pub details: Vec<(&'static str, serde_json::Value)>,
}

impl ApiError {
    /// A 400 `invalid_request_error` for the request field `param`; the message is prefixed with
    /// the field's name.
    pub fn invalid(param: impl Into<std::borrow::Cow<'static, str>>, message: impl std::fmt::Display) -> ApiError {
        let param = param.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {message}"),
            param: Some(param),
            code: None,
            details: Vec::new(),
        }
    }

    /// An error of `status` and `kind` with no `param`, `code` or details.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None, details: Vec::new() }
    }

    /// This error with `code` set.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The error as an OpenAI error body (for a stream's `error` event too).
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({ "message": self.message, "type": self.kind, "param": self.param, "code": self.code });
        for (key, value) in &self.details {
            error[*key] = value.clone();
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match &e {
            // llama-server's type (clients of it read the sizes); OpenAI's code.
            &EngineError::PromptTooLong { prompt_tokens, n_ctx } => {
                let mut error = ApiError::invalid("messages", &e).with_code("context_length_exceeded");
                error.kind = "exceed_context_size_error";
                error.details = vec![("n_prompt_tokens", prompt_tokens.into()), ("n_ctx", n_ctx.into())];
                error
            }
            EngineError::EmptyPrompt => ApiError::invalid("prompt", &e),
            // The engine's per-adapter scales are what a request's `lora` field gave.
            EngineError::InvalidRequest { field: "lora_scales", .. } => ApiError::invalid("lora", &e),
            EngineError::InvalidRequest { field, .. } => ApiError::invalid(*field, &e),
            EngineError::Grammar(_) => ApiError::invalid("grammar", &e),
            EngineError::JsonSchema(schema) => ApiError::invalid("json_schema", schema),
            EngineError::Chat { field, .. } => ApiError::invalid(*field, &e),
            EngineError::Unsupported { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.to_string()).with_code("unsupported")
            }
            EngineError::Tokenize(_) | EngineError::ChatTemplate(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.to_string()),
            EngineError::Decode { kind: DecodeFailure::NoKvSlot, .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()).with_code("kv_cache_full")
            }
            EngineError::Cancelled => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()).with_code("cancelled"),
            // The model's layers on another host are gone; the server reloads the model.
            EngineError::Rpc(_) => ApiError::new(StatusCode::BAD_GATEWAY, "server_error", e.to_string()).with_code("rpc_server_lost"),
            // A file that is not a state of this model and context (or no room for it) is the
            // request's fault; a file that could not be written is the server's.
            EngineError::SlotFile { action: SlotFileAction::Restore, .. } => ApiError::invalid("filename", &e),
            EngineError::NotAccepted(submit) => submit.clone().into(),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        let (status, code) = match e {
            SubmitError::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            SubmitError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            // The handlers prepare each request for the model they submit it to: a bug.
            SubmitError::OtherEngine => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, "server_error", e.to_string()).with_code(code)
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> ApiError {
        // Bad JSON, a known field of the wrong type (400, 422 made 400 as OpenAI does), or a
        // body over the limit (413).
        let status = if e.status() == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { e.status() };
        ApiError::new(status, "invalid_request_error", e.body_text())
    }
}
