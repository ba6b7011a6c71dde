//! CORS for browser clients: the origins `--cors-origin` names may call every route from a
//! page (a preflight `OPTIONS` is answered for each); without any, the server sends no CORS
//! headers at all and a browser keeps pages of other origins out, as before. Credentials
//! (cookies) are never allowed: the API authenticates with a key in a header, which a page sends
//! itself.

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// The layer for `origins`; None for none. `*` lets any page call (with a warning: any site the
/// user visits can then use the server). An origin is `scheme://host[:port]`.
pub fn layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            return Err("--cors-origin *: any origin is allowed already; give it alone".into());
        }
        tracing::warn!("--cors-origin *: any web page the user opens can call this server");
        AllowOrigin::any()
    } else {
        let parsed: Result<Vec<HeaderValue>, String> = origins.iter().map(|o| origin(o)).collect();
        AllowOrigin::list(parsed?)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::HEAD, Method::OPTIONS])
            // Whatever headers the page asks to send (Authorization, X-Api-Key, Content-Type,
            // a client's own): the server reads the ones it knows.
            .allow_headers(AllowHeaders::mirror_request())
            // A page may read its request's id (for a bug report that finds the log line).
            .expose_headers([super::tracking::X_REQUEST_ID.clone()])
            .max_age(std::time::Duration::from_secs(600)),
    ))
}

/// `text` as an origin header value: `scheme://host[:port]`, nothing after.
fn origin(text: &str) -> Result<HeaderValue, String> {
    let bad = |why: &str| format!("--cors-origin {text:?} is not an origin ({why}; e.g. http://localhost:3000)");
    let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
    if !matches!(scheme, "http" | "https") {
        return Err(bad("the scheme is not http or https"));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(bad("it has a path, or no host"));
    }
    HeaderValue::from_str(text).map_err(|_| bad("it is not a header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert!(layer(&[]).unwrap().is_none());
        assert!(layer(&["http://localhost:3000".into(), "https://app.example".into()]).unwrap().is_some());
        assert!(layer(&["*".into()]).unwrap().is_some());
        for bad in ["localhost:3000", "ftp://x", "http://x/path", "http://", "*,http://x"] {
            let origins: Vec<String> = bad.split(',').map(String::from).collect();
            assert!(layer(&origins).is_err(), "{bad}");
        }
    }
}
