//! How often an untrusted callback may act on an order: add a line to its history and queue
//! a status query. Anyone who knows an order's number can post callbacks for it; the history
//! keeps its last 64 lines, so a flood of forged ones would push the real timeline out, and
//! each query spends the merchant's call budget. One untrusted callback per order per window
//! and process acts; the rest are answered, counted in metrics and logged, nothing more. Past
//! [`MAX_ORDERS`] orders in one window the queries go on (each order's unique query job
//! shares repeats) and only the notes stop.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One line per order per this long.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Orders remembered at once (memory stays bounded under a flood of distinct numbers).
const MAX_ORDERS: usize = 10_000;

#[derive(Debug, Default)]
pub struct UntrustedNotes(Mutex<HashMap<String, Instant>>);

/// What an untrusted callback may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Its order's first in the window: noted, and a status query queued.
    Act,
    /// Another one for the order within the window: answered, nothing more.
    Ignore,
    /// Too many orders within one window to remember (a flood of distinct numbers): its
    /// query is queued (its unique key shares it with one already waiting), not noted.
    QueryOnly,
}

impl UntrustedNotes {
    /// What an untrusted callback for `mch_order_no` may do now (`Act` starts its window).
    pub fn admit(&self, mch_order_no: &str) -> Admitted {
        self.admit_at(mch_order_no, Instant::now())
    }

    /// Ends `mch_order_no`'s window: its callback's query could not be queued, and the
    /// resend must act.
    pub fn forget(&self, mch_order_no: &str) {
        self.seen().remove(mch_order_no);
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn admit_at(&self, mch_order_no: &str, now: Instant) -> Admitted {
        let mut seen = self.seen();
        if let Some(at) = seen.get(mch_order_no)
            && now.duration_since(*at) < WINDOW
        {
            return Admitted::Ignore;
        }
        if seen.len() >= MAX_ORDERS {
            seen.retain(|_, at| now.duration_since(*at) < WINDOW);
            if seen.len() >= MAX_ORDERS {
                // Still full within one window: note nothing more until it passes, but let
                // the queries through: a payroll's worth of genuine callbacks that do not
                // verify must still bring their orders home promptly.
                return Admitted::QueryOnly;
            }
        }
        seen.insert(mch_order_no.to_owned(), now);
        Admitted::Act
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_action_per_order_per_window() {
        let notes = UntrustedNotes::default();
        let start = Instant::now();
        assert_eq!(notes.admit_at("A", start), Admitted::Act);
        assert_eq!(
            notes.admit_at("A", start + Duration::from_secs(1)),
            Admitted::Ignore
        );
        assert_eq!(
            notes.admit_at("B", start + Duration::from_secs(1)),
            Admitted::Act
        );
        assert_eq!(notes.admit_at("A", start + WINDOW), Admitted::Act);
        // A query that could not be queued gives the window back.
        notes.forget("B");
        assert_eq!(
            notes.admit_at("B", start + Duration::from_secs(2)),
            Admitted::Act
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_numbers_and_queries_go_on() {
        let notes = UntrustedNotes::default();
        let start = Instant::now();
        for n in 0..MAX_ORDERS {
            assert_eq!(notes.admit_at(&n.to_string(), start), Admitted::Act);
        }
        assert_eq!(notes.admit_at("one-more", start), Admitted::QueryOnly);
        assert_eq!(notes.admit_at("one-more", start + WINDOW), Admitted::Act);
        assert!(notes.0.lock().unwrap().len() <= MAX_ORDERS);
    }
}
