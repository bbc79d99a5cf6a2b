//! The two payout jobs and what they share. They join the gateway (HTTP) and the ledger
//! (Redis): each run reads the ledger, makes at most one gateway call that could create money
//! movement, records the result with one ledger transition, and says what should happen next
//! as a [`Step`]. The queue glue turns a `Step` into an acknowledgement or a delayed retry; the
//! follow-up poll job is queued by the ledger's acceptance itself, and a job that ends with an
//! acceptance or a final state is acknowledged by that ledger step (`Ledger::accept_finishing`,
//! `Ledger::apply_gateway_final_finishing`), so its handler must then report it done.

mod calls;
mod create_payout;
mod guard;
mod in_hand;
mod poll_status;
mod reconcile;
mod slots;
mod trail;

pub use crate::queue::full_jitter;
pub use calls::CallLimits;
pub use create_payout::run_create_payout;
pub use guard::{GuardVerdict, SystemicGuard};
pub use in_hand::{HeldPoll, PollsInHand};
pub use poll_status::run_poll_status;
pub use slots::CallSlots;

use crate::gateway::{CodeTable, TarsPayClient};
use crate::ids::{MchOrderNo, MerchantName};
use crate::ledger::{Ledger, LedgerError, OrderKind, OrderRecord};
use crate::queue::{JobOptions, PreparedJob, QueueError, RedisQueue};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Jobs of the payout queue retry on their own terms (the ledger bounds creates); the queue's
/// own ceiling only catches a job that keeps crashing its worker.
pub const PAYOUT_JOB_MAX_ATTEMPTS: u32 = 10_000;

/// A job on the payout queue. Both carry only the order number: everything else is read from
/// the ledger, so a redelivered or stale job can never carry a different payout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum PayoutJob {
    CreatePayout {
        #[serde(rename = "mchOrderNo")]
        mch_order_no: MchOrderNo,
        /// The order's merchant (its lane and key); absent for `default` and in jobs written
        /// before profiles.
        #[serde(default, skip_serializing_if = "MerchantName::is_default")]
        merchant: MerchantName,
    },
    PollStatus {
        #[serde(rename = "mchOrderNo")]
        mch_order_no: MchOrderNo,
        #[serde(default, skip_serializing_if = "MerchantName::is_default")]
        merchant: MerchantName,
        kind: OrderKind,
        /// A single look (e.g. prompted by an untrusted callback); regular polling goes on in
        /// the order's own poll job.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        once: bool,
    },
}

impl PayoutJob {
    pub fn mch_order_no(&self) -> &MchOrderNo {
        match self {
            Self::CreatePayout { mch_order_no, .. } | Self::PollStatus { mch_order_no, .. } => {
                mch_order_no
            }
        }
    }

    /// The merchant whose lane and key run it.
    pub fn merchant(&self) -> &MerchantName {
        match self {
            Self::CreatePayout { merchant, .. } | Self::PollStatus { merchant, .. } => merchant,
        }
    }

    /// The create job of `record`.
    pub fn create(record: &OrderRecord) -> Self {
        Self::CreatePayout {
            mch_order_no: record.mch_order_no.clone(),
            merchant: record.merchant.clone(),
        }
    }

    /// The regular poll-status job of payout `mch_order_no` of `merchant` (a create job goes
    /// on as it: see `in_hand`).
    pub fn payout_poll(mch_order_no: MchOrderNo, merchant: MerchantName) -> Self {
        Self::PollStatus {
            mch_order_no,
            merchant,
            kind: OrderKind::Payout,
            once: false,
        }
    }

    /// A poll-status job for `record` (payout or deposit); `once` for a single look.
    pub fn poll(record: &OrderRecord, once: bool) -> Self {
        Self::PollStatus {
            mch_order_no: record.mch_order_no.clone(),
            merchant: record.merchant.clone(),
            kind: record.kind,
            once,
        }
    }

    /// The queue's unique key, for the jobs that need one. An order's create job and its
    /// regular poll job are queued by the ledger's registration and acceptance, each of
    /// which happens once per order, so they need none (and save its Redis work); a one-off
    /// look can be asked for any number of times, so at most one waits per order.
    pub fn unique_key(&self) -> Option<String> {
        match self {
            Self::PollStatus {
                mch_order_no,
                once: true,
                ..
            } => Some(format!("poll-once:{mch_order_no}")),
            Self::CreatePayout { .. } | Self::PollStatus { once: false, .. } => None,
        }
    }
}

/// What the queue should do after a job ran. (An accepted order's poll job is queued by the
/// ledger's acceptance itself, see [`JobContext::poll_job`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Finished; acknowledge.
    Done,
    /// Run this job again after the delay.
    RetryAfter(Duration),
    /// Not started (the worker is stopping): back to the queue at once, the attempt not
    /// counted.
    GiveBack,
    /// Done as this job, which goes on as `job` (its `attempts` already made) after `after`,
    /// in the same settlement: a create job that polled its order in hand goes on as the
    /// order's poll job.
    ContinueAs {
        job: PayoutJob,
        attempts: u32,
        after: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First retry waits up to this (full jitter), doubling per attempt.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Creates tried before a retryable failure becomes final.
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct PollPolicy {
    pub first_delay: Duration,
    /// Polling interval cap.
    pub max_interval: Duration,
    /// After this long without a final state the order is flagged stuck (and still polled).
    pub deadline: Duration,
}

/// Everything a job run needs; cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    pub ledger: Ledger,
    pub client: TarsPayClient,
    pub codes: CodeTable,
    pub notify_url: String,
    pub retry: RetryPolicy,
    pub poll: PollPolicy,
    /// How long a create may hold the submit lease: longer than one gateway call.
    pub lease: Duration,
    /// How long the gateway must keep saying "no such order" before an order that may exist
    /// can be failed.
    pub settle_window: Duration,
    pub guard: SystemicGuard,
    /// The payout queue (the merchant's lane), for follow-up jobs the ledger queues
    /// atomically.
    pub queue: RedisQueue<PayoutJob>,
    /// Whose key `client` signs with.
    pub merchant: MerchantName,
    /// The merchant's call limits, when it has any.
    pub limits: Option<CallLimits>,
    /// The process's bound on gateway calls in flight, shared by every lane's context; `None`:
    /// unbounded (the worker sets it).
    pub call_slots: Option<CallSlots>,
    /// The process's first polls held in hand, shared by every lane's context; `None`: every
    /// acceptance queues its poll job (the worker sets it).
    pub polls_in_hand: Option<PollsInHand>,
}

impl JobContext {
    /// The order's regular poll job, first run after `poll.first_delay`; the ledger queues
    /// it in the same step as the acceptance.
    pub fn poll_job(&self, record: &OrderRecord) -> Result<PreparedJob, JobError> {
        let job = PayoutJob::poll(record, false);
        let options = JobOptions {
            delay: Some(self.poll.first_delay),
            max_attempts: Some(PAYOUT_JOB_MAX_ATTEMPTS),
            ..JobOptions::default()
        };
        Ok(self.queue.prepare(&job, &options)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("order {id}: stored request is unreadable: {reason}")]
    BadRecord { id: String, reason: String },
    #[error("systemic guard: {0}")]
    Guard(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
}
