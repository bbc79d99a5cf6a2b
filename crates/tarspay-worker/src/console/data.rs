//! What the console reads besides the deployment's own summaries: workers (heartbeats and
//! jobs in flight), per-partition depth, dead jobs with their console ids.

use crate::deployment::Deployment;
use crate::ids::MerchantName;
use crate::jobs::PayoutJob;
use crate::queue::{DeadJob, QueueError, QueueStats, RedisQueue};
use futures::future::try_join_all;
use redis::Value;
use std::collections::BTreeMap;

/// One worker process (consumer), over every payout queue it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub name: String,
    /// Its latest heartbeat, ms since the epoch.
    pub heartbeat_ms: u64,
    /// Jobs delivered to it and not yet settled.
    pub in_flight: u64,
}

/// Heartbeats (`keys.workers`, score = last heartbeat ms) and per-consumer pending counts
/// (`XPENDING` summary) of one queue.
async fn queue_workers<T>(queue: &RedisQueue<T>) -> Result<Vec<WorkerRow>, QueueError> {
    let keys = queue.keys();
    let mut conn = queue.connection();
    let (beats, pending): (Vec<(String, f64)>, Value) = redis::pipe()
        .cmd("ZRANGE")
        .arg(&keys.workers)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("XPENDING")
        .arg(&keys.stream)
        .arg(&keys.group)
        .query_async(&mut conn)
        .await
        .or_else(|err| {
            // A queue that never had a consumer group yet has nothing pending.
            if err.to_string().contains("NOGROUP") {
                Ok((Vec::new(), Value::Nil))
            } else {
                Err(err)
            }
        })?;
    let mut rows: BTreeMap<String, WorkerRow> = beats
        .into_iter()
        .map(|(name, score)| {
            (
                name.clone(),
                WorkerRow {
                    name,
                    heartbeat_ms: score.max(0.0) as u64,
                    in_flight: 0,
                },
            )
        })
        .collect();
    for (name, count) in pending_per_consumer(&pending) {
        rows.entry(name.clone())
            .or_insert(WorkerRow {
                name,
                heartbeat_ms: 0,
                in_flight: 0,
            })
            .in_flight += count;
    }
    Ok(rows.into_values().collect())
}

/// The 4th element of an `XPENDING key group` summary: `[[consumer, count], …]`.
fn pending_per_consumer(summary: &Value) -> Vec<(String, u64)> {
    let text = |v: &Value| match v {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    let Value::Array(items) = summary else {
        return Vec::new();
    };
    let Some(Value::Array(consumers)) = items.get(3) else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|pair| match pair {
            Value::Array(pair) if pair.len() == 2 => {
                let name = text(&pair[0])?;
                let count = text(&pair[1])?.parse().ok()?;
                Some((name, count))
            }
            _ => None,
        })
        .collect()
}

/// Every worker of every payout queue: its newest heartbeat, its jobs in flight summed.
pub async fn workers(deployment: &Deployment) -> Result<Vec<WorkerRow>, QueueError> {
    let all = try_join_all(deployment.payout_queues().map(queue_workers)).await?;
    let mut merged: BTreeMap<String, WorkerRow> = BTreeMap::new();
    for row in all.into_iter().flatten() {
        let entry = merged.entry(row.name.clone()).or_insert(WorkerRow {
            name: row.name.clone(),
            heartbeat_ms: 0,
            in_flight: 0,
        });
        entry.heartbeat_ms = entry.heartbeat_ms.max(row.heartbeat_ms);
        entry.in_flight += row.in_flight;
    }
    let mut rows: Vec<WorkerRow> = merged.into_values().collect();
    rows.sort_by(|a, b| {
        b.heartbeat_ms
            .cmp(&a.heartbeat_ms)
            .then(a.name.cmp(&b.name))
    });
    Ok(rows)
}

/// Each partition's payout queue stats (its lanes merged), in index order.
pub async fn partition_stats(deployment: &Deployment) -> Result<Vec<QueueStats>, QueueError> {
    let parts = deployment.partitions().iter().map(|partition| async move {
        let all = try_join_all(partition.queues().map(RedisQueue::stats)).await?;
        Ok::<_, QueueError>(
            all.into_iter()
                .reduce(QueueStats::merge)
                .unwrap_or_default(),
        )
    });
    try_join_all(parts).await
}

/// A dead job's id as the CLI lists it (`tarspay-worker dead list`): `PARTITION/ENTRY`
/// when the deployment has several partitions (entry ids repeat across partitions'
/// streams), prefixed `MERCHANT:` for a merchant's lane other than `default`'s.
pub fn dead_job_id(partitions: usize, partition: usize, merchant: &str, entry: &str) -> String {
    let lane = if merchant == MerchantName::DEFAULT {
        String::new()
    } else {
        format!("{merchant}:")
    };
    if partitions > 1 {
        format!("{lane}{partition}/{entry}")
    } else {
        format!("{lane}{entry}")
    }
}

/// A listed id's merchant, the partitions it may name, and its entry id.
pub fn parse_dead_job_id(
    partitions: usize,
    id: &str,
) -> Result<(&str, std::ops::Range<usize>, &str), String> {
    let (merchant, rest) = match id.split_once(':') {
        Some((merchant, rest)) => (merchant, rest),
        None => (MerchantName::DEFAULT, id),
    };
    match rest.split_once('/') {
        Some((partition, entry)) => match partition.parse::<usize>() {
            Ok(p) if p < partitions => Ok((merchant, p..p + 1, entry)),
            _ => Err(format!(
                "no partition {partition:?}: the deployment has {partitions}"
            )),
        },
        None => Ok((merchant, 0..partitions, rest)),
    }
}

/// A dead payout job and where it lies.
pub struct DeadRow {
    pub id: String,
    pub merchant: MerchantName,
    pub job: DeadJob,
    /// The order it is about, when its payload reads as a payout job.
    pub mch_order_no: Option<String>,
    /// `create` or `poll`.
    pub kind: &'static str,
}

/// Up to `limit` dead payout jobs, over every partition and lane (oldest first in each).
pub async fn dead_jobs(deployment: &Deployment, limit: usize) -> Result<Vec<DeadRow>, QueueError> {
    let count = deployment.partitions().len();
    let mut rows = Vec::new();
    for partition in deployment.partitions() {
        for lane in &partition.lanes {
            if rows.len() >= limit {
                return Ok(rows);
            }
            for job in lane.queue.list_dead(None, limit - rows.len()).await? {
                let parsed = serde_json::from_str::<PayoutJob>(&job.payload).ok();
                rows.push(DeadRow {
                    id: dead_job_id(count, partition.index, &lane.merchant, &job.dead_id),
                    merchant: lane.merchant.clone(),
                    mch_order_no: parsed.as_ref().map(|j| j.mch_order_no().to_string()),
                    kind: match parsed {
                        Some(PayoutJob::CreatePayout { .. }) => "create",
                        Some(PayoutJob::PollStatus { .. }) => "poll",
                        None => "unreadable",
                    },
                    job,
                });
            }
        }
    }
    Ok(rows)
}

/// Puts dead job `id` (as [`dead_job_id`] names it) back on its queue; `Ok(false)` if no
/// such dead job.
pub async fn retry_dead(deployment: &Deployment, id: &str) -> Result<bool, String> {
    let (merchant, candidates, entry) = parse_dead_job_id(deployment.partitions().len(), id)?;
    for partition in &deployment.partitions()[candidates] {
        let Some(lane) = partition.lane(merchant) else {
            return Err(format!("no merchant {merchant:?} in the settings"));
        };
        if lane
            .queue
            .requeue_dead(entry)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_ids_round_trip() {
        assert_eq!(dead_job_id(1, 0, "default", "1-0"), "1-0");
        assert_eq!(dead_job_id(4, 2, "kenya", "1-0"), "kenya:2/1-0");
        assert_eq!(
            parse_dead_job_id(1, "1-0").unwrap(),
            ("default", 0..1, "1-0")
        );
        assert_eq!(
            parse_dead_job_id(4, "kenya:2/1-0").unwrap(),
            ("kenya", 2..3, "1-0")
        );
        assert!(parse_dead_job_id(2, "7/1-0").is_err());
    }

    #[test]
    fn pending_summaries_give_per_consumer_counts() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let summary = Value::Array(vec![
            Value::Int(3),
            bulk("1-0"),
            bulk("2-0"),
            Value::Array(vec![
                Value::Array(vec![bulk("w-a"), bulk("2")]),
                Value::Array(vec![bulk("w-b"), bulk("1")]),
            ]),
        ]);
        assert_eq!(
            pending_per_consumer(&summary),
            vec![("w-a".to_owned(), 2), ("w-b".to_owned(), 1)]
        );
        assert!(pending_per_consumer(&Value::Nil).is_empty());
    }
}
