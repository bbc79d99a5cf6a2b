//! `bench queue`: no-op jobs through the Redis Streams storage and an apalis worker.
//!
//! Two ways to feed the worker:
//! * [`Feed::Live`]: the worker runs on an empty queue while a producer enqueues in chunks of
//!   100, keeping at most `window` jobs enqueued but not yet started (so the latency measured
//!   is the queue's, not a backlog's). Timed from the first enqueue to the last job done.
//! * [`Feed::Backlog`]: all jobs are enqueued first; timed from worker start to the last job.
//!
//! Every job carries its enqueue time; the handler records enqueue-to-start latency.
//!
//! With P partitions the queue is P queues (`partition::queue_name`, each its own hash tag, so
//! spread over a cluster's masters), sharing one client and connection as a deployment's
//! partitions do, with the prefetch shared out the same way; one worker consumes them all
//! through [`Partitioned`] (round-robin, one concurrency budget). The live producer sends its
//! chunks of 100 to the partitions in turn; the backlog is split evenly. One partition is the
//! layout every run had before partitions, consumed through the same [`Partitioned`] backend.

use super::shared::{RedisChoice, RedisTarget, commandstats_delta, latency_summary, now_us, round};
use super::{BenchError, BenchOptions, Report};
use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarspay_worker::queue::{Partitioned, QueueConfig, QueueStats, RedisQueue};
use tarspay_worker::redis_conn::Timeouts;
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
    pub partitions: usize,
    pub elapsed: Duration,
    pub jobs_per_s: f64,
    /// Enqueue-to-start, ms: p50, p99, max.
    pub latency_ms: (f64, f64, f64),
    /// `INFO commandstats` calls (Lua-run commands included, added up over a cluster's
    /// masters) per job over the timed phase; only meaningful on a private server or cluster.
    pub redis_calls_per_job: f64,
    /// Time to enqueue the backlog (Backlog feed only).
    pub preload: Option<Duration>,
}

/// The `partitions` queues of `name` on `target`, sharing one connection, each with its share
/// of the prefetch (as a deployment's partitions have: a worker holds fetched jobs of all).
async fn partition_queues(
    target: &RedisTarget,
    name: &str,
    partitions: usize,
) -> Result<Vec<RedisQueue<NoopJob>>, BenchError> {
    let base = QueueConfig::new(name).with_prefix(&target.prefix);
    let conn = target.client.connect(Timeouts {
        connect: base.connection_timeout,
        response: base.response_timeout,
    })?;
    let mut queues = Vec::with_capacity(partitions);
    for index in 0..partitions {
        let partition_name =
            tarspay_worker::partition::queue_name(&target.prefix, name, index, partitions);
        let mut config = QueueConfig::new(partition_name)
            .with_label(name)
            .with_prefix(&target.prefix);
        config.prefetch = config
            .prefetch
            .div_ceil(partitions)
            .max(16)
            .min(config.prefetch);
        queues
            .push(RedisQueue::with_connection(target.client.clone(), conn.clone(), config).await?);
    }
    Ok(queues)
}

/// Stats added up over the partitions.
async fn stats(queues: &[RedisQueue<NoopJob>]) -> Result<QueueStats, BenchError> {
    let all = futures::future::try_join_all(queues.iter().map(RedisQueue::stats)).await?;
    Ok(all
        .into_iter()
        .reduce(QueueStats::merge)
        .unwrap_or_default())
}

/// One run on queue `name` of `target` in `partitions` partitions; checks that every job was
/// acknowledged and every partition is empty afterwards.
pub async fn run_once(
    target: &RedisTarget,
    name: &str,
    n: u64,
    concurrency: usize,
    partitions: usize,
    feed: Feed,
) -> Result<QueueRun, BenchError> {
    let partitions = partitions.max(1);
    let queues = partition_queues(target, name, partitions).await?;
    let mut nodes = target.nodes().await?;
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
        for (index, queue) in queues.iter().enumerate() {
            // An even split: the first n % P partitions take one job more.
            let mut left =
                n / partitions as u64 + u64::from((index as u64) < n % partitions as u64);
            while left > 0 {
                let k = left.min(5_000);
                let t = now_us();
                let jobs: Vec<NoopJob> = (0..k).map(|_| NoopJob { t }).collect();
                queue.enqueue_bulk(&jobs).await?;
                left -= k;
            }
        }
        preload = Some(started.elapsed());
        let waiting = stats(&queues).await?.waiting;
        if waiting != n {
            return Err(BenchError::Check(format!(
                "{waiting} of {n} jobs waiting after the preload"
            )));
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = WorkerBuilder::new(format!("bench-{name}"))
        .backend(Partitioned::new(queues.clone())?)
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
        let calls_before = nodes.commandstats().await?;
        (handle, calls_before, Instant::now())
    } else {
        let calls_before = nodes.commandstats().await?;
        let started = Instant::now();
        (run_worker(), calls_before, started)
    };
    if let Feed::Live { window } = feed {
        let mut sent = 0u64;
        let mut turn = 0usize;
        while sent < n {
            if sent - recorder.started.load(Ordering::Relaxed) >= window {
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            }
            let k = (n - sent).min(CHUNK as u64);
            let t = now_us();
            let jobs: Vec<NoopJob> = (0..k).map(|_| NoopJob { t }).collect();
            queues[turn % partitions].enqueue_bulk(&jobs).await?;
            turn += 1;
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
    let calls_after = nodes.commandstats().await?;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(30), handle).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => return Err(BenchError::Check(format!("worker ended: {err}"))),
        Ok(Err(err)) => return Err(BenchError::Check(format!("worker task: {err}"))),
        Err(_) => return Err(BenchError::Timeout("worker did not stop".into())),
    }
    let stats = stats(&queues).await?;
    if stats.depth() != 0 || stats.dead != 0 || stats.delayed != 0 {
        return Err(BenchError::Check(format!(
            "queue not drained (every job must be acknowledged): {stats:?}"
        )));
    }
    // The first INFO call is counted once on every node.
    let calls: u64 = commandstats_delta(&calls_before, &calls_after)
        .iter()
        .map(|(_, c)| c)
        .sum::<u64>()
        .saturating_sub(nodes.len() as u64);
    let mut latencies: Vec<f64> = recorder
        .latencies
        .lock()
        .map(|l| l.iter().map(|&us| us as f64 / 1000.0).collect())
        .unwrap_or_default();
    Ok(QueueRun {
        n,
        concurrency,
        partitions,
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
    let partitions = options.partitions()?;
    let target = RedisTarget::new(RedisChoice::of(options)?, "queue").await?;
    let window = live_window(concurrency);
    let result = run_once(
        &target,
        "noop",
        n,
        concurrency,
        partitions,
        Feed::Live { window },
    )
    .await;
    target.cleanup().await?;
    let run = result?;
    report(json!({
        "bench": "queue",
        "n": n,
        "concurrency": concurrency,
        "partitions": partitions,
        "redis": target.describe(),
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
        let target = RedisTarget::new(RedisChoice::Private, "queue-test")
            .await
            .expect("redis-server on PATH");
        let run = run_once(&target, "t", 2_000, 16, 1, Feed::Live { window: 500 })
            .await
            .expect("bench run");
        assert_eq!(run.n, 2_000);
        assert!(run.jobs_per_s > 0.0);
        let (p50, p99, max) = run.latency_ms;
        assert!(p50 <= p99 && p99 <= max, "{:?}", run.latency_ms);
        assert!(run.redis_calls_per_job > 0.0);
        let backlog = run_once(&target, "b", 1_000, 16, 1, Feed::Backlog)
            .await
            .expect("backlog run");
        assert!(backlog.preload.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_on_a_cluster_acknowledge_every_job_and_clean_up() {
        let cluster = RedisTarget::new(RedisChoice::PrivateCluster(3), "queue-cluster")
            .await
            .expect("redis-server and redis-cli on PATH");
        assert!(cluster.is_cluster());
        assert_eq!(cluster.masters().len(), 3);
        assert_eq!(cluster.redis_pids().len(), 3);
        let run = run_once(&cluster, "t", 2_000, 16, 4, Feed::Live { window: 500 })
            .await
            .expect("live run on 4 partitions");
        assert_eq!(run.partitions, 4);
        assert!(run.redis_calls_per_job > 0.0);
        run_once(&cluster, "b", 1_001, 16, 3, Feed::Backlog)
            .await
            .expect("backlog run on 3 partitions");

        // The same cluster as the caller's Redis, reached through one node's URL: the run's
        // keys are found on every master and deleted.
        let url = cluster.masters()[1].clone();
        let shared = RedisTarget::new(RedisChoice::Url(&url), "queue-shared")
            .await
            .expect("detects the cluster");
        assert!(shared.is_cluster() && !shared.is_private());
        let mut found = shared.masters().to_vec();
        let mut expected = cluster.masters().to_vec();
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
        run_once(&shared, "t", 500, 8, 16, Feed::Backlog)
            .await
            .expect("backlog run on 16 partitions");
        // This run's keys on one master (one SCAN page is plenty for this small run).
        let keys_on = async |node: &str| -> Vec<String> {
            let mut conn = redis::Client::open(node)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let (_, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(0)
                .arg("MATCH")
                .arg(format!("{{{}:*", shared.prefix))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .unwrap();
            page
        };
        for node in shared.masters() {
            assert!(
                !keys_on(node).await.is_empty(),
                "every master holds some of the 16 partitions"
            );
        }
        shared.cleanup().await.expect("cleanup on every master");
        for node in shared.masters() {
            let page = keys_on(node).await;
            assert!(page.is_empty(), "{node} still holds {page:?}");
        }
    }
}
