//! Benchmarks behind `tarspay-dev bench <queue|e2e|cost|backlog>`. Each bench reports its
//! results as JSON objects, one per result, so runs can be compared over time.
//!
//! * [`queue`]: no-op jobs through the Redis Streams storage and an apalis worker.
//! * [`e2e`]: payouts through worker processes against the sandbox as its own process.
//! * [`cost`]: Redis commands, memory and CPU per payout.
//! * [`backlog`]: throughput with a large backlog waiting vs an empty queue.
//!
//! Without a Redis URL a bench starts its own `redis-server` ([`local_redis::LocalRedis`]); with one it
//! writes only under a unique key prefix and removes those keys at the end.

pub mod backlog;
pub mod cost;
pub mod e2e;
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
    #[error("bench run went wrong: {0}")]
    Check(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Options every bench accepts; `None` means the bench's own default.
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Use this Redis (under a unique key prefix) instead of a private `redis-server`.
    pub redis_url: Option<String>,
    /// Jobs or payouts per run.
    pub n: Option<u64>,
    /// Jobs in flight per worker (process).
    pub concurrency: Option<usize>,
    /// `cost`: the workers' retention; the bench then waits for memory to come back.
    pub retention: Option<std::time::Duration>,
}

/// Receives each result as soon as it is measured.
pub type Report<'a> = &'a mut (dyn FnMut(Value) + Send);
