//! create-payout: send the create for one order at most once at a time, under the ledger's
//! submit lease, and record what the gateway said. The mchOrderNo never changes; an order
//! whose create may have reached the gateway is looked up before anything is sent again.

use super::GuardVerdict;
use super::reconcile::{Lookup, adopt, lookup};
use super::{JobContext, JobError, Step, full_jitter};
use crate::gateway::codes::{is_auth_class, refused_before_creating};
use crate::gateway::{ErrorClass, GatewayError};
use crate::ledger::{FinalResult, OrderRecord, Phase, SubmitTicket};
use crate::payout::PayoutRequest;
use std::time::Duration;

/// How often a job held back by a pause looks again.
const PAUSED_RECHECK: Duration = Duration::from_secs(1);

/// A fresh token per run: the lease belongs to this run, not to the worker process.
fn lease_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub async fn run_create_payout(ctx: &JobContext, mch_order_no: &str) -> Result<Step, JobError> {
    let token = lease_token();
    // The lease and the record come back from one script: one round trip.
    let (ticket, record) = ctx
        .ledger
        .begin_submit_with_record(mch_order_no, &token, ctx.lease)
        .await?;
    let (previous, attempt) = match ticket {
        SubmitTicket::Go { previous, attempt } => (previous, attempt),
        // Its poll job was queued with the acceptance.
        SubmitTicket::Accepted => return Ok(Step::Done),
        SubmitTicket::Final(_) => return Ok(Step::Done),
        // Another run holds the lease (a redelivery while the first still runs).
        SubmitTicket::Busy { retry_in } => {
            return Ok(Step::RetryAfter(retry_in + Duration::from_millis(100)));
        }
        // Checked in the same script as the lease, so even jobs a worker fetched before the
        // pause send nothing.
        SubmitTicket::Paused => return Ok(Step::RetryAfter(PAUSED_RECHECK)),
        SubmitTicket::Missing => {
            tracing::warn!(
                mch_order_no,
                "create-payout job for an order the ledger does not hold"
            );
            return Ok(Step::Done);
        }
    };
    let record = record.ok_or_else(|| JobError::BadRecord {
        id: mch_order_no.to_owned(),
        reason: "vanished while leased".into(),
    })?;
    let request: PayoutRequest =
        serde_json::from_str(&record.request).map_err(|err| JobError::BadRecord {
            id: mch_order_no.to_owned(),
            reason: err.to_string(),
        })?;

    if previous == Phase::Unknown {
        // An earlier create may have reached the gateway: ask before sending another.
        match lookup(ctx, &record).await {
            Lookup::Found(info) => return adopt(ctx, &record, &info).await,
            Lookup::NotFound => {}
            Lookup::Failed(err) => {
                return retry(ctx, &record, &token, Phase::Unknown, attempt, &err).await;
            }
        }
    }

    tracing::debug!(mch_order_no, attempt, "sending create");
    match ctx
        .client
        .create_payout(&request.to_create(&ctx.notify_url))
        .await
    {
        Ok(accepted) => {
            let poll = ctx.poll_job(&record)?;
            ctx.ledger
                .accept(mch_order_no, Some(&accepted.pay_order_id), Some(&poll))
                .await?;
            Ok(Step::Done)
        }
        Err(err) => create_failed(ctx, &record, &token, attempt, err).await,
    }
}

async fn create_failed(
    ctx: &JobContext,
    record: &OrderRecord,
    token: &str,
    attempt: u32,
    err: GatewayError,
) -> Result<Step, JobError> {
    let id = record.mch_order_no.as_str();
    let class = err.class(&ctx.codes);
    tracing::info!(mch_order_no = id, attempt, error = %err, ?class, "create failed");
    if let Some(code) = err.code()
        && is_auth_class(code)
        && ctx.guard.record_auth_failure(id, code).await? == GuardVerdict::Pause
    {
        // Systemic (bad key, unbound IP): the queue is paused; hold this order for the
        // resume instead of burning it.
        ctx.ledger
            .release(id, token, Phase::Queued, err.code(), &err.to_string())
            .await?;
        return Ok(Step::RetryAfter(PAUSED_RECHECK));
    }
    if class == ErrorClass::Reconcile {
        // The gateway says the number exists: find out whether it is this payout.
        return match lookup(ctx, record).await {
            Lookup::Found(info) => adopt(ctx, record, &info).await,
            Lookup::NotFound => retry(ctx, record, token, Phase::Unknown, attempt, &err).await,
            Lookup::Failed(query_err) => {
                retry(ctx, record, token, Phase::Unknown, attempt, &query_err).await
            }
        };
    }
    if class == ErrorClass::Terminal && !err.is_ambiguous() {
        // A refusal that proves nothing was created fails the payout now; any other terminal
        // answer is checked against the gateway first.
        if err.code().is_some_and(refused_before_creating) {
            return fail(ctx, record, token, &err).await;
        }
        return settle_by_lookup(ctx, record, token, &err).await;
    }
    let next = if err.is_ambiguous() {
        Phase::Unknown
    } else {
        Phase::Queued
    };
    retry(ctx, record, token, next, attempt, &err).await
}

/// Retry the same create later; once attempts are used up, settle the order by a query.
async fn retry(
    ctx: &JobContext,
    record: &OrderRecord,
    token: &str,
    next: Phase,
    attempt: u32,
    err: &GatewayError,
) -> Result<Step, JobError> {
    if attempt >= ctx.retry.max_attempts {
        if next == Phase::Unknown || record.ambiguous {
            // Some create may be at the gateway: failing now could pay the beneficiary under
            // a `failed` outcome. Keep settling it at the longest wait (each try looks it up
            // and re-sends the same mchOrderNo, which the gateway refuses if it holds it).
            return keep_settling(ctx, record, token, err).await;
        }
        return settle_by_lookup(ctx, record, token, err).await;
    }
    let id = record.mch_order_no.as_str();
    ctx.ledger
        .release(id, token, next, err.code(), &err.to_string())
        .await?;
    let label = err
        .code()
        .map_or_else(|| err.kind().to_owned(), |c| c.to_string());
    metrics::counter!(crate::metrics::CREATE_RETRIES, "code" => label).increment(1);
    Ok(Step::RetryAfter(full_jitter(
        ctx.retry.base_delay,
        ctx.retry.max_delay,
        attempt,
    )))
}

/// Fails the payout only if the gateway confirms it holds no such order and no create of it
/// was ever ambiguous; adopts the order if it exists.
async fn settle_by_lookup(
    ctx: &JobContext,
    record: &OrderRecord,
    token: &str,
    err: &GatewayError,
) -> Result<Step, JobError> {
    match lookup(ctx, record).await {
        Lookup::Found(info) => adopt(ctx, record, &info).await,
        Lookup::NotFound if !record.ambiguous => fail(ctx, record, token, err).await,
        Lookup::NotFound | Lookup::Failed(_) => keep_settling(ctx, record, token, err).await,
    }
}

/// The order stays `unknown` and is tried again at the longest wait; past the polling
/// deadline it is reported stuck.
async fn keep_settling(
    ctx: &JobContext,
    record: &OrderRecord,
    token: &str,
    err: &GatewayError,
) -> Result<Step, JobError> {
    let id = record.mch_order_no.as_str();
    ctx.ledger
        .release(id, token, Phase::Unknown, err.code(), &err.to_string())
        .await?;
    let age = Duration::from_millis(now_ms().saturating_sub(record.created_at_ms));
    if age > ctx.poll.deadline && !record.stuck {
        ctx.ledger.mark_stuck(id).await?;
        tracing::warn!(
            mch_order_no = id,
            "order unsettled past the deadline: needs a look"
        );
    }
    Ok(Step::RetryAfter(ctx.retry.max_delay))
}

/// Records the final `failed` outcome, but only while this run still holds the lease.
async fn fail(
    ctx: &JobContext,
    record: &OrderRecord,
    token: &str,
    err: &GatewayError,
) -> Result<Step, JobError> {
    let id = record.mch_order_no.as_str();
    let msg = match err {
        GatewayError::Gateway { msg, .. } => msg.clone(),
        other => other.to_string(),
    };
    let result = FinalResult {
        code: err.code(),
        msg: Some(msg),
        ..FinalResult::default()
    };
    if !ctx
        .ledger
        .finalize_leased(record, token, Phase::Failed, &result)
        .await?
    {
        tracing::warn!(
            mch_order_no = id,
            "not failed: another run owns the order now"
        );
    }
    Ok(Step::Done)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
