//! The JSON API: payouts, batches, pause/resume, health and metrics.

use super::AppState;
use crate::batch::{self, BatchError};
use crate::ids::BatchId;
use crate::producer::{Enqueued, ProducerError};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn internal(err: impl std::fmt::Display) -> Response {
    tracing::error!(error = %err, "API request failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage unavailable, retry later",
    )
}

/// `POST /v1/payouts`: 201 queued; 200 the same payout again (its current status); 409 the
/// mchOrderNo exists with a different body; 422 every invalid field.
pub async fn create_payout(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(err) => return error(StatusCode::BAD_REQUEST, format!("malformed JSON: {err}")),
    };
    match state.producer.enqueue_json(&value, None).await {
        Ok(Enqueued::Queued) => {
            let id = value["mchOrderNo"].as_str().unwrap_or_default();
            match state.deployment.ledger.get(id).await {
                Ok(Some(record)) => (StatusCode::CREATED, Json(record)).into_response(),
                Ok(None) => internal("order vanished after registration"),
                Err(err) => internal(err),
            }
        }
        Ok(Enqueued::Exists { record, same_request: true }) => (StatusCode::OK, Json(*record)).into_response(),
        Ok(Enqueued::Exists { record, same_request: false }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("mchOrderNo {} already exists with a different body", record.mch_order_no),
                "current": *record,
            })),
        )
            .into_response(),
        Err(ProducerError::Invalid(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "invalid payout", "errors": errors.0})),
        )
            .into_response(),
        Err(err) => internal(err),
    }
}

pub async fn get_payout(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.deployment.ledger.get(&id).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no payout {id}")),
        Err(err) => internal(err),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchQuery {
    batch_id: Option<String>,
}

/// `POST /v1/batches`: a CSV (`text/csv`) or a JSON array. Every row is validated first; if
/// any is bad nothing is queued and every bad line is listed (422).
pub async fn create_batch(
    State(state): State<Arc<AppState>>,
    Query(query): Query<BatchQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_csv = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/csv"));
    let rules = state.producer.rules();
    let parsed = if is_csv {
        batch::parse_csv(rules, &body)
    } else {
        batch::parse_json(rules, &body)
    };
    let requests = match parsed {
        Ok(requests) => requests,
        Err(err @ BatchError::BadRows { .. }) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": err.to_string(), "detail": err})),
            )
                .into_response();
        }
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": err.to_string(), "detail": err})),
            )
                .into_response();
        }
    };
    let batch_id = match query.batch_id.as_deref().map(BatchId::parse) {
        Some(Ok(id)) => id,
        Some(Err(err)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{} {err}", err.field),
            );
        }
        None => BatchId::random(),
    };
    match state.producer.enqueue_batch(&requests, &batch_id).await {
        Ok(result) => (StatusCode::CREATED, Json(result)).into_response(),
        Err(ProducerError::Invalid(errors)) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, errors.to_string())
        }
        Err(err) => internal(err),
    }
}

pub async fn get_batch(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.deployment.ledger.batch_summary(&id).await {
        Ok(summary) if summary.total == 0 => error(StatusCode::NOT_FOUND, format!("no batch {id}")),
        Ok(summary) => Json(summary).into_response(),
        Err(err) => internal(err),
    }
}

pub async fn pause(State(state): State<Arc<AppState>>) -> Response {
    match state.deployment.queue.pause().await {
        Ok(()) => Json(json!({"paused": true})).into_response(),
        Err(err) => internal(err),
    }
}

pub async fn resume(State(state): State<Arc<AppState>>) -> Response {
    match state.deployment.queue.resume().await {
        Ok(()) => Json(json!({"paused": false})).into_response(),
        Err(err) => internal(err),
    }
}

/// 200 when Redis answers (with the number of live workers), 503 when it does not.
pub async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if let Err(err) = state.deployment.ledger.ping().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"redis": "down", "error": err.to_string()})),
        )
            .into_response();
    }
    match state.deployment.queue.stats().await {
        Ok(stats) => Json(
            json!({"redis": "ok", "workersAlive": stats.workers_alive, "paused": stats.paused}),
        )
        .into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"redis": "error", "error": err.to_string()})),
        )
            .into_response(),
    }
}

/// Prometheus text; queue gauges are read fresh on each scrape.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Ok(stats) = state.deployment.queue.stats().await {
        metrics::gauge!(crate::metrics::QUEUE_WAITING).set(stats.waiting as f64);
        metrics::gauge!(crate::metrics::QUEUE_PENDING).set(stats.pending as f64);
        metrics::gauge!(crate::metrics::QUEUE_DELAYED).set(stats.delayed as f64);
        metrics::gauge!(crate::metrics::QUEUE_DEAD).set(stats.dead as f64);
        metrics::gauge!(crate::metrics::QUEUE_OLDEST_AGE)
            .set(stats.oldest_job_age.map_or(0.0, |a| a.as_secs_f64()));
        metrics::gauge!(crate::metrics::QUEUE_PAUSED).set(if stats.paused { 1.0 } else { 0.0 });
        metrics::gauge!(crate::metrics::WORKERS_ALIVE).set(stats.workers_alive as f64);
    }
    if let Ok(stuck) = state.deployment.ledger.stuck_count().await {
        metrics::gauge!(crate::metrics::ORDERS_STUCK).set(stuck as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
