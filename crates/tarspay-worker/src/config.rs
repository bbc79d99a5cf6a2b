//! Settings: the embedded `config/default.toml`, then an optional file, then `TARSPAY_*`
//! environment variables, parsed once at load into typed values (keys, code table, payout
//! rules, URLs, durations) grouped by concern (`config/groups.rs`, `config/webhook.rs`), so
//! no accessor parses again and each part of the code receives only its group. Anything malformed fails at load
//! with the setting's name and its environment variable, never its value.

mod groups;
mod raw;
mod url;
mod webhook;

pub use groups::{
    CallLimits, GatewaySettings, Merchant, MerchantProfile, RedisSettings, ServerSettings,
    WorkerSettings,
};
pub use raw::{LogFormat, LogSettings, parse_duration};
pub use url::{HttpUrl, RedisUrl, redact_url};
pub use webhook::{WEBHOOK_SECRET_PREFIX, WebhookKey, WebhookTarget};

use crate::gateway::codes::CodeTable;
use crate::gateway::keys::{PrivateKey, PublicKey};
use crate::ids::{Currency, MerchantName};
use crate::jobs::{PollPolicy, RetryPolicy};
use crate::payout::{MerchantRouting, PayoutRules};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use raw::RawSettings;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The defaults shipped inside the binary, so it runs with no files around it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
pub const ENV_PREFIX: &str = "TARSPAY_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load settings: {0}")]
    Load(String),
    #[error("setting `{key}` ({env}) is required {purpose}")]
    Missing {
        key: String,
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

/// Every setting, parsed, grouped by the part of the code that uses it. `Debug` shows no
/// secret, and URLs only without credentials (`redis://:password@host`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: GatewaySettings,
    pub redis: RedisSettings,
    pub worker: WorkerSettings,
    pub server: ServerSettings,
    /// `None` when `webhook_url` is unset.
    pub webhooks: Option<WebhookTarget>,
    pub log: LogSettings,
    /// The per-currency payout rules (`[currencies.*]`).
    pub payout_rules: Arc<PayoutRules>,
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
    /// command that needs the setting ([`GatewaySettings::merchant`], …).
    fn from_raw(raw: RawSettings) -> Result<Self, ConfigError> {
        check_ranges(&raw)?;
        let http_url = |key: &str, text: &str| HttpUrl::parse(text).map_err(|r| invalid(key, r));
        let optional_url =
            |key: &str, text: Option<&str>| text.map(|text| http_url(key, text)).transpose();
        let url = http_url("gateway_url", &raw.gateway_url)?;
        let gateway = GatewaySettings {
            merchants: parse_merchants(&raw, &url)?,
            url,
            system_public_key: PublicKey::from_hex(&raw.system_public_key)
                .map_err(|err| invalid("system_public_key", err.to_string()))?,
            codes: parse_codes(&raw)?,
            connect_timeout: raw.gateway.connect_timeout,
            request_timeout: raw.gateway.request_timeout,
            max_response_bytes: bounded(
                "gateway.max_response_bytes",
                raw.gateway.max_response_bytes,
            )?,
        };
        let webhooks = WebhookTarget::parse(
            optional_url("webhook_url", raw.webhook_url.as_deref())?,
            raw.webhook_secret.as_ref(),
            bounded("webhook_max_attempts", raw.webhook_max_attempts)?,
            raw.webhook_retry_max_delay,
        )?;
        let redis = RedisSettings {
            url: RedisUrl::parse(&raw.redis_url).map_err(|r| invalid("redis_url", r))?,
            allow_unsafe: raw.redis_unsafe,
            cluster: raw
                .redis_cluster
                .parse()
                .map_err(|r| invalid("redis_cluster", r))?,
            partitions: usize::try_from(raw.partitions)
                .ok()
                .filter(|n| (1..=crate::partition::MAX_PARTITIONS).contains(n))
                .ok_or_else(|| invalid("partitions", "must be 1 to 1024"))?,
            queue_prefix: raw.queue_prefix,
            outcome_max_len: raw.outcome_max_len,
            retention: (!raw.retention.is_zero()).then_some(raw.retention),
            min_replicas: u32::try_from(raw.redis_min_replicas)
                .ok()
                .filter(|&n| n <= 100)
                .ok_or_else(|| invalid("redis_min_replicas", "must be 0 to 100"))?,
            replica_timeout: raw.redis_replica_timeout,
        };
        let worker = WorkerSettings {
            concurrency: bounded("concurrency", raw.concurrency)?,
            threads: usize::try_from(raw.worker_threads)
                .ok()
                .filter(|&n| n <= 1024)
                .ok_or_else(|| invalid("worker_threads", "must be 0 (one per core) to 1024"))?,
            retry: RetryPolicy {
                base_delay: raw.retry_base_delay,
                max_delay: raw.retry_max_delay,
                max_attempts: bounded("retry_max_attempts", raw.retry_max_attempts)?,
            },
            poll: PollPolicy {
                first_delay: raw.poll_first_delay,
                max_interval: raw.poll_max_interval,
                deadline: raw.poll_deadline,
            },
            poll_in_hand: raw.poll_in_hand,
            settle_window: raw.settle_window,
            lifeline_interval: raw.lifeline_interval,
            orphan_timeout: raw.orphan_timeout,
            shutdown_grace: raw.shutdown_grace,
            guard_threshold: bounded("guard_auth_failures", raw.guard_auth_failures)?,
        };
        let server = ServerSettings {
            listen: raw.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "listen",
                    "must be an IP address and port such as 127.0.0.1:8080",
                )
            })?,
            api_token: raw.api_token,
            viewer_token: raw.viewer_token,
            auth_disabled: raw.api_auth_disabled,
            trusted_proxies: parse_networks(&raw.trusted_proxies)
                .map_err(|reason| invalid("trusted_proxies", reason))?,
            callback_path: raw.callback_path,
            max_body_bytes: bounded("max_body_bytes", raw.max_body_bytes)?,
            max_batch_bytes: bounded("max_batch_bytes", raw.max_batch_bytes)?,
            header_read_timeout: raw.header_read_timeout,
            body_read_timeout: raw.body_read_timeout,
        };
        let profiles = gateway.profiles();
        let routing = MerchantRouting::new(
            profiles
                .iter()
                .map(|p| (p.name.clone(), p.currencies.clone()))
                .collect(),
            profiles.len() == 1 || profiles[0].mch_no.is_some(),
        );
        let payout_rules = PayoutRules::compile(&raw.currencies)
            .map_err(|(currency, reason)| invalid(&format!("currencies.{currency}"), reason))?
            .with_routing(routing);
        Ok(Self {
            gateway,
            redis,
            worker,
            server,
            webhooks,
            log: raw.log,
            payout_rules: Arc::new(payout_rules),
        })
    }
}

/// Comma-separated addresses (`127.0.0.1`, `::1`) or networks (`10.0.0.0/8`); empty = none.
fn parse_networks(text: &str) -> Result<Vec<ipnet::IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("{item:?} is not an IP address or network such as 10.0.0.0/8"))
        })
        .collect()
}

/// A whole number in the type its user needs (`u32` counts, `usize` sizes); the ranges are
/// checked first, so this fails only on a platform too small for the value.
fn bounded<T: TryFrom<u64>>(key: &str, value: u64) -> Result<T, ConfigError> {
    T::try_from(value).map_err(|_| invalid(key, "is too large"))
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
        ("redis_replica_timeout", raw.redis_replica_timeout),
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

/// Every merchant profile: the top-level settings as `default`, then `[merchants.*]`.
fn parse_merchants(
    raw: &RawSettings,
    gateway_url: &HttpUrl,
) -> Result<Vec<MerchantProfile>, ConfigError> {
    let default = raw::RawMerchant {
        mch_no: raw.mch_no.clone(),
        private_key: raw.private_key.clone(),
        private_key_file: raw.private_key_file.clone(),
        notify_url: raw.notify_url.clone(),
        gateway_url: None,
        currencies: Vec::new(),
        rate_limit: raw.rate_limit,
        rate_burst: raw.rate_burst,
        max_in_flight: raw.max_in_flight,
    };
    let mut profiles = vec![parse_merchant(
        MerchantName::default_profile(),
        "",
        &default,
        gateway_url,
    )?];
    for (name, merchant) in &raw.merchants {
        let path = format!("merchants.{name}.");
        let parsed = MerchantName::parse(name).map_err(|err| {
            invalid(
                &format!("merchants.{name}"),
                format!("the name {err}; `default` is the top-level merchant settings"),
            )
        })?;
        if parsed.is_default() {
            return Err(invalid(
                "merchants.default",
                "`default` is the top-level merchant settings (mch_no, private_key, …); name this profile otherwise",
            ));
        }
        let mut profile = parse_merchant(parsed, &path, merchant, gateway_url)?;
        // One receiver serves every merchant: unset, the top-level notify_url.
        if profile.notify_url.is_none() {
            profile.notify_url = profiles[0].notify_url.clone();
        }
        profiles.push(profile);
    }
    // A payout's merchant must never be in doubt: one profile per currency and per mchNo.
    let mut by_currency: HashMap<&str, &str> = HashMap::new();
    let mut by_mch_no: HashMap<&str, &str> = HashMap::new();
    for profile in &profiles {
        for currency in &profile.currencies {
            if let Some(other) = by_currency.insert(currency.as_str(), &profile.name) {
                return Err(invalid(
                    &format!("merchants.{}.currencies", profile.name),
                    format!(
                        "{currency} is listed by merchant {other:?} too: a currency routes to one merchant"
                    ),
                ));
            }
        }
        if let Some(mch_no) = &profile.mch_no
            && let Some(other) = by_mch_no.insert(mch_no, &profile.name)
        {
            return Err(invalid(
                &format!("merchants.{}.mch_no", profile.name),
                format!("is the mch_no of merchant {other:?} too"),
            ));
        }
    }
    Ok(profiles)
}

/// One profile; `path` is its key prefix (`""` for default, `merchants.<name>.`).
fn parse_merchant(
    name: MerchantName,
    path: &str,
    raw: &raw::RawMerchant,
    gateway_url: &HttpUrl,
) -> Result<MerchantProfile, ConfigError> {
    let key = |field: &str| format!("{path}{field}");
    if let Some(mch_no) = &raw.mch_no {
        check_mch_no(mch_no).map_err(|_| invalid(&key("mch_no"), MCH_NO_RULE))?;
    }
    let url = |field: &str, text: &Option<String>| {
        text.as_deref()
            .map(|text| HttpUrl::parse(text).map_err(|r| invalid(&key(field), r)))
            .transpose()
    };
    let mut currencies = Vec::new();
    for code in &raw.currencies {
        let currency = Currency::parse(code)
            .map_err(|err| invalid(&key("currencies"), format!("{code:?} {err}")))?;
        if !currencies.contains(&currency) {
            currencies.push(currency);
        }
    }
    let count = |field: &str, value: u64| -> Result<u32, ConfigError> {
        u32::try_from(value)
            .ok()
            .filter(|&n| n <= 1_000_000)
            .ok_or_else(|| invalid(&key(field), "must be 0 to 1000000"))
    };
    let per_second = count("rate_limit", raw.rate_limit)?;
    let burst = count("rate_burst", raw.rate_burst)?;
    Ok(MerchantProfile {
        url: url("gateway_url", &raw.gateway_url)?.unwrap_or_else(|| gateway_url.clone()),
        mch_no: raw.mch_no.clone(),
        private_key: parse_private_key(path, &raw.private_key, &raw.private_key_file)?,
        notify_url: url("notify_url", &raw.notify_url)?,
        currencies,
        limits: CallLimits {
            per_second,
            // A limit with no burst set allows one call at a time.
            burst: if per_second > 0 { burst.max(1) } else { burst },
            max_in_flight: count("max_in_flight", raw.max_in_flight)?,
        },
        name,
    })
}

/// A merchant key, read once: from `private_key` or `private_key_file`, never both.
fn parse_private_key(
    path: &str,
    key: &Option<crate::secret::Secret>,
    file: &Option<String>,
) -> Result<Option<PrivateKey>, ConfigError> {
    let name = |field: &str| format!("{path}{field}");
    match (key, file) {
        (Some(_), Some(_)) => Err(invalid(
            &name("private_key"),
            format!(
                "set either {} ({}) or {} ({}), not both",
                name("private_key"),
                env_name(&name("private_key")),
                name("private_key_file"),
                env_name(&name("private_key_file"))
            ),
        )),
        (Some(hex), None) => PrivateKey::from_hex(hex.expose())
            .map(Some)
            .map_err(|err| invalid(&name("private_key"), err.to_string())),
        (None, Some(file)) => PrivateKey::from_file(Path::new(file))
            .map(Some)
            .map_err(|err| invalid(&name("private_key_file"), err.to_string())),
        (None, None) => Ok(None),
    }
}

const MCH_NO_RULE: &str = "must be \"M\" followed by 10 digits";

pub fn check_mch_no(mch_no: &str) -> Result<(), ConfigError> {
    let valid = mch_no.len() == 11
        && mch_no.starts_with('M')
        && mch_no[1..].bytes().all(|b| b.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(invalid("mch_no", MCH_NO_RULE))
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
    use std::time::Duration;

    #[test]
    fn embedded_defaults_load() {
        let settings = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        assert_eq!(settings.gateway.url, "https://payment.tarspay.com");
        assert_eq!(settings.gateway.request_timeout, Duration::from_secs(30));
        assert!(settings.payout_rules.currencies().any(|c| c == "INR"));
        assert!(settings.gateway.merchant().is_err());
        assert!(settings.worker.poll_in_hand);
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
                ("TARSPAY_POLL_IN_HAND", "false"),
                ("TARSPAY_ORPHAN_TIMEOUT", "2m"),
                ("TARSPAY_QUEUE_PREFIX", "acme-payouts"),
            ],
        )
        .unwrap();
        assert_eq!(
            settings.gateway.request_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(
            settings
                .gateway
                .merchant()
                .unwrap()
                .private_key
                .expose_hex(),
            key
        );
        assert_eq!(
            settings.gateway.codes.classify(5003013),
            ErrorClass::Retryable
        );
        assert!(!settings.worker.poll_in_hand);
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
            ("TARSPAY_POLL_IN_HAND", "sometimes", "TARSPAY_POLL_IN_HAND"),
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
    fn each_group_carries_its_parsed_values() {
        let settings = Settings::load_with_env(
            None,
            [
                ("TARSPAY_REDIS_UNSAFE", "true"),
                ("TARSPAY_QUEUE_PREFIX", "acme"),
                ("TARSPAY_OUTCOME_MAX_LEN", "1000"),
                ("TARSPAY_CONCURRENCY", "12"),
                ("TARSPAY_RETRY_MAX_ATTEMPTS", "5"),
                ("TARSPAY_POLL_MAX_INTERVAL", "90s"),
                ("TARSPAY_GUARD_AUTH_FAILURES", "7"),
                ("TARSPAY_MAX_BODY_BYTES", "2048"),
                ("TARSPAY_CALLBACK_PATH", "/hooks/tarspay"),
                ("TARSPAY_GATEWAY__MAX_RESPONSE_BYTES", "4096"),
            ],
        )
        .unwrap();
        assert!(settings.redis.allow_unsafe);
        assert_eq!(settings.redis.queue_prefix, "acme");
        assert_eq!(settings.redis.outcome_max_len, 1000);
        assert_eq!(settings.worker.concurrency, 12);
        assert_eq!(settings.worker.retry.max_attempts, 5);
        assert_eq!(settings.worker.poll.max_interval, Duration::from_secs(90));
        assert_eq!(settings.worker.guard_threshold, 7);
        assert_eq!(settings.server.max_body_bytes, 2048);
        assert_eq!(settings.server.callback_path, "/hooks/tarspay");
        assert_eq!(settings.gateway.max_response_bytes, 4096);
        assert_eq!(
            settings.gateway.submit_lease(),
            Duration::from_secs(30 * 3 + 10)
        );
        assert!(settings.webhooks.is_none(), "no webhook_url, no webhooks");
    }

    #[test]
    fn worker_threads_default_to_one_event_loop_and_are_refused_out_of_range() {
        let defaults = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        assert_eq!(defaults.worker.threads, 1);
        for (value, threads) in [("0", 0), ("4", 4), ("1024", 1024)] {
            let settings =
                Settings::load_with_env(None, [("TARSPAY_WORKER_THREADS", value)]).unwrap();
            assert_eq!(settings.worker.threads, threads, "{value}");
        }
        for value in ["1025", "-1", "two"] {
            let err = Settings::load_with_env(None, [("TARSPAY_WORKER_THREADS", value)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("TARSPAY_WORKER_THREADS"), "{value}: {err}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks_or_refused_naming_the_setting() {
        let none = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        assert!(none.server.trusted_proxies.is_empty());
        let some = Settings::load_with_env(
            None,
            [("TARSPAY_TRUSTED_PROXIES", " 10.1.2.3/8, 127.0.0.1 ,::1,")],
        )
        .unwrap();
        let listed: Vec<String> = some
            .server
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(listed, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
        for bad in ["10.0.0.0/33", "proxy.internal", "10.0.0"] {
            let err = Settings::load_with_env(None, [("TARSPAY_TRUSTED_PROXIES", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("TARSPAY_TRUSTED_PROXIES") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_count_too_large_for_its_type_names_the_setting() {
        let err = Settings::load_with_env(None, [("TARSPAY_GUARD_AUTH_FAILURES", "5000000000")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TARSPAY_GUARD_AUTH_FAILURES") && err.contains("too large"),
            "{err}"
        );
    }

    #[test]
    fn retention_and_replicas_are_parsed_or_refused_naming_the_setting() {
        let defaults = Settings::load_with_env(None, Vec::<(&str, &str)>::new()).unwrap();
        assert_eq!(
            defaults.redis.retention,
            Some(Duration::from_secs(30 * 24 * 3600))
        );
        assert_eq!(defaults.redis.min_replicas, 0);
        let set = Settings::load_with_env(
            None,
            [
                ("TARSPAY_RETENTION", "0s"),
                ("TARSPAY_REDIS_MIN_REPLICAS", "2"),
                ("TARSPAY_REDIS_REPLICA_TIMEOUT", "250ms"),
            ],
        )
        .unwrap();
        assert_eq!(set.redis.retention, None, "0s keeps everything");
        assert_eq!(set.redis.min_replicas, 2);
        assert_eq!(set.redis.replica_timeout, Duration::from_millis(250));
        for (key, value, rule) in [
            ("TARSPAY_RETENTION", "a month", "duration"),
            ("TARSPAY_REDIS_MIN_REPLICAS", "101", "0 to 100"),
            ("TARSPAY_REDIS_MIN_REPLICAS", "-1", ""),
            ("TARSPAY_REDIS_REPLICA_TIMEOUT", "0s", "greater than zero"),
        ] {
            let err = Settings::load_with_env(None, [(key, value)])
                .unwrap_err()
                .to_string();
            let named = key.trim_start_matches("TARSPAY_").to_lowercase();
            assert!(
                (err.contains(key) || err.contains(&named)) && err.contains(rule),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn webhooks_are_parsed_at_load_or_refused_naming_the_secret() {
        let on = Settings::load_with_env(
            None,
            [
                ("TARSPAY_WEBHOOK_URL", "https://app.example/hook"),
                ("TARSPAY_WEBHOOK_SECRET", "whsec_YWJj"),
                ("TARSPAY_WEBHOOK_MAX_ATTEMPTS", "4"),
                ("TARSPAY_WEBHOOK_RETRY_MAX_DELAY", "2m"),
            ],
        )
        .unwrap();
        let webhooks = on.webhooks.unwrap();
        assert_eq!(webhooks.url, "https://app.example/hook");
        assert_eq!(webhooks.key.expose(), b"abc");
        assert_eq!(webhooks.max_attempts, 4);
        assert_eq!(webhooks.retry_max_delay, Duration::from_secs(120));
        for (secret, reason) in [
            ("whsec_", "is empty"),
            ("whsec_!!secretpart!!", "not base64"),
            ("", "is required"),
        ] {
            let err = Settings::load_with_env(
                None,
                [
                    ("TARSPAY_WEBHOOK_URL", "https://app.example/hook"),
                    ("TARSPAY_WEBHOOK_SECRET", secret),
                ],
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("TARSPAY_WEBHOOK_SECRET") && err.contains(reason),
                "{secret:?}: {err}"
            );
            assert!(!err.contains("secretpart"), "{err}");
        }
        // A secret without a URL is not used, so webhooks stay off.
        let off = Settings::load_with_env(None, [("TARSPAY_WEBHOOK_SECRET", "whsec_%%")]).unwrap();
        assert!(off.webhooks.is_none());
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
            settings.gateway.private_key().unwrap().expose_hex(),
            key.expose_hex()
        );
        assert_eq!(settings.server.listen.port(), 9000);
        // The notifyUrl is sent (and signed) as written, not normalised to a trailing '/'.
        assert_eq!(
            settings.gateway.notify_url().unwrap(),
            "https://merchant.example"
        );
    }

    #[test]
    fn missing_merchant_settings_say_which() {
        let settings = Settings::load_with_env(None, [("TARSPAY_MCH_NO", "M1234567890")]).unwrap();
        let err = settings.gateway.merchant().unwrap_err().to_string();
        assert!(
            err.contains("TARSPAY_PRIVATE_KEY") && err.contains("TARSPAY_PRIVATE_KEY_FILE"),
            "{err}"
        );
        let err = settings.gateway.notify_url().unwrap_err().to_string();
        assert!(err.contains("TARSPAY_NOTIFY_URL"), "{err}");
    }

    #[test]
    fn the_api_needs_a_token_or_an_explicit_opt_out() {
        let none = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        let err = none.server.api_token().unwrap_err().to_string();
        assert!(
            err.contains("TARSPAY_API_TOKEN") && err.contains("TARSPAY_API_AUTH_DISABLED"),
            "{err}"
        );
        let off = Settings::load_with_env(None, [("TARSPAY_API_AUTH_DISABLED", "true")]).unwrap();
        assert!(off.server.api_token().unwrap().is_none());
        let on =
            Settings::load_with_env(None, [("TARSPAY_API_TOKEN", "12345678901234567890")]).unwrap();
        assert!(
            on.server
                .api_token()
                .unwrap()
                .unwrap()
                .matches("12345678901234567890"),
            "digits-only tokens stay text"
        );
        assert!(
            !format!("{on:?}").contains("12345678901234567890"),
            "Debug never shows the token"
        );
        // A token no client could match (read with its newline), or one easily guessed.
        for bad in [
            "short-token",
            "api-token-0123456789\n",
            " api-token-0123456789",
        ] {
            let settings = Settings::load_with_env(None, [("TARSPAY_API_TOKEN", bad)]).unwrap();
            let err = settings.server.api_token().unwrap_err().to_string();
            assert!(
                err.contains("TARSPAY_API_TOKEN") && err.contains("at least 16 characters"),
                "{bad:?}: {err}"
            );
            assert!(
                !err.contains(bad.trim()),
                "the error never shows the token: {err}"
            );
        }
    }

    #[test]
    fn the_viewer_token_is_optional_checked_and_redacted() {
        let none = Settings::load_with_env(None, [("", ""); 0]).unwrap();
        assert!(none.server.viewer_token().unwrap().is_none());
        for bad in ["", "   ", "short", "  padded-viewer-token-123  "] {
            let settings = Settings::load_with_env(None, [("TARSPAY_VIEWER_TOKEN", bad)]).unwrap();
            let err = settings.server.viewer_token().unwrap_err().to_string();
            assert!(err.contains("TARSPAY_VIEWER_TOKEN"), "{bad:?}: {err}");
            assert!(bad.trim().is_empty() || !err.contains(bad.trim()), "{err}");
        }
        let same = Settings::load_with_env(
            None,
            [
                ("TARSPAY_VIEWER_TOKEN", "the-very-same-token-42"),
                ("TARSPAY_API_TOKEN", "the-very-same-token-42"),
            ],
        )
        .unwrap();
        let err = same.server.viewer_token().unwrap_err().to_string();
        assert!(
            err.contains("api_token") && !err.contains("very-same"),
            "{err}"
        );
        let good =
            Settings::load_with_env(None, [("TARSPAY_VIEWER_TOKEN", "viewer-token-0123456789")])
                .unwrap();
        assert!(
            good.server
                .viewer_token()
                .unwrap()
                .unwrap()
                .matches("viewer-token-0123456789")
        );
        assert!(
            !format!("{good:?}").contains("viewer-token-0123456789"),
            "Debug never shows the viewer token"
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
        assert_eq!(settings.gateway.url, "http://127.0.0.1:9");
        assert_eq!(settings.gateway.connect_timeout, Duration::from_secs(1));
        assert!(Settings::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn merchant_profiles_from_a_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.toml");
        let key = "2".repeat(64);
        std::fs::write(
            &path,
            format!(
                "[merchants.kenya]\nmch_no = \"M2000000002\"\nprivate_key = \"{key}\"\ncurrencies = [\"KES\"]\nrate_limit = 50\nrate_burst = 10\n"
            ),
        )
        .unwrap();
        let settings = Settings::load_with_env(
            Some(&path),
            [
                ("TARSPAY_MCH_NO", "M1234567890"),
                ("TARSPAY_NOTIFY_URL", "https://all.example/notify"),
                ("TARSPAY_MERCHANTS__BANGLA__MCH_NO", "M3000000003"),
                ("TARSPAY_MERCHANTS__BANGLA__CURRENCIES", "BDT, PKR"),
                ("TARSPAY_MERCHANTS__BANGLA__MAX_IN_FLIGHT", "4"),
                (
                    "TARSPAY_MERCHANTS__KENYA__NOTIFY_URL",
                    "https://k.example/notify",
                ),
            ],
        )
        .unwrap();
        let names: Vec<&str> = settings
            .gateway
            .profiles()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["default", "bangla", "kenya"]);
        let kenya = settings.gateway.profile("kenya").unwrap();
        assert_eq!(kenya.mch_no.as_deref(), Some("M2000000002"));
        assert_eq!(kenya.currencies, ["KES"]);
        assert_eq!(kenya.limits.per_second, 50);
        assert_eq!(kenya.limits.burst, 10);
        assert_eq!(kenya.notify_url().unwrap(), "https://k.example/notify");
        // Unset URLs fall back to the top-level gateway URL.
        assert_eq!(kenya.url, settings.gateway.url);
        let bangla = settings.gateway.profile("bangla").unwrap();
        assert_eq!(bangla.currencies, ["BDT", "PKR"]);
        assert_eq!(bangla.limits.max_in_flight, 4);
        // One receiver for all: an unset notify_url is the top-level one.
        assert_eq!(bangla.notify_url().unwrap(), "https://all.example/notify");
        // Its key is missing: the error names the profile's own variables.
        let err = bangla.merchant().unwrap_err().to_string();
        assert!(
            err.contains("TARSPAY_MERCHANTS__BANGLA__PRIVATE_KEY")
                && err.contains("merchants.bangla.private_key"),
            "{err}"
        );
        // Routing: a listed currency goes to its merchant, the rest to default.
        let rules = &settings.payout_rules;
        let route = |currency: &str, merchant: Option<&str>| {
            let mut payout = serde_json::json!({
                "mchOrderNo": "R-1", "amount": "500", "currency": currency, "wayCode": "X",
            });
            if let Some(merchant) = merchant {
                payout["merchant"] = merchant.into();
            }
            rules.validate_json(&payout).map(|p| p.merchant.to_string())
        };
        assert_eq!(route("PKR", None).unwrap(), "bangla");
        assert_eq!(route("PHP", None).unwrap(), "default");
        assert_eq!(route("PHP", Some("default")).unwrap(), "default");
        let err = route("PHP", Some("kenya")).unwrap_err().to_string();
        assert!(
            err.contains("merchant") && err.contains("kenya does not pay PHP"),
            "{err}"
        );
        let err = route("PHP", Some("Nope")).unwrap_err().to_string();
        assert!(err.contains("merchant"), "{err}");
    }

    #[test]
    fn merchant_profiles_are_refused_naming_the_setting() {
        let refused = |vars: &[(&str, &str)]| {
            Settings::load_with_env(None, vars.iter().copied())
                .unwrap_err()
                .to_string()
        };
        let err = refused(&[
            ("TARSPAY_MERCHANTS__A__CURRENCIES", "KES"),
            ("TARSPAY_MERCHANTS__B__CURRENCIES", "KES"),
        ]);
        assert!(
            err.contains("merchants.b.currencies") && err.contains("KES"),
            "{err}"
        );
        let err = refused(&[
            ("TARSPAY_MCH_NO", "M1234567890"),
            ("TARSPAY_MERCHANTS__A__MCH_NO", "M1234567890"),
        ]);
        assert!(err.contains("merchants.a.mch_no"), "{err}");
        let err = refused(&[("TARSPAY_MERCHANTS__A__MCH_NO", "123")]);
        assert!(
            err.contains("TARSPAY_MERCHANTS__A__MCH_NO") && err.contains("10 digits"),
            "{err}"
        );
        let err = refused(&[("TARSPAY_MERCHANTS__DEFAULT__CURRENCIES", "KES")]);
        assert!(err.contains("merchants.default"), "{err}");
        let err = refused(&[("TARSPAY_MERCHANTS__A__CURRENCIES", "kes")]);
        assert!(err.contains("merchants.a.currencies"), "{err}");
        let err = refused(&[("TARSPAY_MERCHANTS__A__MCHNO", "M1234567890")]);
        assert!(err.contains("mchno"), "an unknown key is named: {err}");
        let secret = "3".repeat(64);
        let err = refused(&[
            ("TARSPAY_MERCHANTS__A__PRIVATE_KEY", secret.as_str()),
            ("TARSPAY_MERCHANTS__A__PRIVATE_KEY_FILE", "/nonexistent"),
        ]);
        assert!(err.contains("merchants.a.private_key"), "{err}");
        assert!(!err.contains(&secret), "the key never appears: {err}");
        let err = refused(&[("TARSPAY_MERCHANTS__A__RATE_LIMIT", "lots")]);
        assert!(err.contains("merchants.a.rate_limit"), "{err}");
        // With named profiles and no default merchant number, a currency no profile lists
        // is refused at validation, naming the field.
        let settings = Settings::load_with_env(
            None,
            [
                ("TARSPAY_MERCHANTS__A__MCH_NO", "M2000000002"),
                ("TARSPAY_MERCHANTS__A__CURRENCIES", "KES"),
            ],
        )
        .unwrap();
        let payout = serde_json::json!({
            "mchOrderNo": "R-2", "amount": "500", "currency": "PHP", "wayCode": "X",
        });
        let err = settings.payout_rules.validate_json(&payout).unwrap_err();
        assert_eq!(err.0[0].field, "currency", "{err}");
        assert!(
            err.0[0].rule.contains("no merchant profile pays PHP"),
            "{err}"
        );
    }
}
