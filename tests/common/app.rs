//! `spawn_app` for payouts: a private redis-server, an in-process sandbox, settings pointing at
//! both, and worker pools in-process or as real `tarspay-worker worker` processes.

use super::redis_server::RedisServer;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tarspay_sandbox::{Sandbox, SandboxConfig, SandboxMerchant};
use tarspay_worker::config::Settings;
use tarspay_worker::deployment::Deployment;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::ledger::Outcome;
use tarspay_worker::producer::Producer;

pub const MCH_NO: &str = "M1234567890";
pub const BIN: &str = env!("CARGO_BIN_EXE_tarspay-dev");

/// The Redis a test app owns: one server, or a local Redis Cluster.
pub enum AppRedis {
    Single(RedisServer),
    Cluster(local_redis::LocalCluster),
}

impl AppRedis {
    /// `TARSPAY_REDIS_URL`: the server's URL, or the cluster's masters as seeds.
    pub fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster(cluster) => cluster.seeds(),
        }
    }

    /// A connection of the test's own (a cluster connection for a cluster).
    pub async fn conn(&self) -> tarspay_worker::redis_conn::RedisConn {
        match self {
            Self::Single(server) => server.conn().await,
            Self::Cluster(cluster) => {
                let client = tarspay_worker::redis_conn::RedisClient::open(
                    &cluster.seeds(),
                    tarspay_worker::redis_conn::ClusterMode::On,
                )
                .await
                .expect("cluster client");
                client
                    .connect(Default::default())
                    .expect("cluster connection")
            }
        }
    }

    /// The single server (restart, crash and port tests run on one).
    pub fn server(&mut self) -> &mut RedisServer {
        match self {
            Self::Single(server) => server,
            Self::Cluster(_) => panic!("this test needs a single redis-server, not a cluster"),
        }
    }

    pub fn cluster(&mut self) -> &mut local_redis::LocalCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            Self::Single(_) => panic!("this test needs a cluster"),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Self::Single(server) => server.port,
            Self::Cluster(_) => panic!("this test needs a single redis-server, not a cluster"),
        }
    }

    pub fn stop(&mut self) {
        self.server().stop()
    }

    pub fn restart(&mut self) {
        self.server().restart()
    }

    pub fn crash(&mut self) {
        self.server().crash()
    }
}

pub struct TestApp {
    pub redis: AppRedis,
    pub sandbox: Sandbox,
    pub key: PrivateKey,
    /// The TARSPAY_* variables every worker of this app uses.
    pub env: Vec<(String, String)>,
    pub settings: Settings,
    pub deployment: Deployment,
    pub producer: Producer,
}

/// Short timers so retries, polls and takeovers happen in seconds.
pub async fn spawn_app(appendonly: bool, change: impl FnOnce(&mut SandboxConfig)) -> TestApp {
    spawn_app_with(appendonly, change, &[]).await
}

pub async fn spawn_app_with(
    appendonly: bool,
    change: impl FnOnce(&mut SandboxConfig),
    extra_env: &[(&str, &str)],
) -> TestApp {
    spawn_app_on(
        AppRedis::Single(RedisServer::start(appendonly)),
        change,
        extra_env,
    )
    .await
}

/// [`spawn_app_with`] on a Redis the caller started (a cluster, say).
pub async fn spawn_app_on(
    redis: AppRedis,
    change: impl FnOnce(&mut SandboxConfig),
    extra_env: &[(&str, &str)],
) -> TestApp {
    let key = PrivateKey::generate();
    let mut config = SandboxConfig {
        merchants: vec![SandboxMerchant {
            mch_no: MCH_NO.into(),
            public_key: key.public_key(),
            balance: 1_000_000_000u64.into(),
        }],
        final_after: Duration::from_millis(200),
        callbacks: false,
        ..SandboxConfig::default()
    };
    change(&mut config);
    let sandbox = Sandbox::start(config, "127.0.0.1:0").await.unwrap();
    let mut env: Vec<(String, String)> = [
        ("TARSPAY_REDIS_URL", redis.url()),
        ("TARSPAY_GATEWAY_URL", sandbox.url()),
        ("TARSPAY_MCH_NO", MCH_NO.to_owned()),
        ("TARSPAY_PRIVATE_KEY", key.expose_hex()),
        (
            "TARSPAY_NOTIFY_URL",
            "http://127.0.0.1:9/tarspay/notify".to_owned(),
        ),
        ("TARSPAY_QUEUE_PREFIX", "apptest".to_owned()),
        // Every pipeline test runs partitioned (one test runs the one-partition layout).
        ("TARSPAY_PARTITIONS", "3".to_owned()),
        ("TARSPAY_RETRY_BASE_DELAY", "50ms".to_owned()),
        ("TARSPAY_RETRY_MAX_DELAY", "300ms".to_owned()),
        ("TARSPAY_RETRY_MAX_ATTEMPTS", "5".to_owned()),
        ("TARSPAY_POLL_FIRST_DELAY", "100ms".to_owned()),
        ("TARSPAY_POLL_MAX_INTERVAL", "300ms".to_owned()),
        ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "1s".to_owned()),
        ("TARSPAY_ORPHAN_TIMEOUT", "3s".to_owned()),
        ("TARSPAY_SETTLE_WINDOW", "1s".to_owned()),
        ("TARSPAY_SHUTDOWN_GRACE", "2s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra_env {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    let settings = Settings::load_with_env(None, env.clone()).unwrap();
    let deployment = Deployment::connect(&settings).await.unwrap();
    let producer = deployment.producer(&settings).unwrap();
    TestApp {
        redis,
        sandbox,
        key,
        env,
        settings,
        deployment,
        producer,
    }
}

/// An in-process worker pool; stops when dropped or on `stop()`.
pub struct InProcessPool {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessPool {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
        }
    }
}

impl Drop for InProcessPool {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

impl TestApp {
    pub fn pool(&self, concurrency: usize) -> InProcessPool {
        let settings = self.settings.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(err) = tarspay_worker::worker::run(&settings, concurrency, shutdown).await {
                eprintln!("worker pool ended: {err}");
            }
        });
        InProcessPool {
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// A `tarspay-worker worker` process with this app's settings.
    pub fn worker_process(&self, concurrency: usize) -> WorkerProcess {
        self.worker_process_with(concurrency, &[])
    }

    /// [`TestApp::worker_process`] with extra environment variables (e.g. libfaketime's, for
    /// a worker whose wall clock is off).
    pub fn worker_process_with(&self, concurrency: usize, extra: &[(&str, &str)]) -> WorkerProcess {
        let mut command = self.command();
        command.envs(extra.iter().copied());
        command.env(
            "RUST_LOG",
            std::env::var("WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        );
        let child = command
            .args(["worker", "--concurrency", &concurrency.to_string()])
            .stdout(Stdio::null())
            .stderr(if std::env::var("WORKER_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn tarspay-worker worker");
        WorkerProcess(Some(child))
    }

    /// [`TestApp::worker_process`] serving its `/metrics` on a free loopback port: the process
    /// and that address.
    pub fn worker_process_with_metrics(&self, concurrency: usize) -> (WorkerProcess, String) {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let worker =
            self.worker_process_with(concurrency, &[("TARSPAY_WORKER_METRICS_LISTEN", &addr)]);
        (worker, addr)
    }

    /// Serves the callback receiver and the API on `listener` until the returned sender is
    /// dropped or fired.
    pub fn serve_on(&self, listener: tokio::net::TcpListener) -> tokio::sync::oneshot::Sender<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let settings = self.settings.clone();
        let deployment = self.deployment.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(err) =
                tarspay_worker::server::serve(&settings, deployment, listener, shutdown).await
            {
                eprintln!("server ended: {err}");
            }
        });
        stop
    }

    pub async fn enqueue(&self, payout: serde_json::Value) {
        self.producer.enqueue_json(&payout, None).await.unwrap();
    }

    /// Every partition's outcomes (each partition's in stream order).
    pub async fn outcomes(&self) -> Vec<Outcome> {
        let mut all = Vec::new();
        for partition in self.deployment.partitions() {
            let mut last = "0".to_owned();
            loop {
                let page = partition.ledger.outcomes_after(&last, 1000).await.unwrap();
                if page.is_empty() {
                    break;
                }
                last = page.last().unwrap().0.clone();
                all.extend(page.into_iter().map(|(_, o)| o));
            }
        }
        all
    }

    /// `n` order ids held by the partition of `first` (which comes first): `first`, then
    /// `first-2`, `first-3`, … that hash to it.
    pub fn ids_in_partition_of(&self, first: &str, n: usize) -> Vec<String> {
        let index = self.partition(first).index;
        std::iter::once(first.to_owned())
            .chain((2..).map(|k| format!("{first}-{k}")))
            .filter(|id| self.partition(id).index == index)
            .take(n)
            .collect()
    }

    /// The partition holding order `id`.
    pub fn partition(&self, id: &str) -> &tarspay_worker::deployment::Partition {
        self.deployment.partition_of(id)
    }

    /// Waits (hang guard only) until `n` outcomes exist, then returns them by mchOrderNo,
    /// asserting no order has two.
    pub async fn wait_outcomes(&self, n: usize) -> HashMap<String, Outcome> {
        let every = Duration::from_millis(50);
        super::poll("the outcomes", Duration::from_secs(120), every, || async {
            let count = self.deployment.outcome_count().await.unwrap_or(0) as usize;
            (count >= n)
                .then_some(())
                .ok_or(format!("({count} of {n})"))
        })
        .await;
        let outcomes = self.outcomes().await;
        let mut by_id = HashMap::new();
        for outcome in outcomes {
            let id = outcome.mch_order_no.to_string();
            assert!(
                by_id.insert(id.clone(), outcome).is_none(),
                "two outcomes for {id}"
            );
        }
        by_id
    }
}

/// A worker process, SIGKILLed on drop.
pub struct WorkerProcess(Option<Child>);

impl WorkerProcess {
    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) to the running process.
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.0 {
            let status = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{name} failed");
        }
    }

    /// Whether the process has exited (its code, if it did).
    #[allow(dead_code)]
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let child = self.0.as_mut()?;
        child
            .try_wait()
            .expect("wait for the worker")
            .map(|s| s.code())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `limit` for the graceful exit: its exit code. A process
    /// still running after that is killed and the test fails (a hang guard, not a speed
    /// check).
    pub fn terminate_within(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.0.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the worker") {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hang guard: the worker did not stop within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.0.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()?.code()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TestApp {
    /// The `tarspay-worker` binary with exactly this app's TARSPAY_* settings (none of the
    /// caller's own).
    pub fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TARSPAY_") {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Runs `tarspay-worker audit --json` against this app; its exit code and report.
    pub fn audit(&self) -> (i32, serde_json::Value) {
        let output = self
            .command()
            .env("RUST_LOG", "warn")
            .args(["audit", "--json", "--confirm", "500ms"])
            .output()
            .expect("run tarspay-worker audit");
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
            panic!(
                "audit printed no report ({err}): {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap_or(-1), report)
    }
}

/// An Indian payout with this id and amount.
pub fn inr(id: &str, amount: &str) -> serde_json::Value {
    serde_json::json!({"mchOrderNo": id, "amount": amount, "currency": "INR", "wayCode": "UPI",
        "customerName": "Asha", "customerEmail": "asha@example.in", "customerContact": "9876543210"})
}

/// Runs `tarspay-dev bench ARGS…` and returns its JSON lines (one per result); a failed run
/// fails the test with the bench's stderr.
pub fn bench_lines(args: &[&str]) -> Vec<serde_json::Value> {
    let output = std::process::Command::new(BIN)
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tarspay-dev bench");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// A bench line's percentile summary `field`: p50 ≤ p99 ≤ max, max finite; `non_negative`
/// for intervals that cannot be negative on one host's clock.
pub fn assert_percentiles(line: &serde_json::Value, field: &str, non_negative: bool) {
    let summary = &line[field];
    let value = |p: &str| {
        summary[p]
            .as_f64()
            .unwrap_or_else(|| panic!("no {field}.{p} in {line}"))
    };
    let (p50, p99, max) = (value("p50"), value("p99"), value("max"));
    assert!(p50 <= p99 && p99 <= max, "{field} unordered: {line}");
    assert!(max.is_finite(), "{field}: {line}");
    if non_negative {
        assert!(p50 >= 0.0, "{field} negative: {line}");
    }
}
