//! The queue handle: connection, enqueue (single and bulk), and the shared state every worker of
//! this handle uses.

use serde::Serialize;
use serde_json::value::RawValue;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::queue::clock;
use crate::queue::envelope::{Envelope, new_job_id};
use crate::queue::runtime::WorkerRuntime;
use crate::queue::shared::{Shared, refresh_clock};
use crate::queue::{QueueConfig, QueueError, QueueKeys, scripts};
use crate::redis_conn::{RedisClient, RedisConn};

/// Options of one enqueued job.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// Run no earlier than this far in the future.
    pub delay: Option<Duration>,
    /// While a job with this key is queued, delayed, running or dead, another enqueue with the
    /// same key is refused as [`Enqueued::Duplicate`]. Released when the job is done.
    pub unique_key: Option<String>,
    /// Hard ceiling on attempts (default [`QueueConfig::max_attempts`]).
    pub max_attempts: Option<u32>,
    /// Job id to use instead of a generated one.
    pub job_id: Option<String>,
}

impl JobOptions {
    /// Options with a delay.
    pub fn delayed(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }

    /// Options with a unique key.
    pub fn unique(key: impl Into<String>) -> Self {
        Self {
            unique_key: Some(key.into()),
            ..Self::default()
        }
    }
}

/// Result of enqueueing one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored (in the stream, or in the delayed set if it has a delay).
    Queued { job_id: String },
    /// Refused: the unique key is held by the job `held_by`.
    Duplicate { held_by: String },
}

impl Enqueued {
    /// True for [`Enqueued::Duplicate`].
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Duplicate { .. })
    }
}

/// A queue of jobs of type `T` on Redis Streams.
///
/// Clone it freely: clones share the connection. Passed to apalis' `WorkerBuilder::backend`, each
/// clone becomes one worker (one consumer in the group, see [`crate::queue`]).
pub struct RedisQueue<T> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) runtime: Option<WorkerRuntime<T>>,
    /// Cancelled when its worker starts to stop: fetching and claiming end then, not once
    /// the jobs in flight are done ([`RedisQueue::stop_fetching_on`]).
    pub(crate) fetch_stop: Option<CancellationToken>,
    pub(crate) _job: PhantomData<fn() -> T>,
}

impl<T> Clone for RedisQueue<T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            runtime: None,
            fetch_stop: self.fetch_stop.clone(),
            _job: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for RedisQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("keys", &self.shared.keys)
            .finish_non_exhaustive()
    }
}

impl<T> RedisQueue<T> {
    /// Connects to `redis_url` and makes sure the consumer group exists.
    pub async fn connect(redis_url: &str, config: QueueConfig) -> Result<Self, QueueError> {
        let client = RedisClient::open(redis_url, crate::redis_conn::ClusterMode::Auto).await?;
        Self::from_client(client, config).await
    }

    /// Like [`RedisQueue::connect`] with a ready client.
    pub async fn from_client(client: RedisClient, config: QueueConfig) -> Result<Self, QueueError> {
        let conn = Shared::manager(&client, &config, Duration::ZERO)?;
        Self::with_connection(client, conn, config).await
    }

    /// Like [`RedisQueue::from_client`], sharing a connection other queues use too (the
    /// partitions of one deployment).
    pub async fn with_connection(
        client: RedisClient,
        conn: RedisConn,
        config: QueueConfig,
    ) -> Result<Self, QueueError> {
        validate(&config)?;
        let keys = config.keys()?;
        let shared = Shared {
            client,
            conn,
            keys,
            config,
        };
        shared.ensure_group().await?;
        let mut conn = shared.conn.clone();
        clock::sync(&mut conn).await?;
        let offset = clock::local_offset_ms();
        if offset.unsigned_abs() > 1_000 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock differs from the Redis server's; the queue uses the server's"
            );
        }
        let shared = Arc::new(shared);
        tokio::spawn(refresh_clock(Arc::downgrade(&shared)));
        Ok(Self {
            shared,
            runtime: None,
            fetch_stop: None,
            _job: PhantomData,
        })
    }

    /// Stops this queue's fetch loop when `token` is cancelled: a worker pool cancels it as
    /// its shutdown starts, so that during the drain it fetches nothing it will not start
    /// (left to the orphan timeout if the grace runs out) and claims no orphans (given back
    /// at the end with a fresh delivery count, which would hide the crashes they count).
    /// Without it, fetching ends when apalis closes the backend, after the drain.
    pub fn stop_fetching_on(mut self, token: CancellationToken) -> Self {
        self.fetch_stop = Some(token);
        self
    }

    /// The keys of this queue.
    pub fn keys(&self) -> &QueueKeys {
        &self.shared.keys
    }

    /// The configuration of this queue.
    pub fn config(&self) -> &QueueConfig {
        &self.shared.config
    }

    /// A connection to the queue's Redis (reconnecting), e.g. for the caller's own bookkeeping.
    pub fn connection(&self) -> RedisConn {
        self.shared.conn.clone()
    }

    /// The Redis client, for components that need connections of their own (blocking reads).
    pub fn client(&self) -> &RedisClient {
        &self.shared.client
    }
}

fn validate(config: &QueueConfig) -> Result<(), QueueError> {
    // Upper bounds keep every Lua `unpack` and reply small (Lua's stack limit is ~8,000).
    let bounded = [
        ("prefetch", config.prefetch, 10_000),
        ("promote_chunk", config.promote_chunk, 5_000),
        ("settle_batch", config.settle_batch, 1_000),
        ("enqueue_chunk", config.enqueue_chunk, 5_000),
    ];
    for (name, value, max) in bounded {
        if value == 0 || value > max {
            return Err(QueueError::InvalidConfig(format!(
                "{name} must be between 1 and {max}, got {value}"
            )));
        }
    }
    if config.heartbeat_interval.is_zero() || config.heartbeat_interval * 2 > config.orphan_timeout
    {
        return Err(QueueError::InvalidConfig(
            "heartbeat_interval must be positive and at most half the orphan_timeout".into(),
        ));
    }
    Ok(())
}

impl<T: Serialize> RedisQueue<T> {
    /// Enqueues one job to run now.
    pub async fn enqueue(&self, job: &T) -> Result<Enqueued, QueueError> {
        self.enqueue_with(job, JobOptions::default()).await
    }

    /// Enqueues one job with options (delay, unique key, attempts ceiling).
    pub async fn enqueue_with(&self, job: &T, options: JobOptions) -> Result<Enqueued, QueueError> {
        let mut out = self.enqueue_bulk_with([(job, options)]).await?;
        out.pop()
            .ok_or_else(|| QueueError::Protocol("enqueue returned no result".into()))
    }

    /// Enqueues many jobs to run now; one round trip per [`QueueConfig::enqueue_chunk`] jobs.
    pub async fn enqueue_bulk<'a>(
        &self,
        jobs: impl IntoIterator<Item = &'a T>,
    ) -> Result<Vec<Enqueued>, QueueError>
    where
        T: 'a,
    {
        self.enqueue_bulk_with(jobs.into_iter().map(|job| (job, JobOptions::default())))
            .await
    }

    /// Enqueues many jobs with their options; results are in input order. Chunks already written
    /// stay written if a later chunk fails.
    pub async fn enqueue_bulk_with<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a T, JobOptions)>,
    ) -> Result<Vec<Enqueued>, QueueError>
    where
        T: 'a,
    {
        let chunk_size = self.shared.config.enqueue_chunk.max(1);
        let mut results = Vec::new();
        let mut chunk = Vec::with_capacity(chunk_size);
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            chunk.clear();
            chunk.extend(jobs.by_ref().take(chunk_size));
            let prepared = chunk
                .iter()
                .map(|(job, options)| self.prepare(job, options))
                .collect::<Result<Vec<_>, _>>()?;
            results.extend(self.write_chunk(prepared).await?);
        }
        Ok(results)
    }

    /// Encodes a job for a script that enqueues it together with its own change
    /// (`scripts::ENQUEUE_ONE`), so both happen in one atomic step.
    pub fn prepare(&self, job: &T, options: &JobOptions) -> Result<PreparedJob, QueueError> {
        let payload = serde_json::to_string(job).map_err(QueueError::Encode)?;
        let payload = RawValue::from_string(payload).map_err(QueueError::Encode)?;
        let id = options.job_id.clone().unwrap_or_else(new_job_id);
        let envelope = Envelope::new(
            id.clone(),
            payload,
            options.unique_key.clone(),
            options.max_attempts,
        );
        let delay_ms = options
            .delay
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        // For scripts of other modules that compare it with `crate::queue::now_ms()`; the
        // queue's own enqueue passes the delay and Redis adds it to its own clock.
        let run_at_ms = if delay_ms > 0 {
            envelope.enqueued_at_ms.saturating_add(delay_ms)
        } else {
            0
        };
        Ok(PreparedJob {
            text: envelope.encode()?,
            id,
            unique: options.unique_key.clone().unwrap_or_default(),
            run_at_ms,
            delay_ms,
        })
    }

    async fn write_chunk(&self, jobs: Vec<PreparedJob>) -> Result<Vec<Enqueued>, QueueError> {
        let keys = &self.shared.keys;
        let mut invocation = scripts::ENQUEUE.prepare_invoke();
        invocation
            .key(&keys.stream)
            .key(&keys.delayed)
            .key(&keys.unique);
        for job in &jobs {
            invocation
                .arg(job.delay_ms)
                .arg(&job.unique)
                .arg(&job.id)
                .arg(&job.text);
        }
        let mut conn = self.shared.conn.clone();
        let holders: Vec<String> = invocation.invoke_async(&mut conn).await?;
        if holders.len() != jobs.len() {
            return Err(QueueError::Protocol(format!(
                "enqueue answered {} results for {} jobs",
                holders.len(),
                jobs.len()
            )));
        }
        Ok(jobs
            .into_iter()
            .zip(holders)
            .map(|(job, holder)| {
                if holder.is_empty() {
                    Enqueued::Queued { job_id: job.id }
                } else {
                    Enqueued::Duplicate { held_by: holder }
                }
            })
            .collect())
    }
}

/// A job encoded for storage, ready to be written by a script (see [`RedisQueue::prepare`]).
pub struct PreparedJob {
    pub(crate) text: String,
    pub(crate) id: String,
    pub(crate) unique: String,
    /// Due time on the server's clock as estimated by this process (`crate::queue::now_ms()`),
    /// 0 = now. For scripts that pass `now_ms()` as ENQUEUE_ONE's `now`.
    pub(crate) run_at_ms: u64,
    /// The delay itself (0 = now): the queue's own enqueue adds it to the server's `TIME`.
    pub(crate) delay_ms: u64,
}

impl PreparedJob {
    pub fn job_id(&self) -> &str {
        &self.id
    }
}
