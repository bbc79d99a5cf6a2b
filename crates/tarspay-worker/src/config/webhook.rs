//! The outcome webhook settings, parsed once at load: present only when `webhook_url` is set,
//! and then with a usable key, so a malformed secret stops every command at start.

use super::{ConfigError, HttpUrl, env_name, invalid};
use crate::secret::Secret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use std::time::Duration;

/// A webhook secret starting with this is `whsec_` + base64 of the key bytes.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";

/// Where outcomes are POSTed and how (`webhook_url`, `webhook_secret`,
/// `webhook_max_attempts`, `webhook_retry_max_delay`).
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: HttpUrl,
    /// The HMAC key decoded from `webhook_secret`.
    pub key: WebhookKey,
    /// Attempts of one delivery before it goes to the webhook queue's dead stream.
    pub max_attempts: u32,
    /// Cap of the retries' backoff (exponential from 1 s, full jitter).
    pub retry_max_delay: Duration,
}

/// The key bytes of a webhook secret: the base64-decoded rest of a secret starting with
/// `whsec_`, otherwise the secret's UTF-8 bytes; never empty. `Debug` never shows them.
#[derive(Clone)]
pub struct WebhookKey(Vec<u8>);

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookKey([redacted])")
    }
}

impl WebhookKey {
    /// The reason names the rule broken, never the value.
    pub fn parse(secret: &Secret) -> Result<Self, &'static str> {
        let text = secret.expose();
        let key = match text.strip_prefix(WEBHOOK_SECRET_PREFIX) {
            Some(encoded) => STANDARD_PAD_INDIFFERENT
                .decode(encoded.trim())
                .map_err(|_| "starts with whsec_ but the rest is not base64")?,
            None => text.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err("is empty");
        }
        Ok(Self(key))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl WebhookTarget {
    /// `None` when `webhook_url` is unset (webhooks off); with a URL, the secret is required.
    pub(super) fn parse(
        url: Option<HttpUrl>,
        secret: Option<&Secret>,
        max_attempts: u32,
        retry_max_delay: Duration,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(url) = url else {
            return Ok(None);
        };
        let secret =
            secret
                .filter(|secret| !secret.is_empty())
                .ok_or_else(|| ConfigError::Missing {
                    key: "webhook_secret".into(),
                    env: env_name("webhook_secret"),
                    purpose: "to sign outcome webhooks when webhook_url is set",
                })?;
        let key = WebhookKey::parse(secret).map_err(|reason| invalid("webhook_secret", reason))?;
        Ok(Some(Self {
            url,
            key,
            max_attempts,
            retry_max_delay,
        }))
    }
}
