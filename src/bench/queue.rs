//! `bench queue`: no-op jobs through the Redis Streams storage and an apalis worker.
//!
//! Two ways to feed the worker:
//! * [`Feed::Live`]: the worker runs on an empty queue while a producer enqueues in chunks of
//!   100, keeping at most `window` jobs enqueued but not yet started (so the latency measured
//!   is the queue's, not a backlog's). Timed from the first enqueue to the last job done.
//! * [`Feed::Backlog`]: all jobs are enqueued first; timed from worker start to the last job.
//!
//! Every job carries its enqueue time; the handler records enqueue-to-start latency.

use super::shared::{
    RedisTarget, commandstats, commandstats_delta, latency_summary, now_us, round,
};
use super::{BenchError, BenchOptions, Report};
use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarspay_worker::queue::{QueueConfig, RedisQueue};
use tokio::sync::Notify;

pub const DEFAULT_N: u64 = 100_000;
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Jobs per enqueue call of the live producer.
const CHUNK: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Enqueue while the worker runs, at most `window` jobs ahead of it.
    Live { window: u64 },
    /// Enqueue everything first, then start the worker.
    Backlog,
}

/// A no-op job: only its enqueue time (µs since the epoch).
#[derive(Debug, Serialize, Deserialize)]
struct NoopJob {
    t: u64,
}

struct Recorder {
    started: AtomicU64,
    done: AtomicU64,
    target: u64,
    /// Enqueue-to-start, µs.
    latencies: Mutex<Vec<u32>>,
    finished: Notify,
}

async fn noop(job: NoopJob, recorder: Data<Arc<Recorder>>) -> Result<(), BoxDynError> {
    let waited = now_us().saturating_sub(job.t).min(u32::MAX as u64) as u32;
    recorder.started.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut latencies) = recorder.latencies.lock() {
        latencies.push(waited);
    }
    if recorder.done.fetch_add(1, Ordering::Relaxed) + 1 >= recorder.target {
        recorder.finished.notify_one();
    }
    Ok(())
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct QueueRun {
    pub n: u64,
    pub concurrency: usize,
    pub elapsed: Duration,
    pub jobs_per_s: f64,
    /// Enqueue-to-start, ms: p50, p99, max.
    pub latency_ms: (f64, f64, f64),
    /// `INFO commandstats` calls (Lua-run commands included) per job over the timed phase;
    /// only meaningful on a private server.
    pub redis_calls_per_job: f64,
    /// Time to enqueue the backlog (Backlog feed only).
    pub preload: Option<Duration>,
}

/// One run on queue `name` of `target`; checks that every job was acknowledged and the queue
/// is empty afterwards.
pub async fn run_once(
    target: &RedisTarget,
    name: &str,
    n: u64,
    concurrency: usize,
    feed: Feed,
) -> Result<QueueRun, BenchError> {
    let config = QueueConfig::new(name).with_prefix(&target.prefix);
    let queue: RedisQueue<NoopJob> = RedisQueue::connect(&target.url, config).await?;
    let mut conn = target.connection().await?;
    let recorder = Arc::new(Recorder {
        started: AtomicU64::new(0),
        done: AtomicU64::new(0),
        target: n,
        latencies: Mutex::new(Vec::with_capacity(n as usize)),
        finished: Notify::new(),
    });
    let mut preload = None;
    if feed == Feed::Backlog {
        let started = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(5_000);
            let t = now_us();
            let jobs: Vec<NoopJob> = (0..k).map(|_| NoopJob { t }).collect();
            queue.enqueue_bulk(&jobs).await?;
            left -= k;
        }
        preload = Some(started.elapsed());
        let waiting = queue.stats().await?.waiting;
        if waiting != n {
            return Err(BenchError::Check(format!(
                "{waiting} of {n} jobs waiting after the preload"
            )));
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = WorkerBuilder::new(format!("bench-{name}"))
        .backend(queue.clone())
        .data(recorder.clone())
        .concurrency(concurrency)
        .build(noop);
    let run_worker = move || {
        tokio::spawn(worker.run_until(async move {
            let _ = stop_rx.await;
            Ok::<(), std::io::Error>(())
        }))
    };
    let (handle, calls_before, started) = if matches!(feed, Feed::Live { .. }) {
        // The worker is up and blocked on an empty stream before the clock runs.
        let handle = run_worker();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let calls_before = commandstats(&mut conn).await?;
        (handle, calls_before, Instant::now())
    } else {
        let calls_before = commandstats(&mut conn).await?;
        let started = Instant::now();
        (run_worker(), calls_before, started)
    };
    if let Feed::Live { window } = feed {
        let mut sent = 0u64;
        while sent < n {
            if sent - recorder.started.load(Ordering::Relaxed) >= window {
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            }
            let k = (n - sent).min(CHUNK as u64);
            let t = now_us();
            let jobs: Vec<NoopJob> = (0..k).map(|_| NoopJob { t }).collect();
            queue.enqueue_bulk(&jobs).await?;
            sent += k;
        }
    }
    let guard = Instant::now() + Duration::from_secs(600);
    while recorder.done.load(Ordering::Relaxed) < n {
        if Instant::now() > guard {
            return Err(BenchError::Timeout(format!(
                "{} of {n} jobs done",
                recorder.done.load(Ordering::Relaxed)
            )));
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), recorder.finished.notified()).await;
    }
    let elapsed = started.elapsed();
    let calls_after = commandstats(&mut conn).await?;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(30), handle).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => return Err(BenchError::Check(format!("worker ended: {err}"))),
        Ok(Err(err)) => return Err(BenchError::Check(format!("worker task: {err}"))),
        Err(_) => return Err(BenchError::Timeout("worker did not stop".into())),
    }
    let stats = queue.stats().await?;
    if stats.depth() != 0 || stats.dead != 0 || stats.delayed != 0 {
        return Err(BenchError::Check(format!(
            "queue not drained (every job must be acknowledged): {stats:?}"
        )));
    }
    // The INFO call itself is counted once.
    let calls: u64 = commandstats_delta(&calls_before, &calls_after)
        .iter()
        .map(|(_, c)| c)
        .sum::<u64>()
        .saturating_sub(1);
    let mut latencies: Vec<f64> = recorder
        .latencies
        .lock()
        .map(|l| l.iter().map(|&us| us as f64 / 1000.0).collect())
        .unwrap_or_default();
    Ok(QueueRun {
        n,
        concurrency,
        elapsed,
        jobs_per_s: n as f64 / elapsed.as_secs_f64(),
        latency_ms: latency_summary(&mut latencies),
        redis_calls_per_job: calls as f64 / n as f64,
        preload,
    })
}

/// The window of the live feed: a little more than the worker holds (its prefetch of 100 plus
/// the running jobs), so it never starves, yet no backlog builds up to inflate the latency.
pub fn live_window(concurrency: usize) -> u64 {
    (3 * concurrency as u64).max(200)
}

pub async fn run(options: &BenchOptions, report: Report<'_>) -> Result<(), BenchError> {
    let n = options.n.unwrap_or(DEFAULT_N).max(1);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let target = RedisTarget::new(options.redis_url.as_deref(), "queue")?;
    let window = live_window(concurrency);
    let result = run_once(&target, "noop", n, concurrency, Feed::Live { window }).await;
    target.cleanup().await?;
    let run = result?;
    report(json!({
        "bench": "queue",
        "n": n,
        "concurrency": concurrency,
        "jobs_per_s": round(run.jobs_per_s, 0),
        "p50_ms": round(run.latency_ms.0, 3),
        "p99_ms": round(run.latency_ms.1, 3),
        "max_ms": round(run.latency_ms.2, 3),
        "elapsed_s": round(run.elapsed.as_secs_f64(), 3),
        "window": window,
        "redis_calls_per_job": round(run.redis_calls_per_job, 2),
        "redis_private": target.is_private(),
        "acknowledged": n,
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_run_acknowledges_every_job_and_reports_latencies() {
        let target = RedisTarget::new(None, "queue-test").expect("redis-server on PATH");
        let run = run_once(&target, "t", 2_000, 16, Feed::Live { window: 500 })
            .await
            .expect("bench run");
        assert_eq!(run.n, 2_000);
        assert!(run.jobs_per_s > 0.0);
        let (p50, p99, max) = run.latency_ms;
        assert!(p50 <= p99 && p99 <= max, "{:?}", run.latency_ms);
        assert!(run.redis_calls_per_job > 0.0);
        let backlog = run_once(&target, "b", 1_000, 16, Feed::Backlog)
            .await
            .expect("backlog run");
        assert!(backlog.preload.is_some());
    }
}
