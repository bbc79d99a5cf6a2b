//! The typed settings, one group per concern, so each part of the code receives only what it
//! needs: the gateway (`gateway`), Redis (`redis`), the worker pool (`worker`) and `serve`
//! (`server`). Every value here was parsed and checked at load; accessors exist only where a
//! required setting may be unset and the command that needs it must say which.

use super::{ConfigError, HttpUrl, RedisUrl, env_name};
use crate::gateway::ClientSettings;
use crate::gateway::codes::CodeTable;
use crate::gateway::keys::{PrivateKey, PublicKey};
use crate::ids::{Currency, MerchantName};
use crate::jobs::{PollPolicy, RetryPolicy};
use crate::secret::Secret;
use std::net::SocketAddr;
use std::time::Duration;

/// How to call TarsPay (`[codes]`, `[gateway]`, the system key) and as whom: every merchant
/// profile, the top-level merchant settings first as `default`.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// `gateway_url`: the default profile's, and every profile's without its own.
    pub url: HttpUrl,
    /// TarsPay's key that signs callbacks (one for every merchant).
    pub system_public_key: PublicKey,
    /// The built-in code classes with the settings' overrides.
    pub codes: CodeTable,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
    /// `default` first, then `[merchants.*]` by name; names and `mch_no`s are unique and no
    /// currency is listed by two profiles (checked at load).
    pub(super) merchants: Vec<MerchantProfile>,
}

/// Calls to the gateway one merchant may make: `rate_limit` per second (0 = no limit) with
/// `rate_burst`, and `max_in_flight` at once (0 = no limit), shared by every worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallLimits {
    pub per_second: u32,
    pub burst: u32,
    pub max_in_flight: u32,
}

impl CallLimits {
    pub fn is_limited(&self) -> bool {
        self.per_second > 0 || self.max_in_flight > 0
    }
}

/// One merchant account at TarsPay: its number, key, notify URL, the currencies routed to it
/// and its call limits. The top-level `mch_no`, `private_key`, … are the profile `default`.
#[derive(Debug, Clone)]
pub struct MerchantProfile {
    pub name: MerchantName,
    pub url: HttpUrl,
    /// "M" + 10 digits, checked.
    pub mch_no: Option<String>,
    /// From `private_key` or `private_key_file` (at most one of them may be set).
    pub(super) private_key: Option<PrivateKey>,
    pub notify_url: Option<HttpUrl>,
    /// Payouts in these currencies go to this profile unless they name a merchant. Empty for
    /// `default`, which takes every currency no profile lists.
    pub currencies: Vec<Currency>,
    pub limits: CallLimits,
}

/// The merchant identity needed to call the gateway, checked.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub mch_no: String,
    pub private_key: PrivateKey,
}

impl MerchantProfile {
    /// The setting's key path in this profile (`mch_no`, `merchants.kenya.mch_no`).
    fn key(&self, field: &str) -> String {
        if self.name.is_default() {
            field.to_owned()
        } else {
            format!("merchants.{}.{field}", self.name)
        }
    }

    /// The merchant key from `private_key` or `private_key_file`.
    pub fn private_key(&self) -> Result<PrivateKey, ConfigError> {
        self.private_key
            .clone()
            .ok_or_else(|| ConfigError::Missing {
                env: format!(
                    "{} or {}",
                    env_name(&self.key("private_key")),
                    env_name(&self.key("private_key_file"))
                ),
                key: self.key("private_key"),
                purpose: "to sign gateway calls",
            })
    }

    pub fn merchant(&self) -> Result<Merchant, ConfigError> {
        let mch_no = self.mch_no.clone().ok_or_else(|| ConfigError::Missing {
            key: self.key("mch_no"),
            env: env_name(&self.key("mch_no")),
            purpose: "to call the gateway",
        })?;
        Ok(Merchant {
            mch_no,
            private_key: self.private_key()?,
        })
    }

    /// The notifyUrl of this merchant's orders, as written in the settings.
    pub fn notify_url(&self) -> Result<&str, ConfigError> {
        self.notify_url
            .as_ref()
            .map(HttpUrl::as_str)
            .ok_or_else(|| ConfigError::Missing {
                key: self.key("notify_url"),
                env: env_name(&self.key("notify_url")),
                purpose: "as the notifyUrl of every order",
            })
    }
}

impl GatewaySettings {
    /// Every merchant profile, `default` first.
    pub fn profiles(&self) -> &[MerchantProfile] {
        &self.merchants
    }

    /// The top-level merchant settings.
    pub fn default_profile(&self) -> &MerchantProfile {
        &self.merchants[0]
    }

    pub fn profile(&self, name: &str) -> Option<&MerchantProfile> {
        self.merchants.iter().find(|p| p.name == name)
    }

    /// The profiles that can call the gateway (those with a merchant number): the ones a
    /// worker serves. `default` counts when it is the only profile, so a process without
    /// merchant settings still says which setting is missing.
    pub fn active_profiles(&self) -> Vec<&MerchantProfile> {
        if self.merchants.len() == 1 {
            return vec![&self.merchants[0]];
        }
        self.merchants
            .iter()
            .filter(|p| p.mch_no.is_some())
            .collect()
    }

    /// The default merchant's key.
    pub fn private_key(&self) -> Result<PrivateKey, ConfigError> {
        self.default_profile().private_key()
    }

    /// The default merchant.
    pub fn merchant(&self) -> Result<Merchant, ConfigError> {
        self.default_profile().merchant()
    }

    /// The default merchant's notifyUrl.
    pub fn notify_url(&self) -> Result<&str, ConfigError> {
        self.default_profile().notify_url()
    }

    /// The default merchant's client settings.
    pub fn client_settings(&self) -> Result<ClientSettings, ConfigError> {
        self.client_settings_for(self.default_profile())
    }

    pub fn client_settings_for(
        &self,
        profile: &MerchantProfile,
    ) -> Result<ClientSettings, ConfigError> {
        let merchant = profile.merchant()?;
        Ok(ClientSettings {
            base_url: profile.url.as_str().to_owned(),
            mch_no: merchant.mch_no,
            private_key: merchant.private_key,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            max_response_bytes: self.max_response_bytes,
        })
    }

    /// How long a create holds the submit lease: one run makes at most three gateway calls
    /// (lookup, create, lookup), plus a margin.
    pub fn submit_lease(&self) -> Duration {
        self.request_timeout * 3 + Duration::from_secs(10)
    }
}

/// Where and how the deployment keeps its state (`redis_url`, `redis_unsafe`,
/// `redis_cluster`, `partitions`, `queue_prefix`, `outcome_max_len`, `retention`, `redis_min_replicas`,
/// `redis_replica_timeout`).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: RedisUrl,
    /// `redis_unsafe`: run on a Redis that may drop acknowledged writes (no AOF, evicting
    /// policy).
    pub allow_unsafe: bool,
    /// `redis_cluster`: whether `url` is a Redis Cluster (asked when `auto`).
    pub cluster: crate::redis_conn::ClusterMode,
    /// `partitions`: how many partitions the deployment's keys are split into (fixed once
    /// written; see `crate::partition`).
    pub partitions: usize,
    /// Prefix of every key; letters, digits, '-', '_', '.', ':' (no braces).
    pub queue_prefix: String,
    /// Approximate cap on the outcome stream's length; 0 keeps every outcome.
    pub outcome_max_len: u64,
    /// `retention`: how long final orders' records and read outcomes are kept; `None` (0)
    /// keeps them forever.
    pub retention: Option<Duration>,
    /// `redis_min_replicas`: replicas that must confirm a registration or a submit lease
    /// (`WAIT`) before it counts; 0 on a single node.
    pub min_replicas: u32,
    /// `redis_replica_timeout`: how long to wait for them.
    pub replica_timeout: Duration,
}

/// The worker pool: how many jobs at once, how creates are retried and orders polled, and
/// the timers that keep work alive.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Gateway calls in flight per worker process, 1 to 10000 (it holds 3 jobs per call).
    pub concurrency: usize,
    /// `worker_threads`: threads of a `worker` process's runtime; 0 = one per core.
    pub threads: usize,
    /// `retry_base_delay`, `retry_max_delay`, `retry_max_attempts`.
    pub retry: RetryPolicy,
    /// `poll_first_delay`, `poll_max_interval`, `poll_deadline`.
    pub poll: PollPolicy,
    /// `poll_in_hand`: an accepted create's job may wait out a short first-poll delay in its
    /// worker and poll itself (`jobs::PollsInHand`).
    pub poll_in_hand: bool,
    /// How long the gateway must keep saying "no such order" (at least twice) before an order
    /// some create of which may exist can be failed.
    pub settle_window: Duration,
    /// How often a worker's lifeline sweeps the ledger for orders without work.
    pub lifeline_interval: Duration,
    pub orphan_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `guard_auth_failures`: consecutive auth-class failures that pause the queue.
    pub guard_threshold: u32,
}

/// Shortest viewer token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// `serve`: where it listens, who may call the API, and how requests are bounded.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub(super) api_token: Option<Secret>,
    /// `viewer_token`: the operator console's read-only login (never the API's token).
    pub(super) viewer_token: Option<Secret>,
    /// `api_auth_disabled`: run the API without a token (behind an authenticating proxy).
    pub auth_disabled: bool,
    /// `trusted_proxies`: reverse proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub callback_path: String,
    pub max_body_bytes: usize,
    pub max_batch_bytes: usize,
    /// A client must send its request head within this, and its body within
    /// `body_read_timeout` of the head, or the connection is answered (408) and closed.
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl ServerSettings {
    /// The API token, or `None` when auth is explicitly disabled; an error when neither, or
    /// when it is shorter than [`MIN_TOKEN_LEN`] or has surrounding whitespace (a
    /// token read from a file with its newline would refuse every client).
    pub fn api_token(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.api_token, self.auth_disabled) {
            (Some(token), _) if !token.is_empty() => {
                let value = token.expose();
                if value.chars().count() < MIN_TOKEN_LEN || value.trim() != value {
                    return Err(ConfigError::Invalid {
                        key: "api_token".into(),
                        env: env_name("api_token"),
                        reason: "must be at least 16 characters, without surrounding spaces"
                            .to_owned(),
                    });
                }
                Ok(Some(token.clone()))
            }
            (_, true) => Ok(None),
            _ => Err(ConfigError::Missing {
                key: "api_token".into(),
                env: env_name("api_token"),
                purpose: "for the HTTP API (or set TARSPAY_API_AUTH_DISABLED=true to run it without auth)",
            }),
        }
    }

    /// The console's viewer token, `None` when not set (then only the admin token logs in).
    /// Set but empty, shorter than [`MIN_TOKEN_LEN`] or equal to the API token (which
    /// would make every viewer an admin) is an error.
    pub fn viewer_token(&self) -> Result<Option<Secret>, ConfigError> {
        let Some(token) = &self.viewer_token else {
            return Ok(None);
        };
        let invalid = |reason: &str| ConfigError::Invalid {
            key: "viewer_token".into(),
            env: env_name("viewer_token"),
            reason: reason.to_owned(),
        };
        let value = token.expose();
        if value.trim().is_empty() {
            return Err(invalid(
                "is set but empty: unset it, or give the console's read-only token",
            ));
        }
        if value.chars().count() < MIN_TOKEN_LEN || value.trim() != value {
            return Err(invalid(
                "must be at least 16 characters, without surrounding spaces",
            ));
        }
        if self
            .api_token
            .as_ref()
            .is_some_and(|api| api.matches(value))
        {
            return Err(invalid(
                "must differ from api_token (the viewer may only look; the API token may act)",
            ));
        }
        Ok(Some(token.clone()))
    }
}
