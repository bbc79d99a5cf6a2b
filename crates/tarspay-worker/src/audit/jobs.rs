//! A snapshot of the payout queue's jobs, by order: the stream (waiting and in flight), the
//! delayed set and the dead stream.
//!
//! Jobs move while they are read (promotion: delayed → stream; retries: stream → delayed or
//! a new stream entry). The stream is read in id order, then the delayed set, then the
//! stream again from where the first read ended, so a job promoted or re-added meanwhile is
//! still seen; a job seen twice is counted once (a job keeps its id across retries).

use super::{AuditError, Pace, read_stream};
use crate::jobs::PayoutJob;
use crate::queue::entries::field;
use crate::queue::{Envelope, QueueKeys};
use crate::redis_conn::RedisConn;
use redis::streams::StreamId;
use std::collections::{HashMap, HashSet};

/// One job, as the audit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobView {
    pub id: String,
    pub job: PayoutJob,
}

#[derive(Debug, Default)]
pub(crate) struct JobIndex {
    /// Waiting, in flight or delayed jobs by mchOrderNo.
    pub live: HashMap<String, Vec<JobView>>,
    /// Dead jobs by mchOrderNo.
    pub dead: HashMap<String, usize>,
    /// Entries whose envelope or job does not decode.
    pub undecodable: u64,
    seen: HashSet<String>,
}

impl JobIndex {
    fn add(&mut self, text: &str, dead: bool) {
        let decoded = Envelope::decode(text).ok().and_then(|envelope| {
            let job = serde_json::from_str::<PayoutJob>(envelope.payload.get()).ok()?;
            Some((envelope.id, job))
        });
        let Some((id, job)) = decoded else {
            self.undecodable += 1;
            return;
        };
        let order = job.mch_order_no().to_string();
        if dead {
            *self.dead.entry(order).or_default() += 1;
        } else if self.seen.insert(id.clone()) {
            self.live
                .entry(order)
                .or_default()
                .push(JobView { id, job });
        }
    }

    /// Adds each stream entry's stored job (its `e` field).
    fn adder(&mut self, dead: bool) -> impl FnMut(&StreamId) + '_ {
        move |entry| match field(&entry.map, "e") {
            Some(stored) => self.add(&stored, dead),
            None => self.undecodable += 1,
        }
    }

    pub fn live_count(&self) -> usize {
        self.live.values().map(Vec::len).sum()
    }

    pub fn dead_count(&self) -> usize {
        self.dead.values().sum()
    }
}

/// Every queue's jobs (a partition's merchant lanes), as one index.
pub(crate) async fn snapshot(
    conn: &RedisConn,
    queues: &[QueueKeys],
    pace: Pace,
) -> Result<JobIndex, AuditError> {
    let mut index = JobIndex::default();
    for keys in queues {
        read_queue(conn, keys, pace, &mut index).await?;
    }
    Ok(index)
}

async fn read_queue(
    conn: &RedisConn,
    keys: &QueueKeys,
    pace: Pace,
    index: &mut JobIndex,
) -> Result<(), AuditError> {
    let mut conn = conn.clone();
    let stream = &keys.stream;
    let last = read_stream(&mut conn, stream, "-", pace, index.adder(false)).await?;
    read_delayed(&mut conn, &keys.delayed, pace, index).await?;
    if let Some(last) = last {
        let after = format!("({last}");
        read_stream(&mut conn, stream, &after, pace, index.adder(false)).await?;
    }
    read_stream(&mut conn, &keys.dead, "-", pace, index.adder(true)).await?;
    Ok(())
}

async fn read_delayed(
    conn: &mut RedisConn,
    delayed: &str,
    pace: Pace,
    index: &mut JobIndex,
) -> Result<(), AuditError> {
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("ZSCAN")
            .arg(delayed)
            .arg(cursor)
            .arg("COUNT")
            .arg(pace.chunk)
            .query_async(conn)
            .await?;
        // Members and scores alternate.
        for member in page.iter().step_by(2) {
            index.add(member, false);
        }
        pace.after(page.len() / 2).await;
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
