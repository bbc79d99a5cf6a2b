//! `bench e2e`: payouts from enqueue to final outcome through `tarspay-worker worker`
//! processes, against `tarspay-dev sandbox` as its own process: real signing on every call
//! the worker makes and real verification on every call the sandbox receives.
//!
//! The sandbox finalises orders 100 ms after create and the first poll waits 150 ms (the
//! production default is 2 s), so the run measures the pipeline rather than timers. The
//! latency of one payout still includes that poll delay and the queue's promotion interval
//! of delayed jobs (up to 500 ms); the JSON line says so.
//!
//! With `--partitions P` the workers and the bench's producer run a deployment of P partitions
//! (`TARSPAY_PARTITIONS`); on a cluster (`--cluster M`, or seeds in `--redis-url`) the workers
//! get the seeds as `TARSPAY_REDIS_URL`. Server-wide numbers (commands, Redis CPU) are added
//! up over the masters.

use super::shared::{
    ChildProcess, RedisChoice, RedisTarget, SandboxProcess, ServeProcess, client_addr,
    commandstats_delta, latency_summary, now_us, payout_calls, proc_cpu_seconds, round,
};
use super::{BenchError, BenchOptions, Report};
use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tarspay_worker::config::Settings;
use tarspay_worker::deployment::Deployment;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::ledger::{Ledger, Outcome};
use tarspay_worker::producer::Producer;
use tarspay_worker::redis_conn::RedisConn;

pub const DEFAULT_N: u64 = 20_000;
pub const DEFAULT_CONCURRENCY: usize = 64;
pub const MCH_NO: &str = "M1234567890";
/// Enqueue calls in flight from the bench process.
const ENQUEUE_PARALLEL: usize = 64;

/// Timers of one pipeline run, and how final states reach the workers.
#[derive(Debug, Clone)]
pub struct PipelineTimers {
    /// `--final-after` of the sandbox.
    pub final_after: &'static str,
    pub poll_first_delay: &'static str,
    pub poll_max_interval: &'static str,
    /// The sandbox sends signed callbacks to a `serve` process of the pipeline; otherwise it
    /// runs with `--no-callbacks` and only the workers' polls find final states.
    pub callbacks: bool,
}

impl Default for PipelineTimers {
    fn default() -> Self {
        Self {
            final_after: "100ms",
            poll_first_delay: "150ms",
            poll_max_interval: "500ms",
            callbacks: false,
        }
    }
}

/// Redis, the sandbox process, worker processes, with callbacks a `serve` process, and a
/// producer in this process.
pub struct Pipeline {
    pub target: RedisTarget,
    pub sandbox: SandboxProcess,
    /// The callback receiver, with [`PipelineTimers::callbacks`].
    pub serve: Option<ServeProcess>,
    pub workers: Vec<ChildProcess>,
    /// The TARSPAY_* variables of every worker.
    pub env: Vec<(String, String)>,
    pub settings: Settings,
    pub deployment: Deployment,
    pub producer: Producer,
    pub partitions: usize,
    concurrency: usize,
}

/// A merchant profile besides `default` ([`MCH_NO`]), for a pipeline of several merchants:
/// the sandbox registers it and the workers get it as `TARSPAY_MERCHANTS__<NAME>__*`, with
/// a fresh key and the pipeline's notify URL.
#[derive(Debug, Clone)]
pub struct ExtraMerchant {
    /// The profile's name (lower case, as in `[merchants.<name>]`).
    pub name: &'static str,
    pub mch_no: &'static str,
    /// Comma-separated currencies routed to it.
    pub currencies: &'static str,
}

impl ExtraMerchant {
    /// `TARSPAY_MERCHANTS__<NAME>__<FIELD>`.
    fn var(&self, field: &str) -> String {
        format!(
            "TARSPAY_MERCHANTS__{}__{field}",
            self.name.to_ascii_uppercase()
        )
    }
}

impl Pipeline {
    /// A deployment of `partitions` partitions on the Redis of `redis`.
    pub async fn start(
        redis: RedisChoice<'_>,
        partitions: usize,
        name: &str,
        workers: usize,
        concurrency: usize,
        timers: &PipelineTimers,
        extra_env: &[(String, String)],
    ) -> Result<Self, BenchError> {
        Self::start_with_merchants(
            redis,
            partitions,
            name,
            workers,
            concurrency,
            timers,
            extra_env,
            &[],
        )
        .await
    }

    /// [`Pipeline::start`] with merchant profiles besides `default`. `workers` may be 0
    /// (start them later with [`Pipeline::spawn_worker`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_with_merchants(
        redis: RedisChoice<'_>,
        partitions: usize,
        name: &str,
        workers: usize,
        concurrency: usize,
        timers: &PipelineTimers,
        extra_env: &[(String, String)],
        merchants: &[ExtraMerchant],
    ) -> Result<Self, BenchError> {
        let target = RedisTarget::new(redis, name).await?;
        let key = PrivateKey::generate();
        let mut merchant_env = vec![
            ("TARSPAY_MCH_NO".to_owned(), MCH_NO.to_owned()),
            ("TARSPAY_PRIVATE_KEY".to_owned(), key.expose_hex()),
            ("TARSPAY_LOG__FILTER".to_owned(), "warn".to_owned()),
        ];
        // The sandbox registers every profile of its settings that has a number and a key.
        for merchant in merchants {
            merchant_env.extend([
                (merchant.var("MCH_NO"), merchant.mch_no.to_owned()),
                (
                    merchant.var("PRIVATE_KEY"),
                    PrivateKey::generate().expose_hex(),
                ),
                (merchant.var("CURRENCIES"), merchant.currencies.to_owned()),
            ]);
        }
        let sandbox =
            SandboxProcess::spawn(timers.final_after, timers.callbacks, &[], &merchant_env)?;
        let mut env = merchant_env;
        env.extend(
            [
                ("TARSPAY_REDIS_URL", target.url.clone()),
                ("TARSPAY_GATEWAY_URL", sandbox.url.clone()),
                (
                    "TARSPAY_SYSTEM_PUBLIC_KEY",
                    sandbox.system_public_key.clone(),
                ),
                ("TARSPAY_QUEUE_PREFIX", target.prefix.clone()),
                ("TARSPAY_PARTITIONS", partitions.to_string()),
                // Benchmarks run on throwaway data, on the documented (AOF-less) set-up.
                ("TARSPAY_REDIS_UNSAFE", "true".to_owned()),
                (
                    "TARSPAY_POLL_FIRST_DELAY",
                    timers.poll_first_delay.to_owned(),
                ),
                (
                    "TARSPAY_POLL_MAX_INTERVAL",
                    timers.poll_max_interval.to_owned(),
                ),
                ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "10s".to_owned()),
                ("TARSPAY_ORPHAN_TIMEOUT", "30s".to_owned()),
                ("TARSPAY_SHUTDOWN_GRACE", "2s".to_owned()),
                ("TARSPAY_CONCURRENCY", concurrency.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v)),
        );
        env.extend(extra_env.iter().cloned());
        // The receiver first: the workers send its address as each create's notifyUrl.
        let serve = if timers.callbacks {
            Some(spawn_serve(&env)?)
        } else {
            None
        };
        let notify_url = serve.as_ref().map_or_else(
            // Nothing listens on the discard port: with callbacks off none is sent anyway.
            || "http://127.0.0.1:9/tarspay/notify".to_owned(),
            ServeProcess::notify_url,
        );
        for merchant in merchants {
            env.push((merchant.var("NOTIFY_URL"), notify_url.clone()));
        }
        env.push(("TARSPAY_NOTIFY_URL".to_owned(), notify_url));
        let settings = Settings::load_with_env(None, env.clone())?;
        let deployment = Deployment::connect(&settings)
            .await
            .map_err(|err| BenchError::Setup(err.to_string()))?;
        let producer = deployment.producer(&settings)?;
        let mut pipeline = Self {
            target,
            sandbox,
            serve,
            workers: Vec::new(),
            env,
            settings,
            deployment,
            producer,
            partitions,
            concurrency,
        };
        for _ in 0..workers {
            pipeline.spawn_worker()?;
        }
        pipeline.wait_workers_alive(workers as u64).await?;
        Ok(pipeline)
    }

    /// Starts one more `tarspay-worker worker` process.
    pub fn spawn_worker(&mut self) -> Result<(), BenchError> {
        let concurrency = self.concurrency.to_string();
        let worker = ChildProcess::spawn(
            "worker",
            &["worker", "--concurrency", &concurrency],
            &self.env,
            Stdio::null(),
        )?;
        self.workers.push(worker);
        Ok(())
    }

    /// Waits until `k` workers heartbeat (hang guard only).
    pub async fn wait_workers_alive(&mut self, k: u64) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.deployment.queue_stats().await?.workers_alive >= k {
                return Ok(());
            }
            if self.workers.iter_mut().any(|w| !w.is_running()) {
                return Err(BenchError::Setup("a worker process exited".into()));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!("{k} workers to start")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(ChildProcess::pid).collect()
    }

    /// A reader of every partition's outcome stream on its own connection.
    pub async fn tail(&self) -> Result<OutcomeTail, BenchError> {
        let conn = self.target.connection()?;
        let streams = self
            .deployment
            .partitions()
            .iter()
            .map(|partition| {
                let keys = partition.ledger.keys().clone();
                (Ledger::new(conn.clone(), keys), "0".to_owned())
            })
            .collect();
        Ok(OutcomeTail {
            streams,
            conn,
            calls: 0,
        })
    }

    /// CPU seconds used so far by the workers and by the sandbox.
    pub fn cpu_seconds(&self) -> (f64, f64) {
        let workers = self
            .worker_pids()
            .into_iter()
            .filter_map(proc_cpu_seconds)
            .sum();
        let sandbox = self
            .sandbox
            .process
            .pid()
            .and_then(proc_cpu_seconds)
            .unwrap_or(0.0);
        (workers, sandbox)
    }

    /// Stops the processes and removes this run's keys from a shared Redis.
    pub async fn finish(mut self) -> Result<(), BenchError> {
        for worker in &mut self.workers {
            worker.kill();
        }
        if let Some(serve) = &mut self.serve {
            serve.process.kill();
        }
        self.sandbox.process.kill();
        self.target.cleanup().await
    }
}

/// A `serve` process on a free port of the loopback, on the workers' deployment; its API is
/// not used, so it runs without a token.
fn spawn_serve(env: &[(String, String)]) -> Result<ServeProcess, BenchError> {
    let mut env = env.to_vec();
    env.extend([
        ("TARSPAY_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("TARSPAY_API_AUTH_DISABLED".to_owned(), "true".to_owned()),
    ]);
    ServeProcess::spawn(&env)
}

/// Reads every partition's outcome stream from the start, page by page.
pub struct OutcomeTail {
    /// Each partition's ledger and the last entry read from its stream.
    streams: Vec<(Ledger, String)>,
    conn: RedisConn,
    /// Redis calls made by this reader (to subtract from server-wide counts).
    pub calls: u64,
}

impl OutcomeTail {
    /// The next page of each partition's stream: (entry id, outcome).
    pub async fn next_page(&mut self) -> Result<Vec<(String, Outcome)>, BenchError> {
        let mut outcomes = Vec::new();
        for (ledger, last) in &mut self.streams {
            self.calls += 1;
            let page = ledger.outcomes_after(last, 1000).await?;
            if let Some((id, _)) = page.last() {
                last.clone_from(id);
            }
            outcomes.extend(page);
        }
        Ok(outcomes)
    }

    /// The address Redis sees for this reader's connection (`CLIENT INFO` addr=…).
    pub async fn client_addr(&mut self) -> Result<String, BenchError> {
        self.calls += 1;
        client_addr(&mut self.conn).await
    }
}

/// An Indian payout of 100 INR.
pub fn payout(id: &str) -> serde_json::Value {
    json!({"mchOrderNo": id, "amount": "100", "currency": "INR", "wayCode": "UPI",
        "customerName": "Asha", "customerEmail": "asha@example.in", "customerContact": "9876543210"})
}

/// What one run through the pipeline measured.
#[derive(Debug, Clone)]
pub struct PipelineRun {
    pub n: u64,
    /// First enqueue to last outcome.
    pub elapsed: Duration,
    pub enqueue_elapsed: Duration,
    /// Enqueue to outcome, ms: p50, p99, max.
    pub latency_ms: (f64, f64, f64),
    /// Most payouts enqueued and not yet final at one time (sampled per outcome page).
    pub peak_in_flight: u64,
    pub outcomes: HashMap<String, Outcome>,
    /// Per payout, by index (`{prefix}-{index:07}`), µs since the epoch: when its enqueue
    /// started.
    pub enqueued_at_us: Vec<u64>,
    /// Per payout, by index: when its outcome was appended, as an upper bound: the end of the
    /// millisecond of its stream entry id (Redis's clock when appending, ms resolution) or
    /// when this reader saw it, whichever is earlier.
    pub outcome_at_us: Vec<u64>,
}

/// The upper bound of [`PipelineRun::outcome_at_us`] for an entry read at `seen_us`.
fn outcome_time_us(entry_id: &str, seen_us: u64) -> u64 {
    entry_id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .map_or(seen_us, |ms| seen_us.min(ms * 1000 + 999))
}

/// Enqueues `n` payouts `{prefix}-{i}` while reading outcomes, until every payout has one:
/// as fast as 64 calls in flight allow (`rate` None, a payroll arriving at once), or paced at
/// `rate` payouts per second. Fails on a second outcome for any payout.
pub async fn drive(
    pipeline: &Pipeline,
    tail: &mut OutcomeTail,
    id_prefix: &str,
    n: u64,
    rate: Option<f64>,
) -> Result<PipelineRun, BenchError> {
    let ids: Vec<String> = (0..n).map(|i| format!("{id_prefix}-{i:07}")).collect();
    let enqueued_at: Vec<std::sync::atomic::AtomicU64> = (0..n)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let enqueued_count = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    let enqueue = async {
        let results = futures::stream::iter(ids.iter().enumerate())
            .map(|(i, id)| {
                let producer = &pipeline.producer;
                let enqueued_at = &enqueued_at;
                let enqueued_count = &enqueued_count;
                async move {
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    enqueued_at[i].store(now_us(), std::sync::atomic::Ordering::Relaxed);
                    let result = producer.enqueue_json(&payout(id), None).await;
                    enqueued_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    result
                }
            })
            .buffer_unordered(ENQUEUE_PARALLEL)
            .collect::<Vec<_>>()
            .await;
        let elapsed = started.elapsed();
        for result in results {
            match result? {
                tarspay_worker::producer::Enqueued::Queued => {}
                other => {
                    return Err(BenchError::Check(format!("payout not queued: {other:?}")));
                }
            }
        }
        Ok::<Duration, BenchError>(elapsed)
    };
    let collect = async {
        let mut outcomes: HashMap<String, Outcome> = HashMap::with_capacity(n as usize);
        let mut latencies = Vec::with_capacity(n as usize);
        let mut outcome_at_us = vec![0u64; n as usize];
        let mut peak_in_flight = 0u64;
        let mut idle_since = Instant::now();
        while (outcomes.len() as u64) < n {
            let page = tail.next_page().await?;
            let seen = now_us();
            let in_flight = enqueued_count
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(outcomes.len() as u64);
            peak_in_flight = peak_in_flight.max(in_flight);
            if page.is_empty() {
                // A hang guard, not a speed check: no outcome for two minutes.
                if idle_since.elapsed() > Duration::from_secs(120) {
                    return Err(BenchError::Timeout(format!(
                        "{} of {n} outcomes",
                        outcomes.len()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            idle_since = Instant::now();
            for (entry_id, outcome) in page {
                let index = outcome
                    .mch_order_no
                    .rsplit('-')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|&i| i < n as usize)
                    .ok_or_else(|| {
                        BenchError::Check(format!("outcome for {}", outcome.mch_order_no))
                    })?;
                let at = enqueued_at[index].load(std::sync::atomic::Ordering::Relaxed);
                latencies.push(seen.saturating_sub(at) as f64 / 1000.0);
                outcome_at_us[index] = outcome_time_us(&entry_id, seen);
                let id = outcome.mch_order_no.to_string();
                if outcomes.insert(id.clone(), outcome).is_some() {
                    return Err(BenchError::Check(format!("two outcomes for {id}")));
                }
            }
        }
        Ok::<_, BenchError>((
            outcomes,
            latencies,
            outcome_at_us,
            peak_in_flight,
            started.elapsed(),
        ))
    };
    let (enqueue_elapsed, collected) = tokio::join!(enqueue, collect);
    let enqueue_elapsed = enqueue_elapsed?;
    let (outcomes, mut latencies, outcome_at_us, peak_in_flight, elapsed) = collected?;
    Ok(PipelineRun {
        n,
        elapsed,
        enqueue_elapsed,
        latency_ms: latency_summary(&mut latencies),
        peak_in_flight,
        outcomes,
        enqueued_at_us: enqueued_at
            .into_iter()
            .map(std::sync::atomic::AtomicU64::into_inner)
            .collect(),
        outcome_at_us,
    })
}

/// Every outcome succeeded, and the sandbox holds exactly one order per payout, each created
/// by a single create call.
pub async fn check_one_rule(pipeline: &Pipeline, runs: &[&PipelineRun]) -> Result<(), BenchError> {
    let mut outcomes = runs.iter().flat_map(|run| run.outcomes.values());
    if let Some(bad) = outcomes.find(|o| o.status != "succeeded") {
        return Err(BenchError::Check(format!(
            "a payout did not succeed: {bad:?}"
        )));
    }
    let payouts: u64 = runs.iter().map(|run| run.n).sum();
    let orders = pipeline.sandbox.orders().await?;
    if orders.len() as u64 != payouts {
        return Err(BenchError::Check(format!(
            "the sandbox holds {} orders for {payouts} payouts",
            orders.len()
        )));
    }
    let resent = orders
        .iter()
        .filter(|o| o["createAttempts"].as_u64() != Some(1))
        .count();
    if resent > 0 {
        return Err(BenchError::Check(format!(
            "{resent} orders saw more than one create"
        )));
    }
    Ok(())
}

/// Offered load of the paced run, payouts per second: well under capacity, so its latency is
/// the pipeline's own rather than time spent queued behind a burst.
pub const PACED_RATE: f64 = 1_000.0;

/// `INFO commandstats`: command name → calls.
type CommandCounts = Vec<(String, u64)>;

pub async fn run(options: &BenchOptions, report: Report<'_>) -> Result<(), BenchError> {
    let n = options.n.unwrap_or(DEFAULT_N).max(1);
    let paced_n = (n / 4).clamp(1, 5_000);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let timers = PipelineTimers::default();
    let partitions = options.partitions()?;
    let choice = RedisChoice::of(options)?;
    for workers in [1usize, 3] {
        let pipeline = Pipeline::start(
            choice,
            partitions,
            &format!("e2e{workers}"),
            workers,
            concurrency,
            &timers,
            &[],
        )
        .await?;
        let result = async {
            let mut tail = pipeline.tail().await?;
            let mut stats = pipeline.target.nodes().await?;
            let stats_start = stats.commandstats().await?;
            // Commands per payout, Lua-run ones included (added up over a cluster's masters);
            // only meaningful on a private server or cluster.
            let mut calls_per_payout =
                async |tail: &OutcomeTail,
                       before: &[(String, u64)],
                       pages_before: u64,
                       payouts: u64|
                       -> Result<(Option<f64>, CommandCounts), BenchError> {
                    // Let the last acknowledgements land first.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let after = stats.commandstats().await?;
                    let calls = payout_calls(
                        &commandstats_delta(before, &after),
                        tail.calls - pages_before,
                    );
                    let per = pipeline
                        .target
                        .is_private()
                        .then(|| round(calls as f64 / payouts as f64, 2));
                    Ok((per, after))
                };
            let redis_cpu = || pipeline.target.redis_cpu_seconds();
            let pages_start = tail.calls;
            let cpu_before = (pipeline.cpu_seconds(), redis_cpu());
            let burst = drive(&pipeline, &mut tail, &format!("E2E{workers}"), n, None).await?;
            let cpu_after = (pipeline.cpu_seconds(), redis_cpu());
            let (burst_calls, stats_mid) =
                calls_per_payout(&tail, &stats_start, pages_start, n).await?;
            let pages_mid = tail.calls;
            let paced = drive(
                &pipeline,
                &mut tail,
                &format!("PACED{workers}"),
                paced_n,
                Some(PACED_RATE),
            )
            .await?;
            let (paced_calls, _) = calls_per_payout(&tail, &stats_mid, pages_mid, paced_n).await?;
            check_one_rule(&pipeline, &[&burst, &paced]).await?;
            Ok::<_, BenchError>((
                burst,
                paced,
                cpu_before,
                cpu_after,
                burst_calls,
                paced_calls,
            ))
        }
        .await;
        let (private, redis) = (pipeline.target.is_private(), pipeline.target.describe());
        pipeline.finish().await?;
        let (run, paced, cpu_before, cpu_after, burst_calls, paced_calls) = result?;
        let per_payout_ms =
            |before: f64, after: f64| round((after - before) * 1000.0 / n as f64, 3);
        report(json!({
            "bench": "e2e",
            "mode": "burst",
            "n": n,
            "workers": workers,
            "concurrency": concurrency,
            "partitions": partitions,
            "redis": redis,
            "payouts_per_s": round(n as f64 / run.elapsed.as_secs_f64(), 0),
            "p50_ms": round(run.latency_ms.0, 1),
            "p99_ms": round(run.latency_ms.1, 1),
            "max_ms": round(run.latency_ms.2, 1),
            "elapsed_s": round(run.elapsed.as_secs_f64(), 3),
            "enqueue_per_s": round(n as f64 / run.enqueue_elapsed.as_secs_f64(), 0),
            "cpu_ms_per_payout_workers": per_payout_ms(cpu_before.0.0, cpu_after.0.0),
            "cpu_ms_per_payout_sandbox": per_payout_ms(cpu_before.0.1, cpu_after.0.1),
            "cpu_ms_per_payout_redis": cpu_before
                .1
                .zip(cpu_after.1)
                .map(|(before, after)| per_payout_ms(before, after)),
            "redis_calls_incl_lua_per_payout": burst_calls,
            "sandbox_final_after": timers.final_after,
            "poll_first_delay": timers.poll_first_delay,
            "note": "all N enqueued at once (a payroll): latency includes waiting behind the burst; timers lowered so the pipeline dominates throughput (production poll_first_delay is 2s)",
            "redis_private": private,
        }));
        report(json!({
            "bench": "e2e",
            "mode": "paced",
            "n": paced_n,
            "workers": workers,
            "concurrency": concurrency,
            "partitions": partitions,
            "redis": redis,
            "offered_per_s": PACED_RATE,
            "payouts_per_s": round(paced_n as f64 / paced.elapsed.as_secs_f64(), 0),
            "p50_ms": round(paced.latency_ms.0, 1),
            "p99_ms": round(paced.latency_ms.1, 1),
            "max_ms": round(paced.latency_ms.2, 1),
            "redis_calls_incl_lua_per_payout": paced_calls,
            "sandbox_final_after": timers.final_after,
            "poll_first_delay": timers.poll_first_delay,
            "note": "latency floor: create, 100ms to final at the sandbox, and the 150ms poll delay (the poll job starts on time: bench delay)",
            "redis_private": private,
        }));
    }
    Ok(())
}
