//! Liveness of one worker: heartbeat (for "workers alive"), renewal of its own pending entries
//! (so a busy worker is never taken for dead), and removal of consumers long gone.

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::queue::clock::now_ms;
use crate::queue::inflight::InFlight;
use crate::queue::shared::Shared;
use crate::queue::{QueueError, scripts};

/// Entries renewed per Lua call.
const RENEW_CHUNK: usize = 500;
/// Stale consumers are looked for every this many heartbeats.
const CLEANUP_EVERY: u64 = 12;

pub(crate) async fn run_renewer(
    shared: Arc<Shared>,
    consumer: String,
    inflight: InFlight,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for beat in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Failures are retried on the next tick; the interval is a quarter of the orphan
        // timeout, so a few lost beats do not cost the worker its jobs.
        if let Err(e) = heartbeat(&shared, &consumer).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        if let Err(e) = renew_held_entries(&shared, &consumer, &inflight).await {
            tracing::warn!(error = %e, "renewing in-flight jobs failed");
        }
        if beat % CLEANUP_EVERY == 0
            && let Err(e) = remove_stale_consumers(&shared, &consumer).await
        {
            tracing::warn!(error = %e, "removing stale consumers failed");
        }
    }
}

async fn heartbeat(shared: &Shared, consumer: &str) -> Result<(), QueueError> {
    let mut conn = shared.conn.clone();
    let _: () = redis::cmd("ZADD")
        .arg(&shared.keys.workers)
        .arg(now_ms())
        .arg(consumer)
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Resets the idle time of the entries this worker holds.
pub(crate) async fn renew_held_entries(
    shared: &Shared,
    consumer: &str,
    inflight: &InFlight,
) -> Result<u64, QueueError> {
    let mut conn = shared.conn.clone();
    let mut renewed = 0u64;
    for chunk in inflight.snapshot().chunks(RENEW_CHUNK) {
        let invocation = shared.held_entries_call(&scripts::RENEW, consumer, chunk);
        let n: u64 = invocation.invoke_async(&mut conn).await?;
        renewed += n;
    }
    Ok(renewed)
}

/// Deletes consumers with nothing pending that have been idle far longer than any live worker
/// can be (on the wake stream, any that idle: see the script), and forgets their heartbeats;
/// every process start adds a consumer to both groups, so without this their consumer lists
/// would grow for ever.
async fn remove_stale_consumers(shared: &Shared, me: &str) -> Result<(), QueueError> {
    let stale_after = (shared.config.worker_ttl * 4).max(Duration::from_secs(60));
    let mut conn = shared.conn.clone();
    let removed: u64 = scripts::REMOVE_STALE_CONSUMERS
        .key(&shared.keys.stream)
        .key(&shared.keys.wake)
        .arg(&shared.keys.group)
        .arg(me)
        .arg(stale_after.as_millis() as u64)
        .invoke_async(&mut conn)
        .await?;
    if removed > 0 {
        tracing::debug!(removed, "stale consumers removed");
    }
    let forget_before = now_ms().saturating_sub(stale_after.as_millis() as u64);
    let _: i64 = redis::cmd("ZREMRANGEBYSCORE")
        .arg(&shared.keys.workers)
        .arg("-inf")
        .arg(forget_before)
        .query_async(&mut conn)
        .await?;
    Ok(())
}
