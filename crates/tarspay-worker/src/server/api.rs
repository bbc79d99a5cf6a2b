//! The JSON API: payouts, batches, pause/resume, health and metrics. Each handler's
//! `#[utoipa::path]` is where its route and its OpenAPI entry come from (see `openapi`).

use super::AppState;
use super::openapi::{BatchRefused, Conflict, ErrorBody, Health, Invalid, QueueState};
use crate::batch::{self, BatchError};
use crate::ids::BatchId;
use crate::ledger::{BatchSummary, OrderRecord};
use crate::payout::PayoutRequest;
use crate::producer::{BatchEnqueued, Enqueued, ProducerError};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody::new(message))).into_response()
}

/// Redis failed or stalled: the request's effect is unknown (it may have been stored), so
/// the caller must retry with the same mchOrderNo, never a new one.
fn internal(err: impl std::fmt::Display) -> Response {
    tracing::error!(error = %err, "API request failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage unavailable: the outcome is unknown; retry with the same mchOrderNo",
    )
}

/// The body's media type, lower-cased, without parameters (`; charset=utf-8`).
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default().trim();
    Some(essence.to_ascii_lowercase())
}

fn is_json(media_type: &str) -> bool {
    media_type == "application/json" || media_type.ends_with("+json")
}

fn unsupported(allowed: &str) -> Response {
    error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("content-type: must be {allowed}"),
    )
}

/// Queue one payout.
#[utoipa::path(
    post, path = "/v1/payouts", operation_id = "createPayout", tag = "payouts",
    request_body(content = PayoutRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Queued", body = OrderRecord, links(
            ("getPayout" = (operation_id = "getPayout", parameters(("mchOrderNo" = "$response.body#/mchOrderNo"))))
        )),
        (status = 200, description = "The same payout again (amounts compared as numbers): its current status", body = OrderRecord, links(
            ("getPayout" = (operation_id = "getPayout", parameters(("mchOrderNo" = "$response.body#/mchOrderNo"))))
        )),
        (status = 400, description = "Malformed JSON, or a key repeated in an object", body = ErrorBody),
        (status = 409, description = "The mchOrderNo exists with a different payout; nothing queued", body = Conflict),
        (status = 415, description = "Content-Type is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid fields, every one listed; nothing queued", body = Invalid),
    )
)]
pub async fn create_payout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !media_type(&headers).is_some_and(|m| is_json(&m)) {
        return unsupported("application/json");
    }
    // Strict: malformed JSON and a key repeated at any depth are 400s naming the problem.
    let value = match crate::strict_json::parse(&body) {
        Ok(value) => value,
        Err(err) => return error(StatusCode::BAD_REQUEST, err.to_string()),
    };
    match state.producer.enqueue_json(&value, None).await {
        Ok(Enqueued::Queued) => {
            let id = value["mchOrderNo"].as_str().unwrap_or_default();
            match state.deployment.order(id).await {
                Ok(Some(record)) => (StatusCode::CREATED, Json(record)).into_response(),
                Ok(None) => internal("order vanished after registration"),
                Err(err) => internal(err),
            }
        }
        Ok(Enqueued::Exists {
            record,
            same_request: true,
        }) => (StatusCode::OK, Json(*record)).into_response(),
        Ok(Enqueued::Exists {
            record,
            same_request: false,
        }) => (StatusCode::CONFLICT, Json(Conflict::new(*record))).into_response(),
        Err(ProducerError::Invalid(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(Invalid::new(errors.0)),
        )
            .into_response(),
        Err(err) => internal(err),
    }
}

/// A payout's current status.
#[utoipa::path(
    get, path = "/v1/payouts/{mchOrderNo}", operation_id = "getPayout", tag = "payouts",
    params(("mchOrderNo" = String, Path, description = "The payout's order id")),
    responses(
        (status = 200, description = "Its status", body = OrderRecord),
    )
)]
pub async fn get_payout(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.deployment.order(&id).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no payout {id}")),
        Err(err) => internal(err),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// 1-64 characters of A-Z, a-z, 0-9, '-' or '_'; when absent, `b-` and 16 hex digits of
    /// the body's SHA-256 (the same body is the same batch).
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    batch_id: Option<String>,
}

/// Queue a batch (payroll): a CSV with a header row, or a JSON array; at least one row.
/// Every row is validated first; if any is bad nothing is queued and every bad line is
/// listed (422). Rows whose mchOrderNo exists with a different payout are not queued and make
/// the answer 409, naming them; the batch's other rows are queued as with 201.
#[utoipa::path(
    post, path = "/v1/batches", operation_id = "createBatch", tag = "batches",
    params(BatchQuery),
    request_body(content(
        (super::openapi::PayoutBatch = "application/json"),
        (super::openapi::CsvBatch = "text/csv"),
    )),
    responses(
        (status = 201, description = "Every row queued (or already queued with the same payout: counted in `existing`, not paid again)", body = BatchEnqueued, links(
            ("getBatch" = (operation_id = "getBatch", parameters(("batchId" = "$response.body#/batchId"))))
        )),
        (status = 400, description = "Unreadable or empty batch (no rows), or a key repeated in a row", body = BatchRefused),
        (status = 409, description = "Some rows' mchOrderNo exists with a different payout: those (in `conflicting`) were not queued; every other row was, as with 201. Resending is safe", body = BatchEnqueued, links(
            ("getBatch" = (operation_id = "getBatch", parameters(("batchId" = "$response.body#/batchId"))))
        )),
        (status = 415, description = "Content-Type is neither text/csv nor JSON", body = ErrorBody),
        (status = 422, description = "Bad rows, each with its line, or a bad batchId; nothing queued", body = BatchRefused),
    )
)]
pub async fn create_batch(
    State(state): State<Arc<AppState>>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(Query(query)) = query else {
        // `?batch_id=` or a second `batchId`: refused, not taken as no id at all.
        let refused = BatchRefused::request("the query takes only one batchId=<id>".to_owned());
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(refused)).into_response();
    };
    let rules = state.producer.rules();
    let parsed = match media_type(&headers).as_deref() {
        Some("text/csv") => batch::parse_csv(rules, &body),
        Some(m) if is_json(m) => batch::parse_json(rules, &body),
        _ => return unsupported("text/csv or application/json"),
    };
    let requests = match parsed {
        Ok(requests) => requests,
        Err(err) => {
            let status = match err {
                BatchError::BadRows { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            };
            return (status, Json(BatchRefused::new(err))).into_response();
        }
    };
    let batch_id = match query.batch_id.as_deref().map(BatchId::parse) {
        Some(Ok(id)) => id,
        Some(Err(err)) => {
            let refused = BatchRefused::request(format!("{} {err}", err.field));
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(refused)).into_response();
        }
        // From the body, so a retry of the same body (after a 503, say) is the same batch
        // and its rows are counted in it, not in a new, empty one.
        None => BatchId::of_content("b", &body),
    };
    match state.producer.enqueue_batch(&requests, &batch_id).await {
        Ok(result) if result.conflicting.is_empty() => {
            (StatusCode::CREATED, Json(result)).into_response()
        }
        // As the single route: a number held by a different payout is a conflict.
        Ok(result) => (StatusCode::CONFLICT, Json(result)).into_response(),
        Err(ProducerError::Invalid(errors)) => {
            let refused = BatchRefused::request(errors.to_string());
            (StatusCode::UNPROCESSABLE_ENTITY, Json(refused)).into_response()
        }
        Err(err) => internal(err),
    }
}

/// Counts and amount totals per phase.
#[utoipa::path(
    get, path = "/v1/batches/{batchId}", operation_id = "getBatch", tag = "batches",
    params(("batchId" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "Summary", body = BatchSummary),
    )
)]
pub async fn get_batch(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.deployment.batch_summary(&id).await {
        Ok(summary) if summary.total == 0 => error(StatusCode::NOT_FOUND, format!("no batch {id}")),
        Ok(summary) => Json(summary).into_response(),
        Err(err) => internal(err),
    }
}

/// Stop every worker from sending creates.
#[utoipa::path(
    post, path = "/v1/queue/pause", operation_id = "pauseQueue", tag = "queue",
    responses((status = 200, description = "Paused", body = QueueState))
)]
pub async fn pause(State(state): State<Arc<AppState>>) -> Response {
    match state.deployment.pause().await {
        Ok(()) => Json(QueueState { paused: true }).into_response(),
        Err(err) => internal(err),
    }
}

/// Continue after a pause (an operator's or the systemic guard's).
#[utoipa::path(
    post, path = "/v1/queue/resume", operation_id = "resumeQueue", tag = "queue",
    responses((status = 200, description = "Resumed", body = QueueState))
)]
pub async fn resume(State(state): State<Arc<AppState>>) -> Response {
    match state.deployment.resume().await {
        Ok(()) => Json(QueueState { paused: false }).into_response(),
        Err(err) => internal(err),
    }
}

/// Redis reachable, workers alive. A failure is a fixed message; the details are logged.
#[utoipa::path(
    get, path = "/healthz", operation_id = "health", tag = "operations", security(),
    responses(
        (status = 200, description = "Redis answers", body = Health),
        (status = 503, description = "Redis does not answer", body = Health),
    )
)]
pub async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let checked = match state.deployment.ping().await {
        Ok(()) => state
            .deployment
            .queue_stats()
            .await
            .map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    match checked {
        Ok(stats) => Json(Health::up(stats.workers_alive, stats.paused)).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "health check: Redis unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, Json(Health::down())).into_response()
        }
    }
}

/// Prometheus text: counters and histograms of this process, and queue gauges refreshed in
/// the background (see `gauges`), so a scrape sends Redis nothing.
#[utoipa::path(
    get, path = "/metrics", operation_id = "metrics", tag = "operations", security(),
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types_are_recognised_with_parameters_and_any_case() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            media_type(&headers)
        };
        assert_eq!(
            with("Application/JSON; charset=utf-8").as_deref(),
            Some("application/json")
        );
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert_eq!(media_type(&HeaderMap::new()), None);
    }
}
