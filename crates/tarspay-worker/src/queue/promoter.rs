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
//! once it lapses. A worker that stops gives the lease back and hands over what it was to
//! wake for: the earliest due time it knew of, and any it is told after its promoter ended,
//! as a wake marker for another worker ([`Handover`]), whose pass for it takes the free
//! lease (with nothing to hand over, the next periodic pass takes it). A lost promoter,
//! marker or follow costs lateness, never a job.
//!
//! The timer is local (tokio), not a Redis `BLOCK` timeout: Redis checks those about every
//! 100 ms, too coarse for on-time starts.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::queue::backoff::redis_backoff;
use crate::queue::clock::now_ms;
use crate::queue::scripts;
use crate::queue::shared::Shared;
use crate::redis_conn::RedisConn;

/// The least time between two on-time promotions: bounds a promoter's wake-ups (and their
/// Redis calls) under due times a millisecond apart, at this much lateness.
const MIN_GAP: Duration = Duration::from_millis(5);

/// Sends due times to follow to the promoter loop: read from markers, or from this worker's
/// own ledger steps (`Delivery::follow_due`). Once the loop has ended, a send fails: the
/// sender then hands the due time over ([`Handover`]).
pub(crate) type DueTimes = mpsc::UnboundedSender<u64>;

/// How long a stopping worker's hand-over calls may take: Redis being away must not hold up
/// the shutdown (a due time not handed over is found by a periodic pass, at worst).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(1);

/// Hands due times this worker can no longer follow (its promoter has ended) to another
/// worker: a wake marker on the queue's wake stream, written like `scripts::DELAY_JOB`'s
/// (field `w`, the stream capped near the same 64 entries), which the next worker to read it
/// follows.
#[derive(Clone)]
pub(crate) struct Handover {
    conn: RedisConn,
    wake: String,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("wake", &self.wake)
            .finish()
    }
}

impl Handover {
    /// Markers go to `wake`, the queue's wake stream (`QueueKeys::wake`).
    pub(crate) fn new(conn: RedisConn, wake: String) -> Self {
        Self { conn, wake }
    }

    /// Writes the marker for `due_ms` (best effort).
    pub(crate) async fn due(&self, due_ms: u64) {
        let mut conn = self.conn.clone();
        let mut marker = redis::cmd("XADD");
        marker.arg(&self.wake).arg("MAXLEN").arg("~").arg(64);
        marker.arg("*").arg("w").arg(due_ms);
        let written = marker.query_async::<redis::Value>(&mut conn);
        match tokio::time::timeout(HANDOVER_TIMEOUT, written).await {
            Ok(Ok(_)) => tracing::debug!(due_ms, "due time handed over to another worker"),
            Ok(Err(e)) => tracing::debug!(error = %e, due_ms, "handing a due time over failed"),
            Err(_) => tracing::debug!(due_ms, "handing a due time over timed out"),
        }
    }

    /// Passes `due_ms` to this worker's promoter loop through `due_times` while that loop
    /// runs; once it has ended (the worker is stopping), to another worker as a marker.
    pub(crate) async fn follow_or_hand_over(&self, due_times: &DueTimes, due_ms: u64) {
        if due_times.send(due_ms).is_err() {
            self.due(due_ms).await;
        }
    }

    /// [`Handover::follow_or_hand_over`] from code that cannot wait for the marker's write.
    pub(crate) fn follow_or_hand_over_later(&self, due_times: &DueTimes, due_ms: u64) {
        if due_times.send(due_ms).is_err() {
            let handover = self.clone();
            tokio::spawn(async move { handover.due(due_ms).await });
        }
    }
}

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
    'run: loop {
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
            _ = stop.cancelled() => break 'run,
            due = due_times.recv() => {
                match due {
                    Some(due) => {
                        next_due = Some(next_due.map_or(due, |known| known.min(due)));
                        follow_until = Some(Instant::now() + every * 2);
                    }
                    None => break 'run,
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
                    _ = stop.cancelled() => break 'run,
                    _ = tokio::time::sleep(wait) => {}
                }
                // Try again at once: the pass that failed is overdue.
                last = Instant::now().checked_sub(every).unwrap_or(last);
            }
        }
    }
    // Stopping: the lease goes back, then the earliest due time this worker was to wake for
    // (known, or sent before the channel closed) goes to another worker, whose pass for it
    // finds the lease free and takes it. Later sends fail and are handed over by their
    // senders.
    due_times.close();
    let mut pending = next_due;
    while let Ok(due) = due_times.try_recv() {
        pending = Some(pending.map_or(due, |known| known.min(due)));
    }
    release_lease(&shared, &consumer).await;
    if let Some(due) = pending {
        Handover::new(shared.conn.clone(), shared.keys.wake.clone())
            .due(due)
            .await;
    }
}

/// Gives the promoter lease back if this worker holds it: jobs nobody follows are then
/// promoted by the next worker's periodic pass, not only once the lease lapses (up to
/// `PROMOTER_LEASE` later). Best effort: a lease left behind lapses by itself.
async fn release_lease(shared: &Shared, consumer: &str) {
    let mut conn = shared.conn.clone();
    let mut release = scripts::RELEASE_PROMOTER.prepare_invoke();
    release.key(&shared.keys.promoter).arg(consumer);
    let released = release.invoke_async::<i64>(&mut conn);
    match tokio::time::timeout(HANDOVER_TIMEOUT, released).await {
        Ok(Ok(1)) => tracing::debug!(%consumer, "promoter lease handed back"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "handing back the promoter lease failed"),
        Err(_) => tracing::debug!("handing back the promoter lease timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_conn::RedisClient;
    use local_redis::{Durability, LocalRedis};
    use redis::AsyncCommands;

    /// The `w` due times of the markers on `wake`, oldest first.
    async fn markers(conn: &RedisConn, wake: &str) -> Vec<Option<String>> {
        let mut c = conn.clone();
        let read: redis::streams::StreamRangeReply = c.xrange_all(wake).await.unwrap();
        read.ids.iter().map(|marker| marker.get("w")).collect()
    }

    #[tokio::test]
    async fn a_due_time_goes_to_the_running_promoter_and_after_it_ended_to_another_worker() {
        let redis = LocalRedis::start(Durability::Off).expect("redis-server on PATH");
        let conn = RedisClient::single(redis.url())
            .and_then(|client| client.connect(Default::default()))
            .expect("client");
        let wake = "{t:payouts}:wake".to_owned();
        let handover = Handover::new(conn.clone(), wake.clone());
        let (due_times, mut promoter) = mpsc::unbounded_channel();

        handover.follow_or_hand_over(&due_times, 1_000).await;
        assert_eq!(
            promoter.try_recv().ok(),
            Some(1_000),
            "the promoter follows it"
        );
        assert!(
            markers(&conn, &wake).await.is_empty(),
            "no other worker is woken"
        );

        // The promoter loop has ended (it closes its channel when the worker stops).
        promoter.close();
        handover.follow_or_hand_over(&due_times, 2_000).await;
        assert_eq!(
            markers(&conn, &wake).await,
            [Some("2000".to_owned())],
            "one marker, for the due time the promoter could not take"
        );
    }
}
