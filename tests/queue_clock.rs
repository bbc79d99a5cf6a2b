//! Due times are on the Redis server's clock: workers whose wall clocks are ten minutes fast
//! and ten minutes slow (real processes under `faketime`) run delayed jobs, retries and jobs
//! they enqueue themselves neither early nor late, and burn no attempts.

mod common;

use common::faketime::libfaketime;

use common::queue::*;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;
use tarspay_worker::queue::{JobOptions, RedisQueue};
use tarspay_worker::redis_conn::RedisConn;

/// The job of the `queue_worker` binary, with its clock-test fields.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ClockJob {
    n: u64,
    sleep_ms: u64,
    retries: u32,
    retry_ms: u64,
    spawn_ms: u64,
}

/// Job number offset of the jobs a `spawn_ms` job enqueues (as in `queue_worker`).
const SPAWN_OFFSET: u64 = 1_000_000;
const TEN_MINUTES_MS: i64 = 600_000;

async fn server_ms(conn: &mut RedisConn) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// (attempt, server ms at start, worker pid) of every attempt of job `n`.
async fn starts(conn: &mut RedisConn, queue: &str, n: u64) -> Vec<(u32, u64, u32)> {
    let raw: Vec<String> = conn
        .lrange(format!("{PREFIX}:{queue}:starts:{n}"), 0, -1)
        .await
        .unwrap();
    raw.iter()
        .map(|line| {
            let mut parts = line.split(':');
            let mut next = || parts.next().expect("three fields").to_owned();
            (
                next().parse().expect("attempt"),
                next().parse().expect("ms"),
                next().parse().expect("pid"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_workers_run_nothing_early_or_late_and_burn_no_attempts() {
    let Some(lib) = libfaketime() else {
        eprintln!(
            "SKIPPED: `faketime` is not installed (apt-get install faketime; .ci/run installs it)"
        );
        return;
    };
    let lib = lib.to_str().expect("utf-8 path");
    let server = RedisServer::start(false);
    let name = "clock";
    let queue: RedisQueue<ClockJob> = RedisQueue::connect(&server.url(), config(name))
        .await
        .unwrap();
    let mut conn = server.conn().await;

    // Only the wall clock is skewed; a host's monotonic clock is unrelated to its date.
    let skewed = |offset| {
        [
            ("LD_PRELOAD", lib),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
    };
    let workers = [
        WorkerProcess::spawn_with_env(&server, name, 8, "10s", &skewed("+10m"), None),
        WorkerProcess::spawn_with_env(&server, name, 8, "10s", &skewed("-10m"), None),
        WorkerProcess::spawn(&server, name, 8, "10s"),
    ];
    // The skew is really in effect in the worker processes.
    let local: HashMap<u32, u64> = conn
        .hgetall(format!("{PREFIX}:{name}:local_clock"))
        .await
        .unwrap();
    let now = server_ms(&mut conn).await as i64;
    let skew = |w: &WorkerProcess| local[&w.pid()] as i64 - now;
    assert!(
        (skew(&workers[0]) - TEN_MINUTES_MS).abs() < 60_000,
        "faketime +10m not in effect: skew {} ms",
        skew(&workers[0])
    );
    assert!(
        (skew(&workers[1]) + TEN_MINUTES_MS).abs() < 60_000,
        "faketime -10m not in effect: skew {} ms",
        skew(&workers[1])
    );

    // Delayed jobs from this (unskewed) producer: due at the server's time before the enqueue
    // plus the delay.
    let mut due = HashMap::new();
    for n in 0..6u64 {
        let delay = 2_000 + 300 * n;
        due.insert(n, server_ms(&mut conn).await + delay);
        let job = ClockJob {
            n,
            ..ClockJob::default()
        };
        queue
            .enqueue_with(&job, JobOptions::delayed(Duration::from_millis(delay)))
            .await
            .unwrap();
    }
    // Retried twice after 1.5 s each (the retry is written by whichever worker ran it).
    let retried: Vec<ClockJob> = (100..106)
        .map(|n| ClockJob {
            n,
            retries: 2,
            retry_ms: 1_500,
            ..ClockJob::default()
        })
        .collect();
    queue.enqueue_bulk(&retried).await.unwrap();
    // Jobs that enqueue a job delayed by 2.5 s from inside a (possibly skewed) worker.
    let spawners: Vec<ClockJob> = (200..206)
        .map(|n| ClockJob {
            n,
            spawn_ms: 2_500,
            ..ClockJob::default()
        })
        .collect();
    queue.enqueue_bulk(&spawners).await.unwrap();

    let total = 6 + 6 + 6 + 6;
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        total,
        Duration::from_secs(120),
    )
    .await;

    let mut by_worker: HashMap<u32, u32> = HashMap::new();
    let mut tally_worker = |runs: &[(u32, u64, u32)]| {
        for (_, _, pid) in runs {
            *by_worker.entry(*pid).or_default() += 1;
        }
    };
    for n in 0..6u64 {
        let runs = starts(&mut conn, name, n).await;
        tally_worker(&runs);
        assert_eq!(runs.len(), 1, "job {n} attempts: {runs:?}");
        assert!(
            runs[0].1 >= due[&n],
            "delayed job {n} started {} ms before it was due",
            due[&n] - runs[0].1
        );
    }
    for n in 100..106u64 {
        let runs = starts(&mut conn, name, n).await;
        tally_worker(&runs);
        let attempts: Vec<u32> = runs.iter().map(|r| r.0).collect();
        assert_eq!(attempts, vec![1, 2, 3], "job {n}: {runs:?}");
        for pair in runs.windows(2) {
            let gap = pair[1].1 - pair[0].1;
            assert!(
                gap >= 1_500,
                "job {n}: a retry after 1500 ms started after {gap} ms: {runs:?}"
            );
        }
    }
    let spawned: HashMap<u64, u64> = conn
        .hgetall(format!("{PREFIX}:{name}:spawned"))
        .await
        .unwrap();
    for n in 200..206u64 {
        let parent = starts(&mut conn, name, n).await;
        tally_worker(&parent);
        assert_eq!(parent.len(), 1, "job {n}: {parent:?}");
        let child = n + SPAWN_OFFSET;
        let runs = starts(&mut conn, name, child).await;
        tally_worker(&runs);
        assert_eq!(runs.len(), 1, "job {child}: {runs:?}");
        let due = spawned[&child] + 2_500;
        assert!(
            runs[0].1 >= due,
            "job {child}, enqueued by worker {} with a 2500 ms delay, started {} ms early",
            parent[0].2,
            due - runs[0].1
        );
    }

    let processed = counts(&mut conn, &processed_key(name)).await;
    assert!(
        processed.values().all(|&c| c == 1),
        "a job ran to completion twice: {processed:?}"
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.dead, 0, "{stats:?}");
    assert_eq!(stats.delayed, 0, "{stats:?}");
    let names = ["+10m", "-10m", "normal"];
    for (worker, label) in workers.iter().zip(names) {
        eprintln!(
            "worker {label} ran {} attempts",
            by_worker.get(&worker.pid()).copied().unwrap_or(0)
        );
    }
}
