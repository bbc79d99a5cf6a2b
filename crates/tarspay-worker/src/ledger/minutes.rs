//! Per-minute counters for the console's charts: final outcomes by status, creates sent and
//! their gateway latency (a coarse histogram). One hash per partition and minute
//! (`{tag}:minute:<epoch minute>`), expired after [`KEEP`]. Each process counts in memory
//! ([`Tally`]) and adds its counts every [`FLUSH_EVERY`] in one pipeline: the charts cost no
//! command per payout; a process that stops adds what it counted on its way out
//! ([`Ledger::flush_counters`](super::Ledger::flush_counters)), and one that dies loses at
//! most that long of chart counts (they are for people, nothing decides on them).

use crate::redis_conn::RedisConn;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a minute's counters are kept.
pub const KEEP: Duration = Duration::from_secs(2 * 3600);

/// Upper bounds (ms) of the latency histogram's buckets, up to the longest a create can
/// take (connect and request timeouts); a last bucket takes the rest.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000,
];

/// The bucket field of a latency: `l<i>` for the first bound at or above it.
pub fn latency_bucket(latency_ms: u64) -> String {
    let index = LATENCY_BUCKETS_MS
        .iter()
        .position(|bound| latency_ms <= *bound)
        .unwrap_or(LATENCY_BUCKETS_MS.len());
    format!("l{index}")
}

/// The minute a timestamp falls in (its start, ms since the epoch).
pub fn minute_of(at_ms: u64) -> u64 {
    at_ms / 60_000 * 60_000
}

/// How often a process adds its counts to Redis.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// This process' counts not yet added to Redis: minute → field → count.
#[derive(Debug, Default)]
pub(crate) struct Tally(Mutex<BTreeMap<u64, BTreeMap<String, u64>>>);

impl Tally {
    fn add(&self, at_ms: u64, fields: &[(&str, u64)]) {
        let mut minutes = match self.0.lock() {
            Ok(minutes) => minutes,
            Err(poisoned) => poisoned.into_inner(),
        };
        let minute = minutes.entry(minute_of(at_ms)).or_default();
        for (field, by) in fields {
            *minute.entry((*field).to_owned()).or_default() += by;
        }
    }

    /// A create that was sent, how long it took and whether it came back accepted.
    pub fn create(&self, at_ms: u64, latency_ms: u64, failed: bool) {
        let bucket = latency_bucket(latency_ms);
        self.add(
            at_ms,
            &[
                ("c", 1),
                ("s", latency_ms),
                (&bucket, 1),
                ("e", u64::from(failed)),
            ],
        );
    }

    /// An order that became final with `status`.
    pub fn finished(&self, at_ms: u64, status: &str) {
        self.add(at_ms, &[(&format!("f:{status}"), 1)]);
    }

    fn take(&self) -> BTreeMap<u64, BTreeMap<String, u64>> {
        match self.0.lock() {
            Ok(mut minutes) => std::mem::take(&mut *minutes),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

/// Adds `tally`'s counts to the minute hashes named by `key` every [`FLUSH_EVERY`]; once
/// only this task holds the tally (its ledger is gone), adds what is left and ends.
pub(crate) async fn flush_every(tally: Arc<Tally>, conn: RedisConn, key: impl Fn(u64) -> String) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let last = Arc::strong_count(&tally) == 1;
        flush(&tally, &conn, &key).await;
        if last {
            return;
        }
    }
}

/// Adds the counts taken from `tally` to Redis, in one pipeline.
pub(crate) async fn flush(tally: &Tally, conn: &RedisConn, key: impl Fn(u64) -> String) {
    let counts = tally.take();
    if counts.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for (minute, fields) in &counts {
        let key = key(*minute);
        for (field, by) in fields.iter().filter(|(_, by)| **by > 0) {
            pipe.cmd("HINCRBY").arg(&key).arg(field).arg(*by).ignore();
        }
        pipe.cmd("PEXPIRE")
            .arg(&key)
            .arg(KEEP.as_millis() as u64)
            .ignore();
    }
    if let Err(err) = pipe.query_async::<()>(&mut conn.clone()).await {
        // Chart counts only: dropped rather than piled up while Redis is away.
        tracing::debug!(error = %err, "minute counters not written");
    }
}

/// One minute's counters, summed over partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MinuteStats {
    /// The minute's start, ms since the epoch.
    pub minute_ms: u64,
    /// Final outcomes recorded in the minute, by status.
    pub finals: BTreeMap<String, u64>,
    /// Creates sent (attempts that reached for the gateway).
    pub creates: u64,
    /// Creates that did not come back accepted.
    pub create_errors: u64,
    /// Sum of the creates' latencies, ms.
    pub latency_sum_ms: u64,
    /// Creates per latency bucket (index into [`LATENCY_BUCKETS_MS`], one more for the rest).
    pub latency_buckets: [u64; LATENCY_BUCKETS_MS.len() + 1],
}

impl MinuteStats {
    /// Every final outcome of the minute.
    pub fn finals_total(&self) -> u64 {
        self.finals.values().sum()
    }

    pub fn mean_latency_ms(&self) -> Option<u64> {
        (self.creates > 0).then(|| self.latency_sum_ms / self.creates)
    }

    /// The bucket bound at or above the `q` quantile of the minute's create latencies (the
    /// histogram's resolution; the last bound when it lies above that, so a minute of
    /// timeouts shows at the top, never blank; `None` without creates).
    pub fn latency_quantile_ms(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in self.latency_buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return LATENCY_BUCKETS_MS
                    .get(index)
                    .or(LATENCY_BUCKETS_MS.last())
                    .copied();
            }
        }
        None
    }

    /// Adds a partition's hash fields (`f:<status>`, `c`, `e`, `s`, `l<i>`).
    pub(crate) fn add_fields(&mut self, fields: &BTreeMap<String, u64>) {
        for (name, value) in fields {
            match name.as_str() {
                "c" => self.creates += value,
                "e" => self.create_errors += value,
                "s" => self.latency_sum_ms += value,
                other => {
                    if let Some(status) = other.strip_prefix("f:") {
                        *self.finals.entry(status.to_owned()).or_default() += value;
                    } else if let Some(index) = other.strip_prefix('l')
                        && let Ok(index) = index.parse::<usize>()
                        && let Some(bucket) = self.latency_buckets.get_mut(index)
                    {
                        *bucket += value;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(latency_bucket(0), "l0");
        assert_eq!(latency_bucket(10), "l0");
        assert_eq!(latency_bucket(11), "l1");
        assert_eq!(latency_bucket(5_001), "l9");
        assert_eq!(latency_bucket(99_999), "l12");
        let mut minute = MinuteStats::default();
        let fields: BTreeMap<String, u64> = [
            ("c", 4),
            ("e", 1),
            ("s", 400),
            ("l3", 3),
            ("l5", 1),
            ("f:succeeded", 2),
            ("f:failed", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        minute.add_fields(&fields);
        assert_eq!(minute.finals_total(), 3);
        assert_eq!(minute.mean_latency_ms(), Some(100));
        assert_eq!(minute.latency_quantile_ms(0.5), Some(100));
        assert_eq!(minute.latency_quantile_ms(0.99), Some(500));
        assert_eq!(MinuteStats::default().latency_quantile_ms(0.5), None);
        let mut timeouts = MinuteStats::default();
        timeouts.add_fields(&[("c".to_owned(), 2), ("l12".to_owned(), 2)].into());
        assert_eq!(
            timeouts.latency_quantile_ms(0.5),
            Some(60_000),
            "never blank"
        );
    }
}
