//! Rate limits on calls to the payment gateway, shared by every worker process through Redis,
//! one limiter per merchant (`"default"`, `"kenya"`, …).
//!
//! A [`Limiter`] answers one question per call, in one Lua script run atomically on the Redis
//! server's clock (`TIME`, like every due time of the project): may this process call the
//! gateway now ([`Acquire::Granted`] with a [`Permit`]), or how long until it may
//! ([`Acquire::Wait`])? Three limits are decided together:
//!
//! * **Rate, by GCRA** (the generic cell rate algorithm). The only state is one number, the
//!   *theoretical arrival time* (TAT): when the next call would be due if calls came exactly
//!   one emission interval (`1 / per_second`) apart. A call conforms when `now ≥ TAT − τ`,
//!   where the burst tolerance `τ = interval · (burst − 1)`; a granted call moves the TAT one
//!   interval on. *Why GCRA:* it is a token bucket without a refill timer, so one key and one
//!   comparison decide it; it needs no per-call log (a sliding log costs memory per call) and
//!   has no window edges (a fixed window lets twice the rate through around a boundary): over
//!   any span `d`, at most `burst + d / interval` calls are granted. A refused call tells the
//!   exact moment it would conform, and writes nothing, so waiting callers do not eat rate.
//! * **Calls in flight, by leases.** A grant with `max_in_flight` set adds a lease — a random
//!   token in a sorted set, scored by its expiry (`lease_ttl` from the grant) — and
//!   [`Limiter::release`] removes it. *Why leases and not a counter:* a counter incremented
//!   by a worker that is then killed (OOM, SIGKILL, a lost host) is never decremented, and the
//!   slot leaks for good; a lease expires on its own. Every acquire first drops expired
//!   leases, so a dead worker's slot is free again `lease_ttl` after its grant. A release after
//!   expiry removes nothing (its token is gone), so it can never free somebody else's slot.
//!   Choose `lease_ttl` longer than the slowest gateway call (the client's total timeout): a
//!   call that outlives its lease no longer counts, and one more call may start.
//! * **Slow-down from the gateway.** [`Limiter::slow_down`] records a 429's `Retry-After`: no
//!   grant until it has passed, and the TAT is raised so that the burst credit is spent: after
//!   the pause calls are granted on the rate's schedule from its end, one per emission interval
//!   (no burst at a gateway that just refused us).
//!
//! The keys of one merchant share the hash tag `{<prefix>:ratelimit:<merchant>}` (`:tat`,
//! `:inflight`, `:slowed`), so the script runs on one slot of a Redis Cluster. Each key has a
//! PEXPIRE reaching just past the last moment it matters, so an idle limiter leaves nothing
//! in memory.
//!
//! Redis cost: an acquire is one `EVALSHA` (inside: `TIME`, two `GET`s, with `max_in_flight`
//! a `ZREMRANGEBYSCORE`, a `ZCARD` and, when full, a `ZRANGE`; a grant adds a `SET … PX` and,
//! with `max_in_flight`, a `ZADD`, a `PTTL` and sometimes a `PEXPIRE`); a release is one
//! `ZREM`, or nothing without `max_in_flight`; a slow-down is one `EVALSHA`.
//!
//! A refusal while every slot is leased cannot know when a holder will release: it asks for a
//! retry after the emission interval (clamped to 10–200 ms, [`IN_FLIGHT_POLL_MIN`] /
//! [`IN_FLIGHT_POLL_MAX`]) or the oldest lease's expiry, whichever is sooner.
//!
//! On a cluster redis-rs may send a script again after a dropped connection. A re-sent acquire
//! that had already been granted is granted again and only the second answer arrives: one rate
//! unit is spent unused, and the lease (same token) is written once. It errs towards fewer
//! calls, never more.
//!
//! A [`Permit`] is a plain value: dropping it releases nothing (releasing needs Redis, which
//! `Drop` cannot await). A caller that forgets [`Limiter::release`] holds its slot until the
//! lease expires.

mod script;
#[cfg(test)]
mod tests;

use crate::redis_conn::RedisConn;
use std::sync::Arc;
use std::time::Duration;

/// The longest pause [`Limiter::slow_down`] records (a longer `Retry-After` is cut to it): a
/// gateway's bogus header must not stop a merchant's payouts for days.
pub const MAX_SLOW_DOWN: Duration = Duration::from_secs(3600);
/// The fewest calls per second a [`RateLimit`] allows is 1; this is the most (one call per
/// microsecond, the script's resolution).
pub const MAX_PER_SECOND: u32 = 1_000_000;
/// The largest burst a [`RateLimit`] allows.
pub const MAX_BURST: u32 = 1_000_000;
/// The longest `lease_ttl` a [`Limiter`] takes.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Bounds of the retry hint while every in-flight slot is leased (see the module docs).
pub const IN_FLIGHT_POLL_MIN: Duration = Duration::from_millis(10);
pub const IN_FLIGHT_POLL_MAX: Duration = Duration::from_millis(200);

/// The limits of one merchant's calls to the gateway. Check with [`RateLimit::validate`]
/// ([`Limiter::new`] does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained calls per second, 1 to [`MAX_PER_SECOND`].
    pub per_second: u32,
    /// Calls that may go at once after an idle spell, 1 to [`MAX_BURST`] (1: strictly one
    /// emission interval apart).
    pub burst: u32,
    /// Calls in flight at once across every process, at least 1; `None` for no cap.
    pub max_in_flight: Option<u32>,
}

/// A [`RateLimit`] field out of range; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    #[error("per_second must be between 1 and {MAX_PER_SECOND}, got {0}")]
    PerSecond(u32),
    #[error("burst must be between 1 and {MAX_BURST}, got {0}")]
    Burst(u32),
    #[error("max_in_flight must be at least 1 when set, got 0")]
    MaxInFlight,
}

impl RateLimitError {
    /// The name of the field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::PerSecond(_) => "per_second",
            Self::Burst(_) => "burst",
            Self::MaxInFlight => "max_in_flight",
        }
    }
}

impl RateLimit {
    /// Every field in range, or the first one that is not.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        if !(1..=MAX_PER_SECOND).contains(&self.per_second) {
            return Err(RateLimitError::PerSecond(self.per_second));
        }
        if !(1..=MAX_BURST).contains(&self.burst) {
            return Err(RateLimitError::Burst(self.burst));
        }
        if self.max_in_flight == Some(0) {
            return Err(RateLimitError::MaxInFlight);
        }
        Ok(())
    }

    /// The emission interval in whole µs, rounded up (never faster than `per_second`).
    fn interval_us(&self) -> u64 {
        1_000_000u64.div_ceil(u64::from(self.per_second))
    }

    /// The GCRA's burst tolerance τ in µs.
    fn tolerance_us(&self) -> u64 {
        self.interval_us() * u64::from(self.burst - 1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("invalid rate limit: {0}")]
    InvalidLimit(#[from] RateLimitError),
    /// A constructor argument is unusable; `field` names it.
    #[error("invalid {field}: {problem}")]
    InvalidArgument {
        field: &'static str,
        problem: &'static str,
    },
    /// Redis refused the command or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered with a shape this code does not expect.
    #[error("unexpected reply from the rate-limit script: {0}")]
    Protocol(String),
    /// [`Limiter::acquire`] could not be granted within its `max_wait`: the limiter's last
    /// answer was to retry after `retry_after` (counted from when it said so).
    #[error("no gateway call allowed within {max_wait:?} (retry after {retry_after:?})")]
    Timeout {
        max_wait: Duration,
        retry_after: Duration,
    },
}

/// The answer to [`Limiter::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// Call the gateway, then [`Limiter::release`] the permit.
    Granted(Permit),
    /// Not now: no retry can succeed before this much time has passed (a hint while every
    /// in-flight slot is leased, see the module docs).
    Wait(Duration),
}

/// A granted call. A plain value: dropping it releases nothing (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    merchant: Arc<str>,
    /// The lease's token; `None` when the limit has no `max_in_flight`.
    token: Option<String>,
    /// The Redis server's clock at the grant, µs since the Unix epoch.
    granted_at_us: u64,
}

impl Permit {
    pub fn merchant(&self) -> &str {
        &self.merchant
    }

    /// The lease's token (unique per grant), when the limit caps calls in flight.
    pub fn lease_token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// When the grant was made, µs since the Unix epoch on the Redis server's clock.
    pub fn granted_at_us(&self) -> u64 {
        self.granted_at_us
    }
}

/// One script answer, with the server's clock at the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    now_us: u64,
    /// `None` when granted.
    wait_us: Option<u64>,
}

/// The keys of one merchant's limiter, sharing the hash tag `{<prefix>:ratelimit:<merchant>}`.
#[derive(Debug)]
struct Keys {
    tat: String,
    inflight: String,
    slowed: String,
}

impl Keys {
    fn new(prefix: &str, merchant: &str) -> Self {
        let tag = format!("{{{prefix}:ratelimit:{merchant}}}");
        Self {
            tat: format!("{tag}:tat"),
            inflight: format!("{tag}:inflight"),
            slowed: format!("{tag}:slowed"),
        }
    }
}

/// One merchant's limiter, shared through Redis by every process that builds one with the same
/// prefix and merchant. Cheap to clone (clones share the connection).
///
/// Every process must build it with the same [`RateLimit`]: the limit is sent with each call,
/// not stored, so processes with different limits each enforce their own against the shared
/// state (during a rolling change of the limit, the stricter one holds for its callers).
#[derive(Clone)]
pub struct Limiter {
    conn: RedisConn,
    merchant: Arc<str>,
    keys: Arc<Keys>,
    limit: RateLimit,
    lease_ttl: Duration,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("merchant", &self.merchant)
            .field("limit", &self.limit)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// A key prefix or merchant name: not empty, and no `{` or `}` (they would move the hash tag).
fn check_name(field: &'static str, name: &str) -> Result<(), LimiterError> {
    if name.is_empty() {
        return Err(LimiterError::InvalidArgument {
            field,
            problem: "must not be empty",
        });
    }
    if name.contains(['{', '}']) {
        return Err(LimiterError::InvalidArgument {
            field,
            problem: "must not contain '{' or '}'",
        });
    }
    Ok(())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Limiter {
    /// The limiter of `merchant` under the key prefix `prefix`. `lease_ttl` (1 ms to
    /// [`MAX_LEASE_TTL`]) is how long an unreleased in-flight slot stays taken; it is unused
    /// without `max_in_flight`. Sends nothing to Redis.
    pub fn new(
        conn: RedisConn,
        prefix: &str,
        merchant: &str,
        limit: RateLimit,
        lease_ttl: Duration,
    ) -> Result<Self, LimiterError> {
        limit.validate()?;
        check_name("prefix", prefix)?;
        check_name("merchant", merchant)?;
        if lease_ttl < Duration::from_millis(1) || lease_ttl > MAX_LEASE_TTL {
            return Err(LimiterError::InvalidArgument {
                field: "lease_ttl",
                problem: "must be between 1 ms and 24 h",
            });
        }
        Ok(Self {
            conn,
            merchant: merchant.into(),
            keys: Arc::new(Keys::new(prefix, merchant)),
            limit,
            lease_ttl,
        })
    }

    pub fn merchant(&self) -> &str {
        &self.merchant
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// The retry hint while every in-flight slot is leased.
    fn in_flight_poll(&self) -> Duration {
        Duration::from_micros(self.limit.interval_us())
            .clamp(IN_FLIGHT_POLL_MIN, IN_FLIGHT_POLL_MAX)
    }

    /// One acquire script call: the decision, and the permit if granted.
    async fn decide(&self) -> Result<(Decision, Option<Permit>), LimiterError> {
        let token = self
            .limit
            .max_in_flight
            .map(|_| format!("{:032x}", rand::random::<u128>()));
        let reply: Vec<i64> = script::ACQUIRE
            .key(&self.keys.tat)
            .key(&self.keys.inflight)
            .key(&self.keys.slowed)
            .arg(self.limit.interval_us())
            .arg(self.limit.tolerance_us())
            .arg(self.limit.max_in_flight.unwrap_or(0))
            .arg(micros(self.lease_ttl))
            .arg(token.as_deref().unwrap_or(""))
            .arg(micros(self.in_flight_poll()))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let (granted, now_us, third) = match reply[..] {
            [granted, now_us, third] if now_us >= 0 && third >= 0 => (granted, now_us, third),
            _ => return Err(LimiterError::Protocol(format!("{reply:?}"))),
        };
        let now_us = now_us as u64;
        match granted {
            1 => {
                let permit = Permit {
                    merchant: self.merchant.clone(),
                    token,
                    granted_at_us: now_us,
                };
                Ok((
                    Decision {
                        now_us,
                        wait_us: None,
                    },
                    Some(permit),
                ))
            }
            0 if third > 0 => Ok((
                Decision {
                    now_us,
                    wait_us: Some(third as u64),
                },
                None,
            )),
            _ => Err(LimiterError::Protocol(format!("{reply:?}"))),
        }
    }

    /// One attempt: granted now, or told how long to wait. A refusal consumes nothing.
    pub async fn try_acquire(&self) -> Result<Acquire, LimiterError> {
        Ok(match self.decide().await? {
            (_, Some(permit)) => Acquire::Granted(permit),
            (decision, None) => Acquire::Wait(Duration::from_micros(decision.wait_us.unwrap_or(0))),
        })
    }

    /// Tries until granted, sleeping each time the limiter's answer plus a little jitter (so
    /// the waiters told the same moment do not all come back at once). Gives up with
    /// [`LimiterError::Timeout`] as soon as the answer lies beyond `max_wait` from the call,
    /// without sleeping towards it, so the caller can reschedule its work instead. Redis
    /// errors are returned at once (the connection reconnects on its own; the caller decides
    /// whether to retry).
    pub async fn acquire(&self, max_wait: Duration) -> Result<Permit, LimiterError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            match self.try_acquire_by(deadline, max_wait).await? {
                Acquire::Granted(permit) => return Ok(permit),
                Acquire::Wait(sleep) => tokio::time::sleep(sleep).await,
            }
        }
    }

    /// One try of [`Self::acquire`] (begun with `max_wait`, so due by `deadline`), for a
    /// caller that does something else while it sleeps: granted, or how long to sleep before
    /// the next try (the limiter's answer plus jitter, at most until `deadline`), or
    /// [`LimiterError::Timeout`] when the answer lies beyond `deadline`.
    pub async fn try_acquire_by(
        &self,
        deadline: tokio::time::Instant,
        max_wait: Duration,
    ) -> Result<Acquire, LimiterError> {
        let wait = match self.try_acquire().await? {
            Acquire::Granted(permit) => return Ok(Acquire::Granted(permit)),
            Acquire::Wait(wait) => wait,
        };
        let now = tokio::time::Instant::now();
        if now + wait > deadline {
            return Err(LimiterError::Timeout {
                max_wait,
                retry_after: wait,
            });
        }
        Ok(Acquire::Wait(
            (wait + jitter(wait)).min(deadline.saturating_duration_since(now)),
        ))
    }

    /// Gives back the permit's in-flight slot. Returns whether its lease was still held:
    /// `false` when it had expired (the call outlived `lease_ttl`) or the limit has no
    /// `max_in_flight`; either way nothing else is touched.
    pub async fn release(&self, permit: Permit) -> Result<bool, LimiterError> {
        let Some(token) = permit.token else {
            return Ok(false);
        };
        let removed: i64 = redis::cmd("ZREM")
            .arg(&self.keys.inflight)
            .arg(token)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(removed == 1)
    }

    /// The gateway answered 429 with `Retry-After: pause`: no grant, in any process, until
    /// `pause` (at most [`MAX_SLOW_DOWN`]) has passed on the server's clock; then calls
    /// resume one per emission interval from the pause's end, without a burst. A pause never
    /// shortens one already recorded.
    pub async fn slow_down(&self, pause: Duration) -> Result<(), LimiterError> {
        self.slow_down_until_us(pause).await.map(|_| ())
    }

    /// [`Self::slow_down`], returning the pause's end (µs, server clock).
    async fn slow_down_until_us(&self, pause: Duration) -> Result<u64, LimiterError> {
        let until: i64 = script::SLOW_DOWN
            .key(&self.keys.tat)
            .key(&self.keys.slowed)
            .arg(micros(pause.min(MAX_SLOW_DOWN)))
            .arg(self.limit.tolerance_us())
            .invoke_async(&mut self.conn.clone())
            .await?;
        u64::try_from(until).map_err(|_| LimiterError::Protocol(until.to_string()))
    }
}

/// A random extra sleep of up to a tenth of `wait`, between 1 and 20 ms at most.
fn jitter(wait: Duration) -> Duration {
    let ceiling = (wait / 10).clamp(Duration::from_millis(1), Duration::from_millis(20));
    Duration::from_micros(rand::random_range(0..=micros(ceiling)))
}
