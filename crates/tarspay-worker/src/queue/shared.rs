//! What every clone of a queue handle shares: the client, a reconnecting connection, the keys
//! and the configuration; and the background sampling of the server's clock.

use std::sync::Weak;
use std::time::Duration;

use crate::queue::{QueueConfig, QueueError, QueueKeys};
use crate::queue::{clock, park};
use crate::redis_conn::{RedisClient, RedisConn, Timeouts};

/// State shared by every clone of a queue handle.
pub(crate) struct Shared {
    pub(crate) client: RedisClient,
    pub(crate) conn: RedisConn,
    pub(crate) keys: QueueKeys,
    pub(crate) config: QueueConfig,
}

impl Shared {
    /// A connection that reconnects by itself; `extra` lengthens the response timeout for
    /// blocking commands.
    pub(crate) fn manager(
        client: &RedisClient,
        config: &QueueConfig,
        extra: Duration,
    ) -> Result<RedisConn, QueueError> {
        Ok(client.connect(Timeouts {
            connect: config.connection_timeout,
            response: config.response_timeout + extra,
        })?)
    }

    /// A call of `script` (RELEASE, RENEW: `KEYS[1]` the stream, then group, consumer and
    /// entry ids) over the entries `ids` held by `consumer`.
    pub(crate) fn held_entries_call<'s>(
        &self,
        script: &'s redis::Script,
        consumer: &str,
        ids: &[String],
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.keys.stream)
            .arg(&self.keys.group)
            .arg(consumer)
            .arg(ids);
        invocation
    }

    /// Creates the consumer groups (from the start of the streams) if they are missing; a
    /// job stream's group created while the queue is paused is parked at once (see `park`).
    pub(crate) async fn ensure_group(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: i64 = park::invocation(&park::ENSURE_GROUP, &self.keys)
            .invoke_async(&mut conn)
            .await?;
        // The wake stream, read with the job stream: never parked.
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.wake)
            .arg(&self.keys.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Samples the server's clock every [`clock::REFRESH_INTERVAL`] while the queue handle lives.
pub(crate) async fn refresh_clock(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(clock::REFRESH_INTERVAL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut conn = shared.conn.clone();
        if let Err(e) = clock::sync(&mut conn).await {
            tracing::debug!(error = %e, "sampling the redis server's clock failed; keeping the last sample");
        }
    }
}
