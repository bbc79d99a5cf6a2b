//! One client and one connection type for a single Redis and a Redis Cluster, so every
//! module (queue, ledger, guard, audit) runs the same commands and scripts on both.
//!
//! * `TARSPAY_REDIS_URL` is one URL or a comma-separated list of seeds. With `redis_cluster =
//!   "auto"` (the default) the first reachable seed is asked `INFO cluster`: `cluster_enabled:1`
//!   means cluster mode. `"on"` / `"off"` force it.
//! * On a cluster, redis-rs routes each command and script by its first key, answers MOVED/ASK
//!   and re-sends after a dropped connection, so every script here must be safe to run twice
//!   (they are: each checks state before it writes). Every command, script and pipeline
//!   touches keys of one hash tag (one slot).
//! * A blocking command (`XREADGROUP BLOCK`) shares a node's multiplexed connection on a
//!   cluster too: callers that block open a connection of their own ([`RedisClient::connect`]).
//! * On a single node, the connection is rebuilt (a new connection to the URL's host, its name
//!   resolved again) when the node it reaches answers as a replica (`READONLY`, or a refused
//!   `WAIT`: demoted by a failover) or leaves [`REBUILD_AFTER_TIMEOUTS`] commands in a row
//!   unanswered while answering nothing for a whole response timeout (frozen):
//!   redis-rs reconnects only when a connection drops, so a demoted or frozen old primary
//!   would otherwise hold every command after the name moved to the new one.

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, ServerError,
    ServerErrorKind, Value,
};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Whether the deployment's Redis is a cluster (`redis_cluster`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterMode {
    /// Ask the first reachable seed (`INFO cluster`).
    #[default]
    Auto,
    /// A cluster, whatever the server says (it refuses cluster commands if it is not one).
    On,
    /// A single node (or a primary behind Sentinel / a proxy).
    Off,
}

impl std::str::FromStr for ClusterMode {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "on" | "true" => Ok(Self::On),
            "off" | "false" => Ok(Self::Off),
            _ => Err("must be auto, on or off"),
        }
    }
}

/// How long to wait for a connection and for an answer.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(5),
        }
    }
}

/// A client of a single Redis or of a Redis Cluster.
#[derive(Clone)]
pub enum RedisClient {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

impl std::fmt::Debug for RedisClient {
    // Never the URL: it may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisClient::Single",
            Self::Cluster(_) => "RedisClient::Cluster",
        })
    }
}

/// The seeds of a URL setting: one URL, or several separated by commas.
pub fn seeds(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .collect()
}

impl RedisClient {
    /// A client for `urls` (see the module docs); with [`ClusterMode::Auto`] one seed is
    /// asked whether it is a cluster node.
    pub async fn open(urls: &str, mode: ClusterMode) -> Result<Self, RedisError> {
        let seeds = seeds(urls);
        let cluster = match mode {
            ClusterMode::On => true,
            ClusterMode::Off => false,
            ClusterMode::Auto => is_cluster_node(&seeds).await?,
        };
        if cluster {
            let infos = seeds
                .iter()
                .map(|seed| seed.into_connection_info())
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Self::Cluster(Box::new(
                ClusterClient::builder(infos).build()?,
            )))
        } else {
            let first = seeds.first().copied().unwrap_or(urls);
            Ok(Self::Single(redis::Client::open(first)?))
        }
    }

    /// A single-node client for one URL, without asking the server.
    pub fn single(url: &str) -> Result<Self, RedisError> {
        Ok(Self::Single(redis::Client::open(url)?))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A reconnecting connection, opened lazily: the first command connects.
    pub fn connect(&self, timeouts: Timeouts) -> Result<RedisConn, RedisError> {
        match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeouts.response))
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(2))
                    .set_number_of_retries(3);
                Ok(RedisConn::Single(SingleConn::rebuilding(
                    client.clone(),
                    config,
                    timeouts.response,
                )?))
            }
            Self::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_response_timeout(timeouts.response)
                    .set_connection_timeout(timeouts.connect);
                // Pending: connects in the background (its eager sibling can hang on a node
                // that accepts and never answers).
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }
}

/// `INFO cluster` of the first seed that answers.
async fn is_cluster_node(seeds: &[&str]) -> Result<bool, RedisError> {
    let mut last_error = None;
    for seed in seeds {
        let probe = async {
            let client = redis::Client::open(*seed)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let info: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut conn)
                .await?;
            Ok::<_, RedisError>(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(cluster)) => return Ok(cluster),
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                last_error = Some(RedisError::from((
                    redis::ErrorKind::Io,
                    "no answer to INFO cluster within 5 s",
                )))
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL given"))
    }))
}

/// A connection to a single Redis or a cluster; clones share it.
#[derive(Clone)]
pub enum RedisConn {
    Single(SingleConn),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

/// Response timeouts in a row after which a single node's connection is rebuilt.
pub const REBUILD_AFTER_TIMEOUTS: u32 = 3;

/// The shortest time between two rebuilds: a URL that really names a replica answers
/// `READONLY` to every write, and must not make each one a new connection.
const MIN_REBUILD_GAP: Duration = Duration::from_secs(1);

/// A single node's reconnecting connection, rebuilt when the node it reaches stops serving
/// (see the module docs). Clones share it, and a rebuild.
#[derive(Clone)]
pub struct SingleConn(Arc<SingleState>);

struct SingleState {
    /// The connection in use, and its generation (each rebuild adds one).
    current: ArcSwap<(u64, ConnectionManager)>,
    /// How to open a new connection; `None`: never rebuilt.
    rebuild: Option<(redis::Client, ConnectionManagerConfig)>,
    timeouts_in_a_row: AtomicU32,
    /// When an answer last came (ms since `since`, updated at most every 100 ms), and how long
    /// the node must have been silent before timeouts rebuild the connection: its response
    /// timeout. Timeouts alone do not tell a frozen node from commands queued behind slow
    /// ones (`WAIT`s for lagging replicas, one after another), which the node does answer.
    last_answer_ms: AtomicU64,
    silence: Duration,
    since: Instant,
    rebuilt_at: Mutex<Option<Instant>>,
}

impl From<ConnectionManager> for SingleConn {
    /// A connection that is never rebuilt (it only reconnects, as redis-rs does).
    fn from(manager: ConnectionManager) -> Self {
        Self::with(manager, None, Duration::MAX)
    }
}

impl SingleConn {
    /// Opened lazily (the first command connects), and rebuilt with `client` and `config`.
    /// `response`: the connection's response timeout.
    fn rebuilding(
        client: redis::Client,
        config: ConnectionManagerConfig,
        response: Duration,
    ) -> Result<Self, RedisError> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Self::with(manager, Some((client, config)), response))
    }

    fn with(
        manager: ConnectionManager,
        rebuild: Option<(redis::Client, ConnectionManagerConfig)>,
        silence: Duration,
    ) -> Self {
        Self(Arc::new(SingleState {
            current: ArcSwap::from_pointee((0, manager)),
            rebuild,
            timeouts_in_a_row: AtomicU32::new(0),
            last_answer_ms: AtomicU64::new(0),
            silence,
            since: Instant::now(),
            rebuilt_at: Mutex::new(None),
        }))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The generation of the connection in use now.
    fn generation(&self) -> u64 {
        self.0.current.load().0
    }

    /// The connection in use now (a cheap clone of a shared handle), with its generation.
    fn manager(&self) -> (u64, ConnectionManager) {
        let current = self.0.current.load();
        (current.0, current.1.clone())
    }

    /// Counts what a command through the connection of `generation` answered; rebuilds the
    /// connection when that shows the node stopped serving. The answers of a connection
    /// already replaced say nothing of the one in use.
    fn observe<T>(
        &self,
        generation: u64,
        answer: &Result<T, RedisError>,
        values: impl FnOnce(&T) -> bool,
    ) {
        if self.generation() != generation {
            return;
        }
        let stopped_serving = match answer {
            Ok(value) => {
                if self.0.timeouts_in_a_row.load(Ordering::Relaxed) != 0 {
                    self.0.timeouts_in_a_row.store(0, Ordering::Relaxed);
                }
                let now = self.now_ms();
                if now > self.0.last_answer_ms.load(Ordering::Relaxed) + 100 {
                    self.0.last_answer_ms.store(now, Ordering::Relaxed);
                }
                values(value)
            }
            Err(err) if err.is_timeout() => {
                let silent_ms = self
                    .now_ms()
                    .saturating_sub(self.0.last_answer_ms.load(Ordering::Relaxed));
                self.0.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1
                    >= REBUILD_AFTER_TIMEOUTS
                    && Duration::from_millis(silent_ms) >= self.0.silence
            }
            Err(err) => says_replica(err),
        };
        if stopped_serving {
            self.rebuild(generation);
        }
    }

    /// Replaces the connection of `generation` with a new one, unless another caller already
    /// did or the last rebuild was less than [`MIN_REBUILD_GAP`] ago.
    fn rebuild(&self, generation: u64) {
        let Some((client, config)) = &self.0.rebuild else {
            return;
        };
        let mut rebuilt_at = self
            .0
            .rebuilt_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.generation() != generation
            || rebuilt_at.is_some_and(|at| at.elapsed() < MIN_REBUILD_GAP)
        {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client.clone(), config.clone()) {
            Ok(fresh) => {
                tracing::warn!(
                    "the Redis node stopped serving (READONLY, or no answers); connecting again"
                );
                self.0.current.store(Arc::new((generation + 1, fresh)));
                self.0.timeouts_in_a_row.store(0, Ordering::Relaxed);
                *rebuilt_at = Some(Instant::now());
            }
            Err(err) => tracing::warn!(error = %err, "cannot rebuild the Redis connection"),
        }
    }
}

impl ConnectionLike for SingleConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut manager) = self.manager();
            let answer = manager.req_packed_command(cmd).await;
            self.observe(generation, &answer, |value| {
                holds_replica_refusal(std::slice::from_ref(value))
            });
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut manager) = self.manager();
            let answer = manager.req_packed_commands(pipeline, offset, count).await;
            self.observe(generation, &answer, |values| holds_replica_refusal(values));
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.0.current.load().1.get_db()
    }
}

/// A refusal that shows the node is a replica now: `READONLY`, or a command a replica refuses
/// (`WAIT`, in a pipeline whose other answers a script may have caught as data).
fn replica_refusal(server: &ServerError) -> bool {
    server.kind() == Some(ServerErrorKind::ReadOnly)
        || server.code() == "READONLY"
        || server.details().is_some_and(|text| {
            text.starts_with("WAIT cannot be used with replica instances")
                || text.starts_with("WAITAOF cannot be used with replica instances")
        })
}

/// An error carrying such a refusal, alone or among a pipeline's errors.
fn says_replica(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || err.code() == Some("READONLY")
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, server)| replica_refusal(server)))
}

/// Such a refusal among a command's or a pipeline's answers.
fn holds_replica_refusal(values: &[Value]) -> bool {
    values
        .iter()
        .any(|value| matches!(value, Value::ServerError(err) if replica_refusal(err)))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConn {
    /// A script answered `READONLY` as data (an error it caught, such as a ledger operation's
    /// `{'!error', …}`): on a single node, the connection is rebuilt as for a `READONLY` reply.
    /// `generation`: [`RedisConn::generation`] when the script was sent (a connection
    /// rebuilt since is not rebuilt again for it).
    pub fn readonly_reported(&self, generation: u64) {
        if let Self::Single(conn) = self {
            conn.rebuild(generation);
        }
    }

    /// A connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Which connection is in use: it changes when a single node's connection is rebuilt.
    pub fn generation(&self) -> u64 {
        match self {
            Self::Single(conn) => conn.generation(),
            Self::Cluster(_) => 0,
        }
    }

    /// Sends `cmd`, which names no key (`SCAN`, `TIME`), to the node serving `key`'s slot: on a
    /// cluster a keyless command would go to a random node, and a scan of one partition's
    /// keys must run where they live.
    pub async fn query_at<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &Cmd,
    ) -> Result<T, RedisError> {
        match self {
            Self::Single(conn) => cmd.query_async(conn).await,
            Self::Cluster(conn) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(crate::partition::slot(key), SlotAddr::Master);
                let value = conn
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}
