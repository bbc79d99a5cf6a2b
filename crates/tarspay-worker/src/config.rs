//! Settings: the embedded `config/default.toml`, then an optional file, then `TARSPAY_*`
//! environment variables, parsed once at load into typed values (keys, code table, payout
//! rules, URLs, durations), so no accessor parses again. Anything malformed fails at load
//! with the setting's name and its environment variable, never its value.

mod raw;
mod url;

pub use raw::{GatewayTuning, LogFormat, LogSettings, parse_duration};
pub use url::{HttpUrl, RedisUrl, redact_url};

use crate::gateway::ClientSettings;
use crate::gateway::codes::CodeTable;
use crate::gateway::keys::{PrivateKey, PublicKey};
use crate::payout::PayoutRules;
use crate::secret::Secret;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use raw::RawSettings;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
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

/// Every setting, parsed. `Debug` is written by hand: it shows no secret, and URLs only
/// without credentials (`redis://:password@host`).
#[derive(Clone)]
pub struct Settings {
    pub gateway_url: HttpUrl,
    /// "M" + 10 digits, checked.
    pub mch_no: Option<String>,
    /// From `private_key` or `private_key_file` (at most one of them may be set).
    private_key: Option<PrivateKey>,
    pub notify_url: Option<HttpUrl>,
    pub system_public_key: PublicKey,
    pub redis_url: RedisUrl,
    /// Run on a Redis that may drop acknowledged writes (no AOF, evicting policy).
    pub redis_unsafe: bool,
    pub concurrency: u64,
    pub queue_prefix: String,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    pub retry_max_attempts: u64,
    pub poll_first_delay: Duration,
    pub poll_max_interval: Duration,
    pub poll_deadline: Duration,
    /// How long the gateway must keep saying "no such order" (at least twice) before an order
    /// some create of which may exist can be failed.
    pub settle_window: Duration,
    /// How often a worker's lifeline sweeps the ledger for orders without work.
    pub lifeline_interval: Duration,
    pub orphan_timeout: Duration,
    pub shutdown_grace: Duration,
    pub guard_auth_failures: u64,
    pub outcome_max_len: u64,
    pub listen: SocketAddr,
    pub api_token: Option<Secret>,
    pub api_auth_disabled: bool,
    pub callback_path: String,
    pub max_body_bytes: u64,
    pub max_batch_bytes: u64,
    /// `serve`: a client must send its request head within this, and its body within
    /// `body_read_timeout` of the head, or the connection is answered (408) and closed.
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub webhook_url: Option<HttpUrl>,
    pub webhook_secret: Option<Secret>,
    /// Attempts of one webhook delivery before it goes to the webhook queue's dead stream.
    pub webhook_max_attempts: u64,
    /// Cap of the webhook retries' backoff (exponential from 1 s, full jitter).
    pub webhook_retry_max_delay: Duration,
    pub gateway: GatewayTuning,
    codes: CodeTable,
    pub log: LogSettings,
    payout_rules: Arc<PayoutRules>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("gateway_url", &self.gateway_url)
            .field("mch_no", &self.mch_no)
            .field("private_key", &self.private_key)
            .field("notify_url", &self.notify_url)
            .field("redis_url", &self.redis_url)
            .field("redis_unsafe", &self.redis_unsafe)
            .field("queue_prefix", &self.queue_prefix)
            .field("concurrency", &self.concurrency)
            .field("listen", &self.listen)
            .field("api_token", &self.api_token)
            .field("webhook_url", &self.webhook_url)
            .field("webhook_secret", &self.webhook_secret)
            .field("payout_rules", &self.payout_rules)
            .finish_non_exhaustive()
    }
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
        let raw: RawSettings = figment.extract().map_err(describe_figment_error)?;
        Self::from_raw(raw)
    }

    /// Parses and checks every setting that has a value; required-ness is checked by the
    /// command that needs the setting ([`Settings::merchant`], …).
    fn from_raw(raw: RawSettings) -> Result<Self, ConfigError> {
        let http_url = |key: &str, text: &str| HttpUrl::parse(text).map_err(|r| invalid(key, r));
        let gateway_url = http_url("gateway_url", &raw.gateway_url)?;
        let notify_url = raw
            .notify_url
            .as_deref()
            .map(|text| http_url("notify_url", text))
            .transpose()?;
        let webhook_url = raw
            .webhook_url
            .as_deref()
            .map(|text| http_url("webhook_url", text))
            .transpose()?;
        if let Some(mch_no) = &raw.mch_no {
            check_mch_no(mch_no)?;
        }
        let system_public_key = PublicKey::from_hex(&raw.system_public_key)
            .map_err(|err| invalid("system_public_key", err.to_string()))?;
        let redis_url = RedisUrl::parse(&raw.redis_url).map_err(|r| invalid("redis_url", r))?;
        let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                "must be an IP address and port such as 127.0.0.1:8080",
            )
        })?;
        check_ranges(&raw)?;
        if webhook_url.is_some() && raw.webhook_secret.as_ref().is_none_or(Secret::is_empty) {
            return Err(ConfigError::Missing {
                key: "webhook_secret",
                env: env_name("webhook_secret"),
                purpose: "to sign outcome webhooks when webhook_url is set",
            });
        }
        let codes = parse_codes(&raw)?;
        let payout_rules = PayoutRules::compile(&raw.currencies)
            .map_err(|(currency, reason)| invalid(&format!("currencies.{currency}"), reason))?;
        let private_key = parse_private_key(&raw)?;
        Ok(Self {
            gateway_url,
            mch_no: raw.mch_no,
            private_key,
            notify_url,
            system_public_key,
            redis_url,
            redis_unsafe: raw.redis_unsafe,
            concurrency: raw.concurrency,
            queue_prefix: raw.queue_prefix,
            retry_base_delay: raw.retry_base_delay,
            retry_max_delay: raw.retry_max_delay,
            retry_max_attempts: raw.retry_max_attempts,
            poll_first_delay: raw.poll_first_delay,
            poll_max_interval: raw.poll_max_interval,
            poll_deadline: raw.poll_deadline,
            settle_window: raw.settle_window,
            lifeline_interval: raw.lifeline_interval,
            orphan_timeout: raw.orphan_timeout,
            shutdown_grace: raw.shutdown_grace,
            guard_auth_failures: raw.guard_auth_failures,
            outcome_max_len: raw.outcome_max_len,
            listen,
            api_token: raw.api_token,
            api_auth_disabled: raw.api_auth_disabled,
            callback_path: raw.callback_path,
            max_body_bytes: raw.max_body_bytes,
            max_batch_bytes: raw.max_batch_bytes,
            header_read_timeout: raw.header_read_timeout,
            body_read_timeout: raw.body_read_timeout,
            webhook_url,
            webhook_secret: raw.webhook_secret,
            webhook_max_attempts: raw.webhook_max_attempts,
            webhook_retry_max_delay: raw.webhook_retry_max_delay,
            gateway: raw.gateway,
            codes,
            log: raw.log,
            payout_rules: Arc::new(payout_rules),
        })
    }

    /// TarsPay's key that signs callbacks.
    pub fn system_public_key(&self) -> PublicKey {
        self.system_public_key
    }

    /// The merchant key from `private_key` or `private_key_file`.
    pub fn private_key(&self) -> Result<PrivateKey, ConfigError> {
        self.private_key
            .clone()
            .ok_or_else(|| ConfigError::Missing {
                key: "private_key",
                env: format!(
                    "{} or {}",
                    env_name("private_key"),
                    env_name("private_key_file")
                ),
                purpose: "to sign gateway calls",
            })
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

    /// The notifyUrl of every order, as written in the settings.
    pub fn notify_url(&self) -> Result<&str, ConfigError> {
        self.notify_url
            .as_ref()
            .map(HttpUrl::as_str)
            .ok_or_else(|| ConfigError::Missing {
                key: "notify_url",
                env: env_name("notify_url"),
                purpose: "as the notifyUrl of every order",
            })
    }

    pub fn client_settings(&self) -> Result<ClientSettings, ConfigError> {
        let merchant = self.merchant()?;
        Ok(ClientSettings {
            base_url: self.gateway_url.as_str().to_owned(),
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

    /// The gateway code table with the settings' overrides.
    pub fn code_table(&self) -> &CodeTable {
        &self.codes
    }

    /// The per-currency payout rules, compiled at load.
    pub fn payout_rules(&self) -> Arc<PayoutRules> {
        Arc::clone(&self.payout_rules)
    }
}

/// The checks of plain numbers, durations and names that need no parsing of their own.
fn check_ranges(raw: &RawSettings) -> Result<(), ConfigError> {
    if raw.gateway.connect_timeout.is_zero() {
        return Err(invalid(
            "gateway.connect_timeout",
            "must be greater than zero",
        ));
    }
    if raw.gateway.request_timeout.is_zero() {
        return Err(invalid(
            "gateway.request_timeout",
            "must be greater than zero",
        ));
    }
    if raw.concurrency == 0 || raw.concurrency > 10_000 {
        return Err(invalid("concurrency", "must be between 1 and 10000"));
    }
    if raw.queue_prefix.is_empty()
        || !raw
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
        ("retry_base_delay", raw.retry_base_delay),
        ("retry_max_delay", raw.retry_max_delay),
        ("poll_first_delay", raw.poll_first_delay),
        ("poll_max_interval", raw.poll_max_interval),
        ("poll_deadline", raw.poll_deadline),
        ("settle_window", raw.settle_window),
        ("lifeline_interval", raw.lifeline_interval),
        ("orphan_timeout", raw.orphan_timeout),
        ("header_read_timeout", raw.header_read_timeout),
        ("body_read_timeout", raw.body_read_timeout),
        ("webhook_retry_max_delay", raw.webhook_retry_max_delay),
    ] {
        if value.is_zero() {
            return Err(invalid(key, "must be greater than zero"));
        }
    }
    if raw.retry_max_delay < raw.retry_base_delay {
        return Err(invalid(
            "retry_max_delay",
            "must not be shorter than retry_base_delay",
        ));
    }
    if raw.retry_max_attempts == 0 || raw.retry_max_attempts > 1000 {
        return Err(invalid("retry_max_attempts", "must be between 1 and 1000"));
    }
    if raw.webhook_max_attempts == 0 || raw.webhook_max_attempts > 1000 {
        return Err(invalid(
            "webhook_max_attempts",
            "must be between 1 and 1000",
        ));
    }
    if raw.orphan_timeout <= raw.gateway.request_timeout {
        return Err(invalid(
            "orphan_timeout",
            "must be longer than gateway.request_timeout, or live jobs would be taken over",
        ));
    }
    if raw.guard_auth_failures == 0 {
        return Err(invalid("guard_auth_failures", "must be at least 1"));
    }
    if !raw.callback_path.starts_with('/') || raw.callback_path.starts_with("/v1/") {
        return Err(invalid(
            "callback_path",
            "must start with '/' and must not be under /v1/",
        ));
    }
    if raw.max_body_bytes < 1024 || raw.max_batch_bytes < raw.max_body_bytes {
        return Err(invalid(
            "max_body_bytes",
            "must be at least 1024, and max_batch_bytes at least max_body_bytes",
        ));
    }
    if raw.gateway.max_response_bytes < 1024 {
        return Err(invalid(
            "gateway.max_response_bytes",
            "must be at least 1024",
        ));
    }
    Ok(())
}

/// `codes.<integer>` overrides of the built-in code classes.
fn parse_codes(raw: &RawSettings) -> Result<CodeTable, ConfigError> {
    let mut overrides = HashMap::new();
    for (code, class) in &raw.codes {
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

/// The merchant key, read once: from `private_key` or `private_key_file`, never both.
fn parse_private_key(raw: &RawSettings) -> Result<Option<PrivateKey>, ConfigError> {
    match (&raw.private_key, &raw.private_key_file) {
        (Some(_), Some(_)) => Err(invalid(
            "private_key",
            "set either private_key (TARSPAY_PRIVATE_KEY) or private_key_file (TARSPAY_PRIVATE_KEY_FILE), not both",
        )),
        (Some(hex), None) => PrivateKey::from_hex(hex.expose())
            .map(Some)
            .map_err(|err| invalid("private_key", err.to_string())),
        (None, Some(path)) => PrivateKey::from_file(Path::new(path))
            .map(Some)
            .map_err(|err| invalid("private_key_file", err.to_string())),
        (None, None) => Ok(None),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::ErrorClass;

    #[test]
    fn embedded_defaults_load() {
        let settings = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        assert_eq!(settings.gateway_url, "https://payment.tarspay.com");
        assert_eq!(settings.gateway.request_timeout, Duration::from_secs(30));
        assert!(settings.payout_rules().currencies().any(|c| c == "INR"));
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
            settings.code_table().classify(5003013),
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
                "TARSPAY_WEBHOOK_URL",
                "https://app.example/hook",
                "TARSPAY_WEBHOOK_SECRET",
            ),
            ("TARSPAY_WEBHOOK_URL", "hook", "TARSPAY_WEBHOOK_URL"),
            (
                "TARSPAY_PRIVATE_KEY_FILE",
                "/nonexistent/key",
                "TARSPAY_PRIVATE_KEY_FILE",
            ),
            (
                "TARSPAY_CURRENCIES__INR__MIN",
                "a lot",
                "TARSPAY_CURRENCIES__INR",
            ),
            ("TARSPAY_MAX_BODY_BYTES", "10", "TARSPAY_MAX_BODY_BYTES"),
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
                "TARSPAY_HEADER_READ_TIMEOUT",
                "0s",
                "TARSPAY_HEADER_READ_TIMEOUT",
            ),
            (
                "TARSPAY_CURRENCIES__ABCD__COUNTRY",
                "Nowhere",
                "TARSPAY_CURRENCIES__ABCD",
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
    fn a_key_and_a_key_file_together_are_refused_without_the_key() {
        let key = "3".repeat(64);
        let err = Settings::load_with_env(
            None,
            [
                ("TARSPAY_PRIVATE_KEY", key.as_str()),
                ("TARSPAY_PRIVATE_KEY_FILE", "/run/secrets/key"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("TARSPAY_PRIVATE_KEY_FILE"), "{err}");
        assert!(!err.contains(&key), "{err}");
    }

    #[test]
    fn values_are_parsed_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = PrivateKey::generate();
        std::fs::write(&path, format!("{}\n", key.expose_hex())).unwrap();
        let settings = Settings::load_with_env(
            None,
            [
                ("TARSPAY_PRIVATE_KEY_FILE", path.to_str().unwrap()),
                ("TARSPAY_LISTEN", "0.0.0.0:9000"),
                ("TARSPAY_NOTIFY_URL", "https://merchant.example"),
            ],
        )
        .unwrap();
        // The file is read once: removing it later changes nothing.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            settings.private_key().unwrap().expose_hex(),
            key.expose_hex()
        );
        assert_eq!(settings.listen.port(), 9000);
        // The notifyUrl is sent (and signed) as written, not normalised to a trailing '/'.
        assert_eq!(settings.notify_url().unwrap(), "https://merchant.example");
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
                ("TARSPAY_WEBHOOK_URL", "https://hook:hookpw@app.example/h"),
                ("TARSPAY_WEBHOOK_SECRET", "whsec-value-987"),
                (
                    "TARSPAY_NOTIFY_URL",
                    "https://n:notifypw@merchant.example/n",
                ),
            ],
        )
        .unwrap();
        let debug = format!("{settings:?}");
        for secret in [
            "s3cretpw",
            "tok-abcdef-123456",
            &"2".repeat(64),
            "hookpw",
            "whsec-value-987",
            "notifypw",
        ] {
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
