//! The delivery job and its handler: read the outcome by its stream entry id, POST it signed,
//! and let the queue decide the rest (a 2xx acknowledges; anything else is retried with the
//! queue's backoff until the job's attempts are spent, then it is dead).

use super::{WebhookError, WebhookMessage, WebhookSettings};
use crate::ledger::{Ledger, Outcome, WebhookJobs};
use crate::queue::{JobOptions, RedisQueue};
use crate::redis_conn::RedisConn;
use apalis::prelude::*;
use redis::streams::StreamRangeReply;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Deliver the outcome stored under this entry id of the outcome stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverWebhook {
    /// Stream entry id; empty in the prepared job, set by the ledger's script.
    pub outcome: String,
    /// The partition whose outcome stream holds it (absent in jobs from before partitions).
    #[serde(default)]
    pub partition: usize,
}

impl DeliverWebhook {
    /// Its `webhook-id`.
    pub fn webhook_id(&self) -> String {
        super::webhook_id(self.partition, &self.outcome)
    }
}

/// Prepares the ledger's delivery jobs on `queue` (the script fills in the outcome's id).
pub fn job_preparer(queue: RedisQueue<DeliverWebhook>, partition: usize) -> WebhookJobs {
    let template = DeliverWebhook {
        outcome: String::new(),
        partition,
    };
    Arc::new(move || queue.prepare(&template, &JobOptions::default()))
}

/// Why one attempt did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Trimmed from the stream (`outcome_max_len`) before delivery: retrying cannot help.
    #[error("outcome {0} is no longer in the outcome stream")]
    Gone(String),
    #[error("cannot read the outcome: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot encode the outcome: {0}")]
    Encode(#[from] serde_json::Error),
    /// An outcome entry that does not parse: a bug, a tampered stream, or one a newer
    /// version wrote (a status this one does not know): retried, so that during a rolling
    /// upgrade a newer worker can deliver it.
    #[error("outcome {id} is malformed: {reason}")]
    Corrupt { id: String, reason: String },
    /// The receiver answered something other than 2xx, or could not be reached.
    #[error("receiver: {0}")]
    Receiver(String),
}

/// What every delivery shares: the HTTP client, the settings and a Redis connection.
pub struct Deliverer {
    http: reqwest::Client,
    settings: WebhookSettings,
    conn: RedisConn,
    /// Each partition's outcome stream, in index order.
    outcomes: Vec<String>,
}

impl Deliverer {
    pub fn new(
        settings: WebhookSettings,
        ledgers: &[&Ledger],
        conn: RedisConn,
    ) -> Result<Self, WebhookError> {
        crate::gateway::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            // A redirect would turn the POST into a GET without the body; count it as a failure.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tarspay-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| WebhookError::Client(err.without_url().to_string()))?;
        Ok(Self {
            http,
            settings,
            conn,
            outcomes: ledgers.iter().map(|l| l.keys().outcomes()).collect(),
        })
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    async fn outcome(&self, job: &DeliverWebhook) -> Result<Option<Outcome>, DeliveryError> {
        let entry_id = job.outcome.as_str();
        let stream = self
            .outcomes
            .get(job.partition)
            .ok_or_else(|| DeliveryError::Corrupt {
                id: entry_id.to_owned(),
                reason: format!("partition {} does not exist here", job.partition),
            })?;
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(entry_id)
            .arg(entry_id)
            .query_async(&mut self.conn.clone())
            .await?;
        range
            .ids
            .first()
            .map(|entry| Outcome::from_fields(&entry.map))
            .transpose()
            .map_err(|reason| DeliveryError::Corrupt {
                id: entry_id.to_owned(),
                reason,
            })
    }

    /// One attempt: `Ok` after a 2xx.
    pub async fn deliver(&self, job: &DeliverWebhook) -> Result<(), DeliveryError> {
        let outcome = self
            .outcome(job)
            .await?
            .ok_or_else(|| DeliveryError::Gone(job.outcome.clone()))?;
        let message = WebhookMessage::new(job.webhook_id(), &outcome)?;
        let timestamp = crate::wall_clock::since_epoch().as_secs();
        let mut request = self
            .http
            .post(self.settings.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in self
            .settings
            .signer
            .headers(&message.id, timestamp, &message.body)
        {
            request = request.header(name, value);
        }
        let response = request
            .body(message.body)
            .send()
            .await
            // Without the URL: it may carry credentials.
            .map_err(|err| DeliveryError::Receiver(err.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Receiver(format!("HTTP {status}")))
        }
    }
}

/// The webhook queue's apalis handler.
pub async fn handle(
    job: DeliverWebhook,
    deliverer: Data<Arc<Deliverer>>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    crate::queue::record_job("deliver_webhook", None);
    let span = tracing::info_span!(
        "webhook",
        webhook_id = %job.webhook_id(),
        attempt = attempt.current()
    );
    let result = deliverer.deliver(&job).instrument(span).await;
    let label = if result.is_ok() {
        "delivered"
    } else {
        "failed"
    };
    metrics::counter!(crate::metrics::WEBHOOKS, "result" => label).increment(1);
    match result {
        Ok(()) => Ok(()),
        Err(err @ DeliveryError::Gone(_)) => {
            tracing::error!(error = %err, "outcome webhook cannot be sent");
            Err(AbortError::new(err).into())
        }
        Err(err) => {
            tracing::warn!(
                webhook_id = %job.webhook_id(),
                attempt = attempt.current(),
                host = %deliverer.settings.host(),
                error = %err,
                "outcome webhook failed; the queue retries it"
            );
            Err(err.into())
        }
    }
}
