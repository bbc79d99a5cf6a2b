//! The systemic guard: when creates for several *different* orders fail in a row with
//! auth-class codes (bad key, unbound IP, disabled merchant…), every further create would
//! fail the same way, so the queue must pause instead of burning a payroll. The count lives in
//! Redis so all workers share it: one set per partition (the ledger's accept script clears
//! its partition's set in the step that records an accepted create), added up over every
//! partition when a failure is recorded; a trip pauses every partition. An accept in one
//! partition leaves another partition's earlier failures counted: the guard errs towards
//! pausing.

use super::JobError;
use crate::queue::{QueueKeys, park};
use crate::redis_conn::RedisConn;
use redis::Script;
use std::sync::{Arc, LazyLock};

static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{}",
        crate::queue::park::PARKING,
        r#"
-- No expiry: failures count until an accepted create clears the key, however far apart
-- they are (an idle night between two failures does not make the key work again).
-- KEYS[1]: this partition's guard set, then its queue's pause flag, parked position and
-- stream; ARGV: the order, the threshold, the failures the other partitions hold (read just
-- before), and the queue's consumer group. Returns 1 when the count reaches the threshold:
-- this partition is paused here (its group parked, as `RedisQueue::pause` does), the others
-- by the caller.
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) + tonumber(ARGV[3]) >= tonumber(ARGV[2]) then
  -- Pause. The count stays until a create is accepted (the ledger's accept clears it), so
  -- after a resume with the fault still there the first failure pauses again and burns no
  -- order.
  park(KEYS[3], KEYS[4], ARGV[4])
  redis.call('SET', KEYS[2], '1')
  return 1
end
return 0
"#
    ))
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardVerdict {
    Continue,
    Pause,
}

/// Counts auth-class failures across the deployment's partitions; at the threshold it pauses
/// every partition.
#[derive(Clone)]
pub struct SystemicGuard {
    conn: RedisConn,
    /// This guard's partition.
    own: usize,
    /// Each partition's guard set ([`crate::ledger::LedgerKeys::guard`]) and payout queue's
    /// keys (same hash tag), in index order.
    partitions: Arc<[(String, QueueKeys)]>,
    threshold: u32,
}

impl SystemicGuard {
    pub fn new(
        conn: RedisConn,
        own: usize,
        partitions: Arc<[(String, QueueKeys)]>,
        threshold: u32,
    ) -> Self {
        Self {
            conn,
            own,
            partitions,
            threshold: threshold.max(1),
        }
    }

    /// Failures recorded in the other partitions (read only after an auth failure).
    async fn failures_elsewhere(&self) -> Result<u64, redis::RedisError> {
        let mut total = 0;
        for (index, (guard, _)) in self.partitions.iter().enumerate() {
            if index != self.own {
                let count: u64 = redis::cmd("SCARD")
                    .arg(guard)
                    .query_async(&mut self.conn.clone())
                    .await?;
                total += count;
            }
        }
        Ok(total)
    }

    /// Pauses every other partition (the script paused this one).
    async fn pause_everywhere(&self) -> Result<(), redis::RedisError> {
        for (index, (_, queue)) in self.partitions.iter().enumerate() {
            if index != self.own {
                park::invocation(&park::PAUSE, queue)
                    .invoke_async::<i64>(&mut self.conn.clone())
                    .await?;
            }
        }
        Ok(())
    }

    /// Counts an auth-class failure of `mch_order_no`; `Pause` (the queue is now paused) once
    /// enough different orders failed with no accepted create in between. The orders before
    /// that fail; from the pause on, the caller holds the order for the resume instead.
    pub async fn record_auth_failure(
        &self,
        mch_order_no: &str,
        code: i64,
    ) -> Result<GuardVerdict, JobError> {
        let guard_error = |err: redis::RedisError| JobError::Guard(err.to_string());
        let elsewhere = self.failures_elsewhere().await.map_err(guard_error)?;
        let (guard, queue) = &self.partitions[self.own];
        let tripped: i64 = RECORD
            .key(guard)
            .key(&queue.paused)
            .key(&queue.parked)
            .key(&queue.stream)
            .arg(mch_order_no)
            .arg(self.threshold)
            .arg(elsewhere)
            .arg(&queue.group)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(guard_error)?;
        if tripped == 1 {
            self.pause_everywhere().await.map_err(guard_error)?;
            tracing::error!(
                code,
                threshold = self.threshold,
                "auth-class failures across orders: pausing the queue"
            );
            Ok(GuardVerdict::Pause)
        } else {
            Ok(GuardVerdict::Continue)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use local_redis::LocalRedis;

    /// The count lasts until an accepted create clears it (no TTL on the key) and adds up
    /// over partitions; a trip pauses every partition as `RedisQueue::pause` does, its
    /// group parked.
    #[tokio::test]
    async fn the_count_survives_until_an_accept_clears_it() {
        let redis = LocalRedis::start(local_redis::Durability::Off).expect("redis-server on PATH");
        let conn = crate::redis_conn::RedisClient::single(redis.url())
            .and_then(|client| client.connect(Default::default()))
            .unwrap();
        let queues = [
            QueueKeys::new("t", "p").unwrap(),
            QueueKeys::new("t", "q").unwrap(),
        ];
        for queue in &queues {
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&queue.stream)
                .arg(&queue.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut conn.clone())
                .await
                .unwrap();
        }
        let partitions: Arc<[(String, QueueKeys)]> = [
            ("{t:p}:guard".to_owned(), queues[0].clone()),
            ("{t:q}:guard".to_owned(), queues[1].clone()),
        ]
        .into();
        let guard = SystemicGuard::new(conn.clone(), 0, partitions.clone(), 3);
        let other = SystemicGuard::new(conn.clone(), 1, partitions, 3);
        for order in ["A", "B"] {
            assert_eq!(
                guard.record_auth_failure(order, 5003007).await.unwrap(),
                GuardVerdict::Continue
            );
        }
        let mut conn = conn;
        let count: i64 = redis::cmd("SCARD")
            .arg("{t:p}:guard")
            .query_async(&mut conn)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg("{t:p}:guard")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(count, 2);
        assert_eq!(ttl, -1, "the count must not expire");
        // The third failure, in another partition, trips the guard: every partition pauses.
        assert_eq!(
            other.record_auth_failure("C", 5003007).await.unwrap(),
            GuardVerdict::Pause
        );
        for queue in &queues {
            let paused: Option<String> = redis::cmd("GET")
                .arg(&queue.paused)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(paused.as_deref(), Some("1"), "{}", queue.paused);
            let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&queue.stream)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(
                groups.groups[0].last_delivered_id,
                park::PARKED_ID,
                "{} parked",
                queue.stream
            );
        }
    }
}
