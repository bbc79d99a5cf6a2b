//! Benchmarks behind `tarspay-dev bench <queue|e2e|cost|backlog|delay|latency|fairness|console>`. Each bench
//! reports its results as JSON objects, one per result, so runs can be compared over time.
//!
//! * [`queue`]: no-op jobs through the Redis Streams storage and an apalis worker.
//! * [`e2e`]: payouts through worker processes against the sandbox as its own process.
//! * [`cost`]: Redis commands, memory and CPU per payout.
//! * [`backlog`]: throughput with a large backlog waiting vs an empty queue.
//! * [`delay`]: how late delayed jobs start.
//! * [`latency`]: per-payout latency by callback and by poll, at paced rates.
//! * [`fairness`]: one merchant's payout while another merchant's payroll is queued.
//! * [`console`]: the operator console's page render times over a large seeded history.
//!
//! Without a Redis URL a bench starts its own `redis-server` ([`local_redis::LocalRedis`]), or
//! with `cluster` its own Redis Cluster ([`local_redis::LocalCluster`]); with a URL (one server,
//! or a cluster's seeds) it writes only under a unique key prefix and removes those keys at the
//! end, on every master.

pub mod backlog;
pub mod console;
pub mod cost;
pub mod delay;
pub mod e2e;
pub mod fairness;
pub mod latency;
pub mod queue;
pub mod shared;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench setup failed: {0}")]
    Setup(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Queue(#[from] tarspay_worker::queue::QueueError),
    #[error(transparent)]
    Ledger(#[from] tarspay_worker::ledger::LedgerError),
    #[error(transparent)]
    Producer(#[from] tarspay_worker::producer::ProducerError),
    #[error(transparent)]
    Config(#[from] tarspay_worker::config::ConfigError),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("serve: {0}")]
    Serve(String),
    #[error("bench run went wrong: {0}")]
    Check(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Options every bench accepts; `None` means the bench's own default.
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Use this Redis (under a unique key prefix) instead of a private `redis-server`: one URL,
    /// or a cluster's seeds separated by commas (a cluster is detected).
    pub redis_url: Option<String>,
    /// Start a private Redis Cluster of this many masters (no replicas) instead of a private
    /// `redis-server`; 1 is one cluster-enabled node serving every slot.
    pub cluster: Option<usize>,
    /// Partitions of the queue (`queue`, `backlog`) or of the deployment (`e2e`, `cost`);
    /// 1 when `None`.
    pub partitions: Option<usize>,
    /// Jobs or payouts per run.
    pub n: Option<u64>,
    /// Jobs in flight per worker (`queue`), or the payout workers' `concurrency`.
    pub concurrency: Option<usize>,
    /// `cost`: the workers' retention; the bench then waits for memory to come back.
    pub retention: Option<std::time::Duration>,
}

impl BenchOptions {
    /// The number of partitions, checked against the deployment's limit.
    pub fn partitions(&self) -> Result<usize, BenchError> {
        let partitions = self.partitions.unwrap_or(1);
        if (1..=tarspay_worker::partition::MAX_PARTITIONS).contains(&partitions) {
            Ok(partitions)
        } else {
            Err(BenchError::Setup(format!(
                "--partitions must be 1 to {}, got {partitions}",
                tarspay_worker::partition::MAX_PARTITIONS
            )))
        }
    }
}

/// Receives each result as soon as it is measured.
pub type Report<'a> = &'a mut (dyn FnMut(Value) + Send);
