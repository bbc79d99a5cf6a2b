//! A worker process for the queue's integration tests and demos.
//!
//! `queue_worker <redis-url> <queue> [--concurrency N] [--orphan-timeout 3s] [--prefix P]`
//!
//! Runs an apalis worker on the queue until SIGTERM/SIGINT. Each job (`{"n":..,"sleep_ms":..}`)
//! sleeps `sleep_ms`, then records itself: `HINCRBY <prefix>:<queue>:processed <n> 1` (and
//! `started` when it begins), so a test can count lost and duplicated jobs.
//!
//! For the clock tests, every attempt also appends `<attempt>:<server ms>:<pid>` to the list
//! `<prefix>:<queue>:starts:<n>`, with the start time read from the Redis server's `TIME`.
//! Optional job fields: `retries` + `retry_ms` (fail with `RetryAfterError(retry_ms)` on the
//! first `retries` attempts), `spawn_ms` (on success, enqueue job `n + 1000000` with that delay,
//! after recording this attempt's start in the hash `<prefix>:<queue>:spawned`). At start the
//! process writes its local wall clock to the hash `<prefix>:<queue>:local_clock` under its pid,
//! so a test can check that a skewed clock (faketime) is really in effect.
//!
//! For the takeover tests, `takeover` 1 (retry) or 2 (give up): only the first attempt sleeps
//! `sleep_ms`; the second waits until the key `<prefix>:<queue>:go:<n>` exists, then fails with
//! `RetryAfterError(0)` (1) or `AbortError` (2); the third succeeds.

use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use std::time::Duration;
use tarspay_worker::queue::{JobOptions, QueueConfig, RedisQueue};
use tarspay_worker::redis_conn::RedisConn;

/// Job number offset of jobs enqueued by a job with `spawn_ms`.
const SPAWN_OFFSET: u64 = 1_000_000;

#[derive(Debug, Default, Serialize, Deserialize)]
struct TestJob {
    n: u64,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    retries: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    retry_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    spawn_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    takeover: u8,
}

fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Appends `<attempt>:<server ms>:<pid>` to KEYS[1]; returns the server ms.
static RECORD_START: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('RPUSH', KEYS[1], ARGV[1] .. ':' .. string.format('%d', ms) .. ':' .. ARGV[2])
return ms
"#,
    )
});

#[derive(Clone)]
struct Recorder {
    conn: RedisConn,
    queue: RedisQueue<TestJob>,
    processed: String,
    started: String,
    starts: String,
    spawned: String,
}

async fn handle(
    job: TestJob,
    attempt: Attempt,
    recorder: Data<Recorder>,
) -> Result<(), BoxDynError> {
    let mut conn = recorder.conn.clone();
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&recorder.started)
        .arg(job.n)
        .arg(1)
        .query_async(&mut conn)
        .await?;
    let started_ms: u64 = RECORD_START
        .key(format!("{}:{}", recorder.starts, job.n))
        .arg(attempt.current())
        .arg(std::process::id())
        .invoke_async(&mut conn)
        .await?;
    if job.sleep_ms > 0 && (job.takeover == 0 || attempt.current() == 1) {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    if job.takeover > 0 && attempt.current() == 2 {
        let go = format!(
            "{}:go:{}",
            recorder.starts.trim_end_matches(":starts"),
            job.n
        );
        loop {
            let open: bool = redis::cmd("EXISTS").arg(&go).query_async(&mut conn).await?;
            if open {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if job.takeover == 2 {
            return Err(AbortError::new("given up by the new holder").into());
        }
        return Err(RetryAfterError::new("retry by the new holder", Duration::ZERO).into());
    }
    if attempt.current() <= job.retries as usize {
        return Err(RetryAfterError::new("not yet", Duration::from_millis(job.retry_ms)).into());
    }
    if job.spawn_ms > 0 {
        let child = job.n + SPAWN_OFFSET;
        let _: i64 = redis::cmd("HSET")
            .arg(&recorder.spawned)
            .arg(child)
            .arg(started_ms)
            .query_async(&mut conn)
            .await?;
        let options = JobOptions {
            delay: Some(Duration::from_millis(job.spawn_ms)),
            unique_key: Some(format!("spawn:{child}")),
            ..JobOptions::default()
        };
        recorder
            .queue
            .enqueue_with(
                &TestJob {
                    n: child,
                    ..TestJob::default()
                },
                options,
            )
            .await?;
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
                parsed.orphan_timeout = tarspay_worker::config::parse_duration(&value)?
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
        queue: queue.clone(),
        processed: format!("{}:{}:processed", args.prefix, args.queue),
        started: format!("{}:{}:started", args.prefix, args.queue),
        starts: format!("{}:{}:starts", args.prefix, args.queue),
        spawned: format!("{}:{}:spawned", args.prefix, args.queue),
    };
    let local_ms = tarspay_worker::wall_clock::now_ms();
    let mut conn = queue.connection();
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{}:{}:local_clock", args.prefix, args.queue))
        .arg(std::process::id())
        .arg(local_ms)
        .query_async(&mut conn)
        .await?;
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
