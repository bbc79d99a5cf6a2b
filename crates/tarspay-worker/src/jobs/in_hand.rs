//! First polls held in hand: the create job whose create the gateway accepted waits out the
//! first poll's delay in its worker and polls with it, instead of queueing a poll job.
//!
//! A queued poll costs Redis a delayed-set entry, its promotion, a fetch and an
//! acknowledgement (about 13 commands counting Lua, docs/performance.md); a payout alone paid
//! them all, and a held poll costs none. The create job's stream entry stays pending under
//! its worker meanwhile (its heartbeat keeps it), so nothing is lost if the worker dies or
//! stalls: another worker takes the entry over after the orphan timeout, finds the
//! acceptance marked `poll_in_hand`, and turns the job into the order's poll job
//! ([`crate::ledger::SubmitTicket::Accepted`]). The held acceptance does not check the
//! submit lease; a run adopting the order meanwhile queues the poll job all the same
//! (`Ledger::accept_polling_in_hand`).
//!
//! Only a quiet process holds (at most half its call slots in use, none waited for), and at
//! most a quarter of its call slots' worth at once: under load a poll job costs little more
//! than a held poll (its Redis work shares batches with the other jobs'), while a held job
//! would keep its place in the worker from a job that could run. A worker that is stopping
//! holds nothing: a waiting hold ends at once and its job goes on as the poll job, due when
//! the hold would have ended.

use super::{CallSlots, JobContext, JobError, PayoutJob, Step, run_poll_status};
use crate::queue::Delivery;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The longest first-poll delay waited out in hand: beyond it a job would hold its place in
/// the worker too long for what it saves.
pub const MAX_HOLD: Duration = Duration::from_secs(5);

/// A worker process's holds. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PollsInHand {
    permits: Arc<Semaphore>,
    /// The process's call slots, whose use says whether it is quiet.
    slots: CallSlots,
    stopping: CancellationToken,
}

/// One held first poll: its permit, given back when dropped.
#[derive(Debug)]
pub struct HeldPoll {
    _permit: OwnedSemaphorePermit,
    stopping: CancellationToken,
}

impl PollsInHand {
    /// Holds for a process whose gateway calls are bounded by `slots`: a quarter of them at
    /// once (at least one).
    pub fn new(slots: CallSlots) -> Self {
        Self {
            permits: Arc::new(Semaphore::new((slots.capacity() / 4).max(1))),
            slots,
            stopping: CancellationToken::new(),
        }
    }

    /// A hold for a first poll due after `delay`, if one is free, the delay short enough, the
    /// process quiet and not stopping.
    pub fn try_hold(&self, delay: Duration) -> Option<HeldPoll> {
        if delay > MAX_HOLD || self.stopping.is_cancelled() || !self.slots.quiet() {
            return None;
        }
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        metrics::gauge!(crate::metrics::POLLS_IN_HAND).increment(1.0);
        Some(HeldPoll {
            _permit: permit,
            stopping: self.stopping.clone(),
        })
    }

    /// The worker is stopping: no new holds, and waiting ones end now.
    pub fn stop(&self) {
        self.stopping.cancel();
    }
}

impl Drop for HeldPoll {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::POLLS_IN_HAND).decrement(1.0);
    }
}

/// Waits out the first poll's delay, then polls the accepted order with its create job's
/// delivery `job` (a final state found acknowledges it in the same ledger step). An order
/// still pending goes on as its poll job (second attempt); a stop during the wait, or a poll
/// that could not start, hands the first poll over as the poll job, not yet attempted.
pub(super) async fn poll_in_hand(
    ctx: &JobContext,
    record: &crate::ledger::OrderRecord,
    held: HeldPoll,
    job: Option<&Delivery>,
) -> Result<Step, JobError> {
    let due = Instant::now() + ctx.poll.first_delay;
    let goes_on = |attempts: u32, after: Duration| Step::ContinueAs {
        job: PayoutJob::poll(record, false),
        attempts,
        after,
    };
    tokio::select! {
        () = tokio::time::sleep_until(due.into()) => {}
        () = held.stopping.cancelled() => {
            return Ok(goes_on(0, due.saturating_duration_since(Instant::now())));
        }
    }
    let step = run_poll_status(ctx, &record.mch_order_no, 1, false, job).await;
    drop(held);
    let step = match step {
        Ok(step) => step,
        // Redis failed the poll's read or write: the poll job takes over after the first
        // delay again, rather than the create job after its own backoff. (Should the
        // settlement fail too, whoever takes the job over turns it into the poll job.)
        Err(JobError::Ledger(err)) => {
            tracing::warn!(mch_order_no = %record.mch_order_no, error = %err, "first poll in hand failed; it goes on as the poll job");
            return Ok(goes_on(1, ctx.poll.first_delay));
        }
        Err(err) => return Err(err),
    };
    Ok(match step {
        Step::Done => Step::Done,
        Step::RetryAfter(after) => goes_on(1, after),
        Step::GiveBack => goes_on(0, Duration::ZERO),
        continued @ Step::ContinueAs { .. } => continued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MerchantName;

    const SHORT: Duration = Duration::from_millis(150);

    #[test]
    fn holds_are_a_quarter_of_the_call_slots_and_come_back_when_dropped() {
        let holds = PollsInHand::new(CallSlots::new(8));
        let first = holds.try_hold(SHORT).unwrap();
        let _second = holds.try_hold(SHORT).unwrap();
        assert!(holds.try_hold(SHORT).is_none());
        drop(first);
        assert!(holds.try_hold(SHORT).is_some());
        let one = PollsInHand::new(CallSlots::new(1));
        assert_eq!(one.permits.available_permits(), 1);
    }

    #[test]
    fn a_long_delay_or_a_stopping_worker_gets_no_hold() {
        let holds = PollsInHand::new(CallSlots::new(16));
        assert!(
            holds
                .try_hold(MAX_HOLD + Duration::from_millis(1))
                .is_none()
        );
        assert!(holds.try_hold(MAX_HOLD).is_some());
        holds.stop();
        assert!(holds.try_hold(Duration::from_millis(1)).is_none());
    }

    #[tokio::test]
    async fn a_busy_process_holds_nothing() {
        let slots = CallSlots::new(4);
        let holds = PollsInHand::new(slots.clone());
        let merchant: MerchantName = "default".parse().unwrap();
        let _calls = [
            slots.take(&merchant).await.unwrap(),
            slots.take(&merchant).await.unwrap(),
        ];
        assert!(holds.try_hold(SHORT).is_some(), "half the slots in use");
        let third = slots.take(&merchant).await.unwrap();
        assert!(holds.try_hold(SHORT).is_none(), "3 of 4 slots in use");
        drop(third);
        assert!(holds.try_hold(SHORT).is_some());
    }
}
