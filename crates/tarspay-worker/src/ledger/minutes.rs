//! Per-minute counters for the console's charts: final outcomes by status, creates sent and
//! their gateway latency (a coarse histogram). One hash per partition and minute
//! (`{tag}:minute:<epoch minute>`), incremented by the ledger script in the step that
//! finalises an order or records a create attempt, and expired after [`KEEP`].

use std::collections::BTreeMap;
use std::time::Duration;

/// How long a minute's counters are kept.
pub const KEEP: Duration = Duration::from_secs(2 * 3600);

/// Upper bounds (ms) of the latency histogram's buckets; a last bucket takes the rest.
pub const LATENCY_BUCKETS_MS: [u64; 9] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

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
    /// histogram's resolution; `None` above the last bound or without creates).
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
                return LATENCY_BUCKETS_MS.get(index).copied();
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
        assert_eq!(latency_bucket(99_999), "l9");
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
    }
}
