//! The auditor and the lifeline. The auditor checks a deployment's invariants from what Redis
//! holds: every order that is not final has exactly one job that can move it (waiting, in
//! flight or delayed), every final order has exactly one `final` outcome entry (within the
//! stream's retention), and no job points at a missing order. The lifeline is the same sweep,
//! run by one worker at a time at a bounded pace, which gives an order without work a new
//! job (as Oban's Lifeline does): work lost to an operator, a trimmed dead stream or a bug is
//! noticed and repaired instead of waiting forever.
//!
//! Redis only. Every read is chunked (SCAN, XRANGE and ZSCAN with COUNT), so no single call
//! blocks Redis for long; the lifeline paces its chunks.

mod jobs;
mod lifeline;
mod orders;
mod report;

pub use lifeline::{Lifeline, LifelineSweep};
pub use report::{AuditReport, Violation};

use crate::ledger::LedgerKeys;
use crate::queue::QueueKeys;
use crate::redis_conn::RedisConn;
use redis::streams::{StreamId, StreamRangeReply};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// How fast a sweep reads: `chunk` items per Redis call, at most `per_second` items a second
/// (0 = as fast as Redis answers).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub chunk: usize,
    pub per_second: u64,
}

impl Pace {
    /// An operator's audit: as fast as Redis answers, in chunks.
    pub const FULL: Pace = Pace {
        chunk: 1000,
        per_second: 0,
    };
    /// A worker's background sweep: a few thousand keys a second at most.
    pub const BACKGROUND: Pace = Pace {
        chunk: 500,
        per_second: 5000,
    };

    /// Sleeps as long as reading `items` takes at this pace.
    async fn after(&self, items: usize) {
        if self.per_second > 0 && items > 0 {
            let secs = items as f64 / self.per_second as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
    }
}

/// Reads `stream` from `start` (an `XRANGE` bound) to its end in paced chunks, handing each
/// entry to `each`; returns the last id read.
async fn read_stream(
    conn: &mut RedisConn,
    stream: &str,
    start: &str,
    pace: Pace,
    mut each: impl FnMut(&StreamId),
) -> Result<Option<String>, AuditError> {
    let mut start = start.to_owned();
    let mut last = None;
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(pace.chunk)
            .query_async(conn)
            .await?;
        let n = page.ids.len();
        for entry in page.ids {
            each(&entry);
            start = format!("({}", entry.id);
            last = Some(entry.id);
        }
        pace.after(n).await;
        if n < pace.chunk {
            return Ok(last);
        }
    }
}

/// Reads one deployment's ledger and payout queue.
#[derive(Clone)]
pub struct Auditor {
    conn: RedisConn,
    ledger: LedgerKeys,
    /// The partition's payout queues: one per merchant lane.
    queues: Vec<QueueKeys>,
    pace: Pace,
}

impl Auditor {
    pub fn new(conn: RedisConn, ledger: LedgerKeys, queues: Vec<QueueKeys>, pace: Pace) -> Self {
        Self {
            conn,
            ledger,
            queues,
            pace,
        }
    }

    /// Every lane's jobs, as one index.
    async fn jobs(&self, pace: Pace) -> Result<jobs::JobIndex, AuditError> {
        jobs::snapshot(&self.conn, &self.queues, pace).await
    }

    /// One pass over orders, jobs and (with `outcomes`) the outcome stream.
    async fn pass(&self, outcomes: bool) -> Result<report::Pass, AuditError> {
        // Orders first, then jobs: a job that finishes its order between the two reads is
        // caught by re-reading the order before anything is called a violation.
        let orders = orders::scan(&self.conn, &self.ledger, self.pace).await?;
        let jobs = self.jobs(self.pace).await?;
        let outcomes = if outcomes {
            Some(orders::outcome_entries(&self.conn, &self.ledger, self.pace).await?)
        } else {
            None
        };
        Ok(report::Pass::new(orders, jobs, outcomes))
    }

    /// Checks every invariant. A violation is reported only if a second pass, `confirm`
    /// later, still sees it: jobs move between the stream and the delayed set while a pass
    /// reads them, and a live system must not be reported for that.
    pub async fn audit(&self, confirm: Duration) -> Result<AuditReport, AuditError> {
        let first = self.pass(true).await?;
        let found = first.violations();
        if found.is_empty() {
            return Ok(first.report(Vec::new()));
        }
        tokio::time::sleep(confirm).await;
        let second = self.pass(true).await?;
        let again = second.violations();
        let confirmed = found.into_iter().filter(|v| again.contains(v)).collect();
        Ok(second.report(confirmed))
    }
}
