//! Gateway calls under the merchant's limits (`rate_limit`, `rate_burst`, `max_in_flight`),
//! shared by every worker process through `crate::ratelimit`.
//!
//! A run takes its first slot before it touches the ledger (a create before its submit lease,
//! so waiting never spends an attempt), and another before each further call it makes. A
//! slot not granted within [`IN_HAND_WAIT`] sends the job back to the queue for about as long
//! as the limiter asks, and closes the merchant's lanes to this process for that long
//! ([`crate::queue::Gate`]): its backlog does not spin through the handlers or hold the
//! concurrency other merchants' jobs need. A `429` from the gateway slows the merchant down,
//! in every process, for its `Retry-After`.
//!
//! Apart from any merchant's limits, a worker process makes at most `concurrency` gateway
//! calls at once ([`super::CallSlots`]): a run takes its slot in [`Calls::start`], before
//! the merchant's first slot, and gives it back once it will call no more (an accepted
//! create's answer, [`Calls::calls_answered`], or [`Calls::finish`]), so the ledger steps
//! that follow overlap other runs' calls. A run that waits in hand for its merchant's first
//! slot lets the process's slot go meanwhile: a merchant at its limit does not hold calls
//! other merchants could make.

use super::slots::CallSlot;
use super::{JobContext, Step};
use crate::gateway::GatewayError;
use crate::queue::Gate;
use crate::ratelimit::{Acquire, Limiter, LimiterError, Permit};
use std::time::Duration;

/// How long a run may wait in hand for its merchant's slot (the limiter's sleeps, not its
/// waits for the process's call slot) before its job goes back to the queue.
const IN_HAND_WAIT: Duration = Duration::from_millis(250);
/// A 429 without `Retry-After` slows the merchant down this long.
const DEFAULT_SLOW_DOWN: Duration = Duration::from_secs(1);
/// How soon a job looks again when the limiter could not be asked (Redis trouble).
const LIMITER_DOWN_RECHECK: Duration = Duration::from_secs(1);

/// One merchant's limiter and its lanes' gate in this process.
#[derive(Clone)]
pub struct CallLimits {
    limiter: Limiter,
    gate: Gate,
}

impl CallLimits {
    pub fn new(limiter: Limiter, gate: Gate) -> Self {
        Self { limiter, gate }
    }

    /// The gate of the merchant's lanes, for the worker's backend to respect.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The limiter gave no slot in hand: how long until the job should run again.
    fn refused(&self, err: LimiterError) -> Duration {
        match err {
            LimiterError::Timeout { retry_after, .. } => {
                // Over the limit: this process takes no more of the merchant's jobs until a
                // slot can be free, and this one comes back about then (jittered, so the
                // jobs sent back do not return together).
                self.gate.close_for(retry_after);
                let spread = crate::queue::random_up_to(retry_after / 2 + IN_HAND_WAIT);
                metrics::counter!(crate::metrics::RATE_LIMITED, "merchant" => self.limiter.merchant().to_owned(), "by" => "limiter").increment(1);
                retry_after + spread
            }
            err => {
                tracing::warn!(merchant = self.limiter.merchant(), error = %err, "rate limiter unavailable: holding the call");
                LIMITER_DOWN_RECHECK
            }
        }
    }
}

/// The slots one run holds; every permit is given back by [`Calls::finish`].
pub(super) struct Calls<'a> {
    ctx: &'a JobContext,
    /// The first slot was taken by [`Calls::start`] and not used yet.
    unused_first: bool,
    held: Vec<Permit>,
    /// The process's call slot, from [`Calls::start`] until the run's last call is answered.
    process_slot: Option<CallSlot>,
}

impl<'a> Calls<'a> {
    /// The run's first slots: the process's call slot, waited for as long as it takes
    /// (nothing of the order is touched yet), then the merchant's. While the merchant is at
    /// its limit for a moment, the run waits without the process's slot, so other
    /// merchants' runs call meanwhile, and takes it again before it asks again. `Err` says
    /// what to do with the job instead; nothing was called.
    pub async fn start(ctx: &'a JobContext) -> Result<Self, Step> {
        let mut calls = Self {
            ctx,
            unused_first: false,
            held: Vec::new(),
            process_slot: None,
        };
        // What is left of the wait for the merchant: only the limiter's sleeps count, not
        // the waits for the process's slot (a run that waited its turn for a slot would
        // otherwise find its budget spent and go back for a wait of milliseconds).
        let mut budget = IN_HAND_WAIT;
        loop {
            if let Some(slots) = &ctx.call_slots {
                match slots.take(&ctx.merchant).await {
                    Some(slot) => calls.process_slot = Some(slot),
                    // The worker is stopping: the job goes back, for another worker.
                    None => return Err(Step::GiveBack),
                }
            }
            let Some(limits) = &ctx.limits else {
                break;
            };
            let deadline = tokio::time::Instant::now() + budget;
            match limits.limiter.try_acquire_by(deadline, IN_HAND_WAIT).await {
                Ok(Acquire::Granted(permit)) => {
                    calls.held.push(permit);
                    break;
                }
                Ok(Acquire::Wait(sleep)) => {
                    calls.process_slot = None;
                    budget = budget.saturating_sub(sleep);
                    tokio::time::sleep(sleep).await;
                }
                Err(err) => return Err(Step::RetryAfter(limits.refused(err))),
            }
        }
        calls.unused_first = true;
        Ok(calls)
    }

    /// The run makes no further call: its process slot goes to the next run now, not after
    /// the run's remaining ledger steps. (A run that may still call keeps it to the end.)
    pub fn calls_answered(&mut self) {
        self.process_slot = None;
    }

    /// A slot for the next gateway call of this run.
    pub async fn next(&mut self) -> Result<(), Duration> {
        if std::mem::take(&mut self.unused_first) {
            return Ok(());
        }
        self.take().await
    }

    /// A further call's slot from the merchant: the run keeps the process's slot meanwhile
    /// (it is in the middle of its work).
    async fn take(&mut self) -> Result<(), Duration> {
        let Some(limits) = &self.ctx.limits else {
            return Ok(());
        };
        match limits.limiter.acquire(IN_HAND_WAIT).await {
            Ok(permit) => {
                self.held.push(permit);
                Ok(())
            }
            Err(err) => Err(limits.refused(err)),
        }
    }

    /// Notes a gateway answer: a 429 slows the merchant down everywhere. The wait to use
    /// before this job runs again, if it was one.
    pub async fn saw(&self, result: Option<&GatewayError>) -> Option<Duration> {
        let Some(GatewayError::RateLimited { retry_after, .. }) = result else {
            return None;
        };
        let pause = retry_after.unwrap_or(DEFAULT_SLOW_DOWN);
        metrics::counter!(crate::metrics::RATE_LIMITED, "merchant" => self.ctx.merchant.to_string(), "by" => "gateway").increment(1);
        if let Some(limits) = &self.ctx.limits {
            limits.gate.close_for(pause);
            if let Err(err) = limits.limiter.slow_down(pause).await {
                tracing::warn!(error = %err, "could not record the gateway's slow-down");
            }
        }
        Some(pause + crate::queue::random_up_to(pause / 2 + IN_HAND_WAIT))
    }

    /// Gives every slot back (the in-flight count); a lost release expires with its lease.
    pub async fn finish(mut self) {
        self.calls_answered();
        let Some(limits) = &self.ctx.limits else {
            return;
        };
        for permit in self.held {
            if let Err(err) = limits.limiter.release(permit).await {
                tracing::debug!(error = %err, "in-flight slot not released: it expires with its lease");
            }
        }
    }
}
