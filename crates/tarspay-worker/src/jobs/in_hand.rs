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

//! A held poll queries the gateway straight away, with the order as its own acceptance left
//! it: the ledger is read first only while held polls have lately found their order final
//! already (a callback beat them; [`READS_AFTER_OVERTAKEN`]). Read every time, the record
//! cost a lone payout one Redis command, and found the order final only where callbacks
//! arrive within the first-poll delay; skipped every time, such a callback would cost a
//! gateway query per payout. A poll that queries an order made final meanwhile writes
//! nothing twice: the final state is write-once, and a differing one is a correction.
//!
//! What the poll's outcome takes from the record (amount, currency, merchant, batch, attempts,
//! the stuck flag) does not change while the run holds its submit lease: attempts are written
//! by lease holders, the stuck flag by a run that holds or has just given back its lease (one
//! that lost it writes neither), the rest at registration. Others may write a final state
//! meanwhile (a callback, an adoption by a run that lost the lease), which the write-once
//! final absorbs. A run whose lease ran out before its acceptance was recorded (it stalled)
//! reads first all the same, and so does one that wakes more than [`LATE_WAKE`] after its
//! due time (its job may have been taken over meanwhile, and its poll job have flagged the
//! order stuck). Left unseen: a freeze longer than the orphan timeout that ends before then,
//! and a stuck flag written just after the lease this run took was given back by another
//! run. Either leaves a stale stuck flag in the record, and so a final order counted in the
//! stuck set until the count prunes it; it needs an order past the polling deadline.

use super::poll_status::{Polled, poll_record};
use super::{CallSlots, JobContext, JobError, PayoutJob, Step};
use crate::ledger::OrderRecord;
use crate::queue::Delivery;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The longest first-poll delay waited out in hand: beyond it a job would hold its place in
/// the worker too long for what it saves.
pub const MAX_HOLD: Duration = Duration::from_secs(5);

/// After a held poll found its order final already, how many of the process's next held polls
/// read the ledger before they query the gateway (each one that finds it final again starts
/// the count over).
pub const READS_AFTER_OVERTAKEN: u32 = 32;

/// A held poll that wakes this much after its due time reads the ledger first: the process
/// was frozen or starved, and its job may have been taken over meanwhile.
pub const LATE_WAKE: Duration = Duration::from_secs(1);

/// A worker process's holds. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PollsInHand {
    permits: Arc<Semaphore>,
    /// The process's call slots, whose use says whether it is quiet.
    slots: CallSlots,
    stopping: CancellationToken,
    /// Held polls left to read the ledger first (see the module documentation).
    reads_left: Arc<AtomicU32>,
}

/// One held first poll: its permit, given back when dropped.
#[derive(Debug)]
pub struct HeldPoll {
    _permit: OwnedSemaphorePermit,
    /// When the hold was taken (the gateway had accepted the create): the first poll is due
    /// `first_delay` after it.
    taken_at: Instant,
    stopping: CancellationToken,
    reads_left: Arc<AtomicU32>,
    /// The record this run holds may be stale, so the poll reads the ledger first whatever the
    /// process has seen: the run's submit lease ran out before its acceptance was recorded
    /// (another run may have taken the order over meanwhile, and failed it, say), or it woke
    /// from the wait late (its job may have been taken over during the wait).
    must_read: bool,
}

impl PollsInHand {
    /// Holds for a process whose gateway calls are bounded by `slots`: a quarter of them at
    /// once (at least one).
    pub fn new(slots: CallSlots) -> Self {
        Self {
            permits: Arc::new(Semaphore::new((slots.capacity() / 4).max(1))),
            slots,
            stopping: CancellationToken::new(),
            reads_left: Arc::new(AtomicU32::new(0)),
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
            taken_at: Instant::now(),
            stopping: self.stopping.clone(),
            reads_left: Arc::clone(&self.reads_left),
            must_read: false,
        })
    }

    /// The worker is stopping: no new holds, and waiting ones end now.
    pub fn stop(&self) {
        self.stopping.cancel();
    }
}

impl HeldPoll {
    /// Its run's lease ran out before the acceptance was recorded (see `must_read`).
    pub(super) fn after_lapsed_lease(mut self) -> Self {
        self.must_read = true;
        self
    }

    /// Whether this poll reads the order's record before it queries the gateway.
    fn reads_ledger_first(&self) -> bool {
        let reads = self.must_read || self.reads_left.load(Ordering::Relaxed) > 0;
        if reads {
            metrics::counter!(crate::metrics::POLLS_IN_HAND_READ_FIRST).increment(1);
        }
        reads
    }

    /// What the poll found: an order final already (`overtaken`) makes the next
    /// [`READS_AFTER_OVERTAKEN`] held polls read first; a read that found it still open counts
    /// them down.
    fn found(&self, read_first: bool, overtaken: bool) {
        if overtaken {
            metrics::counter!(crate::metrics::POLLS_IN_HAND_OVERTAKEN).increment(1);
            self.reads_left
                .store(READS_AFTER_OVERTAKEN, Ordering::Relaxed);
        } else if read_first && !self.must_read {
            let _ = self
                .reads_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(1)
                });
        }
    }
}

impl Drop for HeldPoll {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::POLLS_IN_HAND).decrement(1.0);
    }
}

/// Waits out the first poll's delay, then polls the order its create job's acceptance left as
/// `record` (read again first while callbacks have lately beaten held polls), with that job's
/// delivery `job` (a final state found acknowledges it in the same ledger step). An order still
/// pending goes on as its poll job (second attempt); a stop during the wait, or a poll that
/// could not start, hands the first poll over as the poll job, not yet attempted.
pub(super) async fn poll_in_hand(
    ctx: &JobContext,
    record: &OrderRecord,
    mut held: HeldPoll,
    job: Option<&Delivery>,
) -> Result<Step, JobError> {
    // From the acceptance, so that a stall while it was recorded counts as lateness below.
    let due = held.taken_at + ctx.poll.first_delay;
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
    // Woken late (the process froze or starved): another worker may have taken the job over
    // meanwhile and changed the order (its poll job flagged it stuck, say).
    if Instant::now().saturating_duration_since(due) > LATE_WAKE {
        held.must_read = true;
    }
    let read_first = held.reads_ledger_first();
    let polled = match read_first {
        true => match ctx.ledger.get(&record.mch_order_no).await {
            Ok(Some(now)) => poll_record(ctx, &now, 1, false, job).await,
            Ok(None) => Ok(Step::Done.into()),
            Err(err) => Err(err.into()),
        },
        false => poll_record(ctx, record, 1, false, job).await,
    };
    let step = match polled {
        Ok(Polled { step, overtaken }) => {
            held.found(read_first, overtaken);
            step
        }
        // Redis failed the poll's read or write: the poll job takes over after the first
        // delay again, rather than the create job after its own backoff. (Should the
        // settlement fail too, whoever takes the job over turns it into the poll job.)
        Err(JobError::Ledger(err)) => {
            tracing::warn!(mch_order_no = %record.mch_order_no, error = %err, "first poll in hand failed; it goes on as the poll job");
            return Ok(goes_on(1, ctx.poll.first_delay));
        }
        Err(err) => return Err(err),
    };
    drop(held);
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

    #[test]
    fn held_polls_read_the_ledger_first_only_after_one_found_its_order_final_already() {
        let holds = PollsInHand::new(CallSlots::new(8));
        let hold = || holds.try_hold(SHORT).unwrap();
        // Nothing seen yet: straight to the gateway, and a poll that found the order open
        // changes nothing.
        let first = hold();
        assert!(!first.reads_ledger_first());
        first.found(false, false);
        drop(first);
        assert!(!hold().reads_ledger_first());
        // Overtaken (a callback made the order final during the wait): the next held polls
        // read first, READS_AFTER_OVERTAKEN of them while none finds the order final again.
        hold().found(false, true);
        for _ in 0..READS_AFTER_OVERTAKEN {
            let next = hold();
            assert!(next.reads_ledger_first());
            next.found(true, false);
        }
        assert!(!hold().reads_ledger_first());
        // One that reads and finds it final starts the count over.
        hold().found(false, true);
        for _ in 1..READS_AFTER_OVERTAKEN {
            hold().found(true, false);
        }
        let last = hold();
        assert!(last.reads_ledger_first());
        last.found(true, true);
        drop(last);
        for _ in 0..READS_AFTER_OVERTAKEN {
            hold().found(true, false);
        }
        assert!(!hold().reads_ledger_first());
        // A run whose lease ran out before its acceptance reads first whatever was seen, and
        // that read uses up none of the reads left.
        let lapsed = hold().after_lapsed_lease();
        assert!(lapsed.reads_ledger_first());
        lapsed.found(true, false);
        drop(lapsed);
        assert!(!hold().reads_ledger_first());
        hold().found(false, true);
        hold().after_lapsed_lease().found(true, false);
        for _ in 1..READS_AFTER_OVERTAKEN {
            hold().found(true, false);
        }
        assert!(hold().reads_ledger_first(), "one read left");
        hold().found(true, false);
        assert!(!hold().reads_ledger_first());
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
