//! Answers the router makes itself (no route for the path: 404; the path's route takes other
//! methods: 405) come with an empty body; an API client reads every error as
//! `{"error": "..."}`, so they get one. Answers that already have a body (the console's
//! pages, the callback path's plain text) are left as they are, and so are the headers
//! (`Allow` on a 405).

use super::openapi::ErrorBody;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

pub async fn with_json_error(response: Response) -> Response {
    let status = response.status();
    let message = match status {
        StatusCode::NOT_FOUND => "not found",
        StatusCode::METHOD_NOT_ALLOWED => "this route does not take that method",
        _ => return response,
    };
    if response.headers().contains_key(header::CONTENT_TYPE) {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let (json_parts, body) = (status, Json(ErrorBody::new(message)))
        .into_response()
        .into_parts();
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, body)
}
