//! poll-status: ask the gateway where an accepted order stands; record a final state through
//! the ledger's one terminal transition, or poll again on a capped backoff. Orders past the
//! deadline are flagged stuck and still polled.

use super::calls::Calls;
use super::reconcile::{Lookup, finish_if_final, lookup};
use super::{JobContext, JobError, Step};
use crate::ledger::{Finalized, OrderRecord, Phase};
use crate::queue::Delivery;
use std::time::Duration;
use tokio::sync::Mutex;

/// `attempt` is this poll's number for the order (1 for the first); `once` for a single look
/// (e.g. prompted by an untrusted callback); `job` the queue delivery this run serves, if
/// any (the ledger step that finds the order final acknowledges it too).
pub async fn run_poll_status(
    ctx: &JobContext,
    mch_order_no: &str,
    attempt: u32,
    once: bool,
    job: Option<&Delivery>,
) -> Result<Step, JobError> {
    let Some(record) = ctx.ledger.get(mch_order_no).await? else {
        return Ok(Step::Done);
    };
    Ok(poll_record(ctx, &record, attempt, once, job).await?.step)
}

/// What one poll did.
pub(super) struct Polled {
    pub step: Step,
    /// The order was final already, by another's hand (a callback's, mostly), when this poll
    /// read it or wrote the gateway's final state.
    pub overtaken: bool,
    /// The gateway's answer to this poll's query was final: a lookup that finds settled orders
    /// (a final state found in the ledger, a callback's say, proves nothing about lookups).
    pub gateway_final: bool,
}

impl From<Step> for Polled {
    fn from(step: Step) -> Self {
        Self {
            step,
            overtaken: false,
            gateway_final: false,
        }
    }
}

/// A poll of the order as `record` has it (read just now, or known to its caller).
pub(super) async fn poll_record(
    ctx: &JobContext,
    record: &OrderRecord,
    attempt: u32,
    once: bool,
    job: Option<&Delivery>,
) -> Result<Polled, JobError> {
    let mch_order_no = record.mch_order_no.as_str();
    // We failed it ourselves, yet an acceptance was recorded (its poll job is this one): a
    // create outlived its lease. The outcome stands until the gateway says how the order
    // ended; then a correction tells the application.
    let failed_by_us_then_accepted =
        record.phase == Phase::Failed && record.gateway_state.is_none() && record.accepted;
    if failed_by_us_then_accepted && record.corrections.is_empty() && attempt == 1 && !once {
        tracing::error!(
            mch_order_no,
            "order failed by us was accepted by the gateway afterwards: following it for a correction"
        );
        metrics::counter!(crate::metrics::ACCEPTED_AFTER_FAILED).increment(1);
    }
    let follow = record.phase == Phase::Accepted
        || (failed_by_us_then_accepted && record.corrections.is_empty())
        // A single look at a final order may find that the gateway says otherwise.
        || (once && record.phase.is_final() && record.phase != Phase::Conflict);
    // Otherwise a create still in flight owns the order, or it is settled.
    if !follow {
        return Ok(Polled {
            step: Step::Done,
            overtaken: record.phase.is_final(),
            gateway_final: false,
        });
    }
    let calls = match Calls::start(ctx).await {
        Ok(calls) => Mutex::new(calls),
        // Over the merchant's limit (look again when a slot may be free), or stopping.
        Err(instead) => return Ok(instead.into()),
    };
    let looked = lookup(ctx, &calls, record, if once { "look once" } else { "poll" }).await;
    calls.into_inner().finish().await;
    match looked {
        Lookup::Found(info) => {
            if let Some(finalized) = finish_if_final(ctx, record, &info, job).await? {
                return Ok(Polled {
                    step: Step::Done,
                    overtaken: !once && finalized != Finalized::Recorded,
                    gateway_final: true,
                });
            }
        }
        Lookup::NotFound => {
            tracing::warn!(mch_order_no, "gateway does not know an accepted order yet")
        }
        Lookup::Failed(err) => tracing::info!(mch_order_no, error = %err, "status query failed"),
    }
    if once {
        return Ok(Step::Done.into());
    }
    let age = Duration::from_millis(crate::queue::now_ms().saturating_sub(record.created_at_ms));
    if age > ctx.poll.deadline && !record.stuck && !record.phase.is_final() {
        ctx.ledger.mark_stuck(mch_order_no).await?;
        tracing::warn!(
            mch_order_no,
            age_s = age.as_secs(),
            "order stuck past the polling deadline"
        );
    }
    Ok(Step::RetryAfter(poll_interval(ctx, attempt)).into())
}

/// first_delay × 2^(attempt-1), capped.
fn poll_interval(ctx: &JobContext, attempt: u32) -> Duration {
    ctx.poll
        .first_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(ctx.poll.max_interval)
}
