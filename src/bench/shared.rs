//! What every bench shares: a private `redis-server` (or a caller's Redis under a unique key
//! prefix), `INFO commandstats`, a `MONITOR` counter, percentiles, `/proc` readings and child
//! processes of this binary.

use super::BenchError;
use local_redis::LocalRedis;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a bench writes: its own server, or the caller's Redis under a key prefix no one else
/// uses (removed again at the end).
pub struct RedisTarget {
    pub url: String,
    /// Key prefix for this run (queue prefix; every key carries `{prefix:…}`).
    pub prefix: String,
    own: Option<LocalRedis>,
}

impl RedisTarget {
    /// `url` None: a private `redis-server`. Some: that Redis, with a unique prefix.
    pub fn new(url: Option<&str>, name: &str) -> Result<Self, BenchError> {
        let prefix = format!(
            "bench-{name}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        match url {
            Some(url) => Ok(Self {
                url: url.to_owned(),
                prefix,
                own: None,
            }),
            None => {
                let own = LocalRedis::start(local_redis::Durability::Off)
                    .map_err(|err| BenchError::Setup(err.to_string()))?;
                Ok(Self {
                    url: own.url().to_owned(),
                    prefix,
                    own: Some(own),
                })
            }
        }
    }

    /// True when this run owns the server (then server-wide numbers are this run's alone).
    pub fn is_private(&self) -> bool {
        self.own.is_some()
    }

    pub fn redis_pid(&self) -> Option<u32> {
        self.own.as_ref().map(LocalRedis::pid)
    }

    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, BenchError> {
        let client = redis::Client::open(self.url.as_str())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    /// Deletes this run's keys from a shared Redis (a private server just goes away).
    pub async fn cleanup(&self) -> Result<(), BenchError> {
        if self.own.is_some() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        local_redis::delete_prefix(&mut conn, &self.prefix).await?;
        Ok(())
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
                            if lines.is_multiple_of(4096) {
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

/// A child process of this binary (`tarspay-worker …`), killed on drop.
pub struct ChildProcess {
    child: Option<Child>,
    pub name: String,
}

impl ChildProcess {
    /// Runs this executable with `args`; the environment is this process's minus every
    /// `TARSPAY_*` variable, plus `env`. Output is discarded unless `BENCH_CHILD_LOG` is set.
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
            if var.to_string_lossy().starts_with("TARSPAY_") {
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

/// A `tarspay-dev sandbox` process: its URL from the first line it prints, and its stdout
/// drained in a thread so later prints never hit a closed pipe.
pub struct SandboxProcess {
    pub process: ChildProcess,
    pub url: String,
}

impl SandboxProcess {
    /// `extra` adds arguments (e.g. `--faults FILE`); `env` carries TARSPAY_MCH_NO and
    /// TARSPAY_PRIVATE_KEY to register the merchant.
    pub fn spawn(
        final_after: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Self, BenchError> {
        let mut args = vec![
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--final-after",
            final_after,
            "--no-callbacks",
        ];
        args.extend_from_slice(extra);
        let mut process = ChildProcess::spawn("sandbox", &args, env, Stdio::piped())?;
        let stdout = process
            .child_mut()
            .and_then(|child| child.stdout.take())
            .ok_or_else(|| BenchError::Setup("sandbox has no stdout".into()))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| BenchError::Setup("the sandbox printed nothing".into()))?;
        let url = first
            .strip_prefix("sandbox listening on ")
            .ok_or_else(|| BenchError::Setup(format!("unexpected sandbox output: {first}")))?
            .trim()
            .to_owned();
        Ok(Self { process, url })
    }

    /// `GET /sandbox/orders`: every order the sandbox holds.
    pub async fn orders(&self) -> Result<Vec<serde_json::Value>, BenchError> {
        tarspay_worker::gateway::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| BenchError::Sandbox(err.to_string()))?;
        let response = client
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
    fn stat_ticks_skip_the_command_name() {
        let stat = "1234 (tarspay worker) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
    }
}
