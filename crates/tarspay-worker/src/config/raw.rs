//! The settings as written: the serde shape of `config/default.toml`, a `--config` file and
//! `TARSPAY_*` variables. Only scalars are read here (environment values stay text, so a
//! digits-only secret never becomes a number); `Settings::from_raw` parses the rest once.

use crate::gateway::TARSPAY_SYSTEM_PUBLIC_KEY;
use crate::gateway::codes::ErrorClass;
use crate::payout::CurrencyRule;
use crate::secret::Secret;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Deserialize)]
pub(super) struct RawSettings {
    #[serde(deserialize_with = "lenient_string")]
    pub gateway_url: String,
    #[serde(default, deserialize_with = "optional_string")]
    pub mch_no: Option<String>,
    #[serde(default, deserialize_with = "optional_secret")]
    pub private_key: Option<Secret>,
    #[serde(default, deserialize_with = "optional_string")]
    pub private_key_file: Option<String>,
    #[serde(default, deserialize_with = "optional_string")]
    pub notify_url: Option<String>,
    #[serde(default = "default_system_key", deserialize_with = "lenient_string")]
    pub system_public_key: String,
    #[serde(deserialize_with = "lenient_string")]
    pub redis_url: String,
    #[serde(deserialize_with = "lenient_bool")]
    pub redis_unsafe: bool,
    #[serde(deserialize_with = "lenient_string")]
    pub redis_cluster: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub partitions: u64,
    #[serde(deserialize_with = "lenient_u64")]
    pub concurrency: u64,
    #[serde(deserialize_with = "lenient_u64")]
    pub worker_threads: u64,
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
    #[serde(deserialize_with = "lenient_bool")]
    pub poll_in_hand: bool,
    #[serde(deserialize_with = "duration")]
    pub settle_window: Duration,
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
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    #[serde(deserialize_with = "lenient_u64")]
    pub redis_min_replicas: u64,
    #[serde(deserialize_with = "duration")]
    pub redis_replica_timeout: Duration,
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    #[serde(default, deserialize_with = "optional_secret")]
    pub api_token: Option<Secret>,
    #[serde(default, deserialize_with = "optional_secret")]
    pub viewer_token: Option<Secret>,
    #[serde(deserialize_with = "lenient_bool")]
    pub api_auth_disabled: bool,
    #[serde(deserialize_with = "lenient_string")]
    pub trusted_proxies: String,
    #[serde(deserialize_with = "lenient_string")]
    pub callback_path: String,
    #[serde(deserialize_with = "lenient_u64")]
    pub max_body_bytes: u64,
    #[serde(deserialize_with = "lenient_u64")]
    pub max_batch_bytes: u64,
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    #[serde(default, deserialize_with = "optional_string")]
    pub webhook_url: Option<String>,
    #[serde(default, deserialize_with = "optional_secret")]
    pub webhook_secret: Option<Secret>,
    #[serde(deserialize_with = "lenient_u64")]
    pub webhook_max_attempts: u64,
    #[serde(deserialize_with = "duration")]
    pub webhook_retry_max_delay: Duration,
    pub gateway: GatewayTuning,
    #[serde(default)]
    pub codes: BTreeMap<String, ErrorClass>,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub currencies: BTreeMap<String, CurrencyRule>,
    /// The default merchant's limits at the gateway (`rate_limit` calls per second, 0 = none;
    /// `rate_burst`; `max_in_flight`, 0 = none).
    #[serde(default, deserialize_with = "lenient_u64")]
    pub rate_limit: u64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub rate_burst: u64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub max_in_flight: u64,
    /// More merchant accounts: `[merchants.<name>]`, `TARSPAY_MERCHANTS__<NAME>__<KEY>`.
    #[serde(default)]
    pub merchants: BTreeMap<String, RawMerchant>,
}

/// One `[merchants.<name>]` table. Unset URLs (gateway, notify) fall back to the top-level ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMerchant {
    #[serde(default, deserialize_with = "optional_string")]
    pub mch_no: Option<String>,
    #[serde(default, deserialize_with = "optional_secret")]
    pub private_key: Option<Secret>,
    #[serde(default, deserialize_with = "optional_string")]
    pub private_key_file: Option<String>,
    #[serde(default, deserialize_with = "optional_string")]
    pub notify_url: Option<String>,
    #[serde(default, deserialize_with = "optional_string")]
    pub gateway_url: Option<String>,
    /// The currencies it pays: a TOML array, or comma-separated text (environment).
    #[serde(default, deserialize_with = "text_list")]
    pub currencies: Vec<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub rate_limit: u64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub rate_burst: u64,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub max_in_flight: u64,
}

/// A list written as an array, or as one comma-separated text (`"KES, BDT"`).
fn text_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Items(Vec<String>),
        Text(String),
    }
    let items = match List::deserialize(deserializer)? {
        List::Items(items) => items,
        List::Text(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
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

/// Accepts a string or a scalar written without quotes (TOML numbers, environment values).
fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
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

fn lenient_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
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

/// A secret is text too (a token of digits stays text); empty counts as set, so the command
/// that needs it can say it is empty.
fn optional_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Secret>, D::Error> {
    lenient_string(deserializer).map(|text| Some(Secret::new(text)))
}

fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = lenient_string(deserializer)?;
    text.trim()
        .parse()
        .map_err(|_| serde::de::Error::custom(format!("expected a whole number, got {text:?}")))
}

/// Durations as text: "500ms", "2s", "5m".
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = lenient_string(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("expected a duration such as \"500ms\", \"2s\" or \"5m\", got {text:?}")
    })
}
