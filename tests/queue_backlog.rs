//! A backlog enqueued before any worker starts drains completely, and jobs all due at the same
//! moment are promoted in bounded chunks. `QUEUE_BACKLOG_JOBS` and `QUEUE_DUE_JOBS` change
//! the sizes (10,000 and 20,000 by default; 100,000 each with `TARSPAY_TEST_TIER=long`).
//! Throughput with a backlog vs an empty queue is `tarspay-dev bench backlog`: speed is
//! measured by benchmarks, not tests.

mod common;

use common::queue::*;
use std::time::Duration;
use tarspay_worker::queue::JobOptions;

/// 10,000 in the default tier, 100,000 in the long one (`common::tiered`).
fn backlog_size() -> u64 {
    common::tiered("QUEUE_BACKLOG_JOBS", 10_000, 100_000)
}

async fn drain_backlog(n: u64) {
    let server = RedisServer::start(false);
    let name = "backlog";
    let queue = queue(&server, config(name)).await;
    let jobs: Vec<TestJob> = (0..n).map(TestJob::new).collect();
    let results = queue.enqueue_bulk(&jobs).await.unwrap();
    assert_eq!(results.len() as u64, n);
    assert!(results.iter().all(|r| !r.is_duplicate()));
    assert_eq!(queue.stats().await.unwrap().waiting, n);

    let worker = recording_worker("backlog-1", queue.clone(), 64);
    let mut conn = server.conn().await;
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        n,
        Duration::from_secs(600),
    )
    .await;
    worker.stop().await;

    let tally = tally(&counts(&mut conn, &processed_key(name)).await, 0..n);
    assert!(
        tally.missing.is_empty(),
        "missing {:?}",
        &tally.missing[..tally.missing.len().min(10)]
    );
    assert_eq!(tally.distinct, n);
    assert_eq!(tally.duplicates, 0, "no faults, so no job may run twice");
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.depth(), 0, "{stats:?}");
    assert_eq!(stats.dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_enqueued_before_workers_drains_completely() {
    drain_backlog(backlog_size()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_jobs_all_at_once_are_promoted_in_chunks() {
    // 20,000 by default (40 promotion steps of 500), 100,000 in the long tier.
    let n = common::tiered("QUEUE_DUE_JOBS", 20_000, 100_000);
    let server = RedisServer::start(false);
    let mut config = config("due");
    config.promote_chunk = 500;
    let queue = queue(&server, config).await;
    let jobs: Vec<TestJob> = (0..n).map(TestJob::new).collect();
    let delay = Duration::from_millis(300);
    let results = queue
        .enqueue_bulk_with(jobs.iter().map(|job| (job, JobOptions::delayed(delay))))
        .await
        .unwrap();
    assert_eq!(results.len() as u64, n);
    assert_eq!(queue.stats().await.unwrap().delayed, n);
    tokio::time::sleep(delay + Duration::from_millis(100)).await;

    // All due at once: promotion must take many small steps and lose nothing.
    let moved = queue.promote_due().await.unwrap();
    assert_eq!(moved, n);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.delayed, stats.waiting), (0, n), "{stats:?}");
}
