//! Per-merchant rate limits (GCRA, the generic cell rate algorithm: a token bucket kept as one
//! "theoretical arrival time") and the record of every call a merchant sent, answered or
//! refused with 429, from which the report computes the busiest 1-second window.

use super::rules::RateLimit;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Duration;

/// Arrival times kept per merchant; older ones are dropped (the counters keep counting).
pub const MAX_RECORDED_CALLS: usize = 200_000;

/// The envelope `code` of a 429 answer (HTTP 429 Too Many Requests, with `Retry-After`).
pub const RATE_LIMITED_CODE: i64 = 429;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// GCRA state for one merchant. Times are nanoseconds on the sandbox's monotonic clock.
#[derive(Debug, Clone)]
pub(crate) struct Gcra {
    limit: RateLimit,
    /// Time between two calls at the sustained rate (T).
    interval_ns: u64,
    /// How far ahead of now the theoretical arrival time may run: `burst` × T.
    tolerance_ns: u64,
    /// Theoretical arrival time of the next call.
    tat_ns: u64,
}

impl Gcra {
    /// `None` for a limit that limits nothing sensible (rate not above 0, burst 0).
    pub(crate) fn new(limit: RateLimit) -> Option<Self> {
        if !limit.is_valid() {
            return None;
        }
        let interval_ns = ((NANOS_PER_SEC as f64) / limit.per_second).round().max(1.0) as u64;
        Some(Self {
            limit,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(limit.burst)),
            tat_ns: 0,
        })
    }

    pub(crate) fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Admits a call arriving at `now_ns`, or says how long until one would be admitted.
    /// A refused call changes nothing. From a rested state `burst` calls at the same instant
    /// are admitted, then one every 1/`per_second` s.
    pub(crate) fn admit(&mut self, now_ns: u64) -> Result<(), Duration> {
        let new_tat = self.tat_ns.max(now_ns).saturating_add(self.interval_ns);
        let ahead = new_tat - now_ns;
        if ahead > self.tolerance_ns {
            return Err(Duration::from_nanos(ahead - self.tolerance_ns));
        }
        self.tat_ns = new_tat;
        Ok(())
    }
}

/// `Retry-After` in whole seconds (RFC 9110: a non-negative integer), rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_nanos().div_ceil(u128::from(NANOS_PER_SEC)).max(1) as u64
}

/// Every call a merchant sent: counters, and the last [`MAX_RECORDED_CALLS`] arrival times
/// (µs on the sandbox's monotonic clock, in arrival order).
#[derive(Debug, Default)]
pub(crate) struct CallLog {
    total: u64,
    rate_limited: u64,
    arrivals_us: VecDeque<u64>,
}

impl CallLog {
    pub(crate) fn record(&mut self, at_us: u64, rate_limited: bool) {
        self.total += 1;
        self.rate_limited += u64::from(rate_limited);
        if self.arrivals_us.len() >= MAX_RECORDED_CALLS {
            self.arrivals_us.pop_front();
        }
        self.arrivals_us.push_back(at_us);
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    pub(crate) fn arrivals_us(&self) -> Vec<u64> {
        self.arrivals_us.iter().copied().collect()
    }

    /// The most recorded calls that arrived within any window of `window_us` (two calls are
    /// in one window when they arrived less than `window_us` apart).
    pub(crate) fn max_in_window(&self, window_us: u64) -> u64 {
        let arrivals = &self.arrivals_us;
        max_in_window_by(arrivals.len(), |i| arrivals[i], window_us)
    }

    pub(crate) fn report(&self, mch_no: &str, limit: Option<RateLimit>) -> CallReport {
        CallReport {
            mch_no: mch_no.to_owned(),
            total: self.total,
            rate_limited: self.rate_limited,
            max_in_any_second: self.max_in_window(1_000_000),
            recorded: self.arrivals_us.len() as u64,
            rate_limit: limit,
        }
    }
}

/// Sliding-window maximum over times in ascending order: the most of them within any window
/// of `window_us` (two pointers, O(n)).
pub fn max_in_window(sorted_us: &[u64], window_us: u64) -> u64 {
    max_in_window_by(sorted_us.len(), |i| sorted_us[i], window_us)
}

fn max_in_window_by(len: usize, at: impl Fn(usize) -> u64, window_us: u64) -> u64 {
    let (mut first, mut best) = (0usize, 0usize);
    for last in 0..len {
        while at(last).saturating_sub(at(first)) >= window_us {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best as u64
}

/// What `GET /sandbox/merchants/{mchNo}/calls` and [`crate::Sandbox::calls`] report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallReport {
    pub mch_no: String,
    /// Every call that arrived with this merchant's `X-API-KEY`, answered or refused.
    pub total: u64,
    /// How many of them were answered 429.
    pub rate_limited: u64,
    /// The most calls (of the recorded ones) that arrived within any 1-second window.
    pub max_in_any_second: u64,
    /// Arrival times held (at most [`MAX_RECORDED_CALLS`], the newest).
    pub recorded: u64,
    /// The limit in force, if any.
    pub rate_limit: Option<RateLimit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn gcra(per_second: f64, burst: u32) -> Gcra {
        Gcra::new(RateLimit { per_second, burst }).unwrap()
    }

    #[test]
    fn a_burst_at_one_instant_admits_exactly_the_burst() {
        let mut limiter = gcra(5.0, 5);
        let now = 10_000 * MS;
        let admitted = (0..20).filter(|_| limiter.admit(now).is_ok()).count();
        assert_eq!(admitted, 5);
        // The next slot opens one interval (200 ms) later.
        assert_eq!(limiter.admit(now), Err(Duration::from_millis(200)));
        assert!(limiter.admit(now + 199 * MS).is_err());
        assert!(limiter.admit(now + 200 * MS).is_ok());
        assert!(limiter.admit(now + 200 * MS).is_err());
    }

    #[test]
    fn the_sustained_rate_is_admitted_and_rest_refills_the_burst() {
        let mut limiter = gcra(5.0, 5);
        for i in 0..100 {
            assert!(limiter.admit(i * 200 * MS).is_ok(), "call {i} at the rate");
        }
        // A long rest refills the burst, no more.
        let later = 1_000_000 * MS;
        let admitted = (0..20).filter(|_| limiter.admit(later).is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut limiter = gcra(1.0, 1);
        assert!(limiter.admit(0).is_ok());
        for _ in 0..1000 {
            assert!(limiter.admit(500 * MS).is_err());
        }
        assert!(
            limiter.admit(1000 * MS).is_ok(),
            "refusals did not push the slot back"
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        let mut slow = gcra(0.1, 1);
        assert!(slow.admit(0).is_ok());
        assert_eq!(slow.admit(0).map_err(retry_after_secs), Err(10));
    }

    #[test]
    fn invalid_limits_are_refused() {
        for (per_second, burst) in [
            (0.0, 5),
            (-1.0, 5),
            (f64::NAN, 5),
            (f64::INFINITY, 5),
            (5.0, 0),
        ] {
            assert!(Gcra::new(RateLimit { per_second, burst }).is_none());
        }
    }

    #[test]
    fn sliding_window_maximum() {
        let us = |v: &[u64]| max_in_window(v, 1_000_000);
        assert_eq!(us(&[]), 0);
        assert_eq!(us(&[5]), 1);
        assert_eq!(us(&[0, 999_999]), 2);
        assert_eq!(us(&[0, 1_000_000]), 1);
        assert_eq!(
            us(&[0, 100, 200, 1_500_000, 1_600_000, 1_700_000, 1_800_000]),
            4
        );
        assert_eq!(us(&[0, 0, 0, 2_000_000]), 3);
    }

    #[test]
    fn the_record_is_capped_and_counters_keep_counting() {
        let mut log = CallLog::default();
        for i in 0..(MAX_RECORDED_CALLS as u64 + 10) {
            log.record(i * 10_000, i % 2 == 0);
        }
        let report = log.report("M1", None);
        assert_eq!(report.total, MAX_RECORDED_CALLS as u64 + 10);
        assert_eq!(report.rate_limited, (MAX_RECORDED_CALLS as u64 + 10) / 2);
        assert_eq!(report.recorded, MAX_RECORDED_CALLS as u64);
        assert_eq!(report.max_in_any_second, 100);
    }
}
