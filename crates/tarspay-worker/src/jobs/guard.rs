//! The systemic guard: when creates for several *different* orders fail in a row with
//! auth-class codes (bad key, unbound IP, disabled merchant…), every further create would
//! fail the same way, so the queue must pause instead of burning a payroll. The count lives in
//! Redis so all workers share it; any accepted create resets it (the ledger's accept script
//! clears the same key).

use super::JobError;
use redis::Script;
use redis::aio::ConnectionManager;
use std::sync::LazyLock;

static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- No expiry: failures count until an accepted create clears the key, however far apart
-- they are (an idle night between two failures does not make the key work again).
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  -- Pause. The count stays until a create is accepted (the ledger's accept clears it), so
  -- after a resume with the fault still there the first failure pauses again and burns no
  -- order.
  redis.call('SET', KEYS[2], '1')
  return 1
end
return 0
"#,
    )
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardVerdict {
    Continue,
    Pause,
}

#[derive(Clone)]
pub struct SystemicGuard {
    conn: ConnectionManager,
    key: String,
    pause_key: String,
    threshold: u32,
}

impl SystemicGuard {
    /// `key` is the ledger's guard key ([`crate::ledger::LedgerKeys::guard`]); `pause_key` is
    /// the payout queue's pause flag, which every worker reads (same hash tag).
    pub fn new(conn: ConnectionManager, key: String, pause_key: String, threshold: u32) -> Self {
        Self {
            conn,
            key,
            pause_key,
            threshold: threshold.max(1),
        }
    }

    /// Counts an auth-class failure of `mch_order_no`; `Pause` (the queue is now paused) once
    /// enough different orders failed with no accepted create in between. The orders before
    /// that fail; from the pause on, the caller holds the order for the resume instead.
    pub async fn record_auth_failure(
        &self,
        mch_order_no: &str,
        code: i64,
    ) -> Result<GuardVerdict, JobError> {
        let tripped: i64 = RECORD
            .key(&self.key)
            .key(&self.pause_key)
            .arg(mch_order_no)
            .arg(self.threshold)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|err| JobError::Guard(err.to_string()))?;
        if tripped == 1 {
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

    /// The count lasts until an accepted create clears it: no TTL on the key.
    #[tokio::test]
    async fn the_count_survives_until_an_accept_clears_it() {
        let redis = LocalRedis::start(local_redis::Durability::Off).expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = ConnectionManager::new(client).await.unwrap();
        let guard =
            SystemicGuard::new(conn.clone(), "{t:p}:guard".into(), "{t:p}:paused".into(), 3);
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
        assert_eq!(
            guard.record_auth_failure("C", 5003007).await.unwrap(),
            GuardVerdict::Pause
        );
        let paused: Option<String> = redis::cmd("GET")
            .arg("{t:p}:paused")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(paused.as_deref(), Some("1"));
    }
}
