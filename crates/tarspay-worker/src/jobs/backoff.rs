//! Exponential backoff with full jitter (a uniform wait between zero and the capped
//! exponential), so retries of many orders that failed together do not arrive together.

use std::time::Duration;

/// The wait before retry number `attempt` (1 for the first retry).
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exponential = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exponential.min(cap).as_millis().max(1) as u64;
    Duration::from_millis(rand::random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_the_capped_exponential() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 1..40 {
            let ceiling = base.saturating_mul(1 << (attempt - 1).min(20)).min(cap);
            for _ in 0..50 {
                assert!(full_jitter(base, cap, attempt) <= ceiling);
            }
        }
        // Jitter spreads: 200 draws at attempt 6 are not all the same value.
        let draws: std::collections::HashSet<_> =
            (0..200).map(|_| full_jitter(base, cap, 6)).collect();
        assert!(draws.len() > 10);
    }
}
