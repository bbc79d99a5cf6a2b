//! Backoff for Redis failures inside worker loops: jittered exponential, capped, endless —
//! a worker never gives up on Redis.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

/// A fresh endless backoff sequence (50 ms doubling to 2 s, with jitter).
pub(crate) fn redis_backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Full-jitter exponential delay for the `attempt`-th failure (1-based) of a job whose error
/// carries no delay of its own.
pub(crate) fn job_retry_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1u32 << exp).min(max);
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
    fn job_delay_stays_under_the_cap() {
        for attempt in 1..50 {
            let d = job_retry_delay(attempt, Duration::from_secs(1), Duration::from_secs(60));
            assert!(d <= Duration::from_secs(60));
        }
        assert!(
            job_retry_delay(1, Duration::from_secs(1), Duration::from_secs(60))
                <= Duration::from_secs(1)
        );
    }

    #[test]
    fn redis_backoff_never_ends() {
        assert_eq!(redis_backoff().take(100).count(), 100);
    }
}
