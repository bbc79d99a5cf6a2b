//! Settings: the embedded `config/default.toml`, then an optional file, then `TARSPAY_*`
//! environment variables. Anything missing or malformed fails at start-up with the setting's
//! name and its environment variable, never its value.

use crate::gateway::codes::{CodeTable, ErrorClass};
use crate::gateway::keys::{PrivateKey, PublicKey};
use crate::gateway::{ClientSettings, TARSPAY_SYSTEM_PUBLIC_KEY};
use crate::payout::{CurrencyRule, PayoutRules};
use crate::secret::Secret;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

/// The defaults shipped inside the binary, so it runs with no files around it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
pub const ENV_PREFIX: &str = "TARSPAY_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load settings: {0}")]
    Load(String),
    #[error("setting `{key}` ({env}) is required {purpose}")]
    Missing {
        key: &'static str,
        env: String,
        purpose: &'static str,
    },
    #[error("setting `{key}` ({env}) is invalid: {reason}")]
    Invalid {
        key: String,
        env: String,
        reason: String,
    },
}

/// The environment variable that overrides a key path such as `gateway.request_timeout`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        env: env_name(key),
        reason: reason.into(),
    }
}

/// `Debug` is written by hand: URLs may carry credentials (`redis://:password@host`).
#[derive(Clone, Deserialize)]
pub struct Settings {
    #[serde(deserialize_with = "lenient_string")]
    pub gateway_url: String,
    #[serde(default, deserialize_with = "optional_string")]
    pub mch_no: Option<String>,
    #[serde(default)]
    pub private_key: Option<Secret>,
    #[serde(default, deserialize_with = "optional_string")]
    pub private_key_file: Option<String>,
    #[serde(default, deserialize_with = "optional_string")]
    pub notify_url: Option<String>,
    #[serde(default = "default_system_key", deserialize_with = "lenient_string")]
    pub system_public_key: String,
    #[serde(deserialize_with = "lenient_string")]
    pub redis_url: String,
    /// Run on a Redis that may drop acknowledged writes (no AOF, evicting policy).
    #[serde(deserialize_with = "lenient_bool")]
    pub redis_unsafe: bool,
    #[serde(deserialize_with = "lenient_u64")]
    pub concurrency: u64,
    #[serde(deserialize_with = "lenient_string")]
    pub queue_prefix: String,
    #[serde(deserialize_with = "duration")]
    pub retry_base_delay: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_max_delay: Duration,
    #[serde(deserialize_with = "lenient_u64")]
    pub retry_max_attempts: u64,
    #[serde(deserialize_with = "duration")]
    pub poll_first_delay: Duration,
    #[serde(deserialize_with = "duration")]
    pub poll_max_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub poll_deadline: Duration,
    /// How long the gateway must keep saying "no such order" (at least twice) before an order
    /// some create of which may exist can be failed.
    #[serde(deserialize_with = "duration")]
    pub settle_window: Duration,
    /// How often a worker's lifeline sweeps the ledger for orders without work.
    #[serde(deserialize_with = "duration")]
    pub lifeline_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub orphan_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    #[serde(deserialize_with = "lenient_u64")]
    pub guard_auth_failures: u64,
    #[serde(deserialize_with = "lenient_u64")]
    pub outcome_max_len: u64,
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    #[serde(default)]
    pub api_token: Option<Secret>,
    #[serde(deserialize_with = "lenient_bool")]
    pub api_auth_disabled: bool,
    #[serde(deserialize_with = "lenient_string")]
    pub callback_path: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub max_body_bytes: u64,
    #[serde(deserialize_with = "lenient_u64")]
    pub max_batch_bytes: u64,
    /// `serve`: a client must send its request head within this, and its body within
    /// `body_read_timeout` of the head, or the connection is answered (408) and closed.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    #[serde(default, deserialize_with = "optional_string")]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
    /// Attempts of one webhook delivery before it goes to the webhook queue's dead stream.
    #[serde(deserialize_with = "lenient_u64")]
    pub webhook_max_attempts: u64,
    /// Cap of the webhook retries' backoff (exponential from 1 s, full jitter).
    #[serde(deserialize_with = "duration")]
    pub webhook_retry_max_delay: Duration,
    pub gateway: GatewayTuning,
    #[serde(default)]
    pub codes: BTreeMap<String, ErrorClass>,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub currencies: BTreeMap<String, CurrencyRule>,
}

/// A URL with any `user:password@` part replaced, for printing.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("[redacted]");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "[unparseable url]".to_owned(),
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("gateway_url", &redact_url(&self.gateway_url))
            .field("mch_no", &self.mch_no)
            .field("private_key", &self.private_key)
            .field("private_key_file", &self.private_key_file)
            .field("notify_url", &self.notify_url.as_deref().map(redact_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_unsafe", &self.redis_unsafe)
            .field("queue_prefix", &self.queue_prefix)
            .field("concurrency", &self.concurrency)
            .field("listen", &self.listen)
            .field("api_token", &self.api_token)
            .field("webhook_url", &self.webhook_url.as_deref().map(redact_url))
            .field("webhook_secret", &self.webhook_secret)
            .finish_non_exhaustive()
    }
}

fn default_system_key() -> String {
    TARSPAY_SYSTEM_PUBLIC_KEY.to_owned()
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayTuning {
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "lenient_u64")]
    pub max_response_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    #[serde(default = "default_log_filter", deserialize_with = "lenient_string")]
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            filter: default_log_filter(),
        }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Human
}

fn default_log_filter() -> String {
    "info".to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// The merchant identity needed to call the gateway, checked.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub mch_no: String,
    pub private_key: PrivateKey,
}

impl Settings {
    /// Embedded defaults, then `file` (when given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // Variables that are not valid UTF-8 cannot be settings; skip them rather than panic.
        let vars = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        Self::load_with_env(file, vars)
    }

    /// As [`Settings::load`] with explicit variables instead of the process environment
    /// (tests, embedding). Only names starting with `TARSPAY_` are read.
    pub fn load_with_env<K, V>(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "settings file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Values stay strings (no guessing of types), so a key made only of digits is never
        // turned into a number; typed settings parse their own text.
        for (name, value) in vars {
            if let Some(rest) = name.as_ref().strip_prefix(ENV_PREFIX)
                && !rest.is_empty()
            {
                let path = rest.to_lowercase().replace("__", ".");
                figment = figment.merge(Serialized::default(&path, value.as_ref()));
            }
        }
        Self::finish(figment)
    }

    fn finish(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(describe_figment_error)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every setting that has a value; required-ness is checked by the command that
    /// needs the setting ([`Settings::merchant`], …).
    fn validate(&self) -> Result<(), ConfigError> {
        check_http_url("gateway_url", &self.gateway_url)?;
        if let Some(url) = &self.notify_url {
            check_http_url("notify_url", url)?;
        }
        if let Some(mch_no) = &self.mch_no {
            check_mch_no(mch_no)?;
        }
        self.system_public_key()?;
        if !(self.redis_url.starts_with("redis://")
            || self.redis_url.starts_with("rediss://")
            || self.redis_url.starts_with("unix://"))
        {
            return Err(invalid(
                "redis_url",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        if self.gateway.connect_timeout.is_zero() {
            return Err(invalid(
                "gateway.connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.gateway.request_timeout.is_zero() {
            return Err(invalid(
                "gateway.request_timeout",
                "must be greater than zero",
            ));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(invalid("concurrency", "must be between 1 and 10000"));
        }
        if self.queue_prefix.is_empty()
            || !self
                .queue_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(invalid(
                "queue_prefix",
                "must be non-empty letters, digits, '-', '_', '.' or ':' (no braces: they are the hash tag)",
            ));
        }
        for (key, value) in [
            ("retry_base_delay", self.retry_base_delay),
            ("retry_max_delay", self.retry_max_delay),
            ("poll_first_delay", self.poll_first_delay),
            ("poll_max_interval", self.poll_max_interval),
            ("poll_deadline", self.poll_deadline),
            ("settle_window", self.settle_window),
            ("lifeline_interval", self.lifeline_interval),
            ("orphan_timeout", self.orphan_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("webhook_retry_max_delay", self.webhook_retry_max_delay),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if self.retry_max_delay < self.retry_base_delay {
            return Err(invalid(
                "retry_max_delay",
                "must not be shorter than retry_base_delay",
            ));
        }
        if self.retry_max_attempts == 0 || self.retry_max_attempts > 1000 {
            return Err(invalid("retry_max_attempts", "must be between 1 and 1000"));
        }
        if self.orphan_timeout <= self.gateway.request_timeout {
            return Err(invalid(
                "orphan_timeout",
                "must be longer than gateway.request_timeout, or live jobs would be taken over",
            ));
        }
        if self.webhook_max_attempts == 0 || self.webhook_max_attempts > 1000 {
            return Err(invalid(
                "webhook_max_attempts",
                "must be between 1 and 1000",
            ));
        }
        if self.guard_auth_failures == 0 {
            return Err(invalid("guard_auth_failures", "must be at least 1"));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "listen",
                "must be an IP address and port such as 127.0.0.1:8080",
            ));
        }
        if !self.callback_path.starts_with('/') || self.callback_path.starts_with("/v1/") {
            return Err(invalid(
                "callback_path",
                "must start with '/' and must not be under /v1/",
            ));
        }
        if self.max_body_bytes < 1024 || self.max_batch_bytes < self.max_body_bytes {
            return Err(invalid(
                "max_body_bytes",
                "must be at least 1024, and max_batch_bytes at least max_body_bytes",
            ));
        }
        if let Some(url) = &self.webhook_url {
            check_http_url("webhook_url", url)?;
            if self.webhook_secret.as_ref().is_none_or(Secret::is_empty) {
                return Err(ConfigError::Missing {
                    key: "webhook_secret",
                    env: env_name("webhook_secret"),
                    purpose: "to sign outcome webhooks when webhook_url is set",
                });
            }
        }
        if self.gateway.max_response_bytes < 1024 {
            return Err(invalid(
                "gateway.max_response_bytes",
                "must be at least 1024",
            ));
        }
        self.code_table()?;
        self.payout_rules()?;
        if self.private_key.is_some() || self.private_key_file.is_some() {
            self.private_key()?;
        }
        Ok(())
    }

    pub fn system_public_key(&self) -> Result<PublicKey, ConfigError> {
        PublicKey::from_hex(&self.system_public_key)
            .map_err(|err| invalid("system_public_key", err.to_string()))
    }

    /// The merchant key from `private_key` or `private_key_file` (exactly one of them).
    pub fn private_key(&self) -> Result<PrivateKey, ConfigError> {
        match (&self.private_key, &self.private_key_file) {
            (Some(_), Some(_)) => Err(invalid(
                "private_key",
                "set either private_key (TARSPAY_PRIVATE_KEY) or private_key_file (TARSPAY_PRIVATE_KEY_FILE), not both",
            )),
            (Some(hex), None) => PrivateKey::from_hex(hex.expose())
                .map_err(|err| invalid("private_key", err.to_string())),
            (None, Some(path)) => PrivateKey::from_file(Path::new(path))
                .map_err(|err| invalid("private_key_file", err.to_string())),
            (None, None) => Err(ConfigError::Missing {
                key: "private_key",
                env: format!(
                    "{} or {}",
                    env_name("private_key"),
                    env_name("private_key_file")
                ),
                purpose: "to sign gateway calls",
            }),
        }
    }

    pub fn merchant(&self) -> Result<Merchant, ConfigError> {
        let mch_no = self.mch_no.clone().ok_or_else(|| ConfigError::Missing {
            key: "mch_no",
            env: env_name("mch_no"),
            purpose: "to call the gateway",
        })?;
        Ok(Merchant {
            mch_no,
            private_key: self.private_key()?,
        })
    }

    pub fn notify_url(&self) -> Result<&str, ConfigError> {
        self.notify_url
            .as_deref()
            .ok_or_else(|| ConfigError::Missing {
                key: "notify_url",
                env: env_name("notify_url"),
                purpose: "as the notifyUrl of every order",
            })
    }

    pub fn client_settings(&self) -> Result<ClientSettings, ConfigError> {
        let merchant = self.merchant()?;
        Ok(ClientSettings {
            base_url: self.gateway_url.clone(),
            mch_no: merchant.mch_no,
            private_key: merchant.private_key,
            connect_timeout: self.gateway.connect_timeout,
            request_timeout: self.gateway.request_timeout,
            max_response_bytes: self.gateway.max_response_bytes as usize,
        })
    }

    /// How long a create holds the submit lease: one run makes at most three gateway calls
    /// (lookup, create, lookup), plus a margin.
    pub fn submit_lease(&self) -> Duration {
        self.gateway.request_timeout * 3 + Duration::from_secs(10)
    }

    /// The API token, or `None` when auth is explicitly disabled; an error when neither.
    pub fn api_token(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.api_token, self.api_auth_disabled) {
            (Some(token), _) if !token.is_empty() => Ok(Some(token.clone())),
            (_, true) => Ok(None),
            _ => Err(ConfigError::Missing {
                key: "api_token",
                env: env_name("api_token"),
                purpose: "for the HTTP API (or set TARSPAY_API_AUTH_DISABLED=true to run it without auth)",
            }),
        }
    }

    pub fn code_table(&self) -> Result<CodeTable, ConfigError> {
        let mut overrides = HashMap::new();
        for (code, class) in &self.codes {
            let parsed: i64 = code.trim().parse().map_err(|_| {
                invalid(
                    &format!("codes.{code}"),
                    "the key must be an integer gateway code",
                )
            })?;
            overrides.insert(parsed, *class);
        }
        Ok(CodeTable::with_overrides(overrides))
    }

    pub fn payout_rules(&self) -> Result<PayoutRules, ConfigError> {
        PayoutRules::compile(&self.currencies)
            .map_err(|(currency, reason)| invalid(&format!("currencies.{currency}"), reason))
    }
}

pub fn check_mch_no(mch_no: &str) -> Result<(), ConfigError> {
    let valid = mch_no.len() == 11
        && mch_no.starts_with('M')
        && mch_no[1..].bytes().all(|b| b.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(invalid("mch_no", "must be \"M\" followed by 10 digits"))
    }
}

fn check_http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        _ => Err(invalid(key, "must be an absolute http:// or https:// URL")),
    }
}

/// figment's messages name the key path; keep them, but never echo a value of a secret key.
fn describe_figment_error(err: figment::Error) -> ConfigError {
    let mut messages = Vec::new();
    for error in err {
        let key = error.path.join(".");
        let reason = match &error.kind {
            figment::error::Kind::InvalidType(_, expected) => format!("expected {expected}"),
            figment::error::Kind::MissingField(field) => format!("missing field `{field}`"),
            other => other.to_string(),
        };
        if key.is_empty() {
            messages.push(reason);
        } else {
            messages.push(format!("setting `{key}` ({}): {reason}", env_name(&key)));
        }
    }
    ConfigError::Load(messages.join("; "))
}

/// Accepts a string or a scalar written without quotes (TOML numbers, environment values).
pub fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Uint(u64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(deserializer)? {
        Scalar::Text(text) => text,
        Scalar::Int(n) => n.to_string(),
        Scalar::Uint(n) => n.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

pub fn lenient_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let text = lenient_string(deserializer)?;
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(serde::de::Error::custom(format!(
            "expected true or false, got {text:?}"
        ))),
    }
}

/// An unset or empty value is `None` (so `TARSPAY_NOTIFY_URL=` clears a file's value).
fn optional_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let text = lenient_string(deserializer)?;
    Ok((!text.trim().is_empty()).then_some(text))
}

pub fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = lenient_string(deserializer)?;
    text.trim()
        .parse()
        .map_err(|_| serde::de::Error::custom(format!("expected a whole number, got {text:?}")))
}

/// Durations as text: "500ms", "2s", "5m".
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = lenient_string(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("expected a duration such as \"500ms\", \"2s\" or \"5m\", got {text:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load() {
        let settings = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        assert_eq!(settings.gateway_url, "https://payment.tarspay.com");
        assert_eq!(settings.gateway.request_timeout, Duration::from_secs(30));
        assert!(settings.currencies.contains_key("INR"));
        assert!(settings.merchant().is_err());
    }

    #[test]
    fn env_overrides_and_names() {
        let key = "1".repeat(64);
        let settings = Settings::load_with_env(
            None,
            [
                ("TARSPAY_MCH_NO", "M1234567890"),
                ("TARSPAY_PRIVATE_KEY", key.as_str()),
                ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "1500ms"),
                ("TARSPAY_CODES__5003013", "retryable"),
                ("TARSPAY_CONCURRENCY", "8"),
                ("TARSPAY_RETRY_BASE_DELAY", "250ms"),
                ("TARSPAY_RETRY_MAX_ATTEMPTS", "3"),
                ("TARSPAY_POLL_FIRST_DELAY", "1s"),
                ("TARSPAY_ORPHAN_TIMEOUT", "2m"),
                ("TARSPAY_QUEUE_PREFIX", "acme-payouts"),
            ],
        )
        .unwrap();
        assert_eq!(
            settings.gateway.request_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(settings.merchant().unwrap().private_key.expose_hex(), key);
        assert_eq!(
            settings.code_table().unwrap().classify(5003013),
            ErrorClass::Retryable
        );
        assert_eq!(
            env_name("gateway.request_timeout"),
            "TARSPAY_GATEWAY__REQUEST_TIMEOUT"
        );
    }

    #[test]
    fn malformed_settings_name_the_setting_not_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            ("TARSPAY_MCH_NO", "12345", "TARSPAY_MCH_NO"),
            (
                "TARSPAY_PRIVATE_KEY",
                "secretvalue0123",
                "TARSPAY_PRIVATE_KEY",
            ),
            ("TARSPAY_GATEWAY_URL", "ftp://x", "TARSPAY_GATEWAY_URL"),
            ("TARSPAY_NOTIFY_URL", "not a url", "TARSPAY_NOTIFY_URL"),
            (
                "TARSPAY_SYSTEM_PUBLIC_KEY",
                "02abc",
                "TARSPAY_SYSTEM_PUBLIC_KEY",
            ),
            ("TARSPAY_REDIS_URL", "localhost:6379", "TARSPAY_REDIS_URL"),
            (
                "TARSPAY_GATEWAY__CONNECT_TIMEOUT",
                "soon",
                "TARSPAY_GATEWAY__CONNECT_TIMEOUT",
            ),
            ("TARSPAY_CODES__ABC", "retryable", "TARSPAY_CODES__ABC"),
            ("TARSPAY_CONCURRENCY", "0", "TARSPAY_CONCURRENCY"),
            ("TARSPAY_CONCURRENCY", "many", "TARSPAY_CONCURRENCY"),
            ("TARSPAY_RETRY_BASE_DELAY", "0s", "TARSPAY_RETRY_BASE_DELAY"),
            (
                "TARSPAY_RETRY_MAX_ATTEMPTS",
                "0",
                "TARSPAY_RETRY_MAX_ATTEMPTS",
            ),
            (
                "TARSPAY_POLL_FIRST_DELAY",
                "later",
                "TARSPAY_POLL_FIRST_DELAY",
            ),
            ("TARSPAY_ORPHAN_TIMEOUT", "5s", "TARSPAY_ORPHAN_TIMEOUT"),
            ("TARSPAY_QUEUE_PREFIX", "a{b}", "TARSPAY_QUEUE_PREFIX"),
            ("TARSPAY_LISTEN", "localhost", "TARSPAY_LISTEN"),
            (
                "TARSPAY_API_AUTH_DISABLED",
                "maybe",
                "TARSPAY_API_AUTH_DISABLED",
            ),
            ("TARSPAY_CALLBACK_PATH", "notify", "TARSPAY_CALLBACK_PATH"),
            (
                "TARSPAY_WEBHOOK_MAX_ATTEMPTS",
                "0",
                "TARSPAY_WEBHOOK_MAX_ATTEMPTS",
            ),
            (
                "TARSPAY_WEBHOOK_RETRY_MAX_DELAY",
                "0s",
                "TARSPAY_WEBHOOK_RETRY_MAX_DELAY",
            ),
            (
                "TARSPAY_WEBHOOK_URL",
                "https://app.example/hook",
                "TARSPAY_WEBHOOK_SECRET",
            ),
        ];
        for (var, value, expected) in cases {
            let err = Settings::load_with_env(None, [(var, value)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{var}: {err}");
            if *var == "TARSPAY_PRIVATE_KEY" {
                assert!(!err.contains(value), "{err}");
            }
        }
    }

    #[test]
    fn missing_merchant_settings_say_which() {
        let settings = Settings::load_with_env(None, [("TARSPAY_MCH_NO", "M1234567890")]).unwrap();
        let err = settings.merchant().unwrap_err().to_string();
        assert!(
            err.contains("TARSPAY_PRIVATE_KEY") && err.contains("TARSPAY_PRIVATE_KEY_FILE"),
            "{err}"
        );
        let err = settings.notify_url().unwrap_err().to_string();
        assert!(err.contains("TARSPAY_NOTIFY_URL"), "{err}");
    }

    #[test]
    fn the_api_needs_a_token_or_an_explicit_opt_out() {
        let none = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        let err = none.api_token().unwrap_err().to_string();
        assert!(
            err.contains("TARSPAY_API_TOKEN") && err.contains("TARSPAY_API_AUTH_DISABLED"),
            "{err}"
        );
        let off = Settings::load_with_env(None, [("TARSPAY_API_AUTH_DISABLED", "true")]).unwrap();
        assert!(off.api_token().unwrap().is_none());
        let on =
            Settings::load_with_env(None, [("TARSPAY_API_TOKEN", "12345678901234567890")]).unwrap();
        assert!(
            on.api_token()
                .unwrap()
                .unwrap()
                .matches("12345678901234567890"),
            "digits-only tokens stay text"
        );
        assert!(
            !format!("{on:?}").contains("12345678901234567890"),
            "Debug never shows the token"
        );
    }

    #[test]
    fn debug_output_hides_credentials_in_urls_and_secrets() {
        let settings = Settings::load_with_env(
            None,
            [
                (
                    "TARSPAY_REDIS_URL",
                    "redis://:s3cretpw@redis.internal:6379/0",
                ),
                ("TARSPAY_API_TOKEN", "tok-abcdef-123456"),
                ("TARSPAY_PRIVATE_KEY", &"2".repeat(64)),
            ],
        )
        .unwrap();
        let debug = format!("{settings:?}");
        for secret in ["s3cretpw", "tok-abcdef-123456", &"2".repeat(64)] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("redis.internal"), "{debug}");
    }

    #[test]
    fn settings_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.toml");
        std::fs::write(
            &path,
            "gateway_url = \"http://127.0.0.1:9\"\n[gateway]\nconnect_timeout = \"1s\"\n",
        )
        .unwrap();
        let settings = Settings::load_with_env(Some(&path), [("", ""); 0]).unwrap();
        assert_eq!(settings.gateway_url, "http://127.0.0.1:9");
        assert_eq!(settings.gateway.connect_timeout, Duration::from_secs(1));
        assert!(Settings::load(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
