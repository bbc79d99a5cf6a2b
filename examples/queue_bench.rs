//! No-op throughput of the queue under an apalis worker (concurrency 64).
//!
//! `cargo run --release --example queue_bench -- [--n 100000] [--mode backlog|empty|both] [--redis URL]`
//!
//! Without `--redis` it starts a private redis-server on a free port (never the shared one).
//! backlog: all N jobs are enqueued first, then the worker drains them (timed: the drain).
//! empty: the worker starts on an empty queue and a producer enqueues N jobs in chunks of 500
//! while it runs (timed: first enqueue to last job done).
//! Prints one JSON line per mode; `redis_cmds_per_job` comes from INFO commandstats over the timed
//! phase (it includes the enqueue commands in `empty` mode).

use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tarspay_worker::queue::{QueueConfig, RedisQueue};
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize)]
struct Noop {
    n: u64,
}

#[derive(Clone)]
struct Done {
    count: Arc<AtomicU64>,
    target: u64,
    notify: Arc<Notify>,
}

async fn noop(_job: Noop, done: Data<Done>) -> Result<(), BoxDynError> {
    if done.count.fetch_add(1, Ordering::Relaxed) + 1 >= done.target {
        done.notify.notify_one();
    }
    Ok(())
}

struct OwnRedis {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Result<(String, OwnRedis), BoxDynError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()?;
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..200 {
        if let Ok(mut conn) = redis::Client::open(url.as_str())?.get_connection()
            && redis::cmd("PING").query::<String>(&mut conn).is_ok()
        {
            return Ok((url, OwnRedis { child, _dir: dir }));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("redis-server did not start".into())
}

async fn total_calls(conn: &mut redis::aio::ConnectionManager) -> Result<u64, BoxDynError> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter_map(|line| line.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum())
}

async fn run(url: &str, n: u64, backlog: bool) -> Result<(), BoxDynError> {
    let queue_name = if backlog {
        "bench-backlog"
    } else {
        "bench-empty"
    };
    let config = QueueConfig::new(queue_name).with_prefix("bench");
    let queue: RedisQueue<Noop> = RedisQueue::connect(url, config).await?;
    let mut conn = queue.connection();
    let jobs: Vec<Noop> = (0..n).map(|n| Noop { n }).collect();
    if backlog {
        queue.enqueue_bulk(&jobs).await?;
    }
    let done = Done {
        count: Arc::new(AtomicU64::new(0)),
        target: n,
        notify: Arc::new(Notify::new()),
    };
    let calls_before = total_calls(&mut conn).await?;
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = WorkerBuilder::new(format!("bench-{queue_name}"))
        .backend(queue.clone())
        .data(done.clone())
        .concurrency(64)
        .build(noop);
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
        Ok::<(), std::io::Error>(())
    }));
    if !backlog {
        for chunk in jobs.chunks(500) {
            queue.enqueue_bulk(chunk).await?;
        }
    }
    while done.count.load(Ordering::Relaxed) < n {
        let _ = tokio::time::timeout(Duration::from_millis(100), done.notify.notified()).await;
    }
    let elapsed = started.elapsed();
    let calls = total_calls(&mut conn)
        .await?
        .saturating_sub(calls_before + 1);
    let _ = stop_tx.send(());
    handle.await??;
    let stats = queue.stats().await?;
    if stats.depth() != 0 || stats.dead != 0 {
        return Err(format!("queue not drained after the run: {stats:?}").into());
    }
    println!(
        "{{\"bench\":\"queue\",\"n\":{n},\"concurrency\":64,\"backlog\":{backlog},\"jobs_per_s\":{:.0},\"redis_cmds_per_job\":{:.2}}}",
        n as f64 / elapsed.as_secs_f64(),
        calls as f64 / n as f64
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let mut n = 100_000u64;
    let mut mode = "both".to_owned();
    let mut url = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("missing value for {flag}"))?;
        match flag.as_str() {
            "--n" => n = value.parse()?,
            "--mode" => mode = value,
            "--redis" => url = Some(value),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let (url, _own) = match url {
        Some(url) => (url, None),
        None => {
            let (url, own) = start_redis()?;
            (url, Some(own))
        }
    };
    if mode == "empty" || mode == "both" {
        run(&url, n, false).await?;
    }
    if mode == "backlog" || mode == "both" {
        run(&url, n, true).await?;
    }
    Ok(())
}
