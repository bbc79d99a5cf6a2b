//! Wake-ups inside one process. A delayed job that becomes the earliest of its queue needs
//! someone to follow its due time: a marker in the queue's wake stream tells a worker anywhere
//! (an `XADD`, the fetch that reads it, its `XACK`). When the process that delays the job runs a
//! worker of that queue itself (the ledger's batch script, in a worker process), the due time
//! goes straight to that worker's promoter loop instead, and Redis sees no marker.
//!
//! A worker that stops before the due time costs lateness until a periodic pass (the promoter
//! lease plus `promote_interval`), never a job: the same as a marker whose reader dies.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use crate::queue::promoter::DueTimes;

/// Promoter loops of this process' workers, by their queue's delayed-set key.
static FOLLOWERS: LazyLock<Mutex<HashMap<String, Vec<DueTimes>>>> = LazyLock::new(Mutex::default);

fn followers() -> std::sync::MutexGuard<'static, HashMap<String, Vec<DueTimes>>> {
    FOLLOWERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A worker's promoter loop follows due times of the queue whose delayed set is `delayed`.
pub(crate) fn register(delayed: &str, due_times: DueTimes) {
    followers()
        .entry(delayed.to_owned())
        .or_default()
        .push(due_times);
}

/// Whether a live worker of this process follows `delayed` (stopped ones are forgotten here).
pub(crate) fn is_followed(delayed: &str) -> bool {
    let mut followers = followers();
    let Some(loops) = followers.get_mut(delayed) else {
        return false;
    };
    loops.retain(|due_times| !due_times.is_closed());
    if loops.is_empty() {
        followers.remove(delayed);
        return false;
    }
    true
}

/// Hands `due` (server ms) to a live promoter loop following `delayed`; false if none is left.
pub(crate) fn wake(delayed: &str, due: u64) -> bool {
    let followers = followers();
    followers
        .get(delayed)
        .is_some_and(|loops| loops.iter().any(|due_times| due_times.send(due).is_ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_promoter_is_forgotten_and_a_live_one_is_woken() {
        let key = "test:local_wake:delayed";
        assert!(!is_followed(key));
        let (live, mut live_rx) = tokio::sync::mpsc::unbounded_channel();
        let (stopped, stopped_rx) = tokio::sync::mpsc::unbounded_channel();
        register(key, stopped);
        drop(stopped_rx);
        assert!(!is_followed(key), "a closed loop is not a follower");
        register(key, live);
        assert!(is_followed(key));
        assert!(wake(key, 42));
        assert_eq!(live_rx.try_recv().ok(), Some(42));
        drop(live_rx);
        assert!(!wake(key, 43));
        assert!(!is_followed(key));
    }
}
