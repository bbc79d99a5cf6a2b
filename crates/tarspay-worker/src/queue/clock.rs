//! The Redis server's clock, estimated in this process.
//!
//! Every due time of the queue (delays, retries) and every timestamp the service compares
//! across processes is on the Redis server's clock, so a host whose wall clock is minutes off
//! behaves like the others. The scripts that decide due-ness read `TIME` themselves; everything
//! computed in Rust uses [`now_ms`], which is the server's time as last sampled with `TIME`
//! plus the *monotonic* time elapsed since, so the local wall clock (skewed, or stepped by NTP)
//! never enters. A sample is taken when a queue connects and refreshed every
//! [`REFRESH_INTERVAL`] while the queue handle lives.
//!
//! Error bound of [`now_ms`]: half the round trip of the sample in use (the server's reading is
//! placed at the midpoint of the round trip) plus the drift of the local monotonic clock since
//! the sample (crystal drift, well under 0.01 %: below 30 ms over [`MAX_SAMPLE_AGE`]). A sample
//! whose round trip is more than twice the current one's does not replace it unless the current
//! one is older than [`MAX_SAMPLE_AGE`], so one slow reply does not widen the error.
//!
//! The estimate is process-wide: a process talks to one Redis deployment (one partition). Until
//! the first sample (no queue connected yet) the local wall clock is used.

use redis::aio::ConnectionLike;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::queue::QueueError;
use crate::wall_clock::now_ms as local_ms;

/// How often a live queue handle samples the server's clock again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// A sample older than this is replaced by the next one whatever its round trip.
pub const MAX_SAMPLE_AGE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Server time in microseconds since the epoch, at `at`.
    server_us: u64,
    /// The midpoint of the round trip that read it.
    at: Instant,
    rtt: Duration,
}

static SAMPLE: RwLock<Option<Sample>> = RwLock::new(None);

fn current() -> Option<Sample> {
    *SAMPLE
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch on the Redis server's clock (estimated, see the module
/// documentation for the error bound); the local wall clock until the first sample.
pub fn now_ms() -> u64 {
    match current() {
        Some(sample) => {
            let elapsed = Instant::now().saturating_duration_since(sample.at);
            (sample.server_us + elapsed.as_micros() as u64) / 1000
        }
        // Only for the time before the first sample.
        None => local_ms(),
    }
}

/// Reads `TIME` and records it as the process' estimate of the server's clock (see the
/// replacement rule in the module documentation). Returns the round trip of this reading.
pub(crate) async fn sync(conn: &mut impl ConnectionLike) -> Result<Duration, QueueError> {
    let sent = Instant::now();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let received = Instant::now();
    let rtt = received.saturating_duration_since(sent);
    let sample = Sample {
        server_us: secs
            .checked_mul(1_000_000)
            .and_then(|us| us.checked_add(micros))
            .ok_or_else(|| QueueError::Protocol(format!("TIME reply {secs} {micros}")))?,
        at: sent + rtt / 2,
        rtt,
    };
    let mut slot = SAMPLE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let replace = match *slot {
        None => true,
        Some(old) => {
            sample.rtt <= old.rtt.max(Duration::from_millis(1)) * 2
                || received.saturating_duration_since(old.at) > MAX_SAMPLE_AGE
        }
    };
    if replace {
        *slot = Some(sample);
    }
    Ok(rtt)
}

/// The server's clock minus the local wall clock, in ms (for logs: how far off this host is).
pub(crate) fn local_offset_ms() -> i64 {
    now_ms() as i64 - local_ms() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use local_redis::LocalRedis;

    #[tokio::test]
    async fn now_follows_the_servers_time() {
        let redis = LocalRedis::start(local_redis::Durability::Off).expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        sync(&mut conn).await.unwrap();
        // The server runs on this machine, so its clock is the local one: the estimate is within
        // the round trips of two readings (a hang guard of 5 s, not a speed assertion).
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
        let server = secs * 1000 + micros / 1000;
        let estimate = now_ms();
        assert!(
            estimate.abs_diff(server) < 5_000,
            "estimate {estimate}, server {server}"
        );
    }
}
