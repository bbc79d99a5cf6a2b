//! The API's OpenAPI document, served as written; a test checks it against the router.

use axum::http::header;
use axum::response::IntoResponse;

pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Every route the router serves, as (method, path); the test holds the document to it.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/payouts"),
    ("get", "/v1/payouts/{mchOrderNo}"),
    ("post", "/v1/batches"),
    ("get", "/v1/batches/{batchId}"),
    ("post", "/v1/queue/pause"),
    ("post", "/v1/queue/resume"),
    ("post", "/tarspay/notify"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push((method.clone(), path.clone()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
