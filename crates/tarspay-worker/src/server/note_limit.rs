//! How often an untrusted callback may act on an order: add a line to its history and queue
//! a status query. Anyone who knows an order's number can post callbacks for it; the history
//! keeps its last 64 lines, so a flood of forged ones would push the real timeline out, and
//! each query spends the merchant's call budget. One untrusted callback per order per window
//! and process acts; the rest are answered, counted in metrics and logged, nothing more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One line per order per this long.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Orders remembered at once (memory stays bounded under a flood of distinct numbers).
const MAX_ORDERS: usize = 10_000;

#[derive(Debug, Default)]
pub struct UntrustedNotes(Mutex<HashMap<String, Instant>>);

impl UntrustedNotes {
    /// Whether an untrusted callback for `mch_order_no` may be noted now (and, if so, starts
    /// its window).
    pub fn allow(&self, mch_order_no: &str) -> bool {
        self.allow_at(mch_order_no, Instant::now())
    }

    fn allow_at(&self, mch_order_no: &str, now: Instant) -> bool {
        let mut seen = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = seen.get(mch_order_no)
            && now.duration_since(*at) < WINDOW
        {
            return false;
        }
        if seen.len() >= MAX_ORDERS {
            seen.retain(|_, at| now.duration_since(*at) < WINDOW);
            if seen.len() >= MAX_ORDERS {
                // Still full within one window: a flood of distinct numbers. Note nothing
                // more until it passes (the callbacks are still answered and counted).
                return false;
            }
        }
        seen.insert(mch_order_no.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_order_per_window() {
        let notes = UntrustedNotes::default();
        let start = Instant::now();
        assert!(notes.allow_at("A", start));
        assert!(!notes.allow_at("A", start + Duration::from_secs(1)));
        assert!(notes.allow_at("B", start + Duration::from_secs(1)));
        assert!(notes.allow_at("A", start + WINDOW));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_numbers() {
        let notes = UntrustedNotes::default();
        let start = Instant::now();
        for n in 0..MAX_ORDERS {
            assert!(notes.allow_at(&n.to_string(), start));
        }
        assert!(!notes.allow_at("one-more", start));
        assert!(notes.allow_at("one-more", start + WINDOW));
        assert!(notes.0.lock().unwrap().len() <= MAX_ORDERS);
    }
}
