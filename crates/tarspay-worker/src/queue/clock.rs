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
        Some(sample) => project(sample).0 / 1000,
        // Only for the time before the first sample.
        None => local_ms(),
    }
}

/// The server's time now by `sample` (µs since the epoch), and the time since the sample.
fn project(sample: Sample) -> (u64, Duration) {
    let elapsed = Instant::now().saturating_duration_since(sample.at);
    (sample.server_us + elapsed.as_micros() as u64, elapsed)
}

/// Bounds of the server's clock now (ms): [`now_ms`] less and plus its error bound (half the
/// sample's round trip, drift since it at 100 ppm, 2 ms). `None` before the first sample.
pub(crate) fn now_ms_within() -> Option<(u64, u64)> {
    let sample = current()?;
    let (now_us, elapsed) = project(sample);
    let error_us = sample.rtt.as_micros() as u64 / 2 + elapsed.as_micros() as u64 / 10_000 + 2_000;
    Some((
        now_us.saturating_sub(error_us) / 1000,
        (now_us + error_us).div_ceil(1000),
    ))
}

/// A local instant at which the server's clock had not passed `server_ms` yet, by the upper
/// end of the estimate (so never later than the truth while the estimate holds). `None`
/// before the first sample, and when `server_ms` is above that upper end (a time stamped
/// ahead of the estimate: one of them is wrong).
pub(crate) fn at_or_before_server_ms(server_ms: u64) -> Option<Instant> {
    // Taken before the estimate: a later upper end only moves the answer earlier.
    let now = Instant::now();
    let (_, upper) = now_ms_within()?;
    let ahead = upper.checked_sub(server_ms)?;
    now.checked_sub(Duration::from_millis(ahead))
}

/// How far above the server's clock a true [`AddedAfter`] bound may be: the time from its
/// empty read's sending to the job's arrival, two fetch blocks at most (500 ms each by
/// default), with room to spare.
pub(crate) const ADDED_AFTER_MAX_AHEAD: Duration = Duration::from_secs(2);

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

/// The longest wait between a fetch loop's empty read and the read that brings a job for
/// which [`AddedAfter`] still bounds the server's clock: past it the drift allowance would
/// grow, and the lease step reads `TIME` itself instead.
pub const ADDED_AFTER_MAX_AGE: Duration = Duration::from_secs(10);

/// An upper bound of the Redis server's clock that a job's delivery brings, without a `TIME`
/// call: the job's stream entry was added after its fetch loop sent the read before (which
/// found no job), so the server's clock then was at most the entry id's time (ids are never
/// behind the clock that stamps them, `*`), and it has run on since by at most the local
/// monotonic time elapsed since that read was sent (plus a drift allowance). A lease started
/// on this bound lasts at least as long as its holder counts on (see
/// `ledger::Ledger::begin_submit_for`). Only for a single Redis: on a cluster a redirected
/// read could bring an entry stamped by another node's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddedAfter {
    /// The entry id's time (ms since the epoch, the server's clock when it was added).
    pub(crate) entry_ms: u64,
    /// When the fetch loop sent the read before, which returned no job.
    pub(crate) empty_read_sent: Instant,
}

impl AddedAfter {
    /// For a stream entry id (`<ms>-<seq>`) delivered by a read sent after an empty one
    /// (sent at `empty_read_sent`); `None` for an id of another form.
    pub(crate) fn entry(entry_id: &str, empty_read_sent: Instant) -> Option<Self> {
        let (ms, _) = entry_id.split_once('-')?;
        Some(Self {
            entry_ms: ms.parse().ok()?,
            empty_read_sent,
        })
    }

    /// The bound now: ms on the server's clock that it has not reached yet. `None` once the
    /// empty read is more than [`ADDED_AFTER_MAX_AGE`] old.
    pub(crate) fn server_ms_at_most(&self) -> Option<u64> {
        let elapsed = Instant::now().saturating_duration_since(self.empty_read_sent);
        if elapsed > ADDED_AFTER_MAX_AGE {
            return None;
        }
        // Rounded up; +1 ms for the sub-millisecond part the id truncates; 100 ppm (at most
        // 1 ms over the 10 s) and 1 ms more for the two clocks' rates (a crystal's drift is
        // far less; an NTP slew can be more, and runs through a lease judged on `TIME` too).
        let elapsed_ms = elapsed.as_micros().div_ceil(1000) as u64;
        Some(self.entry_ms + elapsed_ms + elapsed_ms / 10_000 + 2)
    }

    /// [`AddedAfter::server_ms_at_most`], only when the process' own estimate of the
    /// server's clock puts the bound at or above the clock whatever the estimate's error (a
    /// true bound of a job that came to an idle worker is a fetch block, 500 ms, above it),
    /// and not more than [`ADDED_AFTER_MAX_AHEAD`] above (an id stamped ahead of the clock,
    /// one stepped back or a former primary's that ran fast, would make the lease that much
    /// longer). Otherwise the premise may have failed (an entry delivered again by another
    /// server after a failover, say, or over a connection that reconnected unseen, or an
    /// entry added while the queue was paused, delivered by the read after an empty one of
    /// the parked group once a resume put it back: `queue::park`): `None` leaves the lease
    /// to `TIME`. A bound is never moved to the estimate.
    pub(crate) fn checked_server_ms_at_most(&self) -> Option<u64> {
        let bound = self.server_ms_at_most()?;
        let (_, at_most) = now_ms_within()?;
        let ahead = ADDED_AFTER_MAX_AHEAD.as_millis() as u64;
        (at_most..=at_most + ahead)
            .contains(&bound)
            .then_some(bound)
    }
}

/// The server's clock minus the local wall clock, in ms (for logs: how far off this host is).
pub(crate) fn local_offset_ms() -> i64 {
    now_ms() as i64 - local_ms() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use local_redis::LocalRedis;

    /// A private `redis-server` (kept running while the first value lives) and a connection.
    async fn server() -> (LocalRedis, redis::aio::MultiplexedConnection) {
        let redis = LocalRedis::start(local_redis::Durability::Off).expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        (redis, conn)
    }

    async fn server_ms(conn: &mut impl ConnectionLike) -> u64 {
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
        secs * 1000 + micros / 1000
    }

    #[tokio::test]
    async fn a_job_added_after_an_empty_read_bounds_the_servers_clock_from_above() {
        let (_redis, mut conn) = server().await;
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("s")
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
        let sent = Instant::now();
        let empty: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("s")
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(empty, redis::Value::Nil, "no job yet");
        let id: String = redis::cmd("XADD")
            .arg("s")
            .arg("*")
            .arg("e")
            .arg("{}")
            .query_async(&mut conn)
            .await
            .unwrap();
        let bound = AddedAfter::entry(&id, sent).expect("a stream id");
        // The server's clock moves on while the job waits; the bound follows it (without the
        // elapsed time it would fall 200 ms behind).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let at_most = bound.server_ms_at_most().expect("fresh");
        let server = server_ms(&mut conn).await;
        assert!(server <= at_most, "server {server}, bound {at_most}");
        assert!(at_most >= bound.entry_ms + 200, "{at_most} vs {bound:?}");
    }

    #[tokio::test]
    async fn a_bound_whose_empty_read_is_over_ten_seconds_old_is_refused_though_it_would_hold() {
        let (_redis, mut conn) = server().await;
        sync(&mut conn).await.unwrap();
        // Bounds 100 ms above the clock (true, and near enough), after empty reads 9 s and 11 s
        // ago: only the age tells them apart.
        let bound_after = |ago: Duration| {
            let sent = Instant::now().checked_sub(ago)?;
            Some(AddedAfter {
                entry_ms: now_ms() + 100 - ago.as_millis() as u64,
                empty_read_sent: sent,
            })
        };
        let Some(recent) = bound_after(Duration::from_secs(9)) else {
            return; // a machine up for less than that: nothing to check
        };
        assert!(recent.checked_server_ms_at_most().is_some(), "{recent:?}");
        let Some(old) = bound_after(ADDED_AFTER_MAX_AGE + Duration::from_secs(1)) else {
            return;
        };
        assert_eq!(old.checked_server_ms_at_most(), None, "{old:?}");
    }

    #[tokio::test]
    async fn a_bound_the_estimate_does_not_put_above_the_clock_whatever_its_error_is_refused() {
        let (_redis, mut conn) = server().await;
        sync(&mut conn).await.unwrap();
        // A bound right at the estimate (its allowances cancel the 2 ms taken off): within the
        // estimate's error of the clock, so it may be below it.
        let at_estimate = AddedAfter {
            entry_ms: now_ms() - 2,
            empty_read_sent: Instant::now(),
        };
        assert_eq!(at_estimate.checked_server_ms_at_most(), None);
        // 300 ms above: taken.
        let above = AddedAfter {
            entry_ms: now_ms() + 300,
            empty_read_sent: Instant::now(),
        };
        assert!(above.checked_server_ms_at_most().is_some());
    }

    #[test]
    fn a_bound_is_only_taken_from_a_stream_id_and_only_while_its_empty_read_is_recent() {
        let now = Instant::now();
        assert_eq!(AddedAfter::entry("not-an-id", now), None);
        assert_eq!(AddedAfter::entry("17", now), None);
        let bound = AddedAfter::entry("1796639418435-7", now).unwrap();
        assert_eq!(bound.entry_ms, 1_796_639_418_435);
        // Its empty read just sent: the id's time, plus the allowances (2 ms and elapsed).
        let at_most = bound.server_ms_at_most().unwrap();
        assert!(
            (bound.entry_ms + 2..bound.entry_ms + 1000).contains(&at_most),
            "{at_most}"
        );
        let Some(long_ago) = now.checked_sub(ADDED_AFTER_MAX_AGE + Duration::from_secs(1)) else {
            return; // a machine up for less than that: nothing to check
        };
        let old = AddedAfter::entry("1796639418435-7", long_ago).unwrap();
        assert_eq!(old.server_ms_at_most(), None);
    }

    #[tokio::test]
    async fn now_follows_the_servers_time() {
        let (_redis, mut conn) = server().await;
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
