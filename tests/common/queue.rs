//! Shared harness: a private redis-server per test (free port, temp dir, killed on drop), worker
//! processes, in-process apalis workers, and counters of processed jobs.

use apalis::prelude::*;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tarspay_worker::queue::{QueueConfig, RedisQueue};
use tarspay_worker::redis_conn::RedisConn;

pub const PREFIX: &str = "qtest";

/// The job type used by tests and by the `queue_worker` binary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestJob {
    pub n: u64,
    #[serde(default)]
    pub sleep_ms: u64,
}

impl TestJob {
    pub fn new(n: u64) -> Self {
        Self { n, sleep_ms: 0 }
    }
}

pub use super::redis_server::RedisServer;

/// Test config: short timers so recovery tests take seconds, not minutes.
pub fn config(queue: &str) -> QueueConfig {
    let mut config = QueueConfig::new(queue)
        .with_prefix(PREFIX)
        .with_orphan_timeout(Duration::from_secs(3));
    config.retry_base = Duration::from_millis(100);
    config.retry_max = Duration::from_millis(500);
    config.promote_interval = Duration::from_millis(200);
    config.block = Duration::from_millis(200);
    config
}

pub async fn queue(server: &RedisServer, config: QueueConfig) -> RedisQueue<TestJob> {
    RedisQueue::connect(&server.url(), config)
        .await
        .expect("queue connects")
}

pub fn processed_key(queue: &str) -> String {
    format!("{PREFIX}:{queue}:processed")
}

pub fn started_key(queue: &str) -> String {
    format!("{PREFIX}:{queue}:started")
}

/// Per job number: how many times it was processed.
pub async fn counts(conn: &mut RedisConn, key: &str) -> HashMap<u64, u64> {
    // One retry: the harness connection may see one error right after a Redis restart.
    let raw: HashMap<String, u64> = match conn.hgetall(key).await {
        Ok(raw) => raw,
        Err(_) => conn.hgetall(key).await.expect("hgetall"),
    };
    raw.into_iter()
        .map(|(k, v)| (k.parse().expect("job number"), v))
        .collect()
}

/// Queue stats, retried a few times: right after a Redis restart the harness' own connection
/// may see one error before it reconnects.
pub async fn stats_retrying(queue: &RedisQueue<TestJob>) -> tarspay_worker::queue::QueueStats {
    for _ in 0..20 {
        if let Ok(stats) = queue.stats().await {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    queue.stats().await.expect("stats")
}

/// Summary of a run: distinct jobs seen, and how many extra runs (duplicates) there were.
#[derive(Debug)]
pub struct Tally {
    pub distinct: u64,
    pub duplicates: u64,
    pub missing: Vec<u64>,
}

pub fn tally(counts: &HashMap<u64, u64>, expected: impl IntoIterator<Item = u64>) -> Tally {
    let missing: Vec<u64> = expected
        .into_iter()
        .filter(|n| !counts.contains_key(n))
        .collect();
    Tally {
        distinct: counts.len() as u64,
        duplicates: counts.values().map(|c| c.saturating_sub(1)).sum(),
        missing,
    }
}

/// Polls `check` every 100 ms until it is true; panics after `limit` (a hang guard only).
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    super::poll(what, limit, Duration::from_millis(100), || {
        let checked = check();
        async move { checked.await.then_some(()).ok_or_else(String::new) }
    })
    .await
}

/// Waits until `key` holds `n` distinct jobs. Uses a fresh connection per check so the
/// harness itself never depends on reconnect logic under test.
pub async fn wait_for_distinct(server_url: &str, key: &str, n: u64, limit: Duration) {
    let client = redis::Client::open(server_url).expect("client");
    let what = format!("{n} distinct jobs in {key}");
    super::poll(&what, limit, Duration::from_millis(100), || async {
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return Err("(Redis unreachable)".to_owned());
        };
        match conn.hlen::<_, u64>(key).await {
            Ok(len) if len >= n => Ok(()),
            Ok(len) => Err(format!("(saw {len})")),
            Err(e) => Err(format!("({e})")),
        }
    })
    .await
}

/// Worker stderr goes to the file named by `QUEUE_WORKER_LOGFILE` (appending), else nowhere.
fn worker_log() -> Stdio {
    match std::env::var("QUEUE_WORKER_LOGFILE") {
        Ok(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        Err(_) => Stdio::null(),
    }
}

/// A `queue_worker` process, killed on drop.
pub struct WorkerProcess {
    child: Option<Child>,
}

impl WorkerProcess {
    pub fn spawn(
        server: &RedisServer,
        queue: &str,
        concurrency: usize,
        orphan_timeout: &str,
    ) -> Self {
        Self::spawn_with_env(server, queue, concurrency, orphan_timeout, &[], None)
    }

    /// Like [`WorkerProcess::spawn`], with extra environment variables (e.g. `LD_PRELOAD` of
    /// libfaketime, for a worker whose wall clock is off) and its stderr (warn logs) to `log`.
    pub fn spawn_with_env(
        server: &RedisServer,
        queue: &str,
        concurrency: usize,
        orphan_timeout: &str,
        envs: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("worker log file")),
            None => worker_log(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_queue_worker"))
            .envs(envs.iter().copied())
            .arg(server.url())
            .arg(queue)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--orphan-timeout", orphan_timeout])
            .args(["--prefix", PREFIX])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn queue_worker");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready", "worker did not start");
        Self { child: Some(child) }
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the worker.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no cleanup at all, like a crashed host.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An in-process apalis worker running until `stop` is called.
pub struct InProcessWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), WorkerError>>,
}

impl InProcessWorker {
    pub fn spawn(
        stop: tokio::sync::oneshot::Sender<()>,
        handle: tokio::task::JoinHandle<Result<(), WorkerError>>,
    ) -> Self {
        Self {
            stop: Some(stop),
            handle,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("worker stops");
        result.expect("worker task").expect("worker ends cleanly");
    }
}

pub fn stop_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = Result<(), std::io::Error>> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
        Ok(())
    })
}

/// Spawns a worker whose handler records each job into `processed_key(queue)`.
pub fn recording_worker(
    name: &str,
    queue: RedisQueue<TestJob>,
    concurrency: usize,
) -> InProcessWorker {
    #[derive(Clone)]
    struct Recorder {
        conn: RedisConn,
        key: String,
        started_key: String,
    }
    async fn handle(job: TestJob, recorder: Data<Recorder>) -> Result<(), BoxDynError> {
        let mut conn = recorder.conn.clone();
        if job.sleep_ms > 0 {
            // A job that takes time says when it started (a test may wait for that).
            let _: i64 = conn.hincr(&recorder.started_key, job.n, 1).await?;
            tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
        }
        let _: i64 = conn.hincr(&recorder.key, job.n, 1).await?;
        Ok(())
    }
    let recorder = Recorder {
        conn: queue.connection(),
        key: processed_key(&queue.config().queue),
        started_key: started_key(&queue.config().queue),
    };
    let (stop, signal) = stop_signal();
    let worker = WorkerBuilder::new(name)
        .backend(queue)
        .data(recorder)
        .concurrency(concurrency)
        .build(handle);
    InProcessWorker {
        stop: Some(stop),
        handle: tokio::spawn(worker.run_until(signal)),
    }
}
