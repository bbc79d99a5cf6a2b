//! Delayed jobs on time: each worker runs a promoter loop beside its fetch loop. One worker
//! per queue holds the promoter lease (taken in `PROMOTE`) and sleeps, on a local timer, until
//! the next due job it learnt from its last promotion, then promotes; the `XADD`s wake the
//! workers blocked in `XREADGROUP` at once. A job delayed to before every other one leaves a
//! marker entry in the stream (`scripts::DELAY_JOB`); the fetch loop that reads it passes the
//! due time here (as does a ledger step of this worker's job that delayed such a job itself,
//! writing no marker: `Delivery::follow_due`), and this worker then follows due times like
//! the promoter until the promoter's next periodic pass has learnt of the new jobs. Every
//! worker also passes every `promote_interval`: the promoter's pass keeps its lease renewed
//! and catches a lost marker; the others' (one `GET` inside the script) take the lease over
//! once it lapses (a worker that stops gracefully hands it back, so the next pass takes it
//! at once). A lost promoter, marker or follow costs lateness, never a job.
//!
//! The timer is local (tokio), not a Redis `BLOCK` timeout: Redis checks those about every
//! 100 ms, too coarse for on-time starts.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::queue::backoff::redis_backoff;
use crate::queue::clock::now_ms;
use crate::queue::shared::Shared;

/// The least time between two on-time promotions: bounds a promoter's wake-ups (and their
/// Redis calls) under due times a millisecond apart, at this much lateness.
const MIN_GAP: Duration = Duration::from_millis(5);

/// Sends due times to follow to the promoter loop: read from markers, or from this worker's
/// own ledger steps (`Delivery::follow_due`).
pub(crate) type DueTimes = mpsc::UnboundedSender<u64>;

pub(crate) async fn run_promoter(
    shared: Arc<Shared>,
    consumer: String,
    mut due_times: mpsc::UnboundedReceiver<u64>,
    stop: CancellationToken,
) {
    let every = shared.config.promote_interval;
    let mut next_due: Option<u64> = None;
    let mut follow_until: Option<Instant> = None;
    let mut last = Instant::now();
    let mut backoff = redis_backoff();
    loop {
        // Until the next due job, the periodic pass, or a due time to follow, whichever
        // comes first.
        let periodic = last + every;
        let wake = match next_due {
            Some(due) => {
                let in_ms = Duration::from_millis(due.saturating_sub(now_ms()));
                (Instant::now() + in_ms).max(last + MIN_GAP).min(periodic)
            }
            None => periodic,
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            due = due_times.recv() => {
                match due {
                    Some(due) => {
                        next_due = Some(next_due.map_or(due, |known| known.min(due)));
                        follow_until = Some(Instant::now() + every * 2);
                    }
                    None => return,
                }
                continue;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let following = follow_until.is_some_and(|until| Instant::now() < until);
        match shared.promote_due_as(&consumer, following).await {
            Ok(promoted) => {
                backoff = redis_backoff();
                last = Instant::now();
                let now = now_ms();
                next_due = if promoted.promoter || following {
                    promoted.next_due
                } else {
                    next_due.filter(|&due| due > now)
                };
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(error = %e, ?wait, "promoting delayed jobs failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                // Try again at once: the pass that failed is overdue.
                last = Instant::now().checked_sub(every).unwrap_or(last);
            }
        }
    }
}
