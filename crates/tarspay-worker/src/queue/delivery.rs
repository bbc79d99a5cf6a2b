//! The stored delivery behind a task: which stream entry it is, its envelope and its attempt
//! count. Handlers read it with apalis' `Data<Delivery>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::queue::clock::AddedAfter;
use crate::queue::envelope::Envelope;
use crate::queue::inflight::InFlight;
use crate::queue::promoter::{DueTimes, Handover};
use crate::queue::settle::SettleHandle;
use crate::redis_conn::RedisConn;
use tokio_util::sync::CancellationToken;

/// The stored delivery behind a task; handlers can read it with `Data<Delivery>`.
#[derive(Debug, Clone)]
pub struct Delivery(Arc<DeliveryInner>);

#[derive(Debug)]
struct DeliveryInner {
    entry_id: String,
    envelope: Envelope,
    attempts_before: u32,
    max_attempts: u32,
    /// Where this delivery's outcome is written: the settler of the queue (partition) it
    /// came from.
    settle: SettleHandle,
    /// Who holds it, for a ledger step that acknowledges it (see [`Delivery::ack_in`]).
    holder: Arc<Holder>,
    /// Acknowledged (or found taken over) by a ledger step: the settler has nothing to do.
    settled: AtomicBool,
    /// When the fetch loop last found its queue not paused, before it handed this delivery
    /// out: by the flag, or by a delivery (a paused queue's group delivers nothing; see
    /// `queue::fetch`). `None`: no such reading, e.g. a test's delivery.
    pause_clear_read_at: Option<Instant>,
    /// When its fetch loop sent the read (or claim) that returned it (`None`: not known, e.g.
    /// held while the pause flag could not be read).
    fetched_at: Option<Instant>,
    /// Its entry was added after a read its fetch loop sent found no job: a bound of the
    /// server's clock (see [`AddedAfter`]).
    added_after: Option<AddedAfter>,
}

/// The stream, group and consumer a fetcher's deliveries are held in, its in-flight set, and
/// its worker's promoter.
#[derive(Debug)]
pub(crate) struct Holder {
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    /// The queue's pause flag, which the fetch loop reads (or a delivery stands for) before
    /// handing deliveries out.
    pub(crate) paused: String,
    pub(crate) inflight: InFlight,
    /// Due times for the worker's promoter loop to follow (as from a wake marker).
    pub(crate) due_times: DueTimes,
    /// The worker's stop: once it is stopping, its promoter follows nothing more.
    pub(crate) stop: CancellationToken,
    /// Where due times go that the worker's promoter can no longer follow.
    pub(crate) handover: Handover,
    /// For the ownership check of a delivery that waited an orphan timeout to start.
    pub(crate) conn: RedisConn,
    pub(crate) orphan_timeout: Duration,
}

/// What a ledger script needs to acknowledge a delivery in the step that writes its job's
/// last effect: the effect and the acknowledgement are then one atomic change, and the job
/// costs no settlement round trip of its own. The script acknowledges only while the entry
/// is still pending for `consumer` (the rule of the settle script: a worker that stalled past
/// the orphan timeout and lost the entry must not acknowledge it for its new holder), except
/// the one delivery of `consumer` in a call whose step wrote or found its order's final state:
/// no run of that job has anything left to do, so it is acknowledged if pending at all, by
/// `XACK`'s own count (no ownership read); its new holder's settlement is then the stale one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InlineAck {
    pub(crate) entry_id: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    /// The delivery's worker can wake for a job the step delays in its queue before every
    /// other one (its promoter runs): the step then writes no wake marker for it.
    pub(crate) follows: bool,
}

/// When a delivery's fetch loop read it, and last found its queue not paused before handing
/// it out (see `DeliveryInner`). The default is "not known": such a delivery is
/// checked to be still this worker's before it starts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FetchTimes {
    pub(crate) fetched_at: Option<Instant>,
    pub(crate) pause_clear_read_at: Option<Instant>,
    /// When its fetch loop sent the read before the one that returned it, if that read found
    /// no job (and may stand for the server's clock: see [`AddedAfter`]).
    pub(crate) after_empty_read: Option<Instant>,
}

impl Delivery {
    pub(crate) fn new(
        entry_id: String,
        envelope: Envelope,
        attempts_before: u32,
        max_attempts: u32,
        settle: SettleHandle,
        holder: Arc<Holder>,
        times: FetchTimes,
    ) -> Self {
        Self(Arc::new(DeliveryInner {
            envelope,
            attempts_before,
            max_attempts,
            settle,
            holder,
            settled: AtomicBool::new(false),
            pause_clear_read_at: times.pause_clear_read_at,
            fetched_at: times.fetched_at,
            added_after: times
                .after_empty_read
                .and_then(|sent| AddedAfter::entry(&entry_id, sent)),
            entry_id,
        }))
    }

    /// Whether another worker took this delivery over while it waited here to start (this
    /// process frozen, or Redis out of reach, past the orphan timeout, with the job still in
    /// the fetch buffer): it must not start a second time. Its idle time was reset when it was
    /// fetched, so only a delivery an orphan timeout old (or of unknown age) can have been
    /// claimed: only those are asked (`XPENDING`, this entry). When Redis does not answer, it
    /// runs: its settlement is judged on ownership anyway.
    pub(crate) async fn taken_over_before_start(&self) -> bool {
        // The common case, every job: no Redis call, no clone.
        if self
            .0
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.0.holder.orphan_timeout)
        {
            return false;
        }
        let holder = Arc::clone(&self.0.holder);
        let id = self.entry_id().to_owned();
        let mut conn = holder.conn.clone();
        let mut command = redis::cmd("XPENDING");
        command
            .arg(&holder.stream)
            .arg(&holder.group)
            .arg(&id)
            .arg(&id)
            .arg(1);
        let pending: Result<Vec<(String, String, u64, u64)>, redis::RedisError> =
            command.query_async(&mut conn).await;
        match pending {
            Ok(pending) => match pending.first() {
                Some((_, consumer, _, _)) => *consumer != holder.consumer,
                None => true,
            },
            Err(err) => {
                tracing::warn!(error = %err, entry_id = %id, "cannot check who holds a job that waited to start; starting it");
                false
            }
        }
    }

    /// Not started: another worker holds it now (see [`Self::taken_over_before_start`]).
    pub(crate) fn dropped_before_start(&self) {
        self.let_go();
        self.report_stale("start");
    }

    /// Nothing is left for the settler, and the entry is no longer renewed.
    fn let_go(&self) {
        self.0.settled.store(true, Ordering::Release);
        self.0.holder.inflight.remove([self.entry_id()]);
    }

    fn report_stale(&self, outcome: &str) {
        super::settle::report_stale(
            &self.0.holder.consumer,
            self.entry_id(),
            self.job_id(),
            outcome,
        );
    }

    /// When the fetch loop found the queue of pause flag `paused` not paused before handing
    /// this delivery out (the instant it asked, or an instant no later than the read that
    /// delivered a job ran); `None` when it has no such reading of that queue.
    pub(crate) fn pause_clear_read_at(&self, paused: &str) -> Option<Instant> {
        let at = self.0.pause_clear_read_at?;
        (self.0.holder.paused == paused).then_some(at)
    }

    /// A bound of the server's clock this delivery brings, for a ledger step on `stream` (its
    /// own queue's: the same server): see [`AddedAfter`].
    pub(crate) fn added_after_in(&self, stream: &str) -> Option<AddedAfter> {
        self.0
            .added_after
            .filter(|_| self.0.holder.stream == stream)
    }

    /// The acknowledgement a ledger step on `stream` may write for this delivery, if it
    /// came from that stream and holds no unique key (releasing one is the settle
    /// script's job): `None` leaves the settlement to the settler, as for every other job.
    pub(crate) fn ack_in(&self, stream: &str) -> Option<InlineAck> {
        let holder = &self.0.holder;
        (holder.stream == stream && self.unique_key().is_none() && !self.is_settled()).then(|| {
            InlineAck {
                entry_id: self.0.entry_id.clone(),
                group: holder.group.clone(),
                consumer: holder.consumer.clone(),
                follows: !holder.stop.is_cancelled(),
            }
        })
    }

    /// A ledger step acknowledged this delivery (or found it taken over by another worker,
    /// `stale`, which settles it): nothing is left for the settler, and the renewer lets it go.
    pub(crate) fn settled_in_step(&self, stale: bool) {
        self.let_go();
        if !stale {
            metrics::counter!(crate::metrics::QUEUE_ACKED_IN_STEP).increment(1);
        } else {
            self.report_stale("done");
        }
    }

    /// A ledger step delayed a job in this delivery's queue to before every other one and
    /// wrote no wake marker for it: this delivery's worker wakes for it itself.
    pub(crate) fn follow_due(&self, due_ms: u64) {
        let holder = &self.0.holder;
        // The worker may have begun to stop after the step was sent, its promoter ended:
        // another worker is told instead.
        holder
            .handover
            .follow_or_hand_over_later(&holder.due_times, due_ms);
    }

    /// Whether a ledger step has settled this delivery (see [`Delivery::settled_in_step`]).
    pub(crate) fn is_settled(&self) -> bool {
        self.0.settled.load(Ordering::Acquire)
    }

    pub(crate) fn settler(&self) -> &SettleHandle {
        &self.0.settle
    }

    /// The job id given at enqueue.
    pub fn job_id(&self) -> &str {
        &self.0.envelope.id
    }

    /// The stream entry id of this delivery.
    pub fn entry_id(&self) -> &str {
        &self.0.entry_id
    }

    /// Attempts made before this one (retries and crash redeliveries).
    pub fn attempts_before(&self) -> u32 {
        self.0.attempts_before
    }

    /// The job's ceiling on attempts.
    pub fn max_attempts(&self) -> u32 {
        self.0.max_attempts
    }

    /// The unique key the job holds, if any.
    pub fn unique_key(&self) -> Option<&str> {
        self.0.envelope.unique.as_deref()
    }

    /// The job's stored JSON.
    pub fn payload_json(&self) -> &str {
        self.0.envelope.payload.get()
    }

    pub(crate) fn envelope(&self) -> &Envelope {
        &self.0.envelope
    }
}
