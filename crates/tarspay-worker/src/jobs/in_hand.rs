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
//! Where held polls' gateway lookups find their orders final (the gateway settles within the
//! first poll's delay), the acceptance waits for what the poll finds ([`LateAcceptance`]): a
//! payout final at its first poll writes its final state alone (one command fewer), the
//! guard's reset having gone when the gateway accepted. A worker that dies meanwhile leaves
//! the order under its submit lease, which the next run waits out before it looks the order
//! up (it may exist).
//!
//! Only a quiet process holds (at most half its call slots in use, none waited for), and at
//! most a quarter of its call slots' worth at once: under load a poll job costs little more
//! than a held poll (its Redis work shares batches with the other jobs'), while a held job
//! would keep its place in the worker from a job that could run. A worker that is stopping
//! holds nothing: a waiting hold ends at once and its job goes on as the poll job, due when
//! the hold would have ended.

//! A held poll queries the gateway straight away, with the order as its own acceptance leaves
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
//! final absorbs. A run whose lease had run out when the gateway accepted (it stalled)
//! reads first all the same, and so does one that wakes more than [`LATE_WAKE`] after its
//! due time (its job may have been taken over meanwhile, and its poll job have flagged the
//! order stuck). Left unseen: a freeze longer than the orphan timeout that ends before then,
//! and a stuck flag written just after the lease this run took was given back by another
//! run. Either leaves a stale stuck flag in the record, and so a final order counted in the
//! stuck set until the count prunes it; it needs an order past the polling deadline.

use super::poll_status::{Polled, poll_record};
use super::{CallSlots, JobContext, JobError, PayoutJob, Step};
use crate::ledger::{InHandAcceptance, OrderRecord};
use crate::queue::Delivery;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
    /// Whether the last held poll with a verdict had the gateway's lookup find its order final
    /// (set) or not (cleared: the order pending or unknown, the query failed, or no call
    /// could be made, the merchant's limit reached); polls
    /// without one (the order final in the ledger already, by a callback say, the record
    /// gone, the order adopted by another run) leave it. When set, the next acceptance waits
    /// for its own poll (see [`LateAcceptance`]): only lookups that find orders settled make
    /// a lookup after a death during that wait likely to find the order.
    lately_final: Arc<AtomicBool>,
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
    /// process has seen: the run's submit lease had run out when the gateway accepted
    /// (another run may have taken the order over meanwhile, and failed it, say), or it woke
    /// from the wait late (its job may have been taken over during the wait).
    must_read: bool,
    lately_final: Arc<AtomicBool>,
    /// The acceptance was written when the gateway accepted (not left to the poll).
    acceptance_written: bool,
    /// The first poll's delay this hold waits out.
    delay: Duration,
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
            lately_final: Arc::new(AtomicBool::new(false)),
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
            lately_final: Arc::clone(&self.lately_final),
            acceptance_written: false,
            delay,
        })
    }

    /// The worker is stopping: no new holds, and waiting ones end now.
    pub fn stop(&self) {
        self.stopping.cancel();
    }
}

impl HeldPoll {
    /// Its run's lease had run out when the gateway accepted (see `must_read`).
    pub(super) fn after_lapsed_lease(mut self) -> Self {
        self.must_read = true;
        self
    }

    /// Whether the acceptance may wait for this poll (written only if it does not find the
    /// order final): when the process's last held poll with a verdict had the gateway's
    /// lookup find its order final,
    /// and this run's submit lease, `lease_left` now, outlasts the wait by more than
    /// [`LATE_WAKE`] (it keeps other runs off the order meanwhile). Otherwise the caller
    /// writes it now ([`HeldPoll::acceptance_written`]).
    pub(super) fn may_defer_acceptance(&self, lease_left: Duration) -> bool {
        !self.must_read
            && lease_left > self.delay + LATE_WAKE
            && self.lately_final.load(Ordering::Relaxed)
    }

    /// The acceptance was written when the gateway accepted.
    pub(super) fn acceptance_written(mut self) -> Self {
        self.acceptance_written = true;
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
    fn found(&self, read_first: bool, overtaken: bool, verdict: Option<bool>) {
        if let Some(final_found) = verdict {
            self.lately_final.store(final_found, Ordering::Relaxed);
        }
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

/// Waits out the first poll's delay, then polls the order its create job's accepted create
/// left as `record` (read again first while callbacks have lately beaten held polls), with
/// that job's delivery `job` (a final state found acknowledges it in the same ledger step).
/// The acceptance may not be written yet (see [`LateAcceptance`]). An order still pending goes
/// on as its poll job (second attempt); a stop during the wait, or a poll that could not start,
/// hands the first poll over as the poll job, not yet attempted.
pub(super) async fn poll_in_hand(
    ctx: &JobContext,
    record: &OrderRecord,
    mut held: HeldPoll,
    job: Option<&Delivery>,
) -> Result<Step, JobError> {
    // From the acceptance, so that a stall since then counts as lateness below.
    let due = held.taken_at + ctx.poll.first_delay;
    let goes_on = |attempts: u32, after: Duration| Step::ContinueAs {
        job: PayoutJob::poll(record, false),
        attempts,
        after,
    };
    let mut acceptance = LateAcceptance::new(ctx, record, held.acceptance_written);
    tokio::select! {
        () = tokio::time::sleep_until(due.into()) => {}
        () = held.stopping.cancelled() => {
            return Ok(match acceptance.write().await? {
                InHandAcceptance::Recorded => {
                    goes_on(0, due.saturating_duration_since(Instant::now()))
                }
                InHandAcceptance::AlreadyAccepted => Step::Done,
            });
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
            Ok(Some(now)) => poll_as_read(ctx, &mut acceptance, now, job).await,
            Ok(None) => Ok(Step::Done.into()),
            Err(err) => Err(err.into()),
        },
        false => poll_record(ctx, record, 1, false, job).await,
    };
    let step = match polled {
        Ok(Polled {
            step,
            overtaken,
            gateway_final,
        }) => {
            // A verdict: the gateway said final, or the poll asks again later (pending,
            // unknown, the query failed, or no call slot was free: that only turns the
            // deferral off, the safe way).
            let verdict = match (&step, gateway_final) {
                (_, true) => Some(true),
                (Step::RetryAfter(_), false) => Some(false),
                _ => None,
            };
            held.found(read_first, overtaken, verdict);
            step
        }
        // Redis failed the poll's read or write: the poll job takes over after the first
        // delay again, rather than the create job after its own backoff. (Should the
        // acceptance or the settlement fail too, the create job is tried again: it finds the
        // order accepted and goes on as the poll job, or, with no acceptance written, waits
        // out this run's lease and looks the order up.)
        Err(JobError::Ledger(err)) => {
            tracing::warn!(mch_order_no = %record.mch_order_no, error = %err, "first poll in hand failed; it goes on as the poll job");
            return Ok(match acceptance.write().await? {
                InHandAcceptance::Recorded => goes_on(1, ctx.poll.first_delay),
                InHandAcceptance::AlreadyAccepted => Step::Done,
            });
        }
        Err(err) => {
            // The create job is tried again: with the acceptance written, it goes on as the
            // poll job at once.
            if let Err(unwritten) = acceptance.write().await {
                tracing::warn!(mch_order_no = %record.mch_order_no, error = %unwritten, "acceptance of a create polled in hand not written");
            }
            return Err(err);
        }
    };
    drop(held);
    // Done: the order is final (written by this poll or found so) or gone, and needs no
    // acceptance. Otherwise it is written before the job goes on.
    if !matches!(step, Step::Done) && acceptance.write().await? == InHandAcceptance::AlreadyAccepted
    {
        return Ok(Step::Done);
    }
    Ok(match step {
        Step::Done => Step::Done,
        Step::RetryAfter(after) => goes_on(1, after),
        Step::GiveBack => goes_on(0, Duration::ZERO),
        continued @ Step::ContinueAs { .. } => continued,
    })
}

/// The acceptance of a run that holds its first poll. Written when the gateway accepted, unless
/// the process's last held poll had the gateway's lookup find its order final (a final state a
/// callback wrote first does not count: it says nothing of lookups): then the guard's count was
/// cleared at once, and the milestone waits for what this poll finds. A final state found needs
/// none (the final outranks it, and keeps the create's history line): a payout final at its
/// first poll costs one Redis command fewer. Anything else writes it, once, marked as polled in
/// hand and dated when the gateway accepted, before the job goes on as the poll job or is tried
/// again: a run that takes the job over finds it and turns the job into the poll job. Until
/// then the order shows its submit lease, which keeps other runs off it; a worker that dies
/// holding leaves the order to the run after that lease, which looks it up (as after a death
/// during the create call) and, should the gateway not know the order yet, creates it again
/// under the same number (the gateway's duplicate answer settles it). That exposure is why only
/// a process whose first polls' lookups find their orders final defers: where they do not,
/// deferring would save nothing, and the lookup after a death would more likely miss.
struct LateAcceptance<'a> {
    ctx: &'a JobContext,
    ours: &'a OrderRecord,
    written: Option<InHandAcceptance>,
}

impl<'a> LateAcceptance<'a> {
    fn new(ctx: &'a JobContext, ours: &'a OrderRecord, written_already: bool) -> Self {
        Self {
            ctx,
            ours,
            written: written_already.then_some(InHandAcceptance::Recorded),
        }
    }

    fn pay_order_id(&self) -> &str {
        self.ours.pay_order_id.as_deref().unwrap_or_default()
    }

    fn accepted_at_ms(&self) -> u64 {
        self.ours
            .accepted_at_ms
            .unwrap_or_else(crate::queue::now_ms)
    }

    /// Writes it (once). `AlreadyAccepted`: another run adopted the order meanwhile (this
    /// run's lease ran out) and queued its poll job; this job is done.
    async fn write(&mut self) -> Result<InHandAcceptance, JobError> {
        if let Some(answer) = self.written {
            return Ok(answer);
        }
        let answer = self
            .ctx
            .ledger
            .accept_in_hand_after_clearing(
                &self.ours.mch_order_no,
                self.pay_order_id(),
                self.accepted_at_ms(),
            )
            .await?;
        self.written = Some(answer);
        Ok(answer)
    }
}

/// The held poll of the order as read just now (`now`). A state the gateway made final is
/// done. Otherwise this run's create was accepted: an order another run changed (it accepted
/// it, or failed it, after this run's lease ran out) gets the acceptance written first, which
/// says whether this job still polls it (a failed one is followed for a correction); one as
/// this run's lease left it is polled as the acceptance would leave it.
async fn poll_as_read(
    ctx: &JobContext,
    acceptance: &mut LateAcceptance<'_>,
    now: OrderRecord,
    job: Option<&Delivery>,
) -> Result<Polled, JobError> {
    if now.phase.is_final() && now.gateway_state.is_some() {
        return poll_record(ctx, &now, 1, false, job).await;
    }
    if now.accepted || now.phase.is_final() {
        return match acceptance.write().await? {
            InHandAcceptance::Recorded => {
                let mut now = now;
                if !now.accepted {
                    now.accepted = true;
                    now.accepted_at_ms = Some(acceptance.accepted_at_ms());
                }
                poll_record(ctx, &now, 1, false, job).await
            }
            InHandAcceptance::AlreadyAccepted => Ok(Step::Done.into()),
        };
    }
    let as_accepted = now.accepted_in_hand(acceptance.pay_order_id(), acceptance.accepted_at_ms());
    poll_record(ctx, &as_accepted, 1, false, job).await
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
        first.found(false, false, None);
        drop(first);
        assert!(!hold().reads_ledger_first());
        // Overtaken (a callback made the order final during the wait): the next held polls
        // read first, READS_AFTER_OVERTAKEN of them while none finds the order final again.
        hold().found(false, true, None);
        for _ in 0..READS_AFTER_OVERTAKEN {
            let next = hold();
            assert!(next.reads_ledger_first());
            next.found(true, false, None);
        }
        assert!(!hold().reads_ledger_first());
        // One that reads and finds it final starts the count over.
        hold().found(false, true, None);
        for _ in 1..READS_AFTER_OVERTAKEN {
            hold().found(true, false, None);
        }
        let last = hold();
        assert!(last.reads_ledger_first());
        last.found(true, true, None);
        drop(last);
        for _ in 0..READS_AFTER_OVERTAKEN {
            hold().found(true, false, None);
        }
        assert!(!hold().reads_ledger_first());
        // A run whose lease ran out before the gateway accepted reads first whatever was seen, and
        // that read uses up none of the reads left.
        let lapsed = hold().after_lapsed_lease();
        assert!(lapsed.reads_ledger_first());
        lapsed.found(true, false, None);
        drop(lapsed);
        assert!(!hold().reads_ledger_first());
        hold().found(false, true, None);
        hold().after_lapsed_lease().found(true, false, None);
        for _ in 1..READS_AFTER_OVERTAKEN {
            hold().found(true, false, None);
        }
        assert!(hold().reads_ledger_first(), "one read left");
        hold().found(true, false, None);
        assert!(!hold().reads_ledger_first());
    }

    #[test]
    fn the_acceptance_waits_for_the_poll_only_after_a_held_poll_found_its_order_final() {
        let holds = PollsInHand::new(CallSlots::new(8));
        let hold = || holds.try_hold(SHORT).unwrap();
        let lease = Duration::from_secs(30);
        // Nothing found yet: written at once.
        assert!(!hold().may_defer_acceptance(lease));
        // A held poll's lookup found its order final: the next acceptance waits for its poll.
        hold().found(false, false, Some(true));
        assert!(hold().may_defer_acceptance(lease));
        // Unless its run's lease ran out before the gateway accepted, or would not outlast
        // the wait by more than a late wake.
        assert!(!hold().after_lapsed_lease().may_defer_acceptance(lease));
        assert!(!hold().may_defer_acceptance(SHORT + LATE_WAKE));
        assert!(hold().may_defer_acceptance(SHORT + LATE_WAKE + Duration::from_millis(1)));
        // A poll without a verdict (the order final in the ledger already, the record gone,
        // the order adopted) changes nothing.
        hold().found(true, false, None);
        assert!(hold().may_defer_acceptance(lease));
        // One found its order pending (or unknown, or its query failed): written at once again.
        hold().found(false, false, Some(false));
        assert!(!hold().may_defer_acceptance(lease));
        // Found final by the gateway again, after a callback wrote it (overtaken): waits again.
        hold().found(true, true, Some(true));
        assert!(hold().may_defer_acceptance(lease));
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
