//! poll-status: ask the gateway where an accepted order stands; record a final state through
//! the ledger's one terminal transition, or poll again on a capped backoff. Orders past the
//! deadline are flagged stuck and still polled.

use super::reconcile::{Lookup, finish_if_final, lookup};
use super::{JobContext, JobError, Step};
use crate::ledger::Phase;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `attempt` is this poll's number for the order (1 for the first).
pub async fn run_poll_status(
    ctx: &JobContext,
    mch_order_no: &str,
    attempt: u32,
) -> Result<Step, JobError> {
    let Some(record) = ctx.ledger.get(mch_order_no).await? else {
        return Ok(Step::Done);
    };
    if record.phase == Phase::Failed && record.gateway_state.is_none() && record.accepted {
        // We failed it ourselves, yet an acceptance was recorded (its poll job is this one): a
        // create outlived its lease. The outcome stands; a person must reconcile the money.
        tracing::error!(
            mch_order_no,
            "order failed by us was accepted by the gateway afterwards: reconcile by hand"
        );
        metrics::counter!(crate::metrics::ACCEPTED_AFTER_FAILED).increment(1);
    }
    // Only accepted orders are polled; a create still in flight owns the others.
    if record.phase != Phase::Accepted {
        return Ok(Step::Done);
    }
    match lookup(ctx, &record).await {
        Lookup::Found(info) => {
            if finish_if_final(ctx, &record, &info).await? {
                return Ok(Step::Done);
            }
        }
        Lookup::NotFound => {
            tracing::warn!(mch_order_no, "gateway does not know an accepted order yet")
        }
        Lookup::Failed(err) => tracing::info!(mch_order_no, error = %err, "status query failed"),
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let age = Duration::from_millis(now_ms.saturating_sub(record.created_at_ms));
    if age > ctx.poll.deadline && !record.stuck {
        ctx.ledger.mark_stuck(mch_order_no).await?;
        tracing::warn!(
            mch_order_no,
            age_s = age.as_secs(),
            "order stuck past the polling deadline"
        );
    }
    Ok(Step::RetryAfter(poll_interval(ctx, attempt)))
}

/// first_delay × 2^(attempt-1), capped.
fn poll_interval(ctx: &JobContext, attempt: u32) -> Duration {
    ctx.poll
        .first_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(ctx.poll.max_interval)
}
