//! The delivery job and its handler: read the outcome by its stream entry id, POST it signed,
//! and let the queue decide the rest (a 2xx acknowledges; anything else is retried with the
//! queue's backoff until the job's attempts are spent, then it is dead).

use super::{WebhookError, WebhookMessage, WebhookSettings};
use crate::ledger::{Ledger, Outcome, WebhookJobs};
use crate::queue::{JobOptions, RedisQueue};
use apalis::prelude::*;
use redis::aio::ConnectionManager;
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
}

/// Prepares the ledger's delivery jobs on `queue` (the script fills in the outcome's id).
pub fn job_preparer(queue: RedisQueue<DeliverWebhook>) -> WebhookJobs {
    let template = DeliverWebhook {
        outcome: String::new(),
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
    /// An outcome entry that does not parse: only our own script writes them, so this is a
    /// bug or a tampered stream; retrying cannot help.
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
    conn: ConnectionManager,
    outcomes: String,
}

impl Deliverer {
    pub fn new(
        settings: WebhookSettings,
        ledger: &Ledger,
        conn: ConnectionManager,
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
            outcomes: ledger.keys().outcomes(),
        })
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    async fn outcome(&self, entry_id: &str) -> Result<Option<Outcome>, DeliveryError> {
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.outcomes)
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
            .outcome(&job.outcome)
            .await?
            .ok_or_else(|| DeliveryError::Gone(job.outcome.clone()))?;
        let message = WebhookMessage::new(&job.outcome, &outcome)?;
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
        webhook_id = %super::webhook_id(&job.outcome),
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
                webhook_id = %super::webhook_id(&job.outcome),
                attempt = attempt.current(),
                host = %deliverer.settings.host(),
                error = %err,
                "outcome webhook failed; the queue retries it"
            );
            Err(err.into())
        }
    }
}
