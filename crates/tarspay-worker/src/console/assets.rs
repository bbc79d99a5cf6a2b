//! The console's stylesheet and script, inside the binary. Pages link them with a version
//! (`?v=` the content's hash), so they are cached for good and a new build is fetched anew.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

pub const CSS: &str = include_str!("assets/console.css");
pub const JS: &str = include_str!("assets/console.js");

fn version(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

static CSS_URL: LazyLock<String> =
    LazyLock::new(|| format!("/console/assets/console.css?v={}", version(CSS)));
static JS_URL: LazyLock<String> =
    LazyLock::new(|| format!("/console/assets/console.js?v={}", version(JS)));

pub fn css_url() -> &'static str {
    &CSS_URL
}

pub fn js_url() -> &'static str {
    &JS_URL
}

pub async fn serve(Path(name): Path<String>) -> Response {
    let (body, content_type) = match name.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}
