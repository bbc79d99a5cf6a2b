//! Adopting what the gateway says about an order: used when a create's fate is unknown, when a
//! create is refused as a duplicate (5003011), and by polling.

use super::calls::Calls;
use super::trail;
use super::{JobContext, JobError, Step};
use crate::gateway::types::{OrderInfo, OrderRef};
use crate::gateway::{GatewayError, OrderState};
use crate::ledger::{FinalResult, Finalized, OrderKind, OrderRecord, Phase};
use crate::queue::Delivery;
use rust_decimal::Decimal;
use std::str::FromStr;
use std::time::Instant;
use tokio::sync::Mutex;

/// What a query told us.
pub(super) enum Lookup {
    Found(OrderInfo),
    /// The gateway says it has no such order (5003020 / 5003018).
    NotFound,
    Failed(GatewayError),
}

/// One query, under the merchant's call limits (`calls`): a slot not granted in time is a
/// call not sent, which every caller already retries. `reason` goes into the order's
/// history with the answer.
pub(super) async fn lookup(
    ctx: &JobContext,
    calls: &Mutex<Calls<'_>>,
    record: &OrderRecord,
    reason: &str,
) -> Lookup {
    let id = record.mch_order_no.as_str();
    if calls.lock().await.next().await.is_err() {
        ctx.ledger
            .note_soon(id, trail::held("query: over the merchant's call limit"));
        return Lookup::Failed(GatewayError::NotSent {
            endpoint: "query",
            reason: "over the merchant's call limit",
        });
    }
    let order = OrderRef::MchOrderNo(id.to_owned());
    let started = Instant::now();
    let (result, not_found) = if record.kind == OrderKind::Deposit {
        (ctx.client.query_deposit(&order).await, 5003018)
    } else {
        (ctx.client.query_payout(&order).await, 5003020)
    };
    calls.lock().await.saw(result.as_ref().err()).await;
    let looked = match result {
        // An answer about another order says nothing about this one: a failed query, retried.
        Ok(info)
            if info
                .mch_order_no
                .as_deref()
                .is_some_and(|theirs| theirs != id) =>
        {
            Lookup::Failed(GatewayError::Decode {
                endpoint: "query",
                reason: format!(
                    "the answer is about order {:?}, not {id:?}",
                    info.mch_order_no.as_deref().unwrap_or_default()
                ),
                snippet: String::new(),
            })
        }
        Ok(info) => Lookup::Found(info),
        Err(err) if err.code() == Some(not_found) => Lookup::NotFound,
        Err(err) => Lookup::Failed(err),
    };
    ctx.ledger
        .note_soon(id, trail::query(reason, started, &looked, not_found));
    looked
}

fn same_money(ours: &str, theirs: Option<&str>) -> bool {
    match (Decimal::from_str(ours), theirs.map(Decimal::from_str)) {
        (Ok(a), Some(Ok(b))) => a == b,
        // The gateway did not say: nothing contradicts us.
        (_, None) => true,
        _ => false,
    }
}

/// Whether the gateway's order under our number is this payout (same currency and amount,
/// where the gateway says).
fn same_order(record: &OrderRecord, info: &OrderInfo) -> bool {
    let same_currency = info
        .currency
        .as_deref()
        .is_none_or(|c| c == record.currency);
    same_currency && same_money(&record.amount, info.order_amount.as_deref())
}

/// The gateway holds an order under our number: take its state if it is the same payout,
/// otherwise the number clashes with a different order (`conflict`, final). Every way out
/// finishes `job` (acknowledged with its last ledger step where that can be done).
pub(super) async fn adopt(
    ctx: &JobContext,
    record: &OrderRecord,
    info: &OrderInfo,
    job: Option<&Delivery>,
) -> Result<Step, JobError> {
    let id = &record.mch_order_no;
    if !same_order(record, info) {
        let msg = format!(
            "the gateway holds {id} for {} {}, not {} {}",
            info.order_amount.as_deref().unwrap_or("?"),
            info.currency.as_deref().unwrap_or("?"),
            record.amount,
            record.currency
        );
        tracing::warn!(mch_order_no = %id, %msg, "order number conflict");
        ctx.ledger
            .finalize(
                record,
                Phase::Conflict,
                &FinalResult {
                    gateway_state: Some(info.state.code()),
                    pay_order_id: info.pay_order_id.clone(),
                    code: Some(crate::gateway::codes::DUPLICATE_ORDER),
                    msg: Some(msg),
                    ..FinalResult::default()
                },
            )
            .await?;
        return Ok(Step::Done);
    }
    if finish_if_final(ctx, record, info, job).await?.is_some() {
        return Ok(Step::Done);
    }
    let poll = ctx.poll_job(record)?;
    ctx.ledger
        .accept_finishing(id, info.pay_order_id.as_deref(), Some(&poll), job)
        .await?;
    Ok(Step::Done)
}

/// Applies a final gateway state through the one terminal transition (or, for an order
/// already final with another status, as a correction). `Some` when the state was final,
/// saying what the ledger made of it (whether or not this call was the one that recorded
/// it). When `Some`, the step acknowledged `job` too (where it could): its caller must then
/// report the job done.
pub(super) async fn finish_if_final(
    ctx: &JobContext,
    record: &OrderRecord,
    info: &OrderInfo,
    job: Option<&Delivery>,
) -> Result<Option<Finalized>, JobError> {
    let Some(phase) = Phase::from_gateway(info.state) else {
        return Ok(None);
    };
    if record.phase == Phase::Conflict || !same_order(record, info) {
        // Another order holds our number: its state says nothing about this payout (an
        // accepted one is polled on, and flagged stuck past the deadline).
        tracing::warn!(mch_order_no = %record.mch_order_no, "gateway state of a different order under our number: ignored");
        return Ok(None);
    }
    let applied = ctx
        .ledger
        .apply_gateway_final_finishing(record, phase, &gateway_result(info), job)
        .await?;
    if applied == Finalized::Recorded {
        tracing::info!(mch_order_no = %record.mch_order_no, status = %phase, "order final");
    }
    Ok(Some(applied))
}

/// What a final gateway answer says, as the outcome carries it.
fn gateway_result(info: &OrderInfo) -> FinalResult {
    let failed = matches!(info.state, OrderState::Failure | OrderState::Rejected);
    FinalResult {
        gateway_state: Some(info.state.code()),
        pay_order_id: info.pay_order_id.clone(),
        fee: info.fee.clone(),
        code: None,
        msg: if failed {
            info.fail_reason.clone()
        } else {
            None
        },
    }
}
