//! The webhook settings as deliveries use them, built from the group `config` parsed at load
//! ([`WebhookTarget`]): a malformed URL or secret has already stopped the command there,
//! naming the setting, instead of running with webhooks off.

use super::{WebhookError, WebhookSigner};
use crate::config::{Settings, WebhookTarget};
use std::time::Duration;

/// Where and how outcomes are POSTed. `Debug` shows the host only (the URL may carry
/// credentials) and never the key.
#[derive(Clone)]
pub struct WebhookSettings {
    pub(crate) url: reqwest::Url,
    pub(crate) signer: WebhookSigner,
    /// Attempts before a delivery goes to the dead stream.
    pub max_attempts: u32,
    /// Cap of the retries' backoff.
    pub retry_max_delay: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("host", &self.url.host_str())
            .field("signer", &self.signer)
            .field("max_attempts", &self.max_attempts)
            .field("retry_max_delay", &self.retry_max_delay)
            .finish()
    }
}

impl WebhookSettings {
    /// `None` when `webhook_url` is not set (webhooks off). The URL and the key were parsed
    /// at load; only the HMAC is keyed here.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, WebhookError> {
        settings.webhooks.as_ref().map(Self::new).transpose()
    }

    pub fn new(target: &WebhookTarget) -> Result<Self, WebhookError> {
        Ok(Self {
            url: target.url.url().clone(),
            signer: WebhookSigner::from_key(&target.key)?,
            max_attempts: target.max_attempts,
            retry_max_delay: target.retry_max_delay,
        })
    }

    /// The host deliveries go to, for logs.
    pub fn host(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Option<WebhookSettings>, WebhookError> {
        let settings = Settings::load_with_env(None, env.iter().copied()).unwrap();
        WebhookSettings::from_settings(&settings)
    }

    #[test]
    fn off_without_a_url_and_parsed_with_one() {
        assert!(load(&[]).unwrap().is_none());
        let on = load(&[
            ("TARSPAY_WEBHOOK_URL", "https://user:pw@app.example/hook"),
            ("TARSPAY_WEBHOOK_SECRET", "whsec_YWJj"),
            ("TARSPAY_WEBHOOK_MAX_ATTEMPTS", "3"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((on.host(), on.max_attempts), ("app.example", 3));
        let debug = format!("{on:?}");
        assert!(!debug.contains("pw") && !debug.contains("YWJj"), "{debug}");
    }

    #[test]
    fn a_malformed_secret_stops_the_load_naming_the_setting_not_the_value() {
        let err = Settings::load_with_env(
            None,
            [
                ("TARSPAY_WEBHOOK_URL", "https://app.example/hook"),
                ("TARSPAY_WEBHOOK_SECRET", "whsec_%%%hunter2%%%"),
            ],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("TARSPAY_WEBHOOK_SECRET"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
