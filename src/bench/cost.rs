//! `bench cost`: what one payout costs, measured on one worker process with N (default
//! 10,000) payouts in flight at once.
//!
//! * Redis commands per payout, from enqueue to outcome: commands sent by clients (read from
//!   `MONITOR`, the bench's own observer connection excluded; one Lua script is one command)
//!   and every command the server ran including those inside scripts (`INFO commandstats`).
//!   No hot-path call uses MULTI, and one pipeline only (a lone in-hand acceptance's `DEL` and
//!   `HSETNX`), so round trips are client commands less those `DEL`s; batched calls (fetch,
//!   acknowledgement, promotion) serve many payouts per round trip.
//! * Peak RSS of the worker process (`VmHWM`) and its RSS at the end (`VmRSS`).
//! * CPU time per payout of the worker, the sandbox and Redis (`/proc/PID/stat`).
//! * Redis memory per payout (`used_memory`, private server only): at the peak, with every
//!   payout in flight, and at the end, with every payout final (its record and outcome kept
//!   for the retention).
//!
//! * With `--retention`, the memory left per payout once the records expired and the outcomes
//!   were trimmed (the workers' lifeline sweeps every 2 s then), and how long that took.
//!
//! On a Redis Cluster (`--cluster M`, or seeds in `--redis-url`) `INFO` numbers (commands,
//! `used_memory`) and Redis CPU are added up over the masters; `MONITOR` is not run there (the
//! bench's own connections cannot be told apart on every node), so the client-command counts
//! are `null`.
//!
//! To hold every payout in flight at once, the sandbox finalises orders 5 s after create and
//! the first poll waits 6 s; each payout then takes exactly one create and one poll.
//!
//! A trickle (fewer than [`TRICKLE`] payouts, e.g. `-n 1`, a payout alone) runs on the short
//! timers of `bench e2e` instead (final after 100 ms, first poll after 150 ms: still one create
//! and one poll each), so the window is the payouts themselves rather than seconds of an idle
//! worker's polling. The idle worker is watched first for [`IDLE_WATCH`], and the line gives
//! both the raw counts and the counts less that idle rate over the run's window (an estimate:
//! the idle loops a payout's own calls replace are subtracted too).

use super::e2e::{Pipeline, PipelineRun, PipelineTimers, check_one_rule, drive};
use super::shared::{
    MonitorCounter, MonitorCounts, Nodes, RedisChoice, commandstats_delta, monitor_addr,
    payout_calls, payout_calls_by_name, proc_status_kib, round,
};
use super::{BenchError, BenchOptions, Report};
use serde_json::{Map, Value, json};
use std::time::Duration;

pub const DEFAULT_N: u64 = 10_000;
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Runs of fewer payouts than this are a trickle (see the module documentation).
pub const TRICKLE: u64 = 100;
/// How long the idle worker is watched before a trickle.
const IDLE_WATCH: Duration = Duration::from_secs(5);

pub async fn run(options: &BenchOptions, report: Report<'_>) -> Result<(), BenchError> {
    let n = options.n.unwrap_or(DEFAULT_N).max(1);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let timers = if n < TRICKLE {
        PipelineTimers::default()
    } else {
        PipelineTimers {
            final_after: "5s",
            poll_first_delay: "6s",
            poll_max_interval: "10s",
            ..PipelineTimers::default()
        }
    };
    let extra_env: Vec<(String, String)> = match options.retention {
        Some(retention) => vec![
            (
                "TARSPAY_RETENTION".into(),
                humantime::format_duration(retention).to_string(),
            ),
            ("TARSPAY_LIFELINE_INTERVAL".into(), "2s".into()),
        ],
        None => Vec::new(),
    };
    let partitions = options.partitions()?;
    let pipeline = Pipeline::start(
        RedisChoice::of(options)?,
        partitions,
        "cost",
        1,
        concurrency,
        &timers,
        &extra_env,
    )
    .await?;
    let result = measure(&pipeline, n, options.retention).await;
    pipeline.finish().await?;
    let mut line = result?;
    line.insert("concurrency".into(), json!(concurrency));
    line.insert("partitions".into(), json!(partitions));
    line.insert("sandbox_final_after".into(), json!(timers.final_after));
    line.insert("poll_first_delay".into(), json!(timers.poll_first_delay));
    report(Value::Object(line));
    Ok(())
}

async fn measure(
    pipeline: &Pipeline,
    n: u64,
    retention: Option<Duration>,
) -> Result<Map<String, Value>, BenchError> {
    let mut tail = pipeline.tail().await?;
    let mut stats_conn = pipeline.target.nodes().await?;
    let mut memory_conn = pipeline.target.nodes().await?;
    let monitor_target = match monitor_addr(&pipeline.target.url) {
        // On a shared server other clients' commands would be counted too; on a cluster the
        // bench's own connections would be counted on the nodes they are not seen on.
        Some(addr) if pipeline.target.is_private() && !pipeline.target.is_cluster() => {
            let mut observers = vec![tail.client_addr().await?];
            observers.extend(stats_conn.client_addrs().await?);
            observers.extend(memory_conn.client_addrs().await?);
            Some((addr, observers))
        }
        _ => None,
    };
    let start_monitor = || {
        monitor_target
            .as_ref()
            .map(|(addr, observers)| MonitorCounter::start(addr, observers.clone()))
            .transpose()
    };
    // A trickle starts after one payout (not counted), so the measured ones find the worker as
    // a running deployment has it: scripts loaded, connections open. So does a retention run:
    // what a deployment creates once (scripts, groups, its streams) is not the payouts' memory.
    let warm_up = match n < TRICKLE || retention.is_some() {
        true => Some(drive(pipeline, &mut tail, "WARM", 1, None).await?),
        false => None,
    };
    let idle = match (&warm_up, n < TRICKLE) {
        (Some(_), true) => Some(watch_idle(&mut stats_conn, start_monitor()?).await?),
        _ => None,
    };
    let monitor = start_monitor()?;
    let window = std::time::Instant::now();
    let stats_before = stats_conn.commandstats().await?;
    let worker_pid = pipeline
        .worker_pids()
        .first()
        .copied()
        .ok_or_else(|| BenchError::Setup("no worker process".into()))?;
    let cpu_before = pipeline.cpu_seconds();
    let redis_cpu_before = pipeline.target.redis_cpu_seconds();
    let tail_calls_before = tail.calls;

    let memory_before = memory_conn.used_memory().await?;
    let (stop_sampling, sampling) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(peak_memory(memory_conn, sampling));
    let run = drive(pipeline, &mut tail, "COST", n, None).await;
    let _ = stop_sampling.send(());
    let memory_peak = sampler
        .await
        .map_err(|e| BenchError::Setup(format!("memory sampler: {e}")))??;
    let run = run?;
    // Let the last acknowledgements land before reading the counters (a trickle's land within
    // milliseconds; a shorter wait keeps the idle loops in its window few).
    let settle_wait = if idle.is_some() { 300 } else { 1_000 };
    tokio::time::sleep(Duration::from_millis(settle_wait)).await;
    let memory_after = stats_conn.used_memory().await?;

    let cpu_after = pipeline.cpu_seconds();
    let redis_cpu_after = pipeline.target.redis_cpu_seconds();
    let stats_after = stats_conn.commandstats().await?;
    let window = window.elapsed();
    let monitor = monitor.map(MonitorCounter::stop);
    let peak_rss_kib = proc_status_kib(worker_pid, "VmHWM");
    let end_rss_kib = proc_status_kib(worker_pid, "VmRSS");
    let runs: Vec<&PipelineRun> = warm_up.iter().chain([&run]).collect();
    check_one_rule(pipeline, &runs).await?;

    // Server-wide counts include the observers: drop INFO and the outcome reader's pages.
    let tail_pages = tail.calls - tail_calls_before;
    let delta = commandstats_delta(&stats_before, &stats_after);
    let all_calls = payout_calls(&delta, tail_pages);
    let per = |x: f64| round(x / n as f64, 2);
    let mut line = Map::new();
    line.insert("bench".into(), json!("cost"));
    line.insert("n".into(), json!(n));
    line.insert("workers".into(), json!(1));
    line.insert("redis".into(), json!(pipeline.target.describe()));
    line.insert("peak_in_flight".into(), json!(run.peak_in_flight));
    match &monitor {
        Some(counts) => {
            let client = counts.client_total() as f64;
            line.insert("redis_cmds_per_payout".into(), json!(per(client)));
            line.insert(
                "round_trips_per_payout".into(),
                json!(per(counts.round_trips() as f64)),
            );
            let by_command: Map<String, Value> = counts
                .client
                .iter()
                .map(|(name, calls)| (name.clone(), json!(per(*calls as f64))))
                .collect();
            line.insert("redis_cmds_by_name".into(), Value::Object(by_command));
        }
        None => {
            line.insert("redis_cmds_per_payout".into(), Value::Null);
            line.insert("round_trips_per_payout".into(), Value::Null);
        }
    }
    line.insert(
        "redis_calls_incl_lua_per_payout".into(),
        json!(per(all_calls as f64)),
    );
    let by_name_incl_lua: Map<String, Value> = payout_calls_by_name(&delta, tail_pages)
        .map(|(name, calls)| (name.to_uppercase(), json!(per(calls as f64))))
        .filter(|(_, per_payout)| per_payout.as_f64().is_some_and(|v| v > 0.0))
        .collect();
    line.insert(
        "redis_calls_incl_lua_by_name".into(),
        Value::Object(by_name_incl_lua),
    );
    if let Some(idle) = &idle {
        add_less_idle(&mut line, idle, window, n, all_calls, monitor.as_ref());
    }
    if pipeline.target.is_private() {
        let bytes_per =
            |at: u64| json!((at.saturating_sub(memory_before) as f64 / n as f64).round());
        line.insert(
            "redis_bytes_per_payout_in_flight".into(),
            bytes_per(memory_peak),
        );
        line.insert(
            "redis_bytes_per_final_payout".into(),
            bytes_per(memory_after),
        );
        if let Some(retention) = retention {
            let (left, waited) =
                memory_returned(&mut stats_conn, memory_before, memory_peak, retention).await?;
            line.insert(
                "redis_bytes_per_payout_after_retention".into(),
                bytes_per(left),
            );
            line.insert(
                "memory_returned_after_s".into(),
                json!(round(waited.as_secs_f64(), 1)),
            );
        }
    }
    line.insert(
        "worker_peak_rss_mib".into(),
        json!(peak_rss_kib.map(|k| round(k as f64 / 1024.0, 1))),
    );
    line.insert(
        "worker_end_rss_mib".into(),
        json!(end_rss_kib.map(|k| round(k as f64 / 1024.0, 1))),
    );
    line.insert(
        "cpu_ms_per_payout_worker".into(),
        json!(per((cpu_after.0 - cpu_before.0) * 1000.0)),
    );
    line.insert(
        "cpu_ms_per_payout_sandbox".into(),
        json!(per((cpu_after.1 - cpu_before.1) * 1000.0)),
    );
    if let (Some(before), Some(after)) = (redis_cpu_before, redis_cpu_after) {
        line.insert(
            "cpu_ms_per_payout_redis".into(),
            json!(per((after - before) * 1000.0)),
        );
    }
    let note = if monitor.is_some() {
        "redis_cmds_per_payout counts client commands (one Lua script = one command) from MONITOR, which also inflates Redis CPU; each is one round trip but a DEL pipelined with a lone in-hand acceptance's HSETNX (round_trips_per_payout takes min(DEL, HSETNX) of them for pipelined: one too many for each acceptance written after its held poll found the order pending)"
    } else if pipeline.target.is_cluster() {
        "no MONITOR on a cluster (client commands not measured); commands, memory and Redis CPU are added up over the masters"
    } else {
        "no MONITOR on a shared Redis (other clients would be counted): client commands not measured"
    };
    line.insert("note".into(), json!(note));
    Ok(line)
}

/// What an idle worker costs Redis per second (Lua included; client commands when `MONITOR`
/// runs).
struct IdleRate {
    calls_incl_lua_per_s: f64,
    client_cmds_per_s: Option<f64>,
}

/// Watches the idle worker for [`IDLE_WATCH`] (with its own `MONITOR`, if any).
async fn watch_idle(
    stats_conn: &mut Nodes,
    monitor: Option<MonitorCounter>,
) -> Result<IdleRate, BenchError> {
    // Let the last payout's acknowledgements and the promoter's follow-up passes finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = stats_conn.commandstats().await?;
    let client_before = monitor.as_ref().map(MonitorCounter::client_total_now);
    tokio::time::sleep(IDLE_WATCH).await;
    let after = stats_conn.commandstats().await?;
    let client_after = monitor.map(|m| m.stop().client_total());
    let secs = IDLE_WATCH.as_secs_f64();
    let calls = payout_calls(&commandstats_delta(&before, &after), 0);
    Ok(IdleRate {
        calls_incl_lua_per_s: calls as f64 / secs,
        client_cmds_per_s: client_before
            .zip(client_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / secs),
    })
}

/// The idle rate, and the per-payout counts less that rate over the run's `window`.
fn add_less_idle(
    line: &mut Map<String, Value>,
    idle: &IdleRate,
    window: Duration,
    n: u64,
    all_calls: u64,
    monitor: Option<&MonitorCounts>,
) {
    let less_idle = |total: f64, per_s: f64| {
        round(
            (total - per_s * window.as_secs_f64()).max(0.0) / n as f64,
            1,
        )
    };
    line.insert("window_s".into(), json!(round(window.as_secs_f64(), 2)));
    line.insert(
        "idle_redis_calls_incl_lua_per_s".into(),
        json!(round(idle.calls_incl_lua_per_s, 1)),
    );
    line.insert(
        "redis_calls_incl_lua_per_payout_less_idle".into(),
        json!(less_idle(all_calls as f64, idle.calls_incl_lua_per_s)),
    );
    if let (Some(per_s), Some(counts)) = (idle.client_cmds_per_s, monitor) {
        line.insert("idle_redis_cmds_per_s".into(), json!(round(per_s, 1)));
        line.insert(
            "redis_cmds_per_payout_less_idle".into(),
            json!(less_idle(counts.client_total() as f64, per_s)),
        );
    }
}

/// The highest `used_memory` (added up over the masters) seen every 50 ms until `stop`.
async fn peak_memory(
    mut nodes: Nodes,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<u64, BenchError> {
    let mut peak = 0;
    loop {
        peak = peak.max(nodes.used_memory().await?);
        tokio::select! {
            _ = &mut stop => return Ok(peak),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Waits until Redis gives back at least 90 % of what the run added at its peak (expired
/// records, trimmed outcomes), at most the retention plus three minutes; returns
/// `used_memory` then and how long it took from the end of the run.
async fn memory_returned(
    nodes: &mut Nodes,
    before: u64,
    peak: u64,
    retention: Duration,
) -> Result<(u64, Duration), BenchError> {
    let started = std::time::Instant::now();
    let target = before + peak.saturating_sub(before) / 10;
    loop {
        let now = nodes.used_memory().await?;
        if now <= target || started.elapsed() > retention + Duration::from_secs(180) {
            return Ok((now, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
