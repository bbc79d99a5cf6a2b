//! create-payout: send the create for one order at most once at a time, under the ledger's
//! submit lease, and record what the gateway said. The mchOrderNo never changes; an order
//! whose create may have reached the gateway is looked up before anything is sent again.
//!
//! Never fail what may exist: once any create of an order may have reached the gateway (a
//! timeout, a dropped answer, 5xx, `-1`, any code that is not a refusal before creating),
//! the order is *ambiguous* for good. It is then failed only when the gateway has said "no
//! such order" at least twice over the settle window with no possibly-landed create in
//! between (the ledger enforces this in the same step as the failure); a refusal of a later
//! create (say 5004006 from a gateway that checks the balance before duplicates) proves
//! nothing about the first one.

use super::GuardVerdict;
use super::PayoutJob;
use super::calls::Calls;
use super::in_hand::{HeldPoll, poll_in_hand};
use super::reconcile::{Lookup, adopt, lookup};
use super::trail;
use super::{JobContext, JobError, Step, full_jitter};
use crate::gateway::codes::{is_auth_class, refused_before_creating};
use crate::gateway::{ErrorClass, GatewayError};
use crate::ids::MchOrderNo;
use crate::ledger::{FinalResult, Finalized, InHandAcceptance, OrderRecord, Phase, SubmitTicket};
use crate::payout::PayoutRequest;
use crate::queue::Delivery;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How often a job held back by a pause looks again.
const PAUSED_RECHECK: Duration = Duration::from_secs(1);
/// How long an order's first auth-class refusal is held before its create is tried again
/// (long enough for the guard to see the other orders' refusals).
const AUTH_RECHECK: Duration = Duration::from_secs(2);
/// How soon a run that lost the lease to another run looks at the order again: it never
/// reports as done work it did not finish.
const LEASE_LOST_RECHECK: Duration = Duration::from_secs(1);

/// How soon a create whose lease the replicas did not confirm is tried again.
const REPLICATION_RECHECK: Duration = Duration::from_secs(1);

/// A fresh token per run: the lease belongs to this run, not to the worker process.
fn lease_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// `job` is the queue delivery this run serves, when it has one: the ledger step that
/// finishes the job (the acceptance, or what a lookup found) acknowledges it too.
pub async fn run_create_payout(
    ctx: &JobContext,
    mch_order_no: &str,
    job: Option<&Delivery>,
) -> Result<Step, JobError> {
    // A slot under the merchant's limits before the lease: waiting spends no attempt.
    let calls = match Calls::start(ctx).await {
        Ok(calls) => Mutex::new(calls),
        Err(instead) => return Ok(instead),
    };
    let mut first_poll = None;
    let step = create(ctx, mch_order_no, &calls, job, &mut first_poll).await;
    calls.into_inner().finish().await;
    match first_poll {
        // Accepted, with the first poll left to this job: its call slot is free again.
        Some((record, held)) => poll_in_hand(ctx, &record, held, job).await,
        None => step,
    }
}

/// `first_poll` is set, with the order as this run read it, when the create was accepted and
/// its first poll is to be held in this job's hand (then the returned step is meaningless).
async fn create(
    ctx: &JobContext,
    mch_order_no: &str,
    calls: &Mutex<Calls<'_>>,
    job: Option<&Delivery>,
    first_poll: &mut Option<(OrderRecord, HeldPoll)>,
) -> Result<Step, JobError> {
    let token = lease_token();
    // The lease starts on the server after this instant, so it lasts at least until
    // `lease_ends`: a create is sent only if it can finish before then.
    let lease_ends = Instant::now() + ctx.lease;
    // The lease and the record come back from one script: one round trip.
    let (ticket, record) = ctx
        .ledger
        .begin_submit_for(mch_order_no, &token, ctx.lease, job)
        .await?;
    let (previous, attempt) = match ticket {
        SubmitTicket::Go { previous, attempt } => (previous, attempt),
        // Its poll job was queued with the acceptance.
        SubmitTicket::Accepted {
            poll_in_hand: false,
        } => return Ok(Step::Done),
        // Its create job was to poll it in hand, and this is that job, taken over from a
        // worker that died or stalled (or retried after a failed poll): it goes on as the
        // poll job now. (The first holder, should it still poll, writes at most the same
        // write-once final state, and its own settlement finds the entry gone.)
        SubmitTicket::Accepted { poll_in_hand: true } => {
            let mch_order_no =
                MchOrderNo::parse(mch_order_no).map_err(|err| JobError::BadRecord {
                    id: mch_order_no.to_owned(),
                    reason: err.to_string(),
                })?;
            return Ok(Step::ContinueAs {
                job: PayoutJob::payout_poll(mch_order_no, ctx.merchant.clone()),
                attempts: 0,
                after: Duration::ZERO,
            });
        }
        SubmitTicket::Final(_) => return Ok(Step::Done),
        // Another run holds the lease (a redelivery while the first still runs).
        SubmitTicket::Busy { retry_in } => {
            return Ok(Step::RetryAfter(retry_in + Duration::from_millis(100)));
        }
        // Checked in the same script as the lease (or found clear by the fetch loop just
        // before, by the flag or the job's own delivery, `ledger::FRESH_PAUSE_READING`), so
        // jobs a worker fetched before the pause send nothing.
        SubmitTicket::Paused => return Ok(Step::RetryAfter(PAUSED_RECHECK)),
        // The replicas did not confirm the lease (one lagging or gone): nothing was sent, and
        // the lease is back. Not an attempt.
        SubmitTicket::Unreplicated => return Ok(Step::RetryAfter(REPLICATION_RECHECK)),
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
    let run = Run {
        ctx,
        calls,
        record: &record,
        token: &token,
        attempt,
        may_exist: previous == Phase::Unknown || record.ambiguous,
        job,
    };

    let mut absent_proven = false;
    if run.may_exist {
        // An earlier create may have reached the gateway: ask before sending another.
        match lookup(ctx, calls, &record, "before another create").await {
            Lookup::Found(info) => return adopt(ctx, &record, &info, job).await,
            Lookup::NotFound => match ctx.ledger.note_absent(mch_order_no, &token).await? {
                Some(absence) => absent_proven = absence.proven(ctx.settle_window),
                None => return Ok(Step::RetryAfter(LEASE_LOST_RECHECK)),
            },
            // Held back by the call limit, or a 429: no call was made, so no attempt spent.
            Lookup::Failed(
                err @ (GatewayError::NotSent { .. } | GatewayError::RateLimited { .. }),
            ) => {
                let wait = full_jitter(ctx.retry.base_delay, ctx.retry.max_delay, attempt);
                return run.not_sent(wait, &err.to_string()).await;
            }
            Lookup::Failed(err) => return run.lookup_failed(&err).await,
        }
        if attempt > ctx.retry.max_attempts {
            // Attempts are used up: only the gateway's word settles it now, and no further
            // create is sent (a refusal of it would prove nothing).
            if absent_proven {
                return run.fail(record.last_code, record.last_msg.clone()).await;
            }
            return run.keep_settling().await;
        }
    }

    if let Err(wait) = calls.lock().await.next().await {
        // After a lookup, no slot for the create itself yet.
        return run
            .not_sent(wait, "held back by the merchant's call limit")
            .await;
    }
    tracing::debug!(mch_order_no, attempt, "sending create");
    let started = Instant::now();
    let sent = ctx
        .client
        .create_payout_within(&request.to_create(&ctx.notify_url), lease_ends)
        .await;
    if let Some(wait) = calls.lock().await.saw(sent.as_ref().err()).await {
        // A 429 refuses before anything happens: not an attempt (its history line is the
        // held call's).
        return run
            .not_sent(wait, "rate-limited by the gateway (HTTP 429)")
            .await;
    }
    if !matches!(sent, Err(GatewayError::NotSent { .. })) {
        // A create that left this process, with the gateway's answer and its latency.
        ctx.ledger.note_soon(
            mch_order_no,
            trail::create_sent(
                attempt,
                started,
                sent.as_ref().map(|accepted| accepted.pay_order_id.as_str()),
            ),
        );
    }
    match sent {
        Ok(accepted) => {
            // No further call: the process's call slot goes to the next run now.
            calls.lock().await.calls_answered();
            let hold = ctx
                .polls_in_hand
                .as_ref()
                .and_then(|holds| holds.try_hold(ctx.poll.first_delay));
            if let Some(held) = hold {
                // The first poll stays with this job (see `in_hand`). Past the lease, another
                // run may have changed the order: the held poll reads it rather than trust
                // ours.
                let held = match Instant::now() >= lease_ends {
                    true => held.after_lapsed_lease(),
                    false => held,
                };
                let as_accepted = record
                    .clone()
                    .accepted_in_hand(&accepted.pay_order_id, crate::queue::now_ms());
                // The acceptance waits for the poll (the guard's count starts over now), or,
                // should that reset fail, is written now as usual.
                let lease_left = lease_ends.saturating_duration_since(Instant::now());
                let deferred = held.may_defer_acceptance(lease_left)
                    && ctx.ledger.clear_guard_for_acceptance().await.is_ok();
                if deferred {
                    metrics::counter!(crate::metrics::POLLS_IN_HAND_ACCEPTANCE_DEFERRED)
                        .increment(1);
                }
                let held = match deferred {
                    true => held,
                    false => match ctx
                        .ledger
                        .accept_polling_in_hand(mch_order_no, &accepted.pay_order_id)
                        .await?
                    {
                        InHandAcceptance::Recorded => held.acceptance_written(),
                        // Accepted by an adoption, which queued its poll job.
                        InHandAcceptance::AlreadyAccepted => return Ok(Step::Done),
                    },
                };
                *first_poll = Some((as_accepted, held));
                return Ok(Step::Done);
            }
            let poll = ctx.poll_job(&record)?;
            ctx.ledger
                .accept_finishing(mch_order_no, Some(&accepted.pay_order_id), Some(&poll), job)
                .await?;
            Ok(Step::Done)
        }
        // Stopped before it left (the run stalled, frozen say, until too little of its lease
        // was left for the call): nothing reached the gateway, so it is not an attempt. Counted,
        // a worker's stalls alone would use the attempts up and fail a payout never sent.
        Err(err @ GatewayError::NotSent { .. }) => {
            let wait = full_jitter(ctx.retry.base_delay, ctx.retry.max_delay, attempt);
            run.not_sent(wait, &err.to_string()).await
        }
        Err(err) => run.create_failed(err, absent_proven).await,
    }
}

/// Whether a create that failed this way may have created the order. Only a transport
/// failure before sending, an HTTP refusal (4xx) or a code that refuses before creating
/// (validation, auth, balance) proves it did not: `-1` ("system error") and any other code
/// may come after the gateway stored the order.
fn may_have_created(err: &GatewayError) -> bool {
    match err {
        GatewayError::Gateway { code, .. } => !refused_before_creating(*code),
        other => other.is_ambiguous(),
    }
}

/// One run of an order's create job: it holds the submit lease under `token`.
struct Run<'a, 'c> {
    ctx: &'a JobContext,
    /// The run's slots under the merchant's call limits.
    calls: &'a Mutex<Calls<'c>>,
    record: &'a OrderRecord,
    token: &'a str,
    attempt: u32,
    /// Some earlier create of this order may exist at the gateway.
    may_exist: bool,
    /// The queue delivery this run serves (acknowledged by the step that finishes it).
    job: Option<&'a Delivery>,
}

impl Run<'_, '_> {
    fn id(&self) -> &str {
        &self.record.mch_order_no
    }

    /// The create was not sent, or refused before anything happened (429): the lease goes
    /// back with the attempt it counted, and the job runs again after `wait`.
    async fn not_sent(&self, wait: Duration, why: &str) -> Result<Step, JobError> {
        self.ctx.ledger.note_soon(self.id(), trail::held(why));
        self.ctx
            .ledger
            .release_unsent(self.id(), self.token, self.next_phase(false), why)
            .await?;
        Ok(Step::RetryAfter(wait))
    }

    async fn create_failed(
        &self,
        err: GatewayError,
        absent_proven: bool,
    ) -> Result<Step, JobError> {
        let ctx = self.ctx;
        let id = self.id();
        let class = err.class(&ctx.codes);
        let created = may_have_created(&err);
        tracing::info!(mch_order_no = id, attempt = self.attempt, error = %err, ?class, created, "create failed");
        // A gateway may check the key before the duplicate number: an auth-class refusal of
        // a create whose order may already exist says nothing sure about the key, so it
        // does not count towards pausing every payout.
        if let Some(code) = err.code()
            && is_auth_class(code)
            && !self.may_exist
        {
            let verdict = ctx.guard.record_auth_failure(id, code).await?;
            // Systemic (bad key, unbound IP): the merchant's lanes are paused; hold this
            // order for the resume instead of burning it. The first auth-class refusal of
            // an order is held too, for a moment: orders failing together in several
            // partitions each count before they see the others, and if the fault is the
            // merchant's the guard trips meanwhile and holds them all; if the next create
            // of this order is refused again without a trip, it fails.
            let first_refusal = !self.record.last_code.is_some_and(is_auth_class);
            if verdict == GuardVerdict::Pause || first_refusal {
                ctx.ledger
                    .release(
                        id,
                        self.token,
                        self.next_phase(false),
                        false,
                        err.code(),
                        &err.to_string(),
                    )
                    .await?;
                return Ok(Step::RetryAfter(if verdict == GuardVerdict::Pause {
                    PAUSED_RECHECK
                } else {
                    AUTH_RECHECK
                }));
            }
        }
        if class == ErrorClass::Reconcile {
            // The gateway says the number exists: find out whether it is this payout. A
            // lookup that does not find it yet is lag, not absence.
            return match lookup(ctx, self.calls, self.record, "the number exists").await {
                Lookup::Found(info) => adopt(ctx, self.record, &info, self.job).await,
                Lookup::NotFound => self.retry(&err, true).await,
                // The create's answer is the order's error; the query's is in its history.
                Lookup::Failed(_) => self.retry(&err, true).await,
            };
        }
        if !created && err.code().is_some_and(refused_before_creating) {
            // A refusal fails the payout only if no create of it may exist, or the gateway
            // has proven it holds none; otherwise it proves nothing about the earlier create.
            if !self.may_exist || absent_proven {
                return self.fail(err.code(), Some(gateway_msg(&err))).await;
            }
            return self.keep_settling_or_retry(&err).await;
        }
        if class == ErrorClass::Terminal {
            // Terminal but not a refusal before creating: check it against the gateway.
            return self.settle_by_lookup(&err, created).await;
        }
        self.retry(&err, created).await
    }

    fn next_phase(&self, created: bool) -> Phase {
        if self.may_exist || created {
            Phase::Unknown
        } else {
            Phase::Queued
        }
    }

    /// Retry the same create later; once attempts are used up, settle the order by queries.
    async fn retry(&self, err: &GatewayError, created: bool) -> Result<Step, JobError> {
        let ctx = self.ctx;
        if self.attempt >= ctx.retry.max_attempts {
            if self.may_exist || created {
                // Some create may be at the gateway: failing now could pay the beneficiary
                // under a `failed` outcome. Only lookups settle it from now on.
                return self
                    .release_and_wait(err, created, ctx.retry.max_delay)
                    .await;
            }
            return self.settle_by_lookup(err, false).await;
        }
        ctx.ledger
            .release(
                self.id(),
                self.token,
                self.next_phase(created),
                created,
                err.code(),
                &err.to_string(),
            )
            .await?;
        let label = err
            .code()
            .map_or_else(|| err.kind().to_owned(), |c| c.to_string());
        metrics::counter!(crate::metrics::CREATE_RETRIES, "code" => label).increment(1);
        Ok(Step::RetryAfter(full_jitter(
            ctx.retry.base_delay,
            ctx.retry.max_delay,
            self.attempt,
        )))
    }

    /// The lookup before another create failed: the order stays `unknown` and is looked up
    /// again after the retry's wait. The record keeps the create's last error (the query's
    /// is in the history): that is what a `failed` outcome would report once absence is
    /// proven, and a query's timeout is not why the payout failed.
    async fn lookup_failed(&self, err: &GatewayError) -> Result<Step, JobError> {
        let ctx = self.ctx;
        let wait = if self.attempt >= ctx.retry.max_attempts {
            ctx.retry.max_delay
        } else {
            full_jitter(ctx.retry.base_delay, ctx.retry.max_delay, self.attempt)
        };
        tracing::info!(mch_order_no = self.id(), error = %err, "lookup before another create failed");
        let record = self.record;
        let msg = record.last_msg.as_deref().unwrap_or_default();
        self.hold(false, record.last_code, msg, wait).await
    }

    /// A refusal of a create of an order that may exist: wait for the gateway to settle it
    /// (the next run looks it up first), keeping the record's last error.
    async fn keep_settling_or_retry(&self, err: &GatewayError) -> Result<Step, JobError> {
        let wait = if self.attempt >= self.ctx.retry.max_attempts {
            self.ctx.retry.max_delay
        } else {
            full_jitter(
                self.ctx.retry.base_delay,
                self.ctx.retry.max_delay,
                self.attempt,
            )
        };
        self.release_and_wait(err, false, wait).await
    }

    /// Fails the payout only if the gateway confirms it holds no such order and no create of
    /// it may exist; adopts the order if it exists; otherwise keeps settling.
    async fn settle_by_lookup(&self, err: &GatewayError, created: bool) -> Result<Step, JobError> {
        match lookup(self.ctx, self.calls, self.record, "settle a refused create").await {
            Lookup::Found(info) => adopt(self.ctx, self.record, &info, self.job).await,
            Lookup::NotFound if !self.may_exist && !created => {
                self.fail(err.code(), Some(gateway_msg(err))).await
            }
            Lookup::NotFound | Lookup::Failed(_) => {
                self.release_and_wait(err, created, self.ctx.retry.max_delay)
                    .await
            }
        }
    }

    async fn release_and_wait(
        &self,
        err: &GatewayError,
        created: bool,
        wait: Duration,
    ) -> Result<Step, JobError> {
        self.hold(created, err.code(), &err.to_string(), wait).await
    }

    /// The order stays `unknown` (its last error kept) and is looked up again at the
    /// longest wait; past the polling deadline it is reported stuck.
    async fn keep_settling(&self) -> Result<Step, JobError> {
        let record = self.record;
        let msg = record.last_msg.as_deref().unwrap_or_default();
        self.hold(false, record.last_code, msg, self.ctx.retry.max_delay)
            .await
    }

    /// Gives the lease back with the order `unknown`, and runs again after `wait`.
    async fn hold(
        &self,
        created: bool,
        code: Option<i64>,
        msg: &str,
        wait: Duration,
    ) -> Result<Step, JobError> {
        let released = self
            .ctx
            .ledger
            .release(self.id(), self.token, Phase::Unknown, created, code, msg)
            .await?;
        // A run that lost its lease leaves the order to the run that holds it now (which may
        // be about to make it final, with its own view of the stuck flag).
        if released {
            self.flag_if_overdue().await?;
        }
        Ok(Step::RetryAfter(wait))
    }

    async fn flag_if_overdue(&self) -> Result<(), JobError> {
        let record = self.record;
        let age =
            Duration::from_millis(crate::queue::now_ms().saturating_sub(record.created_at_ms));
        if age > self.ctx.poll.deadline && !record.stuck {
            self.ctx.ledger.mark_stuck(self.id()).await?;
            tracing::warn!(
                mch_order_no = self.id(),
                "order unsettled past the deadline: needs a look"
            );
        }
        Ok(())
    }

    /// Records the final `failed` outcome, but only while this run still holds the lease
    /// (and, for an order that may exist, once its absence is proven: the ledger checks).
    async fn fail(&self, code: Option<i64>, msg: Option<String>) -> Result<Step, JobError> {
        let result = FinalResult {
            code,
            msg,
            ..FinalResult::default()
        };
        match self
            .ctx
            .ledger
            .finalize_leased(
                self.record,
                self.token,
                Phase::Failed,
                &result,
                self.ctx.settle_window,
            )
            .await?
        {
            Finalized::Recorded | Finalized::Unchanged | Finalized::Corrected => Ok(Step::Done),
            Finalized::LeaseLost => {
                // Not ours any more: look again soon rather than report the work as done.
                tracing::warn!(
                    mch_order_no = self.id(),
                    "not failed: this run's lease is gone (another run took it, or it ran out)"
                );
                Ok(Step::RetryAfter(LEASE_LOST_RECHECK))
            }
            Finalized::MayExist => self.keep_settling().await,
        }
    }
}

/// The gateway's own message for a code, or the error's text.
fn gateway_msg(err: &GatewayError) -> String {
    match err {
        GatewayError::Gateway { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}
