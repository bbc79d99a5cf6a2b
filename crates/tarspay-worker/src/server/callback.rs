//! The callback receiver. A callback that verifies with TarsPay's system key and reports a
//! final state goes through the ledger's one terminal transition (whichever of callback and
//! poll comes first wins; the other changes nothing). A callback that does not verify is not
//! trusted: it only schedules an immediate status query, and so does a verified callback for
//! an order we never sent a create for (only our create can make it exist under our merchant:
//! anything else is for the create run and a lookup to settle). `OK` is answered only after
//! the effect is recorded in Redis; if Redis is down the answer is 503, so TarsPay resends.
//! Any content type is read (TarsPay does not document its header; refusing would only make
//! it resend), but the body is strict JSON.

use super::AppState;
use super::note_limit::Admitted;
use crate::gateway::callback::{
    BizType, Callback, CallbackError, HEADER_SIGNATURE, parse_callback, verify_callback,
};
use crate::ledger::history::{EventKind, OrderEvent};
use crate::ledger::{FinalResult, OrderKind, OrderRecord, Phase};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use std::str::FromStr;
use std::sync::Arc;

fn reply(status: StatusCode, text: &str) -> Response {
    (status, text.to_owned()).into_response()
}

fn unavailable(err: impl std::fmt::Display) -> Response {
    tracing::error!(error = %err, "callback not recorded: Redis unavailable");
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "not recorded, please resend",
    )
}

/// The documented path; `server::routes` serves it at the configured `callback_path`.
pub const DOCUMENTED_PATH: &str = "/tarspay/notify";

/// TarsPay callback receiver (served at `callback_path`).
#[utoipa::path(
    post, path = "/tarspay/notify", operation_id = "tarspayCallback", tag = "callbacks", security(),
    params(("X-RESP-SIGNATURE" = Option<String>, Header, description = "TarsPay's signature of the body")),
    request_body(content = super::openapi::CallbackNotice, content_type = "application/json"),
    responses(
        (status = 200, description = "Plain text OK: recorded; or, if untrusted or about an order never sent, a status query was queued", body = String, content_type = "text/plain"),
        (status = 400, description = "Not a JSON object, or a key repeated", body = String, content_type = "text/plain"),
        (status = 422, description = "A required field is missing or invalid", body = String, content_type = "text/plain"),
        (status = 503, description = "Not recorded (Redis unavailable): TarsPay resends", body = String, content_type = "text/plain"),
    )
)]
pub async fn receive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // A repeated key would let whichever copy the parser keeps decide the outcome.
    if let Err(err @ crate::strict_json::StrictJsonError::DuplicateKey { .. }) =
        crate::strict_json::parse(&body)
    {
        metrics::counter!(crate::metrics::CALLBACKS, "result" => "malformed").increment(1);
        return reply(StatusCode::BAD_REQUEST, &err.to_string());
    }
    let callback = match parse_callback(&body) {
        Ok(callback) => callback,
        Err(err @ CallbackError::NotAnObject) => {
            metrics::counter!(crate::metrics::CALLBACKS, "result" => "malformed").increment(1);
            return reply(StatusCode::BAD_REQUEST, &err.to_string());
        }
        Err(err) => {
            metrics::counter!(crate::metrics::CALLBACKS, "result" => "malformed").increment(1);
            return reply(StatusCode::UNPROCESSABLE_ENTITY, &err.to_string());
        }
    };
    let id = callback.mch_order_no.clone();
    let verified = headers
        .get(HEADER_SIGNATURE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|signature| verify_callback(&state.system_key, &body, signature).is_some());
    let record = match state.deployment.order(&id).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            // Nothing of ours to apply it to or to query for.
            tracing::warn!(mch_order_no = %id, verified, "callback for an order this ledger does not hold");
            metrics::counter!(crate::metrics::CALLBACKS, "result" => "unknown_order").increment(1);
            return reply(StatusCode::OK, "OK");
        }
        Err(err) => return unavailable(err),
    };
    if record.phase == Phase::Conflict {
        // The gateway holds our number for a different payout (the conflict): its callbacks
        // are about that order, never ours, as the poll's `finish_if_final` judges too.
        tracing::warn!(mch_order_no = %id, verified, "callback for a number the gateway holds for a different payout: ignored");
        metrics::counter!(crate::metrics::CALLBACKS, "result" => "conflict").increment(1);
        return reply(StatusCode::OK, "OK");
    }
    let trusted = verified && matches_record(&callback, &record, state.mch_no_of(&record.merchant));
    // An order never sent is not an outcome of ours (yet): the create run and a lookup decide.
    let query_instead = match (trusted, never_sent(&record)) {
        (false, _) => Some("untrusted"),
        (true, true) => Some("never_sent"),
        (true, false) => None,
    };
    let ledger = state.deployment.ledger_of(&id);
    // An untrusted callback (unverified, or verified but not matching the order) is noted
    // and queries the gateway once a minute per order at most: anyone who knows an order's
    // number can post them, and a flood must neither push the real timeline out of the
    // capped history nor spend the merchant's call budget (polling still follows the order
    // meanwhile).
    let admitted = match query_instead {
        Some("untrusted") => state.untrusted_notes.admit(&id),
        _ => Admitted::Act,
    };
    if admitted == Admitted::Ignore {
        tracing::debug!(mch_order_no = %id, verified, "untrusted callback within its order's window: ignored");
        metrics::counter!(crate::metrics::CALLBACKS, "result" => "untrusted_ignored").increment(1);
        return reply(StatusCode::OK, "OK");
    }
    if admitted == Admitted::Act {
        ledger.note_soon(&id, history_line(&callback, verified, query_instead));
    }
    if let Some(result) = query_instead {
        note_now(ledger, &id).await;
        tracing::warn!(mch_order_no = %id, verified, result, "callback not applied: scheduling a status query");
        metrics::counter!(crate::metrics::CALLBACKS, "result" => result).increment(1);
        return match state.producer.queue_lookup(&record).await {
            Ok(()) => reply(StatusCode::OK, "OK"),
            Err(err) => {
                // Not queued: TarsPay resends on the 503, and the resend must not find the
                // window already spent.
                state.untrusted_notes.forget(&id);
                unavailable(err)
            }
        };
    }
    metrics::counter!(crate::metrics::CALLBACKS, "result" => "verified").increment(1);
    let Some(phase) = Phase::from_gateway(callback.state) else {
        // Not final: nothing to record; polling follows the order.
        note_now(ledger, &id).await;
        return reply(StatusCode::OK, "OK");
    };
    let failed = matches!(phase, Phase::Failed | Phase::Rejected);
    let result = FinalResult {
        gateway_state: Some(callback.state.code()),
        pay_order_id: callback.pay_order_id.clone(),
        fee: callback.fee.clone(),
        code: None,
        msg: if failed {
            callback.fail_reason.clone()
        } else {
            None
        },
    };
    // The history line rides with the final transition.
    match ledger.apply_gateway_final(&record, phase, &result).await {
        Ok(applied) => {
            tracing::info!(mch_order_no = %id, status = %phase, ?applied, "verified callback");
            reply(StatusCode::OK, "OK")
        }
        Err(err) => unavailable(err),
    }
}

/// The order history's line for a callback: verified or not, the state it told, and what
/// was done instead of applying it.
fn history_line(callback: &Callback, verified: bool, query_instead: Option<&str>) -> OrderEvent {
    let mut event = OrderEvent::now(EventKind::Callback);
    event.verified = Some(verified);
    event.state = Some(callback.state.code());
    event.reason =
        query_instead.map(|why| format!("not applied ({why}): a status query was queued"));
    event
}

/// Writes the noted callback line now (no ledger operation follows). The history never
/// fails a callback.
async fn note_now(ledger: &crate::ledger::Ledger, id: &str) {
    if let Err(err) = ledger.flush_noted(id).await {
        tracing::debug!(mch_order_no = %id, error = %err, "order history not written");
    }
}

/// A payout no create was ever sent for: the submit step counts every create before sending
/// it, so no attempts and no acceptance means the gateway cannot hold it from us.
fn never_sent(record: &OrderRecord) -> bool {
    record.kind == OrderKind::Payout
        && record.attempts == 0
        && !record.accepted
        && !record.phase.is_final()
}

/// A signed callback is applied only to the order it describes: the order's own merchant
/// (TarsPay's key signs callbacks of every merchant, another merchant may reuse our order
/// numbers, and one deployment's profiles share one receiver), the
/// same kind, the same payOrderId once we know it, and the same amount and currency. Anything
/// else is checked by a query instead.
fn matches_record(callback: &Callback, record: &OrderRecord, mch_no: Option<&str>) -> bool {
    let ours = matches!((callback.mch_no.as_deref(), mch_no), (Some(theirs), Some(ours)) if theirs == ours);
    let same_order = match (
        callback.pay_order_id.as_deref(),
        record.pay_order_id.as_deref(),
    ) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => true,
    };
    let kind = match callback.biz_type {
        BizType::Payout => OrderKind::Payout,
        BizType::Deposit => OrderKind::Deposit,
    };
    let same_currency = callback
        .currency
        .as_deref()
        .is_none_or(|c| c == record.currency);
    let same_amount = match (
        callback.order_amount.as_deref(),
        Decimal::from_str(&record.amount),
    ) {
        (Some(theirs), Ok(ours)) => Decimal::from_str(theirs).is_ok_and(|t| t == ours),
        (None, _) => true,
        (Some(_), Err(_)) => false,
    };
    ours && same_order && record.kind == kind && same_currency && same_amount
}
