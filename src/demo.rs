//! The demo, the README's main command: a sample payroll paid end to end through the real
//! pipeline (producer → ledger → Redis Streams queue → worker pool → signed calls to an
//! in-process sandbox → signed callbacks to the in-process receiver → outcome stream), with a
//! realistic mix of faults and final states. It needs no settings and no merchant account;
//! Redis comes from `TARSPAY_REDIS_URL`, else 127.0.0.1:6379, else a private redis-server.
//! Everything it writes to a shared Redis lives under its own prefix and is deleted at the end.
//!
//! With [`DemoOptions::console`] the workers and `serve` keep running after the payroll, with
//! the operator console at `/console/` (an admin and a viewer token), until the caller ends
//! the demo ([`Demo::finish`]).

use indicatif::{ProgressBar, ProgressStyle};
use local_redis::{self, LocalRedis, LocalRedisError};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};
use tarspay_sandbox::rules::SANDBOX_SYSTEM_PRIVATE_KEY;
use tarspay_sandbox::{
    Endpoint, FaultAction, FaultRule, OutcomeRule, Sandbox, SandboxConfig, SandboxMerchant,
};
use tarspay_worker::config::{ConfigError, Settings};
use tarspay_worker::deployment::Deployment;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::ids::BatchId;
use tarspay_worker::ledger::Phase;
use tarspay_worker::worker::WorkerError;

pub const DEMO_MCH_NO: &str = "M0000000001";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub payouts: usize,
    pub concurrency: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Redis to use; `None` tries 127.0.0.1:6379, then a private redis-server.
    pub redis_url: Option<String>,
    /// Keep the workers and `serve` (with the operator console) running after the payroll,
    /// with these login tokens.
    pub console: Option<ConsoleTokens>,
}

/// The console's login tokens: the admin's (`TARSPAY_API_TOKEN`, which is also the API's
/// bearer token) and the viewer's (`TARSPAY_VIEWER_TOKEN`).
#[derive(Debug, Clone)]
pub struct ConsoleTokens {
    pub admin: String,
    pub viewer: String,
}

impl ConsoleTokens {
    /// `admin` and `viewer` where given (non-empty), else 32 random hex digits each.
    pub fn or_random(admin: Option<String>, viewer: Option<String>) -> Self {
        let random = || {
            format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            )
        };
        let given = |token: Option<String>| token.filter(|t| !t.trim().is_empty());
        Self {
            admin: given(admin).unwrap_or_else(random),
            viewer: given(viewer).unwrap_or_else(random),
        }
    }
}

/// Where the console of a [`Demo`] run with [`DemoOptions::console`] answers.
#[derive(Debug, Clone)]
pub struct ConsoleAccess {
    /// `http://127.0.0.1:PORT/console/`.
    pub url: String,
    pub tokens: ConsoleTokens,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sandbox(#[from] tarspay_sandbox::SandboxError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Deployment(#[from] tarspay_worker::deployment::DeploymentError),
    #[error(
        "no Redis answered at {tried} and no private one could be started: {source}. Start one (apt-get install redis-server && redis-server, or docker run -p 6379:6379 redis:7) or set TARSPAY_REDIS_URL"
    )]
    NoRedis {
        tried: String,
        source: LocalRedisError,
    },
    #[error("sample payout {0} is invalid: {1}")]
    Sample(String, tarspay_worker::payout::ValidationErrors),
    #[error("demo step failed: {0}")]
    Step(String),
}

/// What the demo measured.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub payouts: usize,
    pub redis: String,
    /// Final status → count.
    pub by_status: BTreeMap<String, usize>,
    /// Gateway code or transport failure → creates retried because of it.
    pub retries_by_code: Vec<(String, u64)>,
    pub gateway_orders: usize,
    pub create_calls: u32,
    pub callbacks_acknowledged: usize,
    pub elapsed: Duration,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
}

impl DemoSummary {
    pub fn payouts_per_second(&self) -> f64 {
        self.payouts as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "payouts: {} (Redis: {})", self.payouts, self.redis)?;
        writeln!(
            f,
            "redis safety: skipped (TARSPAY_REDIS_UNSAFE=true) - a demo on a throwaway prefix; `worker` and `serve` refuse a Redis without AOF or with eviction"
        )?;
        writeln!(f, "outcomes by status:")?;
        for (status, count) in &self.by_status {
            writeln!(f, "  {status:<12} {count}")?;
        }
        writeln!(f, "retries by code:")?;
        if self.retries_by_code.is_empty() {
            writeln!(f, "  none")?;
        }
        for (code, count) in &self.retries_by_code {
            writeln!(f, "  {code:<16} {count}")?;
        }
        writeln!(
            f,
            "gateway orders: {} from {} create calls (one order per mchOrderNo, never a new number)",
            self.gateway_orders, self.create_calls
        )?;
        writeln!(f, "callbacks acknowledged: {}", self.callbacks_acknowledged)?;
        writeln!(
            f,
            "throughput: {:.1} payouts/s over {:.2}s",
            self.payouts_per_second(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "latency enqueue->outcome: p50 {} ms, p99 {} ms",
            self.latency_p50.as_millis(),
            self.latency_p99.as_millis()
        )
    }
}

/// The sample payroll: four countries; prefixes steer the sandbox into faults and final states
/// (see [`demo_sandbox_config`]): per 20 payouts one each of `-1`, `500323` (twice), a dropped
/// connection after commit, a 502 page, an answer slower than the client's timeout, a
/// rejection and a failure.
pub fn sample_payroll(count: usize) -> Vec<serde_json::Value> {
    (0..count)
        .map(|i| {
            let prefix = match i % 20 {
                3 => "SYS",
                5 => "SLOW",
                7 => "RCE",
                11 => "DROP",
                13 => "BAD",
                17 => "REJ",
                19 => "FAIL",
                _ => "PAY",
            };
            let id = format!("{prefix}-{i:06}");
            match i % 4 {
                0 => json!({"mchOrderNo": id, "amount": format!("{}.50", 100 + i % 900), "currency": "INR", "wayCode": "UPI",
                            "customerName": "Asha Rao", "customerEmail": "asha@example.in", "customerContact": "9876543210"}),
                1 => json!({"mchOrderNo": id, "amount": format!("{}", 100 + i % 5000), "currency": "BDT", "wayCode": "EWALLET_BKASH",
                            "walletId": "01712345678"}),
                2 => json!({"mchOrderNo": id, "amount": format!("{}", 100 + i % 7000), "currency": "KES", "wayCode": "EWALLET_MPESA",
                            "customerContact": "254712345678", "customerName": "Wanjiru K", "customerEmail": "w@example.ke"}),
                _ => json!({"mchOrderNo": id, "amount": format!("{}.20", 50 + i % 3000), "currency": "MYR", "wayCode": "MAYBANK",
                            "customerName": "Aminah", "customerAccountNumber": "1234567890"}),
            }
        })
        .collect()
}

/// Faults and final states keyed by the prefixes [`sample_payroll`] uses.
pub fn demo_sandbox_config(merchant_key: &PrivateKey) -> SandboxConfig {
    let fault = |prefix: &str, times: u32, action: FaultAction| FaultRule {
        prefix: prefix.into(),
        endpoint: Endpoint::CreatePayout,
        times: Some(times),
        action,
    };
    SandboxConfig {
        merchants: vec![SandboxMerchant {
            mch_no: DEMO_MCH_NO.into(),
            public_key: merchant_key.public_key(),
            balance: 1_000_000_000u64.into(),
        }],
        final_after: Duration::from_millis(300),
        callbacks: true,
        callback_retry_delay: Duration::from_millis(200),
        faults: vec![
            fault(
                "SYS-",
                1,
                FaultAction::Code {
                    code: -1,
                    msg: None,
                },
            ),
            fault(
                "RCE-",
                2,
                FaultAction::Code {
                    code: 500323,
                    msg: None,
                },
            ),
            fault("DROP-", 1, FaultAction::CommitThenDrop),
            fault(
                "BAD-",
                1,
                FaultAction::Http {
                    status: 502,
                    commit: false,
                    body: None,
                },
            ),
            fault("SLOW-", 1, FaultAction::Slow { ms: 3_000 }),
        ],
        outcomes: vec![
            OutcomeRule {
                prefix: "REJ-".into(),
                state: 8,
                final_after_ms: None,
            },
            OutcomeRule {
                prefix: "FAIL-".into(),
                state: 3,
                final_after_ms: None,
            },
        ],
        ..SandboxConfig::default()
    }
}

/// Finds a Redis: the given URL, else 127.0.0.1:6379, else a private one (kept alive by the
/// returned guard).
fn find_redis(url: Option<String>) -> Result<(String, Option<LocalRedis>), DemoError> {
    let tried = url.unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());
    if local_redis::answers(&tried) {
        return Ok((tried, None));
    }
    match LocalRedis::start(local_redis::Durability::Off) {
        Ok(local) => Ok((local.url().to_owned(), Some(local))),
        Err(source) => Err(DemoError::NoRedis { tried, source }),
    }
}

/// Runs the demo end to end and returns its summary (with [`DemoOptions::console`], the
/// console is up until this returns: use [`Demo::start`] to keep it).
pub async fn run(options: DemoOptions) -> Result<DemoSummary, DemoError> {
    let demo = Demo::start(options).await?;
    let summary = demo.summary.clone();
    demo.finish().await;
    Ok(summary)
}

/// A demo whose payroll is paid. Without a console its workers and server are stopped
/// already; with one they serve until [`Demo::finish`], which also deletes the demo's keys.
pub struct Demo {
    pub summary: DemoSummary,
    /// Where to log in, with [`DemoOptions::console`].
    pub console: Option<ConsoleAccess>,
    running: Option<Running>,
    deployment: Deployment,
    prefix: String,
    _sandbox: Sandbox,
    _private_redis: Option<LocalRedis>,
}

/// The demo's worker pool and server, while they run.
struct Running {
    stop_workers: tokio::sync::oneshot::Sender<()>,
    stop_server: tokio::sync::oneshot::Sender<()>,
    workers: tokio::task::JoinHandle<Result<(), WorkerError>>,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

impl Running {
    /// Stops the workers (in-flight jobs finish within the shutdown grace) and the server.
    async fn stop(self) {
        let _ = self.stop_workers.send(());
        let _ = self.stop_server.send(());
        let _ = self.workers.await;
        let _ = self.server.await;
    }
}

impl Demo {
    /// Stops what still runs and deletes the demo's keys.
    pub async fn finish(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        cleanup(&self.deployment, &self.prefix).await;
    }

    /// Starts everything and pays the payroll.
    pub async fn start(options: DemoOptions) -> Result<Self, DemoError> {
        start(options).await
    }
}

async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
    let (redis_url, private_redis) = find_redis(options.redis_url.clone())?;
    let metrics = tarspay_worker::metrics::install();
    let key = PrivateKey::generate();
    let sandbox = Sandbox::start(demo_sandbox_config(&key), "127.0.0.1:0").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Step(format!("cannot bind the callback receiver: {e}")))?;
    let receiver = listener
        .local_addr()
        .map_err(|e| DemoError::Step(e.to_string()))?;
    let prefix = format!("tarspay-demo-{:08x}", rand::random::<u32>());
    let system_public = PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY)
        .map_err(|e| DemoError::Step(e.to_string()))?
        .public_key()
        .to_hex();
    let env = [
        ("TARSPAY_REDIS_URL", redis_url.clone()),
        ("TARSPAY_GATEWAY_URL", sandbox.url()),
        ("TARSPAY_MCH_NO", DEMO_MCH_NO.to_owned()),
        ("TARSPAY_PRIVATE_KEY", key.expose_hex()),
        (
            "TARSPAY_NOTIFY_URL",
            format!("http://{receiver}/tarspay/notify"),
        ),
        ("TARSPAY_SYSTEM_PUBLIC_KEY", system_public),
        ("TARSPAY_QUEUE_PREFIX", prefix.clone()),
        // A demo on a throwaway prefix: the dev Redis on 6379 usually has no AOF.
        ("TARSPAY_REDIS_UNSAFE", "true".to_owned()),
        ("TARSPAY_RETRY_BASE_DELAY", "100ms".to_owned()),
        ("TARSPAY_RETRY_MAX_DELAY", "1s".to_owned()),
        ("TARSPAY_POLL_FIRST_DELAY", "1s".to_owned()),
        ("TARSPAY_POLL_MAX_INTERVAL", "2s".to_owned()),
        ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "2s".to_owned()),
        ("TARSPAY_ORPHAN_TIMEOUT", "20s".to_owned()),
        ("TARSPAY_SHUTDOWN_GRACE", "2s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect::<Vec<_>>();
    let mut env = env;
    match &options.console {
        // The console opens only with a token; the admin's is the API's too.
        Some(tokens) => env.extend([
            ("TARSPAY_API_TOKEN".to_owned(), tokens.admin.clone()),
            ("TARSPAY_VIEWER_TOKEN".to_owned(), tokens.viewer.clone()),
        ]),
        None => env.push(("TARSPAY_API_AUTH_DISABLED".to_owned(), "true".to_owned())),
    }
    let settings = Settings::load_with_env(None, env)?;
    let deployment = Deployment::connect(&settings).await?;
    let producer = deployment.producer(&settings)?;
    let rules = producer.rules();
    let mut payroll = Vec::with_capacity(options.payouts);
    for row in sample_payroll(options.payouts) {
        let id = row["mchOrderNo"].as_str().unwrap_or_default().to_owned();
        payroll.push(
            rules
                .validate_json(&row)
                .map_err(|errors| DemoError::Sample(id, errors))?,
        );
    }

    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let settings = settings.clone();
        let deployment = deployment.clone();
        async move {
            let shutdown = async move {
                let _ = server_stopped.await;
            };
            tarspay_worker::server::serve(&settings, deployment, listener, shutdown).await
        }
    });
    let (stop_workers, workers_stopped) = tokio::sync::oneshot::channel::<()>();
    let workers = tokio::spawn({
        let settings = settings.clone();
        let concurrency = options.concurrency.max(1);
        async move {
            let shutdown = async move {
                let _ = workers_stopped.await;
            };
            tarspay_worker::worker::run(&settings, concurrency, shutdown).await
        }
    });

    let started = Instant::now();
    // Named for its payouts, so the same demo run is the same batch.
    let batch = BatchId::of_content("demo", &options.payouts.to_le_bytes());
    let batch_id = batch.as_str();
    producer
        .enqueue_batch(&payroll, &batch)
        .await
        .map_err(|e| DemoError::Step(e.to_string()))?;
    let running = Running {
        stop_workers,
        stop_server,
        workers,
        server,
    };
    if let Err(err) = follow(&deployment, batch_id, options.payouts, options.progress).await {
        running.stop().await;
        cleanup(&deployment, &prefix).await;
        return Err(err);
    }
    let elapsed = started.elapsed();

    // Without a console the pipeline stops before the summary is read (as it always did).
    let running = match options.console {
        Some(_) => Some(running),
        None => {
            running.stop().await;
            None
        }
    };

    let mut summary = summarize(&deployment, &payroll, elapsed).await?;
    summary.payouts = options.payouts;
    summary.redis = if private_redis.is_some() {
        format!("private redis-server at {redis_url}")
    } else {
        redis_url
    };
    let rendered = metrics.render();
    summary.retries_by_code = tarspay_worker::metrics::counter_by_label(
        &rendered,
        tarspay_worker::metrics::CREATE_RETRIES,
        "code",
    );
    let orders = sandbox.orders();
    summary.gateway_orders = orders.len();
    summary.create_calls = orders.iter().map(|o| o.create_attempts).sum();
    summary.callbacks_acknowledged = orders.iter().filter(|o| o.callback_acknowledged).count();
    let console = options.console.map(|tokens| ConsoleAccess {
        url: format!("http://{receiver}/console/"),
        tokens,
    });
    Ok(Demo {
        summary,
        console,
        running,
        deployment,
        prefix,
        _sandbox: sandbox,
        _private_redis: private_redis,
    })
}

async fn follow(
    deployment: &Deployment,
    batch_id: &str,
    total: usize,
    progress: bool,
) -> Result<(), DemoError> {
    let bar = if progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} final  {msg}  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let summary = deployment
            .batch_summary(batch_id)
            .await
            .map_err(|e| DemoError::Step(e.to_string()))?;
        let count = |phase: &str| summary.phases.get(phase).map_or(0, |t| t.count);
        let done: usize = summary
            .phases
            .iter()
            .filter(|(phase, _)| phase.parse::<Phase>().is_ok_and(Phase::is_final))
            .map(|(_, t)| t.count)
            .sum();
        bar.set_position(done as u64);
        bar.set_message(format!(
            "succeeded {}  failed {}  in flight {}",
            count("succeeded"),
            count("failed") + count("rejected") + count("conflict"),
            total - done
        ));
        if done >= total {
            bar.finish();
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Step(format!(
                "only {done} of {total} payouts final after 10 minutes"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn summarize(
    deployment: &Deployment,
    payroll: &[tarspay_worker::payout::PayoutRequest],
    elapsed: Duration,
) -> Result<DemoSummary, DemoError> {
    let mut summary = DemoSummary {
        elapsed,
        ..DemoSummary::default()
    };
    let mut latencies = Vec::with_capacity(payroll.len());
    for request in payroll {
        let record = deployment
            .order(&request.mch_order_no)
            .await
            .map_err(|e| DemoError::Step(e.to_string()))?
            .ok_or_else(|| DemoError::Step(format!("{} vanished", request.mch_order_no)))?;
        *summary
            .by_status
            .entry(record.phase.to_string())
            .or_default() += 1;
        if let Some(finished) = record.finished_at_ms {
            latencies.push(Duration::from_millis(
                finished.saturating_sub(record.created_at_ms),
            ));
        }
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    summary.latency_p50 = percentile(0.50);
    summary.latency_p99 = percentile(0.99);
    Ok(summary)
}

/// Deletes the demo's keys (all under its own prefix's hash tag).
async fn cleanup(deployment: &Deployment, prefix: &str) {
    let mut conn = deployment.partitions()[0].queue.connection();
    if let Err(err) = local_redis::delete_prefix(&mut conn, prefix).await {
        tracing::warn!(error = %err, prefix, "could not delete the demo's keys");
    }
}
