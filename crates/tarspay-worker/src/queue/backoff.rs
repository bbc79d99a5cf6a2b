//! Every random delay of the service, in one place: the endless backoff of worker loops on Redis
//! failures (backon's jittered exponential), full-jitter retry delays of jobs (the queue's own
//! and the payout jobs'), and plain uniform spreading.
//!
//! Retries use *full* jitter (a uniform wait between zero and the capped exponential) so the
//! retries of many jobs that failed together do not arrive together; backon's jitter only adds
//! up to one more delay on top of the exponential, which keeps them bunched.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

/// A fresh endless backoff sequence (50 ms doubling to 2 s, with jitter): a worker never gives
/// up on Redis.
pub(crate) fn redis_backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The wait before retry number `attempt` (1 for the first retry): uniform between zero and
/// `base · 2^(attempt-1)`, capped at `cap`.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exponential = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(30));
    random_up_to(exponential.min(cap))
}

/// A uniform random wait between zero and `ceiling`, in whole milliseconds.
pub fn random_up_to(ceiling: Duration) -> Duration {
    let ceiling_ms = ceiling.as_millis() as u64;
    if ceiling_ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::random_range(0..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_within_the_capped_exponential() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 1..50 {
            let ceiling = base.saturating_mul(1 << (attempt - 1).min(30)).min(cap);
            for _ in 0..50 {
                assert!(full_jitter(base, cap, attempt) <= ceiling);
            }
        }
        // Jitter spreads: 200 draws at attempt 6 are not all the same value.
        let draws: std::collections::HashSet<_> =
            (0..200).map(|_| full_jitter(base, cap, 6)).collect();
        assert!(draws.len() > 10);
    }

    #[test]
    fn a_zero_ceiling_waits_nothing() {
        assert_eq!(
            full_jitter(Duration::ZERO, Duration::from_secs(1), 3),
            Duration::ZERO
        );
        assert_eq!(random_up_to(Duration::from_micros(900)), Duration::ZERO);
    }

    #[test]
    fn redis_backoff_never_ends() {
        assert_eq!(redis_backoff().take(100).count(), 100);
    }
}
