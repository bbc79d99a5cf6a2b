//! Tunables of one queue. Defaults suit payouts: a few seconds of orphan timeout would re-run
//! live work too eagerly, so it defaults to 30 s and busy workers renew their entries.

use std::time::Duration;

/// Configuration of one queue (shared by producers and workers).
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Key prefix; the hash tag of every key is `{prefix:queue}`.
    pub prefix: String,
    /// Queue (job kind) name.
    pub queue: String,
    /// The name logs and spans show (`queue` when unset): the partitions of one queue
    /// (`payouts:3:17`) all show as that queue (`payouts`).
    pub label: Option<String>,
    /// Another queue whose partition (hash tag) this one lives in, if any (see
    /// [`crate::queue::QueueKeys::nested`]).
    pub partition: Option<String>,
    /// A pending entry idle longer than this belongs to a dead worker and is claimed.
    pub orphan_timeout: Duration,
    /// How many fetched-but-not-started jobs a worker may hold (also the XREADGROUP COUNT).
    pub prefetch: usize,
    /// XREADGROUP BLOCK time: how long an idle worker's fetch waits before it looks at
    /// orphans again (delayed jobs are woken for on time, see `queue::fetch`).
    pub block: Duration,
    /// How often the promoter promotes due delayed jobs anyway (the safety net behind its
    /// on-time wake-ups) and the other workers check its lease; a lost promoter costs at most
    /// its lease plus this much lateness.
    pub promote_interval: Duration,
    /// Delayed jobs moved per Lua call (bounded so 100,000 due jobs never make a huge reply).
    pub promote_chunk: usize,
    /// How often a paused worker reads the flag again, and how old a fetch loop's last
    /// reading of the flag may be before an orphan scan (or jobs claimed or held) without a
    /// read of its own. Jobs delivered by a read need none: a paused queue delivers nothing
    /// (see `queue::park`).
    pub pause_check_interval: Duration,
    /// Heartbeat and renewal period of a worker.
    pub heartbeat_interval: Duration,
    /// A worker unseen for this long is not counted as alive.
    pub worker_ttl: Duration,
    /// Hard ceiling on attempts of a job unless the job carries its own.
    pub max_attempts: u32,
    /// Base of the exponential backoff (full jitter) used for errors that carry no delay.
    pub retry_base: Duration,
    /// Cap of that backoff.
    pub retry_max: Duration,
    /// Length cap of the dead stream: the oldest dead entries are dropped first (at most 100
    /// per burial), and their unique keys released. 0: no cap.
    pub dead_max_len: usize,
    /// Redis response timeout of non-blocking commands.
    pub response_timeout: Duration,
    /// Redis connection timeout.
    pub connection_timeout: Duration,
    /// Most settlements (acks, retries, deaths) written by one Lua call.
    pub settle_batch: usize,
    /// Jobs per Lua call when enqueueing in bulk.
    pub enqueue_chunk: usize,
}

impl QueueConfig {
    /// Defaults for the queue `queue` under the prefix `tarspay`.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            prefix: "tarspay".to_owned(),
            queue: queue.into(),
            label: None,
            partition: None,
            orphan_timeout: Duration::from_secs(30),
            prefetch: 100,
            block: Duration::from_millis(500),
            promote_interval: Duration::from_secs(1),
            promote_chunk: 500,
            pause_check_interval: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(5),
            worker_ttl: Duration::from_secs(30),
            max_attempts: 10,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            dead_max_len: 100_000,
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(5),
            settle_batch: 256,
            enqueue_chunk: 500,
        }
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the name logs and spans show.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The name logs and spans show.
    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.queue)
    }

    /// Puts this queue's keys in the partition of the queue `partition`.
    pub fn within(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }

    /// The key layout this configuration names.
    pub fn keys(&self) -> Result<crate::queue::QueueKeys, crate::queue::QueueError> {
        match &self.partition {
            Some(partition) => {
                crate::queue::QueueKeys::nested(&self.prefix, partition, &self.queue)
            }
            None => crate::queue::QueueKeys::new(&self.prefix, &self.queue),
        }
    }

    /// Sets the orphan timeout and keeps the renewal period well below it.
    pub fn with_orphan_timeout(mut self, timeout: Duration) -> Self {
        self.orphan_timeout = timeout;
        self.heartbeat_interval = self.heartbeat_interval.min(timeout / 4);
        self.worker_ttl = self.worker_ttl.max(timeout);
        self
    }

    /// How often a worker looks for orphaned entries.
    pub(crate) fn claim_interval(&self) -> Duration {
        (self.orphan_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }
}
