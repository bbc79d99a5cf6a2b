//! Job storage on Redis Streams, run by apalis 1.0 workers.
//!
//! # Model
//! * One Redis Stream per queue with one consumer group. Workers fetch in batches
//!   (`XREADGROUP COUNT n BLOCK ms`); an entry stays in the group's pending list (PEL) until the
//!   handler's outcome is written, then it is acknowledged **and deleted** (`XACK` + `XDEL`), so
//!   the stream holds only waiting and running jobs.
//! * Delayed jobs (enqueued with a delay, retries) wait in a sorted set and are promoted into the
//!   stream by a Lua script in bounded chunks ([`QueueConfig::promote_chunk`]), on time: one
//!   worker per queue, the promoter (a lease), sleeps until the next due job; a job delayed
//!   to before all others wakes a sleeping worker with a marker entry (`w` = its due time,
//!   acknowledged by the worker that reads it, never a job), unless a ledger step that
//!   acknowledges one of a live worker's jobs from the same queue delayed it: that worker
//!   then wakes for it itself (`Delivery::follow_due`); every
//!   [`QueueConfig::promote_interval`] the promoter passes anyway as a safety net, and the
//!   other workers check its lease and take over when it lapses.
//! * A worker that dies leaves entries in the PEL; entries idle longer than
//!   [`QueueConfig::orphan_timeout`] are taken over with `XAUTOCLAIM` by live workers. A live
//!   worker renews the entries it holds (`XCLAIM … JUSTID`, which resets the idle time without
//!   counting a delivery) every [`QueueConfig::heartbeat_interval`], so a busy worker is never
//!   robbed. Entries assigned by a fetch whose reply was lost are not renewed, so they are
//!   recovered like orphans. A worker whose renewals failed past the timeout (Redis out of
//!   reach, the process frozen) may claim its own running jobs: those are not started again,
//!   and the delivery the claim counted is taken back (`XCLAIM … RETRYCOUNT … JUSTID`), so a
//!   later takeover does not read it as one more lost worker. After Redis was out of reach (a
//!   restart, a failover, a freeze) for longer than the orphan timeout every entry looks
//!   orphaned: a fetch loop claims nothing while its steps fail, nor for two heartbeats after
//!   they succeed again or after it starts, so live workers renew first. A worker frozen
//!   through that whole time still loses its jobs.
//! * **A settlement applies only while its worker still holds the entry.** An outcome (done,
//!   retry, dead) and a shutdown give-back are written only if the entry is still pending *and*
//!   owned by the settling consumer (`XPENDING id id 1`, checked inside the same script). A
//!   worker that stalled past the orphan timeout (GC pause, swap, SIGSTOP, a frozen VM) and lost
//!   the entry to another worker has its settlement dropped without `XACK`/`XDEL`, counted in
//!   `tarspay_queue_stale_settlements_total` and logged (warn, with the job id): the new holder
//!   settles the entry, so its retry or death is never lost. The stalled run's effects still
//!   happened, which delivery-at-least-once already allows. A unique key is released only by
//!   the call that acknowledged the entry.
//! * Delivery is at least once. Effects must be idempotent (the payout ledger makes them so).
//!
//! # Time: the Redis server's clock
//! Every due time is on the Redis server's clock, so a host whose clock is minutes off (±10 min
//! is tested with faketime) runs nothing early or late and burns no attempts:
//! * Decided by Redis itself, exactly: promotion of delayed jobs (`PROMOTE` compares scores with
//!   `TIME`), the due time of a retry (`SETTLE` is given the delay and adds it to `TIME`) and of
//!   a job enqueued with a delay through [`RedisQueue`] (`ENQUEUE` likewise). A job therefore
//!   never starts before the server's time at its enqueue or failure plus its delay.
//! * Computed in Rust with `crate::queue::now_ms()`: the server's time as last sampled with
//!   `TIME` plus the local *monotonic* time since (the local wall clock is never used once a
//!   queue has connected). Sampled at connect and every 30 s while a queue handle lives. Its
//!   error is at most half the round trip of the sample in use (a slower sample does not replace
//!   a faster one for up to 5 min) plus the monotonic clock's drift since the sample (typically
//!   under 0.01 %, i.e. < 30 ms over 5 min). Used for heartbeats, stats, envelope and job-id
//!   timestamps, and by other modules that enqueue in their own scripts through `ENQUEUE_ONE`
//!   with `now_ms()` as its `now` and [`PreparedJob`]'s `run_at_ms` (the ledger): those due
//!   times carry this error bound, since both sides come from the same estimate.
//!
//! # Handler contract (the retry policy belongs to the job)
//! The handler's result decides what happens to the job, in the backend's layer, after every
//! inner middleware (including apalis' in-process `retry`) is done:
//! * `Ok(_)` — done: acknowledged and deleted; its unique key is released.
//! * `Err(RetryAfterError::new(e, d))` — retried after `d`.
//! * `Err(AbortError::new(e))` — given up: moved to the dead stream with the reason. A panic caught
//!   by apalis' `catch_panic` becomes an `AbortError` too (the service's own workers map a
//!   handler's panic to a plain error instead, retried: see `worker`).
//! * `Err(DeferredError)` — retried immediately.
//! * `Err(GiveBack)` — not started: back in the queue at once, the attempt not counted.
//! * `Err(ContinueAs { payload, attempts, delay })` — done as this job, and goes on as another
//!   (same id, new payload and attempts) after `delay`, in one settlement.
//! * any other error — retried after an exponential backoff with full jitter
//!   ([`QueueConfig::retry_base`], [`QueueConfig::retry_max`]).
//!
//! Every retry is bounded by the job's `max_attempts` ([`JobOptions::max_attempts`], default
//! [`QueueConfig::max_attempts`]); an exhausted job goes to the dead stream. Attempts are counted
//! durably: the envelope carries the attempts already made, and a crash redelivery adds the
//! stream's delivery count, so a job that kills its worker every time also ends up dead. The
//! handler sees the current attempt (1-based) through apalis' `Attempt` extractor, and the stored
//! delivery through `Data<Delivery>`.
//!
//! Jobs that cannot be decoded into the job type go to the dead stream at once; the worker keeps
//! going. Dead jobs can be listed, re-enqueued ([`RedisQueue::requeue_dead`]) or deleted.
//!
//! # Failure handling
//! Redis errors, stalls beyond [`QueueConfig::response_timeout`] and restarts never end a worker:
//! every loop backs off (backon, jittered exponential, capped at 2 s) and continues on a
//! `ConnectionManager` that reconnects by itself. The blocking fetch runs on its own connection.
//! Handlers must not block the async runtime (use `spawn_blocking`), or renewals stall too.
//!
//! # Keys
//! All keys of a queue share the hash tag `{prefix:queue}` ([`QueueKeys`]), or, for a queue
//! nested in another's partition ([`QueueConfig::within`]), that queue's tag; scripts only touch
//! keys of one tag, so the code runs unchanged on Redis Cluster.

mod backend;
pub(crate) mod backoff;
mod clock;
mod config;
mod dead;
mod delay;
mod delivery;
pub(crate) mod entries;
mod envelope;
mod fetch;
mod inflight;
mod keys;
mod layer;
pub(crate) mod park;
mod partitioned;
mod pause;
mod promoter;
mod renew;
mod runtime;
mod scripts;
mod settle;
mod shared;
mod stats;
mod storage;
mod worker_id;

pub use backoff::{full_jitter, random_up_to};
#[cfg(test)]
pub(crate) use clock::{ADDED_AFTER_MAX_AGE, sync as sync_clock};
pub(crate) use clock::{AddedAfter, now_ms};
/// The Redis server's time (ms) as this process estimates it (see "Time" above); meaningful once a
/// queue has connected.
pub fn server_now_ms() -> u64 {
    now_ms()
}
pub use config::QueueConfig;
pub use dead::DeadJob;
pub use delivery::Delivery;
pub(crate) use delivery::InlineAck;
pub(crate) use envelope::Envelope;
pub use keys::QueueKeys;
pub use layer::{ContinueAs, GiveBack, SettleLayer, SettleService, record_job};
pub use partitioned::{Gate, Partitioned};
pub(crate) use scripts::{DELAY_JOB, ENQUEUE_ONE, OWNED_ENTRIES};
pub use stats::QueueStats;
pub use storage::{Enqueued, JobOptions, PreparedJob, RedisQueue};
pub use worker_id::worker_identity;
#[cfg(test)]
pub(crate) use {
    delivery::FetchTimes, delivery::Holder, inflight::InFlight, promoter::Handover,
    settle::SettleHandle,
};

/// Errors at the queue's boundary.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis refused a command or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A job could not be serialized.
    #[error("job encoding failed: {0}")]
    Encode(#[source] serde_json::Error),
    /// A stored job could not be parsed.
    #[error("stored job is not valid: {0}")]
    Decode(#[source] serde_json::Error),
    /// Redis answered with a shape this code does not expect.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// The configuration is unusable.
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),
    /// The worker's settlement task is gone (the worker is shutting down).
    #[error("worker settlement task stopped")]
    SettlerStopped,
}

impl QueueError {
    /// Redis has no consumer group for the stream (it restarted empty, or the group was
    /// destroyed): a command's own `NOGROUP`, or one raised inside a script.
    pub(crate) fn is_no_group(&self) -> bool {
        matches!(self, Self::Redis(e)
            if e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP"))
    }
}
