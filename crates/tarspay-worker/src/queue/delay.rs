//! Promotion of due delayed jobs into the stream, in bounded chunks.

use crate::queue::shared::Shared;
use crate::queue::{QueueError, RedisQueue, scripts};

impl Shared {
    /// Moves every job due now (by the Redis server's clock) from the delayed set to the stream, `promote_chunk` per Lua call,
    /// so 100,000 due jobs are many small atomic steps rather than one huge one.
    pub(crate) async fn promote_due(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let chunk = self.config.promote_chunk;
        let mut moved = 0u64;
        loop {
            let n: u64 = scripts::PROMOTE
                .key(&self.keys.delayed)
                .key(&self.keys.stream)
                .arg(chunk)
                .invoke_async(&mut conn)
                .await?;
            moved += n;
            if n < chunk as u64 {
                return Ok(moved);
            }
        }
    }
}

impl<T> RedisQueue<T> {
    /// Promotes due delayed jobs now (workers also do this every `promote_interval`).
    pub async fn promote_due(&self) -> Result<u64, QueueError> {
        self.shared.promote_due().await
    }
}
