//! What every bench shares: a private `redis-server` or Redis Cluster (or a caller's Redis,
//! one server or a cluster, under a unique key prefix), `INFO commandstats` and `used_memory`
//! added up over the masters, a `MONITOR` counter, percentiles, `/proc` readings and child
//! processes of this binary.

use super::BenchError;
use local_redis::{LocalCluster, LocalRedis};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarspay_worker::redis_conn::{ClusterMode, RedisClient, RedisConn, Timeouts, seeds};

/// Where a bench writes: its own server or cluster, or the caller's Redis (one server or a
/// cluster) under a key prefix no one else uses (removed again at the end).
pub struct RedisTarget {
    /// One URL, or a cluster's seeds separated by commas (as `TARSPAY_REDIS_URL` takes them).
    pub url: String,
    /// Key prefix for this run (queue prefix; every key carries `{prefix:…}`).
    pub prefix: String,
    /// The client every connection of the bench comes from (single node or cluster).
    pub client: RedisClient,
    own: Own,
    /// The URL of every master: server-wide numbers (`INFO`, `MONITOR`, `SCAN`) are per node.
    masters: Vec<String>,
}

/// What the bench started for itself, if anything.
enum Own {
    Nothing,
    Server(LocalRedis),
    Cluster(LocalCluster),
}

/// Which Redis a bench runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisChoice<'a> {
    /// A private `redis-server`.
    Private,
    /// A private Redis Cluster of this many masters, without replicas (1: one cluster-enabled
    /// node serving every slot).
    PrivateCluster(usize),
    /// The caller's Redis: one URL, or a cluster's seeds separated by commas (a cluster is
    /// detected with `INFO cluster`).
    Url(&'a str),
}

impl<'a> RedisChoice<'a> {
    /// From the bench options (`--redis-url` and `--cluster` exclude each other).
    pub fn of(options: &'a super::BenchOptions) -> Result<Self, BenchError> {
        match (options.redis_url.as_deref(), options.cluster) {
            (Some(_), Some(_)) => Err(BenchError::Setup(
                "--redis-url and --cluster exclude each other".into(),
            )),
            (Some(url), None) => Ok(Self::Url(url)),
            (None, Some(masters)) => Ok(Self::PrivateCluster(masters)),
            (None, None) => Ok(Self::Private),
        }
    }
}

impl RedisTarget {
    /// Starts (or connects to) the Redis of `choice`; this run's keys go under a unique prefix.
    pub async fn new(choice: RedisChoice<'_>, name: &str) -> Result<Self, BenchError> {
        let prefix = format!(
            "bench-{name}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let setup = |err: local_redis::LocalRedisError| BenchError::Setup(err.to_string());
        let (url, own) = match choice {
            RedisChoice::Url(url) => (url.to_owned(), Own::Nothing),
            RedisChoice::Private => {
                let own = LocalRedis::start(local_redis::Durability::Off).map_err(setup)?;
                (own.url().to_owned(), Own::Server(own))
            }
            RedisChoice::PrivateCluster(masters) => {
                // Forming a cluster blocks (it waits until every node sees every slot served).
                let own = tokio::task::spawn_blocking(move || match masters {
                    0 => Err(BenchError::Setup("--cluster needs at least 1 master".into())),
                    1 => LocalCluster::single_node().map_err(setup),
                    2 => Err(BenchError::Setup(
                        "--cluster 2: redis-cli --cluster create needs at least 3 masters (1 gives a one-node cluster)".into(),
                    )),
                    _ => LocalCluster::start(masters, 0).map_err(setup),
                })
                .await
                .map_err(|err| BenchError::Setup(format!("starting the cluster: {err}")))??;
                (own.seeds(), Own::Cluster(own))
            }
        };
        let client = RedisClient::open(&url, ClusterMode::Auto).await?;
        let masters = match &own {
            Own::Cluster(cluster) => seeds(&cluster.seeds())
                .into_iter()
                .map(str::to_owned)
                .collect(),
            _ if client.is_cluster() => cluster_masters(&url).await?,
            _ => vec![seeds(&url).first().copied().unwrap_or(&url).to_owned()],
        };
        Ok(Self {
            url,
            prefix,
            client,
            own,
            masters,
        })
    }

    /// True when this run owns the server or cluster (then server-wide numbers are this run's
    /// alone).
    pub fn is_private(&self) -> bool {
        !matches!(self.own, Own::Nothing)
    }

    /// True on a Redis Cluster (private or the caller's).
    pub fn is_cluster(&self) -> bool {
        self.client.is_cluster()
    }

    /// The masters' URLs (one for a single server).
    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    /// What the JSON lines call the Redis: `"server"`, or `"cluster of M masters"`.
    pub fn describe(&self) -> String {
        if self.is_cluster() {
            match self.masters.len() {
                1 => "cluster of 1 master".to_owned(),
                masters => format!("cluster of {masters} masters"),
            }
        } else {
            "server".to_owned()
        }
    }

    /// The process ids of the private server or of every node of the private cluster (empty
    /// for the caller's Redis).
    pub fn redis_pids(&self) -> Vec<u32> {
        match &self.own {
            Own::Nothing => Vec::new(),
            Own::Server(server) => vec![server.pid()],
            Own::Cluster(cluster) => cluster.nodes().iter().filter_map(|n| n.pid).collect(),
        }
    }

    /// User + system CPU seconds of every private Redis process together; `None` for the
    /// caller's Redis (not ours to read) or when one cannot be read (never a partial sum).
    pub fn redis_cpu_seconds(&self) -> Option<f64> {
        let pids = self.redis_pids();
        if pids.is_empty() {
            return None;
        }
        pids.into_iter().map(proc_cpu_seconds).sum::<Option<f64>>()
    }

    /// A new connection (reconnecting) that routes by key on a cluster.
    pub fn connection(&self) -> Result<RedisConn, BenchError> {
        Ok(self.client.connect(Timeouts::default())?)
    }

    /// A connection to every master, for server-wide numbers.
    pub async fn nodes(&self) -> Result<Nodes, BenchError> {
        let mut conns = Vec::with_capacity(self.masters.len());
        for url in &self.masters {
            let client = redis::Client::open(url.as_str())?;
            conns.push(client.get_multiplexed_async_connection().await?);
        }
        Ok(Nodes { conns })
    }

    /// Deletes this run's keys from the caller's Redis, on every master of a cluster (a
    /// private server or cluster just goes away).
    pub async fn cleanup(&self) -> Result<(), BenchError> {
        if self.is_private() {
            return Ok(());
        }
        let nodes = self.nodes().await?;
        for mut conn in nodes.conns {
            local_redis::delete_prefix(&mut conn, &self.prefix).await?;
        }
        Ok(())
    }
}

/// The masters of the cluster reached through `urls`, from `CLUSTER NODES` of the first seed
/// that answers; each URL keeps the seed's scheme, credentials and database.
async fn cluster_masters(urls: &str) -> Result<Vec<String>, BenchError> {
    let mut last = None;
    for seed in seeds(urls) {
        let text = async {
            let client = redis::Client::open(seed)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
        };
        match text.await {
            Ok(text) => {
                let masters = parse_cluster_masters(&text)
                    .into_iter()
                    .map(|(host, port)| with_host_port(seed, &host, port))
                    .collect::<Vec<_>>();
                if masters.is_empty() {
                    return Err(BenchError::Setup(format!(
                        "CLUSTER NODES of {} lists no master serving slots",
                        redact(seed)
                    )));
                }
                return Ok(masters);
            }
            Err(err) => last = Some(err),
        }
    }
    Err(last.map_or_else(
        || BenchError::Setup("no Redis URL given".into()),
        BenchError::Redis,
    ))
}

/// `(host, port)` of every master in a `CLUSTER NODES` reply that serves slots and is not
/// failed: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link>
/// <slot>…`.
pub fn parse_cluster_masters(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            let serves = fields.len() > 8;
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) || !serves
            {
                return None;
            }
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// `seed` with its host and port replaced (scheme, credentials and database kept).
fn with_host_port(seed: &str, host: &str, port: u16) -> String {
    let Some((scheme, rest)) = seed.split_once("://") else {
        return format!("redis://{host}:{port}/");
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let credentials = authority
        .rsplit_once('@')
        .map_or(String::new(), |(c, _)| format!("{c}@"));
    format!("{scheme}://{credentials}{host}:{port}{path}")
}

/// A URL without its credentials, for messages.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, rest))) => format!("{scheme}://…@{rest}"),
        _ => url.to_owned(),
    }
}

/// A plain connection to every master of the bench's Redis: `INFO` numbers are per node, so
/// they are read from each and added up.
pub struct Nodes {
    conns: Vec<redis::aio::MultiplexedConnection>,
}

impl Nodes {
    /// How many nodes (masters) are read.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Always false: a target has at least one node.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// `INFO commandstats` added up over the masters.
    pub async fn commandstats(&mut self) -> Result<Vec<(String, u64)>, BenchError> {
        let mut total: BTreeMap<String, u64> = BTreeMap::new();
        for conn in &mut self.conns {
            for (name, calls) in commandstats(conn).await? {
                *total.entry(name).or_default() += calls;
            }
        }
        Ok(total.into_iter().collect())
    }

    /// `used_memory` added up over the masters (read one after another, not at one instant).
    pub async fn used_memory(&mut self) -> Result<u64, BenchError> {
        let mut total = 0;
        for conn in &mut self.conns {
            total += used_memory(conn).await?;
        }
        Ok(total)
    }

    /// The address each master sees for its connection (`CLIENT INFO`).
    pub async fn client_addrs(&mut self) -> Result<Vec<String>, BenchError> {
        let mut addrs = Vec::with_capacity(self.conns.len());
        for conn in &mut self.conns {
            addrs.push(client_addr(conn).await?);
        }
        Ok(addrs)
    }
}

/// One section of `INFO`.
async fn info<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    section: &str,
) -> Result<String, BenchError> {
    Ok(redis::cmd("INFO").arg(section).query_async(conn).await?)
}

/// `INFO commandstats` as (command, calls). Commands run by Lua scripts are counted too.
pub async fn commandstats<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> Result<Vec<(String, u64)>, BenchError> {
    Ok(parse_commandstats(&info(conn, "commandstats").await?))
}

/// `used_memory` of `INFO memory`: the bytes Redis holds for data and its own structures.
pub async fn used_memory<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> Result<u64, BenchError> {
    info(conn, "memory")
        .await?
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .ok_or_else(|| BenchError::Check("INFO memory has no used_memory".into()))
}

/// Server-wide calls per command (Lua-run commands included) in `delta`, without the bench's
/// own: its `INFO` reads and the outcome reader's `tail_pages` `XRANGE` pages.
pub fn payout_calls_by_name(
    delta: &[(String, u64)],
    tail_pages: u64,
) -> impl Iterator<Item = (&str, u64)> {
    delta.iter().map(move |(name, calls)| {
        let calls = match name.as_str() {
            "info" => 0,
            "xrange" => calls.saturating_sub(tail_pages),
            _ => *calls,
        };
        (name.as_str(), calls)
    })
}

/// The sum of [`payout_calls_by_name`].
pub fn payout_calls(delta: &[(String, u64)], tail_pages: u64) -> u64 {
    payout_calls_by_name(delta, tail_pages)
        .map(|(_, calls)| calls)
        .sum()
}

/// The address Redis sees for this connection (`CLIENT INFO` addr=…), as MONITOR prints it.
pub async fn client_addr<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> Result<String, BenchError> {
    let info: String = redis::cmd("CLIENT").arg("INFO").query_async(conn).await?;
    info.split_whitespace()
        .find_map(|kv| kv.strip_prefix("addr="))
        .map(str::to_owned)
        .ok_or_else(|| BenchError::Check(format!("CLIENT INFO without addr: {info}")))
}

pub fn parse_commandstats(info: &str) -> Vec<(String, u64)> {
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Calls per command between two `commandstats` readings (only commands that ran).
pub fn commandstats_delta(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    let mut delta: Vec<(String, u64)> = after
        .iter()
        .map(|(name, calls)| {
            let old = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, c)| *c);
            (name.clone(), calls.saturating_sub(old))
        })
        .filter(|(_, calls)| *calls > 0)
        .collect();
    delta.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    delta
}

/// Counts the commands a Redis server receives from clients, apart from those Lua scripts run,
/// by reading `MONITOR` on a plain socket in a thread. Commands from the `ignore` client
/// addresses (the bench's own observers) are not counted. MONITOR costs the server time: use
/// it only where throughput is not the measurement.
pub struct MonitorCounter {
    counts: Arc<Mutex<MonitorCounts>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What [`MonitorCounter`] saw.
#[derive(Debug, Clone, Default)]
pub struct MonitorCounts {
    /// Commands sent by clients, by name.
    pub client: BTreeMap<String, u64>,
    /// Commands run inside Lua scripts.
    pub script: u64,
}

impl MonitorCounts {
    pub fn client_total(&self) -> u64 {
        self.client.values().sum()
    }

    /// Round trips: client commands, less the `DEL`s sent in one pipeline with an `HSETNX`.
    /// On the payout path a client `DEL` is the guard's reset: pipelined with the `HSETNX` of a
    /// lone in-hand acceptance (`ledger::batcher::LoneForm`), or alone when the acceptance
    /// waits for the first poll (`jobs::in_hand`), and a client `HSETNX` is a lone acceptance
    /// (with its `DEL`, or alone when written after such a poll found the order pending). So
    /// at most min(`DEL`, `HSETNX`) of them shared a round trip: this counts one round trip too
    /// few for each acceptance written after its poll. Every other hot-path command is its own
    /// round trip.
    pub fn round_trips(&self) -> u64 {
        let count = |name: &str| self.client.get(name).copied().unwrap_or(0);
        self.client_total() - count("DEL").min(count("HSETNX"))
    }
}

/// `host:port` of a `redis://host:port[/db]` URL without credentials (MONITOR would need AUTH).
pub fn monitor_addr(url: &str) -> Option<String> {
    let rest = url.strip_prefix("redis://")?;
    let hostport = rest.split('/').next()?;
    if hostport.contains('@') || hostport.is_empty() {
        return None;
    }
    Some(if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    })
}

impl MonitorCounter {
    /// Client commands counted so far (at most ~200 ms behind the server).
    pub fn client_total_now(&self) -> u64 {
        self.counts
            .lock()
            .map(|counts| counts.client_total())
            .unwrap_or(0)
    }

    /// `addr` is `host:port`.
    pub fn start(addr: &str, ignore: Vec<String>) -> Result<Self, BenchError> {
        let setup = |err: std::io::Error| BenchError::Setup(format!("MONITOR: {err}"));
        let mut stream = TcpStream::connect(addr).map_err(setup)?;
        stream.write_all(b"MONITOR\r\n").map_err(setup)?;
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(setup)?;
        let counts = Arc::new(Mutex::new(MonitorCounts::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = BufReader::with_capacity(1 << 20, stream);
        // The "+OK" answer to MONITOR itself.
        let mut first = String::new();
        reader.read_line(&mut first).map_err(setup)?;
        let thread = {
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut line = Vec::with_capacity(256);
                let mut local = MonitorCounts::default();
                let mut lines = 0u64;
                let mut published = Instant::now();
                let publish = |local: &mut MonitorCounts| {
                    if let Ok(mut shared) = counts.lock() {
                        shared.script += std::mem::take(&mut local.script);
                        for (name, n) in std::mem::take(&mut local.client) {
                            *shared.client.entry(name).or_default() += n;
                        }
                    }
                };
                loop {
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) => break,
                        Ok(_) if line.ends_with(b"\n") => {
                            match parse_monitor_line(&line) {
                                Some(MonitorLine::Script) => local.script += 1,
                                Some(MonitorLine::Client { addr, command })
                                    if !ignore.iter().any(|i| i == addr) =>
                                {
                                    *local.client.entry(command.to_owned()).or_default() += 1;
                                }
                                _ => {}
                            }
                            line.clear();
                            lines += 1;
                            // By count under load, and at least every 100 ms so a reader
                            // mid-run (`client_total_now`) is never far behind.
                            if lines.is_multiple_of(4096)
                                || published.elapsed() > Duration::from_millis(100)
                            {
                                published = Instant::now();
                                publish(&mut local);
                                if stop.load(Ordering::Relaxed) {
                                    break;
                                }
                            }
                        }
                        // A partial line (timeout mid-line): keep it and read on.
                        Ok(_) => {}
                        Err(err)
                            if matches!(
                                err.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            publish(&mut local);
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                publish(&mut local);
            })
        };
        Ok(Self {
            counts,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops reading (within a read timeout or 4,096 lines) and returns the counts.
    pub fn stop(mut self) -> MonitorCounts {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for MonitorCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One line of MONITOR output.
#[derive(Debug, PartialEq, Eq)]
pub enum MonitorLine<'a> {
    /// Run by a Lua script (`[0 lua]`).
    Script,
    /// Sent by the client at `addr`.
    Client { addr: &'a str, command: &'a str },
}

/// A MONITOR line looks like `+1700000000.123456 [0 127.0.0.1:5000] "hset" "k" …`.
pub fn parse_monitor_line(line: &[u8]) -> Option<MonitorLine<'_>> {
    let line = std::str::from_utf8(line.strip_prefix(b"+")?).ok()?;
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let source = &line[open + 1..close];
    let (_db, addr) = source.split_once(' ')?;
    if addr == "lua" {
        return Some(MonitorLine::Script);
    }
    let rest = line[close + 1..].trim_start().strip_prefix('"')?;
    let command = &rest[..rest.find('"')?];
    Some(MonitorLine::Client { addr, command })
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank; 0 for no values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of latencies, sorted in place.
pub fn latency_summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        percentile(values, 50.0),
        percentile(values, 99.0),
        values.last().copied().unwrap_or(0.0),
    )
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    tarspay_worker::wall_clock::since_epoch().as_micros() as u64
}

/// Rounds to `digits` decimals for the JSON lines.
pub fn round(value: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (value * factor).round() / factor
}

/// The host's CPU time counters (`cpu` line of `/proc/stat`, in ticks): the machine is
/// shared, so a latency run says how much of it others (and the hypervisor) took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCpu {
    pub total: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Time the hypervisor ran something else while this VM wanted the CPU.
    pub steal: u64,
}

impl HostCpu {
    /// `None` where `/proc/stat` cannot be read (not Linux).
    pub fn read() -> Option<Self> {
        parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// (steal %, busy %) of the host's CPU time between `self` and `later`.
    pub fn shares_until(&self, later: &Self) -> Option<(f64, f64)> {
        let total = later.total.checked_sub(self.total).filter(|&t| t > 0)? as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        let idle = later.idle.saturating_sub(self.idle) as f64;
        Some((
            100.0 * steal / total,
            100.0 * (total - idle - steal) / total,
        ))
    }
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq steal [guest…]
/// (guest time is already counted in user).
pub fn parse_proc_stat(stat: &str) -> Option<HostCpu> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let steal = ticks.get(7).copied().unwrap_or(0);
    Some(HostCpu {
        total: ticks.iter().sum(),
        idle: ticks.get(3)? + ticks.get(4).copied().unwrap_or(0),
        steal,
    })
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A field of `/proc/PID/status` in KiB (e.g. `VmHWM`, `VmRSS`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line; the command name may hold
/// spaces, so fields are counted after its closing parenthesis.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Settings a bench's child processes take from the bench's environment: how they run, never
/// what they do (`TARSPAY_WORKER_THREADS=0 bench e2e` measures workers on a thread per core;
/// `TARSPAY_POLL_IN_HAND=false bench cost -n 1` a payout whose first poll is a job of its
/// own).
const KEPT_SETTINGS: [&str; 2] = ["TARSPAY_WORKER_THREADS", "TARSPAY_POLL_IN_HAND"];

/// A child process of this binary (`tarspay-worker …`), killed on drop.
pub struct ChildProcess {
    child: Option<Child>,
    pub name: String,
}

impl ChildProcess {
    /// Runs this executable with `args`; the environment is this process's minus every
    /// `TARSPAY_*` variable but [`KEPT_SETTINGS`], plus `env`. Output is discarded unless
    /// `BENCH_CHILD_LOG` is set.
    pub fn spawn(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        stdout: Stdio,
    ) -> Result<Self, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|err| BenchError::Setup(format!("cannot find this executable: {err}")))?;
        let mut command = Command::new(exe);
        for (var, _) in std::env::vars_os() {
            let var_name = var.to_string_lossy();
            if var_name.starts_with("TARSPAY_") && !KEPT_SETTINGS.contains(&var_name.as_ref()) {
                command.env_remove(var);
            }
        }
        let log = std::env::var("BENCH_CHILD_LOG").is_ok();
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", if log { "info" } else { "warn" })
            .stdout(stdout)
            .stderr(if log { Stdio::inherit() } else { Stdio::null() });
        let child = command
            .spawn()
            .map_err(|err| BenchError::Setup(format!("cannot start {name}: {err}")))?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first `n` lines a child prints on stdout, read through one reader (a reader per line
/// could swallow the next line into a buffer that is then dropped); the rest is drained in a
/// thread so later prints never hit a closed or full pipe.
fn first_lines(process: &mut ChildProcess, n: usize) -> Result<Vec<String>, BenchError> {
    let name = process.name.clone();
    let stdout = process
        .child_mut()
        .and_then(|child| child.stdout.take())
        .ok_or_else(|| BenchError::Setup(format!("{name} has no stdout")))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().take(n) {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
        for _ in lines {}
    });
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|_| BenchError::Setup(format!("{name} printed less than {n} lines")))
        })
        .collect()
}

/// A `tarspay-dev sandbox` process: its URL and system key from the first lines it prints.
pub struct SandboxProcess {
    pub process: ChildProcess,
    pub url: String,
    /// The key that signs its callbacks (hex), for `TARSPAY_SYSTEM_PUBLIC_KEY`.
    pub system_public_key: String,
}

impl SandboxProcess {
    /// `callbacks` false runs it with `--no-callbacks`; `extra` adds arguments (e.g.
    /// `--faults FILE`); `env` carries TARSPAY_MCH_NO and TARSPAY_PRIVATE_KEY to register the
    /// merchant.
    pub fn spawn(
        final_after: &str,
        callbacks: bool,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Self, BenchError> {
        let mut args = vec![
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--final-after",
            final_after,
        ];
        if !callbacks {
            args.push("--no-callbacks");
        }
        args.extend_from_slice(extra);
        let mut process = ChildProcess::spawn("sandbox", &args, env, Stdio::piped())?;
        let lines = first_lines(&mut process, 2)?;
        let unexpected =
            |line: &str| BenchError::Setup(format!("unexpected sandbox output: {line}"));
        let url = lines[0]
            .strip_prefix("sandbox listening on ")
            .ok_or_else(|| unexpected(&lines[0]))?
            .trim()
            .to_owned();
        let system_public_key = lines[1]
            .strip_prefix("sandbox system public key")
            .and_then(|rest| rest.rsplit(' ').next())
            .ok_or_else(|| unexpected(&lines[1]))?
            .trim()
            .to_owned();
        Ok(Self {
            process,
            url,
            system_public_key,
        })
    }

    /// `GET /sandbox/orders`: every order the sandbox holds.
    pub async fn orders(&self) -> Result<Vec<serde_json::Value>, BenchError> {
        let response = http_client()
            .map_err(BenchError::Sandbox)?
            .get(format!("{}/sandbox/orders", self.url))
            .send()
            .await
            .map_err(|err| BenchError::Sandbox(err.to_string()))?;
        let orders: Vec<serde_json::Value> = response
            .json()
            .await
            .map_err(|err| BenchError::Sandbox(err.to_string()))?;
        Ok(orders)
    }
}

/// An HTTP client for the bench's own reads of its child processes (bounded: a hung child
/// must fail the run, not stall it).
pub fn http_client() -> Result<reqwest::Client, String> {
    tarspay_worker::gateway::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|err| err.to_string())
}

/// A `tarspay-dev serve` process, the callback receiver: its address from the line it prints.
pub struct ServeProcess {
    pub process: ChildProcess,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where it receives TarsPay's callbacks.
    pub callback_path: String,
}

impl ServeProcess {
    /// Starts `serve` with `env` (which should listen on port 0: the address is read back).
    pub fn spawn(env: &[(String, String)]) -> Result<Self, BenchError> {
        let mut process = ChildProcess::spawn("serve", &["serve"], env, Stdio::piped())?;
        let line = first_lines(&mut process, 1)?.remove(0);
        let (url, callback_path) = parse_serve_line(&line)
            .ok_or_else(|| BenchError::Setup(format!("unexpected serve output: {line}")))?;
        Ok(Self {
            process,
            url,
            callback_path,
        })
    }

    /// The `notifyUrl` the workers send with each create.
    pub fn notify_url(&self) -> String {
        format!("{}{}", self.url, self.callback_path)
    }

    /// Callbacks received so far by result (`verified`, `untrusted`, …), from its `/metrics`.
    pub async fn callbacks(&self) -> Result<Vec<(String, u64)>, BenchError> {
        let text = http_client()
            .map_err(BenchError::Serve)?
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|err| BenchError::Serve(err.to_string()))?
            .text()
            .await
            .map_err(|err| BenchError::Serve(err.to_string()))?;
        Ok(tarspay_worker::metrics::counter_by_label(
            &text,
            tarspay_worker::metrics::CALLBACKS,
            "result",
        ))
    }
}

/// `listening on http://ADDR (callbacks at PATH)` → (`http://ADDR`, `PATH`).
fn parse_serve_line(line: &str) -> Option<(String, String)> {
    let (url, rest) = line
        .strip_prefix("listening on ")?
        .split_once(" (callbacks at ")?;
    let path = rest.trim_end().strip_suffix(')')?;
    Some((url.to_owned(), path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let mut shuffled = vec![3.0, 1.0, 2.0];
        assert_eq!(latency_summary(&mut shuffled), (2.0, 3.0, 3.0));
    }

    #[test]
    fn commandstats_are_parsed_and_diffed() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5,usec_per_call=0.5,rejected_calls=0,failed_calls=0\r\ncmdstat_hset:calls=3,usec=1\r\n",
        );
        assert_eq!(
            before,
            vec![("evalsha".to_owned(), 10), ("hset".to_owned(), 3)]
        );
        let after = parse_commandstats(
            "cmdstat_evalsha:calls=25,usec=9\r\ncmdstat_hset:calls=3,usec=1\r\ncmdstat_xadd:calls=4,usec=1\r\n",
        );
        assert_eq!(
            commandstats_delta(&before, &after),
            vec![("evalsha".to_owned(), 15), ("xadd".to_owned(), 4)]
        );
    }

    #[test]
    fn monitor_lines_tell_scripts_from_clients() {
        assert_eq!(
            parse_monitor_line(b"+1700000000.123456 [0 127.0.0.1:5000] \"evalsha\" \"ab\"\r\n"),
            Some(MonitorLine::Client {
                addr: "127.0.0.1:5000",
                command: "evalsha"
            })
        );
        assert_eq!(
            parse_monitor_line(b"+1700000000.123456 [0 lua] \"hset\" \"k\"\r\n"),
            Some(MonitorLine::Script)
        );
        assert_eq!(parse_monitor_line(b"-ERR nope\r\n"), None);
        assert_eq!(
            monitor_addr("redis://127.0.0.1:7000/").as_deref(),
            Some("127.0.0.1:7000")
        );
        assert_eq!(monitor_addr("redis://:pw@host:1/"), None);
    }

    #[test]
    fn cluster_masters_come_from_cluster_nodes_with_the_seed_credentials() {
        let text = "\
a1 10.0.0.1:7000@17000,host-a myself,master - 0 0 1 connected 0-5460
b2 10.0.0.2:7001@17001 master - 0 1 2 connected 5461-10922
c3 10.0.0.3:7002@17002 slave a1 0 1 1 connected
d4 10.0.0.4:7003@17003 master,fail - 0 1 3 disconnected 10923-16383
e5 10.0.0.5:7004@17004 master - 0 1 4 connected
f6 10.0.0.6:7005@17005 master - 0 1 5 connected 10923-16383
";
        assert_eq!(
            parse_cluster_masters(text),
            vec![
                ("10.0.0.1".to_owned(), 7000),
                ("10.0.0.2".to_owned(), 7001),
                ("10.0.0.6".to_owned(), 7005)
            ]
        );
        assert_eq!(
            with_host_port("redis://u:pw@seed:1/2", "10.0.0.2", 7001),
            "redis://u:pw@10.0.0.2:7001/2"
        );
        assert_eq!(with_host_port("rediss://seed:1", "h", 7), "rediss://h:7/");
        assert_eq!(redact("redis://u:pw@seed:1/"), "redis://…@seed:1/");
    }

    #[test]
    fn the_serve_address_is_read_from_its_first_line() {
        assert_eq!(
            parse_serve_line("listening on http://127.0.0.1:4321 (callbacks at /tarspay/notify)"),
            Some((
                "http://127.0.0.1:4321".to_owned(),
                "/tarspay/notify".to_owned()
            ))
        );
        assert_eq!(parse_serve_line("sandbox listening on http://x"), None);
    }

    #[test]
    fn host_cpu_shares_come_from_the_cpu_line() {
        let before = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            before,
            HostCpu {
                total: 1000,
                idle: 850,
                steal: 0
            }
        );
        let after = parse_proc_stat("cpu  150 0 100 900 50 0 0 100 0 0\n").unwrap();
        let (steal, busy) = before.shares_until(&after).unwrap();
        assert_eq!((round(steal, 2), round(busy, 2)), (33.33, 33.33));
        assert_eq!(after.shares_until(&after), None);
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
    }

    #[test]
    fn stat_ticks_skip_the_command_name() {
        let stat = "1234 (tarspay worker) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
    }
}
