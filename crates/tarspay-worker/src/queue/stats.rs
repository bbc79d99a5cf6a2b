//! Introspection: real numbers read from Redis in one round trip (a second one when jobs wait:
//! the oldest of them, after the group's last delivery).

use redis::Value;
use redis::streams::StreamRangeReply;
use std::time::Duration;

use crate::queue::clock::now_ms;
use crate::queue::entries::entry_id_ms;
use crate::queue::{QueueError, RedisQueue, park};

/// A snapshot of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Jobs in the stream not yet delivered to any worker.
    pub waiting: u64,
    /// Jobs delivered and not yet settled (running, prefetched, or orphaned).
    pub pending: u64,
    /// Jobs waiting for their due time (delays and retries).
    pub delayed: u64,
    /// Jobs in the dead stream.
    pub dead: u64,
    /// Age of the oldest job in the stream (waiting or pending), if any.
    pub oldest_job_age: Option<Duration>,
    /// Age of the oldest job not yet delivered to any worker, if any.
    pub oldest_waiting_age: Option<Duration>,
    /// Workers that sent a heartbeat within `worker_ttl`.
    pub workers_alive: u64,
    /// Whether the queue is paused.
    pub paused: bool,
}

impl QueueStats {
    /// Jobs in the stream (waiting + pending).
    pub fn depth(&self) -> u64 {
        self.waiting + self.pending
    }

    /// The stats of two partitions of one queue as one: counts add up, the oldest job is the
    /// older one, a worker process (which serves every partition) is counted once, and the
    /// queue is paused if any partition is.
    pub fn merge(self, other: Self) -> Self {
        Self {
            waiting: self.waiting + other.waiting,
            pending: self.pending + other.pending,
            delayed: self.delayed + other.delayed,
            dead: self.dead + other.dead,
            oldest_job_age: self.oldest_job_age.max(other.oldest_job_age),
            oldest_waiting_age: self.oldest_waiting_age.max(other.oldest_waiting_age),
            workers_alive: self.workers_alive.max(other.workers_alive),
            paused: self.paused || other.paused,
        }
    }
}

impl<T> RedisQueue<T> {
    /// Reads depth, pending, delayed, dead, oldest age and live workers.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let keys = &self.shared.keys;
        let now = now_ms();
        let alive_since = now.saturating_sub(self.shared.config.worker_ttl.as_millis() as u64);
        let mut conn = self.shared.conn.clone();
        let (stream_len, pending, delayed, dead, oldest, alive, paused, groups, parked): (
            u64,
            Value,
            u64,
            u64,
            StreamRangeReply,
            u64,
            bool,
            redis::streams::StreamInfoGroupsReply,
            Option<String>,
        ) = redis::pipe()
            .cmd("XLEN")
            .arg(&keys.stream)
            .cmd("XPENDING")
            .arg(&keys.stream)
            .arg(&keys.group)
            .cmd("ZCARD")
            .arg(&keys.delayed)
            .cmd("XLEN")
            .arg(&keys.dead)
            .cmd("XRANGE")
            .arg(&keys.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("ZCOUNT")
            .arg(&keys.workers)
            .arg(alive_since)
            .arg("+inf")
            .cmd("EXISTS")
            .arg(&keys.paused)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&keys.stream)
            .cmd("GET")
            .arg(&keys.parked)
            .query_async(&mut conn)
            .await?;
        let pending = pending_count(&pending)?;
        let waiting = stream_len.saturating_sub(pending);
        // The first entry after the group's last delivery is the oldest one waiting (a second
        // round trip, only when something waits).
        let last_delivered = groups
            .groups
            .iter()
            .find(|g| g.name == keys.group)
            .map(|g| g.last_delivered_id.clone())
            // A paused queue's group is parked past every id: where it stood is kept aside.
            // Without a readable one (lost: a flag check recovers it) nothing is said about
            // the oldest waiting job.
            .and_then(|id| {
                if id != park::PARKED_ID {
                    return Some(id);
                }
                parked
                    .as_deref()
                    .and_then(park::parked_position)
                    .map(str::to_owned)
            });
        let oldest_waiting_age = match last_delivered {
            Some(after) if waiting > 0 => {
                let first: StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&keys.stream)
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                first
                    .ids
                    .first()
                    .and_then(|entry| entry_id_ms(&entry.id))
                    .map(|ms| Duration::from_millis(now.saturating_sub(ms)))
            }
            _ => None,
        };
        Ok(QueueStats {
            // Acknowledged entries are deleted, so the stream holds waiting + pending only.
            waiting,
            pending,
            delayed,
            dead,
            oldest_job_age: (oldest.ids.first())
                .and_then(|entry| entry_id_ms(&entry.id))
                .map(|ms| Duration::from_millis(now.saturating_sub(ms))),
            oldest_waiting_age,
            workers_alive: alive,
            paused,
        })
    }
}

/// First element of the `XPENDING key group` summary.
fn pending_count(summary: &Value) -> Result<u64, QueueError> {
    match summary {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => Ok((*n).max(0) as u64),
            _ => Err(QueueError::Protocol(format!(
                "XPENDING summary: {summary:?}"
            ))),
        },
        _ => Err(QueueError::Protocol(format!(
            "XPENDING summary: {summary:?}"
        ))),
    }
}
