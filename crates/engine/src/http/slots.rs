//! llama-server's `POST /slots/{id}?action=save|restore|erase`: a slot's KV cache written to a
//! file, read back into any slot, or emptied. Files live in `--slot-save-path` and nowhere else:
//! a request names a file, never a path. Without that folder the route answers 501, as
//! llama-server does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::log;
use crate::outcome::{SlotAction, SlotActionDone};

#[derive(Deserialize)]
pub(super) struct ActionQuery {
    action: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    filename: Option<String>,
}

pub(super) async fn action(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ActionQuery>,
    body: Bytes,
) -> Response {
    match run(&state, &id, query, &body).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

async fn run(state: &AppState, id: &str, query: ActionQuery, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let Some(dir) = state.config.slot_save_path.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported_error",
            "this server does not save, restore or erase slots: start it with --slot-save-path DIR",
        ));
    };
    let slot: usize = id.parse().map_err(|_| ApiError::invalid("id_slot", format!("{id:?} is not a slot number")))?;
    // The body is optional (an erase needs none: empty or null); read as JSON whatever its
    // Content-Type.
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        serde_json::from_slice::<Option<ActionBody>>(body)
            .map_err(|e| ApiError::invalid("body", format!("not a slot action body ({{\"filename\": ...}}): {e}")))?
            .unwrap_or_default()
    };
    let action_name = query.action.as_deref().unwrap_or_default();
    let file = |body: &ActionBody| -> Result<(String, PathBuf), ApiError> {
        let name = body.filename.as_deref().ok_or_else(|| ApiError::invalid("filename", format!("action {action_name} needs a filename")))?;
        Ok((name.to_owned(), file_in(dir, name)?))
    };
    let (action, filename) = match action_name {
        "save" => {
            let (name, path) = file(&body)?;
            (SlotAction::Save(path), Some(name))
        }
        "restore" => {
            let (name, path) = file(&body)?;
            if !path.is_file() {
                let mut e =
                    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no slot file {name:?} in the --slot-save-path folder"));
                e.param = Some("filename".into());
                return Err(e);
            }
            (SlotAction::Restore(path), Some(name))
        }
        "erase" => (SlotAction::Erase, None),
        other => return Err(ApiError::invalid("action", format!("{other:?} is not a slot action (save, restore, erase)"))),
    };
    let model = state.models.get(None).await?;
    let reply = model.core.slot_action(slot, action.clone())?;
    // The decode thread answers between steps; waiting for it must not hold a runtime thread.
    let done = tokio::task::spawn_blocking(move || reply.recv())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down").with_code("shutting_down"))??;
    tracing::info!(slot, action = action_name, tokens = done.tokens, bytes = done.bytes, "slot action done");
    Ok(answer(slot, filename, &action, &done))
}

/// llama-server's answer to each action.
fn answer(slot: usize, filename: Option<String>, action: &SlotAction, done: &SlotActionDone) -> serde_json::Value {
    match action {
        SlotAction::Save(_) => json!({
            "id_slot": slot, "filename": filename, "n_saved": done.tokens, "n_written": done.bytes,
            "timings": { "save_ms": done.ms },
        }),
        SlotAction::Restore(_) => json!({
            "id_slot": slot, "filename": filename, "n_restored": done.tokens, "n_read": done.bytes,
            "timings": { "restore_ms": done.ms },
        }),
        SlotAction::Erase => json!({ "id_slot": slot, "n_erased": done.tokens }),
    }
}

/// The file `name` in `dir`. A name is one plain file name: no separators, no parent or hidden
/// names, no control or reserved characters (so it means the same file on every platform), at
/// most 255 bytes; and it must not be a symbolic link (which could point out of the folder).
fn file_in(dir: &Path, name: &str) -> Result<PathBuf, ApiError> {
    let refuse = |why: &str| Err(ApiError::invalid("filename", format!("{name:?} is not a slot file name: {why}")));
    if name.is_empty() || name.len() > 255 {
        return refuse("it must be 1 to 255 bytes");
    }
    if name.starts_with('.') {
        return refuse("it must not start with a dot");
    }
    if name.ends_with([' ', '.']) || name.starts_with(' ') {
        return refuse("it must not start with a space or end with a space or a dot");
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')) {
        return refuse(&format!("it must be a file name, not a path, without {c:?}"));
    }
    let path = dir.join(name);
    if path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
        return refuse("it is a symbolic link");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_file_is_a_plain_name_in_the_folder() {
        let dir = Path::new("/srv/slots");
        assert_eq!(file_in(dir, "slot1.bin").unwrap(), dir.join("slot1.bin"));
        assert_eq!(file_in(dir, "état du slot 1.bin").unwrap(), dir.join("état du slot 1.bin"));
        for bad in ["", ".", "..", ".hidden", "../x", "a/b", "a\\b", "/etc/passwd", "c:x", "x\n", "x ", " x", "x.", "a*b", &"x".repeat(256)] {
            let e = file_in(dir, bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(e.param.as_deref(), Some("filename"), "{bad:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_in_the_folder_is_refused() {
        let dir = std::env::temp_dir().join(format!("exsa-slot-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("out.bin");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/tmp/elsewhere.bin", &link).unwrap();
        let e = file_in(&dir, "out.bin").unwrap_err();
        assert!(e.message.contains("symbolic link"), "{}", e.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
