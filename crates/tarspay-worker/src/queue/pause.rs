//! Pause and resume of one queue. A pause parks the queue's consumer group (see `park`), so
//! no worker is handed a job until the resume, and sets the flag the ledger and the stats go
//! by; jobs already running finish, and jobs fetched before are given back by a fetch loop
//! that reads the flag.

use redis::AsyncCommands;

use crate::queue::{QueueError, RedisQueue, park};

impl<T> RedisQueue<T> {
    /// Stops every worker of this queue from fetching.
    pub async fn pause(&self) -> Result<(), QueueError> {
        let mut conn = self.shared.conn.clone();
        let _: i64 = park::invocation(&park::PAUSE, &self.shared.keys)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Lets workers fetch again, from where the group stood at the pause.
    pub async fn resume(&self) -> Result<(), QueueError> {
        let mut conn = self.shared.conn.clone();
        let _: i64 = park::invocation(&park::RESUME, &self.shared.keys)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Whether the queue is paused.
    pub async fn is_paused(&self) -> Result<bool, QueueError> {
        let mut conn = self.shared.conn.clone();
        Ok(conn.exists(&self.shared.keys.paused).await?)
    }
}
