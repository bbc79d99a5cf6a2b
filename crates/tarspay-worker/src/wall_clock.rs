//! The host's wall clock, read in one place. Due times and lease expiries are on the Redis
//! server's clock (`queue::clock`); this is for what is stamped locally: nonces before the first
//! server sample, callback timestamps, the sandbox's checks, the dev kit's measurements.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch (zero if the host's clock is set before 1970).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch on the host's clock.
pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_itself_and_is_after_2020() {
        let ms = now_ms();
        assert!(ms > 1_577_836_800_000, "{ms} is before 2020");
        assert!(since_epoch().as_millis() as u64 >= ms);
    }
}
