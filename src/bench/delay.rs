//! `bench delay`: how late delayed jobs start. A producer enqueues no-op jobs, each delayed by
//! [`DELAY`], one every `1/rate` s (so due times are spread evenly), into one queue served by 1
//! or 4 worker processes (`tarspay-dev bench delay-worker`, this executable). Each job carries
//! its due time on the server's clock (the producer's estimate of it, taken just before the
//! enqueue, whose script adds the delay to the server's `TIME` a little later: lateness is
//! measured at most one round trip short, and both ends are whole milliseconds of two clock
//! readings, so a job that started on the dot can read -1 ms: `early`). A worker records
//! `start - due` in a list; the bench
//! reports p50 / p99 / max per rate and worker count, and the Redis commands per second the
//! idle workers cost before any job arrives.

use super::shared::{ChildProcess, RedisChoice, RedisTarget, commandstats_delta, round};
use super::{BenchError, BenchOptions, Report};
use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tarspay_worker::queue::{JobOptions, QueueConfig, RedisQueue, server_now_ms};
use tarspay_worker::redis_conn::RedisConn;

/// How far in the future every job is due.
const DELAY: Duration = Duration::from_millis(250);
/// How long each rate runs.
const RUN: Duration = Duration::from_secs(5);
/// How long the idle workers are watched.
const IDLE: Duration = Duration::from_secs(5);
const QUEUE: &str = "delay";
const RATES: [u64; 2] = [100, 1_000];
const WORKERS: [usize; 2] = [1, 4];
const CONCURRENCY: usize = 64;

/// A no-op job due at `due` (server ms).
#[derive(Debug, Serialize, Deserialize)]
struct DelayJob {
    due: u64,
}

fn lateness_key(prefix: &str) -> String {
    format!("{{{prefix}:{QUEUE}}}:lateness")
}

fn queue_config(prefix: &str) -> QueueConfig {
    QueueConfig::new(QUEUE).with_prefix(prefix)
}

/// Runs every rate with 1 and 4 worker processes; one JSON line per run.
pub async fn run(options: &BenchOptions, report: Report<'_>) -> Result<(), BenchError> {
    for workers in WORKERS {
        let target = RedisTarget::new(RedisChoice::of(options)?, "delay").await?;
        let mut nodes = target.nodes().await?;
        let queue: RedisQueue<DelayJob> =
            RedisQueue::connect(&target.url, queue_config(&target.prefix)).await?;
        let env = vec![
            ("BENCH_DELAY_URL".to_owned(), target.url.clone()),
            ("BENCH_DELAY_PREFIX".to_owned(), target.prefix.clone()),
        ];
        let mut children = Vec::new();
        for i in 0..workers {
            children.push(ChildProcess::spawn(
                &format!("delay-worker-{i}"),
                &["bench", "delay-worker"],
                &env,
                Stdio::null(),
            )?);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while queue.stats().await?.workers_alive < workers as u64 {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!(
                    "{workers} delay workers to start"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Idle: what the sleeping workers cost Redis.
        let before = nodes.commandstats().await?;
        tokio::time::sleep(IDLE).await;
        let after = nodes.commandstats().await?;
        let idle_calls: u64 = commandstats_delta(&before, &after)
            .iter()
            .filter(|(name, _)| name != "info")
            .map(|(_, calls)| calls)
            .sum();
        let idle_per_s = idle_calls as f64 / IDLE.as_secs_f64();
        let mut conn = queue.connection();
        for rate in RATES {
            let late = measure(&queue, &mut conn, &target.prefix, rate).await?;
            let mut sorted = late.clone();
            sorted.sort_by(f64::total_cmp);
            let pick = |p: f64| super::shared::percentile(&sorted, p);
            report(json!({
                "bench": "delay",
                "workers": workers,
                "concurrency": CONCURRENCY,
                "redis": target.describe(),
                "rate_per_s": rate,
                "n": late.len(),
                "delay_ms": DELAY.as_millis() as u64,
                "lateness_ms_p50": round(pick(50.0), 1),
                "lateness_ms_p99": round(pick(99.0), 1),
                "lateness_ms_max": round(sorted.last().copied().unwrap_or(0.0), 1),
                "early": late.iter().filter(|&&l| l < 0.0).count(),
                "lateness_ms_min": round(sorted.first().copied().unwrap_or(0.0), 1),
                "idle_redis_calls_per_s": round(idle_per_s, 1),
            }));
        }
        for child in &mut children {
            child.kill();
        }
        target.cleanup().await?;
    }
    Ok(())
}

/// Enqueues `rate` jobs a second for [`RUN`], then waits for every start; the lateness of each
/// (ms, negative: early).
async fn measure(
    queue: &RedisQueue<DelayJob>,
    conn: &mut RedisConn,
    prefix: &str,
    rate: u64,
) -> Result<Vec<f64>, BenchError> {
    let n = rate * RUN.as_secs();
    let key = lateness_key(prefix);
    redis::cmd("DEL").arg(&key).query_async::<i64>(conn).await?;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..n {
        ticks.tick().await;
        let job = DelayJob {
            due: server_now_ms() + DELAY.as_millis() as u64,
        };
        queue.enqueue_with(&job, JobOptions::delayed(DELAY)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started: u64 = redis::cmd("LLEN").arg(&key).query_async(conn).await?;
        if started >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "{started} of {n} delayed jobs started"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let values: Vec<i64> = redis::cmd("LRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    Ok(values.into_iter().map(|ms| ms as f64).collect())
}

/// `bench delay-worker`: one worker process of `bench delay` (its Redis and prefix from
/// `BENCH_DELAY_URL` and `BENCH_DELAY_PREFIX`); runs until killed.
pub async fn worker() -> Result<(), BenchError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| BenchError::Setup(format!("{name} is not set")))
    };
    let (url, prefix) = (var("BENCH_DELAY_URL")?, var("BENCH_DELAY_PREFIX")?);
    let queue: RedisQueue<DelayJob> = RedisQueue::connect(&url, queue_config(&prefix)).await?;
    let recorder = Recorder {
        conn: queue.connection(),
        key: lateness_key(&prefix),
    };
    WorkerBuilder::new("delay-worker")
        .backend(queue)
        .data(recorder)
        .concurrency(CONCURRENCY)
        .build(record)
        .run()
        .await
        .map_err(|err| BenchError::Check(err.to_string()))
}

#[derive(Clone)]
struct Recorder {
    conn: RedisConn,
    key: String,
}

async fn record(job: DelayJob, recorder: Data<Recorder>) -> Result<(), BoxDynError> {
    let late = server_now_ms() as i64 - job.due as i64;
    redis::cmd("RPUSH")
        .arg(&recorder.key)
        .arg(late)
        .query_async::<i64>(&mut recorder.conn.clone())
        .await?;
    Ok(())
}
