//! `bench backlog`: does throughput hold up when a large backlog is already waiting? The same
//! no-op jobs and worker as `bench queue`; first on an empty queue fed live, then draining N
//! jobs enqueued before the worker starts. The target is a ratio of at least 0.8.

use super::queue::{DEFAULT_CONCURRENCY, DEFAULT_N, Feed, live_window, run_once};
use super::shared::{RedisChoice, RedisTarget, round};
use super::{BenchError, BenchOptions, Report};
use serde_json::json;

pub async fn run(options: &BenchOptions, report: Report<'_>) -> Result<(), BenchError> {
    let n = options.n.unwrap_or(DEFAULT_N).max(1);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let partitions = options.partitions()?;
    let target = RedisTarget::new(RedisChoice::of(options)?, "backlog").await?;
    let window = live_window(concurrency);
    let runs = async {
        let live = Feed::Live { window };
        let empty = run_once(&target, "empty", n, concurrency, partitions, live).await?;
        let backlog = run_once(
            &target,
            "backlog",
            n,
            concurrency,
            partitions,
            Feed::Backlog,
        )
        .await?;
        Ok::<_, BenchError>((empty, backlog))
    }
    .await;
    target.cleanup().await?;
    let (empty, backlog) = runs?;
    let preload_s = backlog.preload.map_or(0.0, |d| d.as_secs_f64());
    report(json!({
        "bench": "backlog",
        "n": n,
        "concurrency": concurrency,
        "partitions": partitions,
        "redis": target.describe(),
        "waiting_at_start": n,
        "empty_jobs_per_s": round(empty.jobs_per_s, 0),
        "backlog_jobs_per_s": round(backlog.jobs_per_s, 0),
        "ratio": round(backlog.jobs_per_s / empty.jobs_per_s, 3),
        "backlog_preload_s": round(preload_s, 3),
        "empty_redis_calls_per_job": round(empty.redis_calls_per_job, 2),
        "backlog_redis_calls_per_job": round(backlog.redis_calls_per_job, 2),
        "redis_private": target.is_private(),
    }));
    Ok(())
}
