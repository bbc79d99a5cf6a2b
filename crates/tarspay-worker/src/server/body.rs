//! Request bodies are read here, before any handler, within bounds: a `Content-Length` over
//! the route's limit is refused (413) before a byte of the body is read, a body that grows past
//! it is cut off (413), and one that does not arrive within the read timeout gets 408. Without
//! this a client announcing 10 MB and sending 2 bytes held a connection with no answer.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;

/// The bounds of one route's body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    pub max_bytes: usize,
    pub read_timeout: Duration,
}

enum Refused {
    TooLarge,
    Slow,
    Broken,
}

fn refuse(refused: Refused, limit: BodyLimit) -> Response {
    let (status, message) = match refused {
        Refused::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body: larger than {} bytes", limit.max_bytes),
        ),
        Refused::Slow => (
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "body: not received within {}",
                humantime::format_duration(limit.read_timeout)
            ),
        ),
        Refused::Broken => (
            StatusCode::BAD_REQUEST,
            "body: the connection failed while it was read".to_owned(),
        ),
    };
    // The rest of the body is never read: the connection closes after this answer.
    (
        status,
        [(header::CONNECTION, "close")],
        axum::Json(json!({"error": message})),
    )
        .into_response()
}

/// Middleware: buffers the body within `limit`, then hands the request on.
pub async fn read_within(State(limit): State<BodyLimit>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit.max_bytes as u64) {
        return refuse(Refused::TooLarge, limit);
    }
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(limit.read_timeout, collect(body, limit.max_bytes)).await;
    match read {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(refused)) => refuse(refused, limit),
        Err(_) => refuse(Refused::Slow, limit),
    }
}

async fn collect(body: Body, max_bytes: usize) -> Result<Vec<u8>, Refused> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Refused::Broken)?;
        if bytes.len() + chunk.len() > max_bytes {
            return Err(Refused::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
