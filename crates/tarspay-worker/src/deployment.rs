//! The composition root: one deployment's connected parts, assembled from settings — the
//! payout queue, the ledger in the same partition, the webhook queue nested in it — and what
//! each process builds from them (a producer, the jobs' context). Workers (`worker`), the
//! server, the CLI, the demo and the tests all start here.

use crate::config::{ConfigError, Settings};
use crate::gateway::TarsPayClient;
use crate::gateway::client::ClientBuildError;
use crate::jobs::{JobContext, PayoutJob, SystemicGuard};
use crate::ledger::{Ledger, LedgerKeys, Replication, WEBHOOK_QUEUE};
use crate::producer::Producer;
use crate::queue::{QueueConfig, QueueError, RedisQueue};
use crate::webhooks::DeliverWebhook;

/// The queue every payout job goes through.
pub const PAYOUT_QUEUE: &str = "payouts";

/// Why a deployment could not be assembled from its settings.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The payout queue's settings, from the worker settings.
pub fn queue_config(settings: &Settings) -> QueueConfig {
    QueueConfig::new(PAYOUT_QUEUE)
        .with_prefix(&settings.redis.queue_prefix)
        .with_orphan_timeout(settings.worker.orphan_timeout)
}

/// The webhook queue's settings: nested in the payout queue's partition, where the ledger
/// queues deliveries; retries bounded by the webhook settings.
pub fn webhook_queue_config(settings: &Settings) -> QueueConfig {
    let mut config = QueueConfig::new(WEBHOOK_QUEUE)
        .with_prefix(&settings.redis.queue_prefix)
        .within(PAYOUT_QUEUE)
        .with_orphan_timeout(settings.worker.orphan_timeout);
    // Without webhook settings this process queues and delivers none: the defaults stand.
    if let Some(webhooks) = &settings.webhooks {
        config.max_attempts = webhooks.max_attempts;
        config.retry_max = webhooks.retry_max_delay;
    }
    config.retry_base = config.retry_base.min(config.retry_max);
    config
}

/// Connected handles on one deployment's Redis: the payout queue, the ledger and the webhook
/// queue.
#[derive(Clone)]
pub struct Deployment {
    pub queue: RedisQueue<PayoutJob>,
    pub ledger: Ledger,
    pub webhooks: RedisQueue<DeliverWebhook>,
}

impl Deployment {
    /// With webhooks configured (malformed ones were refused at load), every
    /// outcome this deployment's ledger appends gets its delivery job in the same step.
    pub async fn connect(settings: &Settings) -> Result<Self, DeploymentError> {
        let queue =
            RedisQueue::connect(settings.redis.url.as_str(), queue_config(settings)).await?;
        let webhooks =
            RedisQueue::from_client(queue.client().clone(), webhook_queue_config(settings)).await?;
        // The ledger shares the payout queue's partition (hash tag), see `LedgerKeys`.
        let tag = format!("{{{}:{PAYOUT_QUEUE}}}", settings.redis.queue_prefix);
        let keys = LedgerKeys::new(&tag, queue.keys());
        debug_assert_eq!(&keys.webhooks(), webhooks.keys());
        let ledger = match settings.redis.min_replicas {
            0 => Ledger::new(queue.connection(), keys),
            replicas => Ledger::with_replicas(
                queue.connection(),
                // Its own connection: `WAIT` holds up whatever is queued behind it.
                queue.client().get_connection_manager().await?,
                keys,
                Replication {
                    replicas,
                    timeout: settings.redis.replica_timeout,
                },
            ),
        };
        let mut ledger = ledger
            .with_outcome_max_len(settings.redis.outcome_max_len)
            .with_retention(settings.redis.retention);
        if settings.webhooks.is_some() {
            ledger = ledger.with_webhook_jobs(crate::webhooks::job_preparer(webhooks.clone()));
        }
        Ok(Self {
            queue,
            ledger,
            webhooks,
        })
    }

    pub fn producer(&self, settings: &Settings) -> Result<Producer, ConfigError> {
        Ok(Producer::new(
            self.ledger.clone(),
            self.queue.clone(),
            settings.payout_rules.clone(),
        ))
    }

    pub fn job_context(&self, settings: &Settings) -> Result<JobContext, DeploymentError> {
        // Nonces on the Redis server's clock: a worker whose own clock is off would sign
        // nonces the gateway refuses (as signature errors, which would pause every payout).
        let client = TarsPayClient::new(settings.gateway.client_settings()?)?
            .with_clock(crate::queue::now_ms);
        Ok(JobContext {
            ledger: self.ledger.clone(),
            client,
            codes: settings.gateway.codes.clone(),
            notify_url: settings.gateway.notify_url()?.to_owned(),
            retry: settings.worker.retry.clone(),
            poll: settings.worker.poll.clone(),
            lease: settings.gateway.submit_lease(),
            settle_window: settings.worker.settle_window,
            guard: SystemicGuard::new(
                self.queue.connection(),
                self.ledger.keys().guard(),
                self.queue.keys().paused.clone(),
                settings.worker.guard_threshold,
            ),
            queue: self.queue.clone(),
        })
    }
}
