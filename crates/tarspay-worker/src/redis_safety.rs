//! Does this Redis keep its word? The ledger is the source of truth and accept/finalize do not
//! re-read what they wrote, so a Redis that evicts keys or loses acknowledged writes on restart
//! can lose or double a payout. `worker` and `serve` check at start and refuse such a Redis
//! unless `redis_unsafe = true` (TARSPAY_REDIS_UNSAFE) says the operator accepts the risk.

use crate::config::Settings;

/// What was read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisSafety {
    /// The settings were read. `unsafe_settings` may drop acknowledged writes (refused unless
    /// allowed); `warnings` may lose the last moments before a crash.
    Checked {
        unsafe_settings: Vec<String>,
        warnings: Vec<String>,
    },
    /// CONFIG is not allowed here (managed Redis, ACL): nothing could be checked.
    Unchecked { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSafetyError {
    #[error("cannot connect to Redis to check its persistence settings: {0}")]
    Connect(#[source] redis::RedisError),
    #[error("no Redis URL given")]
    NoUrl,
    #[error(
        "refusing to start: this Redis may drop acknowledged writes, and the ledger relies on them: {}. Fix the Redis configuration (redis.conf, or CONFIG SET then CONFIG REWRITE), or set TARSPAY_REDIS_UNSAFE=true (redis_unsafe = true) to run anyway",
        .0.join("; ")
    )]
    Unsafe(Vec<String>),
    #[error(
        "refusing to start: Redis {version} is too old; the ledger's scripts need Redis 7.0 or later (they use PEXPIRE with NX)"
    )]
    TooOld { version: String },
}

/// Whether a server reporting `redis_version` `version` is older than 7.0. A version that does
/// not parse is let through (a fork may spell it its own way; its scripts will tell).
pub fn too_old(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|major| major.trim().parse::<u32>().ok())
        .is_some_and(|major| major < 7)
}

/// The server's `redis_version`, if its `INFO server` answers and says.
async fn server_version<C: redis::aio::ConnectionLike + Send>(conn: &mut C) -> Option<String> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(|version| version.trim().to_owned())
}

/// Judges the three settings (`None`: not reported by this server).
pub fn judge(
    maxmemory_policy: Option<&str>,
    appendonly: Option<&str>,
    appendfsync: Option<&str>,
) -> RedisSafety {
    let mut unsafe_settings = Vec::new();
    let mut warnings = Vec::new();
    if let Some(policy) = maxmemory_policy
        && policy != "noeviction"
    {
        unsafe_settings.push(format!(
            "maxmemory-policy is {policy}, so Redis may evict order and queue keys when memory is full (set maxmemory-policy noeviction)"
        ));
    }
    let aof_on = appendonly == Some("yes");
    if let Some(aof) = appendonly
        && !aof_on
    {
        unsafe_settings.push(format!(
            "appendonly is {aof}, so a restart loses every write since the last snapshot (set appendonly yes)"
        ));
    }
    if aof_on
        && let Some(fsync) = appendfsync
        && fsync != "always"
    {
        warnings.push(format!(
            "appendfsync is {fsync}: a crash of the Redis host can lose the last writes it acknowledged (about a second with everysec; more with no), e.g. orders, acceptances or outcomes consumers already saw (set appendfsync always)"
        ));
    }
    RedisSafety::Checked {
        unsafe_settings,
        warnings,
    }
}

/// Reads one setting; `Ok(None)` when this server does not know it.
async fn config_get<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    name: &str,
) -> Result<Option<String>, redis::RedisError> {
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await?;
    Ok(reply.into_iter().nth(1))
}

/// Reads the settings; a CONFIG the server refuses (unknown command, NOPERM) is `Unchecked`.
pub async fn inspect<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> Result<RedisSafety, RedisSafetyError> {
    let mut values = Vec::with_capacity(3);
    for name in ["maxmemory-policy", "appendonly", "appendfsync"] {
        match config_get(conn, name).await {
            Ok(value) => values.push(value),
            Err(err) if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() => {
                return Err(RedisSafetyError::Connect(err));
            }
            Err(err) => {
                return Ok(RedisSafety::Unchecked {
                    reason: err.to_string(),
                });
            }
        }
    }
    Ok(judge(
        values[0].as_deref(),
        values[1].as_deref(),
        values[2].as_deref(),
    ))
}

/// What one node says.
async fn inspect_url(url: &str) -> Result<RedisSafety, RedisSafetyError> {
    let client = redis::Client::open(url).map_err(RedisSafetyError::Connect)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(RedisSafetyError::Connect)?;
    if let Some(version) = server_version(&mut conn).await
        && too_old(&version)
    {
        return Err(RedisSafetyError::TooOld { version });
    }
    inspect(&mut conn).await
}

/// What every listed node that answers says (a cluster's seeds), as one judgement.
async fn inspect_seeds(urls: &str) -> Result<RedisSafety, RedisSafetyError> {
    let mut combined: Option<RedisSafety> = None;
    let mut last_error = None;
    for seed in crate::redis_conn::seeds(urls) {
        let safety = match inspect_url(seed).await {
            Ok(safety) => safety,
            // One node too old is enough: its scripts would fail, whatever the others say.
            Err(err @ RedisSafetyError::TooOld { .. }) => return Err(err),
            Err(err) => {
                last_error = Some(err);
                continue;
            }
        };
        combined = Some(match (combined, safety) {
            (
                Some(RedisSafety::Checked {
                    mut unsafe_settings,
                    mut warnings,
                }),
                RedisSafety::Checked {
                    unsafe_settings: more_unsafe,
                    warnings: more_warnings,
                },
            ) => {
                for item in more_unsafe {
                    if !unsafe_settings.contains(&item) {
                        unsafe_settings.push(item);
                    }
                }
                for item in more_warnings {
                    if !warnings.contains(&item) {
                        warnings.push(item);
                    }
                }
                RedisSafety::Checked {
                    unsafe_settings,
                    warnings,
                }
            }
            (Some(checked @ RedisSafety::Checked { .. }), RedisSafety::Unchecked { .. }) => checked,
            (_, safety) => safety,
        });
    }
    combined.ok_or_else(|| last_error.unwrap_or(RedisSafetyError::NoUrl))
}

/// Checks the settings' Redis at start (each seed of a cluster): an error stops
/// `worker`/`serve`; warnings are logged once here.
pub async fn ensure(settings: &Settings) -> Result<RedisSafety, RedisSafetyError> {
    let safety = inspect_seeds(settings.redis.url.as_str()).await?;
    match &safety {
        RedisSafety::Unchecked { reason } => tracing::warn!(
            %reason,
            "cannot read Redis persistence and eviction settings (CONFIG not allowed); make sure it runs with appendonly yes, appendfsync always and maxmemory-policy noeviction"
        ),
        RedisSafety::Checked {
            unsafe_settings,
            warnings,
        } => {
            for warning in warnings {
                tracing::warn!("redis: {warning}");
            }
            if !unsafe_settings.is_empty() {
                if !settings.redis.allow_unsafe {
                    return Err(RedisSafetyError::Unsafe(unsafe_settings.clone()));
                }
                for setting in unsafe_settings {
                    tracing::warn!("redis: {setting}; running anyway (redis_unsafe = true)");
                }
            }
        }
    }
    Ok(safety)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_older_than_7_is_refused() {
        for old in ["6.2.14", "5.0.7", "6"] {
            assert!(too_old(old), "{old}");
        }
        for fine in ["7.0.15", "7.2.4", "8.2.1", "10.0", "unknown"] {
            assert!(!too_old(fine), "{fine}");
        }
    }

    fn unsafe_of(safety: &RedisSafety) -> &[String] {
        match safety {
            RedisSafety::Checked {
                unsafe_settings, ..
            } => unsafe_settings,
            RedisSafety::Unchecked { .. } => &[],
        }
    }

    #[test]
    fn only_noeviction_with_aof_is_safe_and_lazy_fsync_is_a_warning() {
        let safe = judge(Some("noeviction"), Some("yes"), Some("always"));
        assert_eq!(
            safe,
            RedisSafety::Checked {
                unsafe_settings: vec![],
                warnings: vec![]
            }
        );
        let lazy = judge(Some("noeviction"), Some("yes"), Some("everysec"));
        match &lazy {
            RedisSafety::Checked {
                unsafe_settings,
                warnings,
            } => {
                assert!(unsafe_settings.is_empty());
                assert!(warnings[0].contains("appendfsync is everysec"), "{lazy:?}");
            }
            other => panic!("{other:?}"),
        }
        let bad = judge(Some("allkeys-lru"), Some("no"), Some("everysec"));
        let reasons = unsafe_of(&bad);
        assert_eq!(reasons.len(), 2);
        assert!(reasons[0].contains("maxmemory-policy is allkeys-lru"));
        assert!(reasons[1].contains("appendonly is no"));
        let text = RedisSafetyError::Unsafe(reasons.to_vec()).to_string();
        assert!(text.contains("TARSPAY_REDIS_UNSAFE=true"), "{text}");
    }

    #[tokio::test]
    async fn a_real_redis_without_aof_is_reported() {
        let redis = local_redis::LocalRedis::start(local_redis::Durability::Off)
            .expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let safety = inspect(&mut conn).await.unwrap();
        assert_eq!(unsafe_of(&safety).len(), 1, "{safety:?}");
        assert!(unsafe_of(&safety)[0].contains("appendonly is no"));
    }
}
