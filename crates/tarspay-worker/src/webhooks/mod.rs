//! Outcome webhooks: every entry of the ledger's outcome stream is also POSTed to the
//! application's URL in the [Standard Webhooks](https://www.standardwebhooks.com/) form. The
//! stream stays the source of truth; webhooks are a push on top of it, delivered at least once.
//!
//! Deliveries are jobs of the project's queue, not an engine of their own: the ledger queues one
//! [`DeliverWebhook`] (the outcome's stream entry id) on the `webhooks` queue in the same atomic
//! step that appends the outcome, when the appending process' settings configure webhooks
//! ([`crate::ledger::Ledger::with_webhook_jobs`]). `worker` processes run a second apalis worker
//! over that queue ([`handle`]); retries use the queue's backoff, an exhausted delivery goes to
//! the queue's dead stream, and stats, pause and `dead retry` work as for payouts.
//!
//! Modules: `signing` (the `webhook-signature` HMAC), `envelope` (the body and `webhook-id`),
//! `settings` (URL, secret, retry bound, checked at start), `deliver` (the job and its handler).
//!
//! Receivers must deduplicate on `webhook-id` (`msg_` + the outcome's stream entry id, the
//! same on every retry): a crash between a 2xx and the job's acknowledgement sends it again.
//! The secret is never logged, and neither is the URL (it may carry credentials).

mod deliver;
mod envelope;
mod settings;
mod signing;

pub use deliver::{DeliverWebhook, Deliverer, DeliveryError, handle, job_preparer};
pub use envelope::{WebhookMessage, event_type, webhook_id};
pub use settings::WebhookSettings;
pub use signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SECRET_PREFIX, WebhookSigner};

/// An unusable webhook setting; names the setting and its variable, never the value.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("setting `webhook_secret` (TARSPAY_WEBHOOK_SECRET) {0}")]
    Secret(&'static str),
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}
