//! Outcome webhooks: every entry of the ledger's outcome stream is also POSTed to the
//! application's URL, signed in the [Standard Webhooks](https://www.standardwebhooks.com/) form.
//! The stream stays the source of truth; webhooks are a push on top of it, delivered at least
//! once.
//!
//! # Model
//! * A consumer group ([`WebhookOptions::group`], `webhooks`) on the outcome stream, created
//!   from id `0` with `MKSTREAM`, so outcomes written before the first start are delivered too.
//! * Each process is one consumer ([`crate::queue::worker_identity`]). It reads with
//!   `XREADGROUP COUNT n BLOCK ms` on its own connection, delivers up to
//!   [`WebhookOptions::max_in_flight`] outcomes at a time, and acknowledges (`XACK`) an entry only
//!   after a 2xx answer. A failing delivery is retried with exponential backoff and jitter, capped
//!   at [`WebhookOptions::retry_max_delay`], until a 2xx or shutdown, always with the same
//!   `webhook-id` (`msg_` + the stream entry id) and body; the timestamp and signature are those
//!   of each attempt.
//! * Recovery: a consumer first re-reads its own pending entries (id `0`), again after every
//!   Redis error (a lost `XREADGROUP` reply leaves entries assigned but unseen). Every
//!   [`WebhookOptions::claim_interval`] it takes over entries idle longer than
//!   [`WebhookOptions::claim_idle`] (`XAUTOCLAIM`): those of crashed consumers. A live consumer
//!   renews an entry it is still retrying (`XCLAIM … JUSTID`, which resets the idle time) before
//!   every retry, and stops retrying if the entry is no longer its own, so a slow receiver never
//!   gets the same outcome from two deliverers at once.
//! * Shutdown stops new attempts, lets acknowledgements finish, then hands this consumer's
//!   unacknowledged entries back (their idle time is set past any claim threshold) so the next
//!   deliverer to start (or any live one) takes them over at once; with nothing pending the
//!   consumer is deleted. Consumers with nothing pending that have been idle for
//!   [`WebhookOptions::consumer_expiry`] are deleted during claim scans.
//! * Redis errors never end the loop: it backs off (jittered, capped at 2 s) and continues.
//!
//! Receivers must deduplicate on `webhook-id`: a crash or shutdown between a 2xx and its `XACK`
//! sends that outcome again. An entry trimmed from the stream (`outcome_max_len`) before its
//! delivery cannot be sent and is acknowledged with an error in the log.
//!
//! The secret is never logged, and neither is the URL (it may carry credentials); logs name the
//! host only.

use crate::ledger::Outcome;
use crate::secret::Secret;
use crate::worker::Deployment;
use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::Sha256;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// A secret starting with this is `whsec_` + base64 of the key bytes.
pub const SECRET_PREFIX: &str = "whsec_";
pub const DEFAULT_GROUP: &str = "webhooks";

/// The `webhook-id` of the outcome stored under stream entry `entry_id`.
pub fn webhook_id(entry_id: &str) -> String {
    format!("msg_{entry_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The secret is unusable; the message never contains it.
    #[error("webhook_secret {0}")]
    Secret(&'static str),
    #[error("webhook_url must be an absolute http:// or https:// URL")]
    Url,
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
    #[error("invalid webhook options: {0}")]
    Options(&'static str),
}

type HmacSha256 = Hmac<Sha256>;

/// Computes and checks Standard Webhooks signatures:
/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
///
/// The key is the base64-decoded rest of a secret starting with `whsec_`, otherwise the
/// secret's UTF-8 bytes. `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSigner {
    keyed: HmacSha256,
}

impl std::fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSigner { key: [redacted] }")
    }
}

impl WebhookSigner {
    pub fn new(secret: &Secret) -> Result<Self, WebhookError> {
        let text = secret.expose();
        let key = match text.strip_prefix(SECRET_PREFIX) {
            Some(encoded) => STANDARD_PAD_INDIFFERENT
                .decode(encoded.trim())
                .map_err(|_| {
                    WebhookError::Secret("starts with whsec_ but the rest is not base64")
                })?,
            None => text.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err(WebhookError::Secret("is empty"));
        }
        let keyed = HmacSha256::new_from_slice(&key)
            .map_err(|_| WebhookError::Secret("cannot key HMAC-SHA256"))?;
        Ok(Self { keyed })
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for this message id, Unix timestamp (seconds) and body.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// The three Standard Webhooks headers for one attempt.
    pub fn headers(&self, id: &str, timestamp: u64, body: &[u8]) -> [(&'static str, String); 3] {
        [
            (HEADER_ID, id.to_owned()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_SIGNATURE, self.sign(id, timestamp, body)),
        ]
    }

    /// True if any `v1,` signature in the space-separated `signature_header` matches
    /// (constant-time comparison). `timestamp` is the header's text as received. Checking that
    /// the timestamp is recent (Standard Webhooks suggests 5 minutes) is the receiver's part.
    pub fn verify(&self, id: &str, timestamp: &str, body: &[u8], signature_header: &str) -> bool {
        signature_header
            .split(' ')
            .filter_map(|candidate| candidate.strip_prefix("v1,"))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .any(|tag| self.mac(id, timestamp, body).verify_slice(&tag).is_ok())
    }
}

/// Tuning of the deliverer. [`Default`] suits production; tests shorten the timers.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Consumer group on the outcome stream.
    pub group: String,
    /// Outcomes delivered at the same time.
    pub max_in_flight: usize,
    /// XREADGROUP BLOCK time.
    pub block: Duration,
    /// An entry unacknowledged and not renewed for this long belongs to a dead consumer and is
    /// taken over.
    pub claim_idle: Duration,
    /// How often to look for such entries.
    pub claim_interval: Duration,
    /// First retry delay; doubles per attempt up to `retry_max_delay`, with jitter.
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    pub connect_timeout: Duration,
    /// Bound on one whole attempt (connect, send, answer).
    pub request_timeout: Duration,
    /// Bound on one Redis command (plus `block` for the blocking read).
    pub redis_timeout: Duration,
    /// Consumers with nothing pending, idle this long, are deleted from the group.
    pub consumer_expiry: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            group: DEFAULT_GROUP.to_owned(),
            max_in_flight: 8,
            block: Duration::from_secs(5),
            claim_idle: Duration::from_secs(5 * 60),
            claim_interval: Duration::from_secs(30),
            retry_min_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            redis_timeout: Duration::from_secs(5),
            consumer_expiry: Duration::from_secs(60 * 60),
        }
    }
}

impl WebhookOptions {
    pub fn validate(&self) -> Result<(), WebhookError> {
        let fail = |why| Err(WebhookError::Options(why));
        if self.group.is_empty() {
            return fail("group must not be empty");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1000 {
            return fail("max_in_flight must be between 1 and 1000");
        }
        let positive = [
            self.block,
            self.claim_interval,
            self.retry_min_delay,
            self.connect_timeout,
            self.request_timeout,
            self.redis_timeout,
        ];
        if positive.iter().any(Duration::is_zero) {
            return fail("every duration must be positive");
        }
        if self.retry_min_delay > self.retry_max_delay {
            return fail("retry_min_delay must not exceed retry_max_delay");
        }
        // A live consumer renews its entries before each retry; the longest gap between two
        // renewals (one attempt plus one delay) must stay under the claim threshold, or a
        // second deliverer would take over an outcome that is still being retried.
        if self.request_timeout + self.retry_max_delay >= self.claim_idle {
            return fail("claim_idle must exceed request_timeout + retry_max_delay");
        }
        if self.block >= self.claim_idle || self.consumer_expiry < self.claim_idle {
            return fail("block must be under claim_idle, and consumer_expiry at least claim_idle");
        }
        Ok(())
    }
}

/// Delivers outcome webhooks until `shutdown` resolves, with [`WebhookOptions::default`].
/// Returns an error only for unusable settings; Redis and HTTP failures are retried forever.
pub async fn run(
    deployment: &Deployment,
    url: &str,
    secret: &Secret,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    run_with(deployment, url, secret, WebhookOptions::default(), shutdown).await
}

/// [`run`] with explicit options.
pub async fn run_with(
    deployment: &Deployment,
    url: &str,
    secret: &Secret,
    options: WebhookOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    options.validate()?;
    let url = reqwest::Url::parse(url).map_err(|_| WebhookError::Url)?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(WebhookError::Url);
    }
    let signer = WebhookSigner::new(secret)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .timeout(options.request_timeout)
        // A redirect would turn the POST into a GET without the body; count it as a failure.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tarspay-worker/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(50))
        .build()
        .map_err(|err| WebhookError::Client(err.without_url().to_string()))?;
    let client = deployment.queue.client().clone();
    let manager = |timeout: Duration| {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(options.redis_timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|err| WebhookError::Client(format!("redis: {err}")))
    };
    let conn = manager(options.redis_timeout)?;
    // The blocking read gets its own connection: commands queued behind a BLOCK would wait.
    let blocking = manager(options.redis_timeout + options.block)?;
    let host = url.host_str().unwrap_or_default().to_owned();
    let inner = Arc::new(Inner {
        http,
        url,
        signer,
        conn,
        stream: deployment.ledger.keys().outcomes(),
        consumer: crate::queue::worker_identity("webhooks"),
        options,
        stop: CancellationToken::new(),
    });
    tracing::info!(
        host = %host,
        consumer = %inner.consumer,
        group = %inner.options.group,
        "outcome webhooks starting"
    );
    let mut deliverer = Deliverer {
        inner,
        blocking,
        tasks: JoinSet::new(),
        in_flight: HashMap::new(),
    };
    tokio::select! {
        () = shutdown => {}
        never = deliverer.deliver_forever() => match never {},
    }
    deliverer.shutdown().await;
    Ok(())
}

/// What every delivery task shares.
struct Inner {
    http: reqwest::Client,
    url: reqwest::Url,
    signer: WebhookSigner,
    conn: ConnectionManager,
    stream: String,
    consumer: String,
    options: WebhookOptions,
    stop: CancellationToken,
}

/// One outcome stream entry; `outcome` is `None` when the entry is gone (trimmed) but still
/// listed in a pending list.
#[derive(Debug)]
struct Entry {
    id: String,
    outcome: Option<Outcome>,
}

enum Source {
    /// Re-reading this consumer's pending list after this id.
    Pending(String),
    /// Reading new entries (`>`).
    New,
}

struct ClaimScan {
    cursor: String,
    next_at: Instant,
}

struct Deliverer {
    inner: Arc<Inner>,
    blocking: ConnectionManager,
    tasks: JoinSet<()>,
    /// Task → stream entry id, for the deliveries running now.
    in_flight: HashMap<Id, String>,
}

fn redis_backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The wait after failed attempt number `attempt` (1-based): the capped exponential, of which
/// the upper half is random ("equal jitter"), so receivers coming back are not hit in step.
fn retry_delay(attempt: u32, min: Duration, max: Duration) -> Duration {
    let ceiling = min
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let half = ceiling / 2;
    let spread = (ceiling - half).as_millis() as u64;
    half + Duration::from_millis(rand::random_range(0..=spread))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A reqwest error and its causes on one line, without the URL.
fn describe(err: reqwest::Error) -> String {
    crate::gateway::error::error_chain(&err.without_url())
}

impl Deliverer {
    async fn deliver_forever(&mut self) -> Infallible {
        let mut backoff: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
        let mut need_group = true;
        let mut source = Source::Pending("0".to_owned());
        let mut claim = ClaimScan {
            cursor: "0-0".to_owned(),
            next_at: Instant::now(),
        };
        loop {
            while let Some(done) = self.tasks.try_join_next_with_id() {
                self.finished(done);
            }
            let room = self
                .inner
                .options
                .max_in_flight
                .saturating_sub(self.tasks.len());
            if room == 0 {
                if let Some(done) = self.tasks.join_next_with_id().await {
                    self.finished(done);
                }
                continue;
            }
            match self
                .step(room, &mut need_group, &mut source, &mut claim)
                .await
            {
                Ok(()) => backoff = None,
                Err(err) => {
                    let delay = backoff
                        .get_or_insert_with(|| Box::new(redis_backoff()))
                        .next()
                        .unwrap_or(Duration::from_secs(2));
                    tracing::warn!(
                        error = %err,
                        retry_in_ms = delay.as_millis() as u64,
                        "outcome webhooks: redis error, backing off"
                    );
                    // The group may be gone (Redis restarted empty) and a lost read reply may
                    // have assigned entries to us: recreate if needed and re-read our own.
                    need_group = true;
                    source = Source::Pending("0".to_owned());
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn step(
        &mut self,
        room: usize,
        need_group: &mut bool,
        source: &mut Source,
        claim: &mut ClaimScan,
    ) -> Result<(), redis::RedisError> {
        if *need_group {
            self.inner.ensure_group().await?;
            *need_group = false;
        }
        if Instant::now() >= claim.next_at {
            let (cursor, claimed) = self.inner.autoclaim(&claim.cursor, room).await?;
            if cursor == "0-0" {
                claim.next_at = Instant::now() + self.inner.options.claim_interval;
                match self.inner.forget_idle_consumers().await {
                    Ok(0) => {}
                    Ok(removed) => {
                        tracing::info!(removed, "outcome webhooks: removed idle consumers")
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "outcome webhooks: consumer cleanup failed")
                    }
                }
            }
            claim.cursor = cursor;
            if !claimed.is_empty() {
                tracing::info!(
                    entries = claimed.len(),
                    "outcome webhooks: took over undelivered outcomes"
                );
                self.start_all(claimed);
                return Ok(());
            }
        }
        let entries = match source {
            Source::Pending(after) => {
                let entries = self.inner.read_pending(after, room).await?;
                match entries.last() {
                    Some(last) => *after = last.id.clone(),
                    None => *source = Source::New,
                }
                entries
            }
            Source::New => self.read_new(room).await?,
        };
        self.start_all(entries);
        Ok(())
    }

    async fn read_new(&mut self, count: usize) -> Result<Vec<Entry>, redis::RedisError> {
        let inner = &self.inner;
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&inner.options.group)
            .arg(&inner.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(inner.options.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&inner.stream)
            .arg(">")
            .query_async(&mut self.blocking)
            .await?;
        parse_read_reply(&reply)
    }

    fn start_all(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if self.in_flight.values().any(|id| *id == entry.id) {
                continue;
            }
            let id = entry.id.clone();
            let handle = self.tasks.spawn(Arc::clone(&self.inner).deliver(entry));
            self.in_flight.insert(handle.id(), id);
        }
    }

    fn finished(&mut self, done: Result<(Id, ()), tokio::task::JoinError>) {
        match done {
            Ok((task, ())) => {
                self.in_flight.remove(&task);
            }
            Err(err) => {
                let entry = self.in_flight.remove(&err.id());
                if err.is_panic() {
                    // Left unacknowledged: taken over again once idle past claim_idle.
                    tracing::error!(entry = ?entry, "outcome webhook delivery panicked");
                }
            }
        }
    }

    /// Stops attempts, lets acknowledgements finish, hands pending entries back.
    async fn shutdown(mut self) {
        self.inner.stop.cancel();
        let grace = self.inner.options.redis_timeout * 2;
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = self.tasks.join_next_with_id().await {
                self.finished(done);
            }
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        match tokio::time::timeout(grace, self.inner.release()).await {
            Ok(Ok(0)) => tracing::info!("outcome webhooks stopped; nothing left pending"),
            Ok(Ok(handed)) => tracing::info!(
                handed,
                "outcome webhooks stopped; undelivered outcomes handed to the next deliverer"
            ),
            Ok(Err(err)) => tracing::warn!(
                error = %err,
                "outcome webhooks stopped; pending outcomes will be taken over after claim_idle"
            ),
            Err(_) => tracing::warn!(
                "outcome webhooks stopped; redis did not answer, pending outcomes will be taken over after claim_idle"
            ),
        }
    }
}

/// Resets the idle time of an entry still pending for this consumer; 0 if it is not (taken
/// over by another consumer, or acknowledged).
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] == nil or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
",
    )
});

/// Makes this consumer's pending entries look idle for ARGV[3] ms, so the next claim scan of
/// any deliverer takes them; deletes the consumer when nothing is pending.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for _, e in ipairs(pending) do args[#args + 1] = e[1] end
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[3]
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return #pending
",
    )
});

/// Deletes consumers other than ARGV[2] with nothing pending, idle at least ARGV[3] ms.
static FORGET_IDLE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and f['pending'] == 0 and f['idle'] >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
",
    )
});

impl Inner {
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn ensure_group(&self) -> Result<(), redis::RedisError> {
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.options.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(err) if err.code() != Some("BUSYGROUP") => Err(err),
            _ => Ok(()),
        }
    }

    async fn read_pending(
        &self,
        after: &str,
        count: usize,
    ) -> Result<Vec<Entry>, redis::RedisError> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(after)
            .query_async(&mut self.conn())
            .await?;
        parse_read_reply(&reply)
    }

    /// One XAUTOCLAIM step: the next cursor and the entries taken over.
    async fn autoclaim(
        &self,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<Entry>), redis::RedisError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg(self.options.claim_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        parse_autoclaim_reply(&reply)
    }

    async fn forget_idle_consumers(&self) -> Result<i64, redis::RedisError> {
        FORGET_IDLE
            .key(&self.stream)
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg(self.options.consumer_expiry.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
    }

    async fn renew(&self, id: &str) -> Result<bool, redis::RedisError> {
        let renewed: i64 = RENEW
            .key(&self.stream)
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg(id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self) -> Result<i64, redis::RedisError> {
        let idle = self
            .options
            .claim_idle
            .max(Duration::from_secs(24 * 60 * 60));
        RELEASE
            .key(&self.stream)
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg(idle.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Acknowledges `id`, retrying Redis errors until done or stopped. The first try always
    /// runs, so a delivery finished during shutdown is still acknowledged.
    async fn ack(&self, id: &str) {
        let mut backoff = redis_backoff();
        loop {
            let acked: Result<i64, redis::RedisError> = redis::cmd("XACK")
                .arg(&self.stream)
                .arg(&self.options.group)
                .arg(id)
                .query_async(&mut self.conn())
                .await;
            let Err(err) = acked else { return };
            let delay = backoff.next().unwrap_or(Duration::from_secs(2));
            tracing::warn!(entry = %id, error = %err, "outcome webhooks: XACK failed, retrying");
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One signed POST; `Ok` on a 2xx, otherwise why not.
    async fn post(&self, webhook_id: &str, body: Bytes) -> Result<reqwest::StatusCode, String> {
        let timestamp = unix_now();
        let mut request = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in self.signer.headers(webhook_id, timestamp, &body) {
            request = request.header(name, value);
        }
        let response = request.body(body).send().await.map_err(describe)?;
        let status = response.status();
        if status.is_success() {
            Ok(status)
        } else {
            Err(format!("HTTP {status}"))
        }
    }

    /// Delivers one entry until a 2xx (then acknowledges it), shutdown, or the entry is no
    /// longer this consumer's.
    async fn deliver(self: Arc<Self>, entry: Entry) {
        let Some(outcome) = entry.outcome else {
            tracing::error!(
                entry = %entry.id,
                "outcome was trimmed from the stream before its webhook was delivered; skipped"
            );
            self.ack(&entry.id).await;
            return;
        };
        let body = match serde_json::to_vec(&outcome) {
            Ok(body) => Bytes::from(body),
            Err(err) => {
                // Not expected for plain strings and numbers; left pending for a later try.
                tracing::error!(entry = %entry.id, error = %err, "cannot encode outcome");
                return;
            }
        };
        let webhook_id = webhook_id(&entry.id);
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            if attempt > 1 {
                match self.renew(&entry.id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(
                            webhook_id = %webhook_id,
                            "outcome webhook taken over or acknowledged elsewhere; stopping here"
                        );
                        return;
                    }
                    Err(err) => tracing::warn!(
                        webhook_id = %webhook_id,
                        error = %err,
                        "cannot renew the pending outcome; delivering anyway"
                    ),
                }
            }
            let sent = tokio::select! {
                () = self.stop.cancelled() => return,
                sent = self.post(&webhook_id, body.clone()) => sent,
            };
            match sent {
                Ok(status) => {
                    metrics::counter!(crate::metrics::WEBHOOKS, "result" => "delivered")
                        .increment(1);
                    tracing::debug!(
                        webhook_id = %webhook_id,
                        mch_order_no = %outcome.mch_order_no,
                        attempt,
                        status = status.as_u16(),
                        "outcome webhook delivered"
                    );
                    break;
                }
                Err(reason) => {
                    metrics::counter!(crate::metrics::WEBHOOKS, "result" => "failed").increment(1);
                    let delay = retry_delay(
                        attempt,
                        self.options.retry_min_delay,
                        self.options.retry_max_delay,
                    );
                    tracing::warn!(
                        webhook_id = %webhook_id,
                        mch_order_no = %outcome.mch_order_no,
                        attempt,
                        reason = %reason,
                        retry_in_ms = delay.as_millis() as u64,
                        "outcome webhook failed"
                    );
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.ack(&entry.id).await;
    }
}

fn protocol(what: &str, value: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply",
        format!("{what}: {value:?}"),
    ))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// `[id, [field, value, …]]`; fields are nil for an entry deleted while pending.
fn parse_entry(value: &Value) -> Result<Entry, redis::RedisError> {
    let Value::Array(parts) = value else {
        return Err(protocol("stream entry", value));
    };
    let id = parts
        .first()
        .and_then(text)
        .ok_or_else(|| protocol("stream entry", value))?;
    let fields: Option<HashMap<String, Value>> = match parts.get(1) {
        Some(Value::Array(flat)) => Some(
            flat.chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, pair.get(1)?.clone())))
                .collect(),
        ),
        Some(Value::Map(pairs)) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, v.clone())))
                .collect(),
        ),
        Some(Value::Nil) | None => None,
        Some(_) => return Err(protocol("stream entry", value)),
    };
    let outcome = fields
        .filter(|fields| !fields.is_empty())
        .map(|fields| Outcome::from_fields(&fields))
        .transpose()
        .map_err(|reason| protocol(&format!("outcome entry ({reason})"), value))?;
    Ok(Entry { id, outcome })
}

fn parse_entries(value: &Value) -> Result<Vec<Entry>, redis::RedisError> {
    match value {
        // Redis 6.2 lists entries deleted while pending as nil in XAUTOCLAIM replies.
        Value::Array(items) => items
            .iter()
            .filter(|item| !matches!(item, Value::Nil))
            .map(parse_entry)
            .collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(protocol("stream entries", value)),
    }
}

/// XREADGROUP on one stream, RESP2 (`[[name, entries]]`) or RESP3 (`{name: entries}`).
fn parse_read_reply(value: &Value) -> Result<Vec<Entry>, redis::RedisError> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => match streams.first() {
            Some(Value::Array(pair)) => pair.get(1).map_or(Ok(Vec::new()), parse_entries),
            None => Ok(Vec::new()),
            _ => Err(protocol("XREADGROUP", value)),
        },
        Value::Map(streams) => streams
            .first()
            .map_or(Ok(Vec::new()), |(_, entries)| parse_entries(entries)),
        _ => Err(protocol("XREADGROUP", value)),
    }
}

/// `[cursor, entries, deleted ids]` (the last since Redis 7; those leave the PEL by themselves).
fn parse_autoclaim_reply(value: &Value) -> Result<(String, Vec<Entry>), redis::RedisError> {
    let Value::Array(parts) = value else {
        return Err(protocol("XAUTOCLAIM", value));
    };
    let cursor = parts
        .first()
        .and_then(text)
        .ok_or_else(|| protocol("XAUTOCLAIM", value))?;
    let entries = parts.get(1).map_or(Ok(Vec::new()), parse_entries)?;
    Ok((cursor, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> WebhookSigner {
        WebhookSigner::new(&Secret::new(secret)).unwrap()
    }

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        // The reference implementations' published vector: a receiver's stock library
        // accepts what we send only if this matches exactly.
        let signer = signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            expected
        );
        assert!(signer.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body, expected));
        // Any of several space-separated signatures may match.
        assert!(signer.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            body,
            &format!("v1,bm9wZQ== v2,xyz {expected}")
        ));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let signer = signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let good = signer.sign("msg_1", 100, b"{}");
        assert!(signer.verify("msg_1", "100", b"{}", &good));
        assert!(!signer.verify("msg_1", "100", b"{ }", &good));
        assert!(!signer.verify("msg_2", "100", b"{}", &good));
        assert!(!signer.verify("msg_1", "101", b"{}", &good));
        assert!(!signer.verify("msg_1", "100", b"{}", &good.replace("v1,", "v2,")));
        assert!(!signer.verify("msg_1", "100", b"{}", "v1,not-base64!"));
        assert!(!signer.verify("msg_1", "100", b"{}", ""));
        let other = self::signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSx");
        assert!(!other.verify("msg_1", "100", b"{}", &good));
    }

    #[test]
    fn plain_secrets_are_their_utf8_bytes() {
        // "whsec_" + base64("plain key") signs like the plain string "plain key".
        let plain = signer("plain key");
        let encoded = signer(&format!("whsec_{}", STANDARD.encode("plain key")));
        assert_eq!(plain.sign("msg_1", 7, b"x"), encoded.sign("msg_1", 7, b"x"));
        // Without the prefix, a base64-looking secret is not decoded.
        let raw = signer("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let decoded = signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_ne!(raw.sign("msg_1", 7, b"x"), decoded.sign("msg_1", 7, b"x"));
    }

    #[test]
    fn unusable_secrets_are_refused_without_showing_them() {
        for bad in ["", "whsec_", "whsec_%%%not base64%%%"] {
            let err = WebhookSigner::new(&Secret::new(bad)).unwrap_err();
            assert!(!err.to_string().contains("not base64%%%"), "{err}");
        }
        // Unpadded base64 is accepted too.
        assert!(WebhookSigner::new(&Secret::new("whsec_YWJj")).is_ok());
        assert!(WebhookSigner::new(&Secret::new("whsec_YWI")).is_ok());
        let debug = format!("{:?}", signer("hunter2"));
        assert!(!debug.contains("hunter2"));
    }

    #[test]
    fn headers_carry_id_timestamp_and_signature() {
        let signer = signer("k");
        let headers = signer.headers("msg_1-0", 42, b"{}");
        assert_eq!(headers[0], (HEADER_ID, "msg_1-0".to_owned()));
        assert_eq!(headers[1], (HEADER_TIMESTAMP, "42".to_owned()));
        assert_eq!(headers[2].0, HEADER_SIGNATURE);
        assert!(signer.verify("msg_1-0", "42", b"{}", &headers[2].1));
        assert_eq!(webhook_id("1712345678901-3"), "msg_1712345678901-3");
    }

    #[test]
    fn retry_delays_grow_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 1..60 {
            let ceiling = min.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            for _ in 0..20 {
                let delay = retry_delay(attempt, min, max);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{attempt}: {delay:?}"
                );
            }
        }
        let draws: std::collections::HashSet<_> =
            (0..100).map(|_| retry_delay(10, min, max)).collect();
        assert!(draws.len() > 10);
    }

    #[test]
    fn default_options_are_valid_and_checks_hold() {
        WebhookOptions::default().validate().unwrap();
        let bad = [
            WebhookOptions {
                max_in_flight: 0,
                ..Default::default()
            },
            WebhookOptions {
                claim_idle: Duration::from_secs(60),
                ..Default::default()
            },
            WebhookOptions {
                retry_min_delay: Duration::from_secs(120),
                ..Default::default()
            },
            WebhookOptions {
                block: Duration::ZERO,
                ..Default::default()
            },
        ];
        for options in bad {
            assert!(options.validate().is_err(), "{options:?}");
        }
    }

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_in_both_protocols_and_keep_deleted_entries() {
        let fields = Value::Array(vec![
            bulk("kind"),
            bulk("payout"),
            bulk("mchOrderNo"),
            bulk("A-1"),
            bulk("status"),
            bulk("succeeded"),
            bulk("currency"),
            bulk("INR"),
            bulk("attempts"),
            bulk("2"),
        ]);
        let entries = Value::Array(vec![
            Value::Array(vec![bulk("1-0"), fields]),
            Value::Array(vec![bulk("2-0"), Value::Nil]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), entries.clone()])]);
        let resp3 = Value::Map(vec![(bulk("s"), entries.clone())]);
        for reply in [resp2, resp3] {
            let parsed = parse_read_reply(&reply).unwrap();
            assert_eq!(parsed.len(), 2);
            let outcome = parsed[0].outcome.as_ref().unwrap();
            assert_eq!(
                (outcome.mch_order_no.as_str(), outcome.attempts),
                ("A-1", 2)
            );
            assert_eq!(parsed[1].id, "2-0");
            assert!(parsed[1].outcome.is_none());
        }
        assert!(parse_read_reply(&Value::Nil).unwrap().is_empty());
        let claimed = Value::Array(vec![bulk("0-0"), entries, Value::Array(vec![])]);
        let (cursor, parsed) = parse_autoclaim_reply(&claimed).unwrap();
        assert_eq!((cursor.as_str(), parsed.len()), ("0-0", 2));
        assert!(parse_read_reply(&Value::Int(3)).is_err());
    }

    /// `run` must be spawnable (its future is `Send`).
    #[allow(dead_code)]
    fn run_is_send(deployment: &Deployment, secret: &Secret) {
        fn is_send<T: Send>(_: T) {}
        is_send(run(
            deployment,
            "http://127.0.0.1/",
            secret,
            std::future::pending(),
        ));
    }
}
