//! The dead stream: jobs that were given up, exhausted their attempts, or could not be decoded.
//! Entries keep the job's stored form byte for byte, so they can be re-enqueued.

use redis::streams::{StreamId, StreamRangeReply};

use crate::queue::entries::field;
use crate::queue::envelope::Envelope;
use crate::queue::{QueueError, RedisQueue, scripts};

/// One dead job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadJob {
    /// Entry id in the dead stream (use it to re-enqueue or delete).
    pub dead_id: String,
    /// The job id, if the stored job could be parsed.
    pub job_id: Option<String>,
    /// Attempts made before it died, if the stored job could be parsed.
    pub attempts: Option<u32>,
    /// Why it died.
    pub reason: String,
    /// The worker (consumer) that buried it.
    pub worker: String,
    /// When it died, ms since the epoch.
    pub died_at_ms: u64,
    /// The job's own JSON if the envelope parsed, else the whole stored text.
    pub payload: String,
    /// The stored envelope text.
    pub(crate) stored: String,
}

impl DeadJob {
    fn from_entry(entry: &StreamId) -> Self {
        let text = |name: &str| field(&entry.map, name).unwrap_or_default();
        let stored = text("e");
        let envelope = Envelope::decode(&stored).ok();
        Self {
            dead_id: entry.id.clone(),
            job_id: envelope.as_ref().map(|e| e.id.clone()),
            attempts: envelope.as_ref().map(|e| e.attempts),
            reason: text("reason"),
            worker: text("worker"),
            died_at_ms: text("at").parse().unwrap_or(0),
            payload: envelope
                .as_ref()
                .map_or_else(|| stored.clone(), |e| e.payload.get().to_owned()),
            stored,
        }
    }
}

impl<T> RedisQueue<T> {
    /// Lists up to `count` dead jobs, oldest first, starting after `after` (a `dead_id`) if given.
    pub async fn list_dead(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadJob>, QueueError> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let mut conn = self.shared.conn.clone();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.shared.keys.dead)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids.iter().map(DeadJob::from_entry).collect())
    }

    /// Number of dead jobs.
    pub async fn dead_count(&self) -> Result<u64, QueueError> {
        let mut conn = self.shared.conn.clone();
        Ok(redis::cmd("XLEN")
            .arg(&self.shared.keys.dead)
            .query_async(&mut conn)
            .await?)
    }

    async fn dead_job(&self, dead_id: &str) -> Result<Option<DeadJob>, QueueError> {
        let mut conn = self.shared.conn.clone();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.shared.keys.dead)
            .arg(dead_id)
            .arg(dead_id)
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids.first().map(DeadJob::from_entry))
    }

    /// Moves a dead job back to the stream with its attempts reset. Returns false if no such dead
    /// job exists (e.g. another caller re-enqueued it first). The job keeps its id and unique key.
    pub async fn requeue_dead(&self, dead_id: &str) -> Result<bool, QueueError> {
        let Some(dead) = self.dead_job(dead_id).await? else {
            return Ok(false);
        };
        let mut envelope = Envelope::decode(&dead.stored)?;
        envelope.attempts = 0;
        let mut conn = self.shared.conn.clone();
        let moved: u32 = scripts::REQUEUE_DEAD
            .key(&self.shared.keys.dead)
            .key(&self.shared.keys.stream)
            .arg(dead_id)
            .arg(envelope.encode()?)
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }

    /// Deletes a dead job for good and releases its unique key.
    pub async fn delete_dead(&self, dead_id: &str) -> Result<bool, QueueError> {
        let Some(dead) = self.dead_job(dead_id).await? else {
            return Ok(false);
        };
        let envelope = Envelope::decode(&dead.stored).ok();
        let (unique, job_id) = envelope
            .map(|e| (e.unique.unwrap_or_default(), e.id))
            .unwrap_or_default();
        let mut conn = self.shared.conn.clone();
        let deleted: u32 = scripts::DELETE_DEAD
            .key(&self.shared.keys.dead)
            .key(&self.shared.keys.unique)
            .arg(dead_id)
            .arg(unique)
            .arg(job_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(deleted == 1)
    }
}
