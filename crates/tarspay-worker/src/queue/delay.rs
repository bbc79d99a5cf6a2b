//! Promotion of due delayed jobs into the stream, in bounded chunks, and what a worker learns
//! from it: when the next job is due, and whether it is the queue's promoter (the one worker
//! that wakes on time for it).

use std::time::Duration;

use crate::queue::shared::Shared;
use crate::queue::{QueueError, RedisQueue, scripts};

/// How long a promoter lease lasts at least without a promotion renewing it; a promoter that
/// dies is replaced by the next worker to pass after it lapses.
pub(crate) const PROMOTER_LEASE: Duration = Duration::from_secs(2);

/// The lease of a queue whose promoter renews it every `promote_interval`: two renewals'
/// worth, so a live promoter never loses it between its own passes.
fn promoter_lease(promote_interval: Duration) -> Duration {
    PROMOTER_LEASE.max(promote_interval * 2)
}

/// What one promotion pass found.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Promoted {
    pub(crate) moved: u64,
    /// The earliest due time left in the delayed set (server ms), if any.
    pub(crate) next_due: Option<u64>,
    /// The caller holds the promoter lease.
    pub(crate) promoter: bool,
    /// How long past its due time the most overdue job moved was (server clock), if any moved.
    pub(crate) lateness: Option<Duration>,
}

impl Shared {
    /// Moves every job due now (by the Redis server's clock) from the delayed set to the
    /// stream, `promote_chunk` per Lua call, so 100,000 due jobs are many small atomic steps
    /// rather than one huge one. `consumer` takes the promoter lease when it is free (`""`:
    /// none); the next due time is learnt by the promoter, or when `following` (a marker
    /// woke the caller).
    pub(crate) async fn promote_due_as(
        &self,
        consumer: &str,
        following: bool,
    ) -> Result<Promoted, QueueError> {
        let mut conn = self.conn.clone();
        let chunk = self.config.promote_chunk;
        let mut total = Promoted::default();
        loop {
            let (moved, next_due, promoter, late_ms): (u64, i64, i64, i64) = scripts::PROMOTE
                .key(&self.keys.delayed)
                .key(&self.keys.stream)
                .key(&self.keys.promoter)
                .arg(chunk)
                .arg(consumer)
                .arg(promoter_lease(self.config.promote_interval).as_millis() as u64)
                .arg(if following { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await?;
            if let Ok(late_ms) = u64::try_from(late_ms)
                && total.lateness.is_none()
            {
                // The first chunk holds the most overdue job of the pass.
                let lateness = Duration::from_millis(late_ms);
                metrics::histogram!(crate::metrics::QUEUE_PROMOTION_LATENESS)
                    .record(lateness.as_secs_f64());
                total.lateness = Some(lateness);
            }
            total.moved += moved;
            total.next_due = u64::try_from(next_due).ok();
            total.promoter = promoter == 1;
            if moved < chunk as u64 {
                return Ok(total);
            }
        }
    }
}

impl<T> RedisQueue<T> {
    /// Promotes due delayed jobs now (the promoter also does this when the next one is due,
    /// and at least every `promote_interval`).
    pub async fn promote_due(&self) -> Result<u64, QueueError> {
        Ok(self.shared.promote_due_as("", false).await?.moved)
    }
}
