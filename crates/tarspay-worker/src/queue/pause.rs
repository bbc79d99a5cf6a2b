//! Pause and resume of one queue. Workers read the flag when jobs arrive (at most
//! `pause_check_interval` after the last reading) and, while it is set, give back what they
//! fetched and fetch no more; jobs already running finish.

use redis::AsyncCommands;

use crate::queue::{QueueError, RedisQueue};

impl<T> RedisQueue<T> {
    /// Stops every worker of this queue from fetching.
    pub async fn pause(&self) -> Result<(), QueueError> {
        let mut conn = self.shared.conn.clone();
        let _: () = conn.set(&self.shared.keys.paused, 1).await?;
        Ok(())
    }

    /// Lets workers fetch again.
    pub async fn resume(&self) -> Result<(), QueueError> {
        let mut conn = self.shared.conn.clone();
        let _: () = conn.del(&self.shared.keys.paused).await?;
        Ok(())
    }

    /// Whether the queue is paused.
    pub async fn is_paused(&self) -> Result<bool, QueueError> {
        let mut conn = self.shared.conn.clone();
        Ok(conn.exists(&self.shared.keys.paused).await?)
    }
}
