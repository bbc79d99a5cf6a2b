//! A worker process for the queue's integration tests and demos.
//!
//! `queue_worker <redis-url> <queue> [--concurrency N] [--orphan-timeout 3s] [--prefix P]`
//!
//! Runs an apalis worker on the queue until SIGTERM/SIGINT. Each job (`{"n":..,"sleep_ms":..}`)
//! sleeps `sleep_ms`, then records itself: `HINCRBY <prefix>:<queue>:processed <n> 1` (and
//! `started` when it begins), so a test can count lost and duplicated jobs.

use apalis::prelude::*;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tarspay_worker::queue::{QueueConfig, RedisQueue};

#[derive(Debug, Serialize, Deserialize)]
struct TestJob {
    n: u64,
    #[serde(default)]
    sleep_ms: u64,
}

#[derive(Clone)]
struct Recorder {
    conn: ConnectionManager,
    processed: String,
    started: String,
}

async fn handle(job: TestJob, recorder: Data<Recorder>) -> Result<(), BoxDynError> {
    let mut conn = recorder.conn.clone();
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&recorder.started)
        .arg(job.n)
        .arg(1)
        .query_async(&mut conn)
        .await?;
    if job.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&recorder.processed)
        .arg(job.n)
        .arg(1)
        .query_async(&mut conn)
        .await?;
    Ok(())
}

struct Args {
    url: String,
    queue: String,
    prefix: String,
    concurrency: usize,
    orphan_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("missing redis url")?;
    let queue = args.next().ok_or("missing queue name")?;
    let mut parsed = Args {
        url,
        queue,
        prefix: "qtest".to_owned(),
        concurrency: 16,
        orphan_timeout: Duration::from_secs(30),
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("missing value for {flag}"))?;
        match flag.as_str() {
            "--concurrency" => parsed.concurrency = value.parse().map_err(|e| format!("{e}"))?,
            "--orphan-timeout" => {
                parsed.orphan_timeout =
                    humantime::parse_duration(&value).map_err(|e| format!("{e}"))?
            }
            "--prefix" => parsed.prefix = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let args = parse_args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUEUE_WORKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = QueueConfig::new(&args.queue)
        .with_prefix(&args.prefix)
        .with_orphan_timeout(args.orphan_timeout);
    let queue: RedisQueue<TestJob> = RedisQueue::connect(&args.url, config).await?;
    let recorder = Recorder {
        conn: queue.connection(),
        processed: format!("{}:{}:processed", args.prefix, args.queue),
        started: format!("{}:{}:started", args.prefix, args.queue),
    };
    let worker = WorkerBuilder::new(format!("queue-worker-{}", std::process::id()))
        .backend(queue)
        .data(recorder)
        .concurrency(args.concurrency)
        .build(handle);
    // Readiness line for the test harness.
    println!("ready");
    worker
        .run_until(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok::<(), std::io::Error>(())
        })
        .await?;
    Ok(())
}
