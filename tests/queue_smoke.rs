mod common;

use common::queue::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_and_are_trimmed() {
    let server = RedisServer::start(false);
    let queue = queue(&server, config("smoke")).await;
    let jobs: Vec<TestJob> = (0..500).map(TestJob::new).collect();
    let results = queue.enqueue_bulk(&jobs).await.unwrap();
    assert_eq!(results.len(), 500);
    assert_eq!(queue.stats().await.unwrap().waiting, 500);
    let worker = recording_worker("smoke-1", queue.clone(), 16);
    let mut conn = server.conn().await;
    wait_for_distinct(
        &server.url(),
        &processed_key("smoke"),
        500,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let tally = tally(&counts(&mut conn, &processed_key("smoke")).await, 0..500);
    assert!(tally.missing.is_empty());
    assert_eq!(tally.duplicates, 0);
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.pending, stats.depth()),
        (0, 0, 0),
        "{stats:?}"
    );
    let len: u64 = redis::cmd("XLEN")
        .arg(&queue.keys().stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0, "acknowledged entries are deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_running_jobs_and_returns_prefetched_ones() {
    let server = RedisServer::start(false);
    let name = "graceful";
    let queue = queue(&server, config(name)).await;
    let jobs: Vec<TestJob> = (0..10).map(|n| TestJob { n, sleep_ms: 700 }).collect();
    queue.enqueue_bulk(&jobs).await.unwrap();
    // Concurrency 1: one job runs, the other nine sit in the worker's prefetch buffer.
    let worker = recording_worker("graceful-1", queue.clone(), 1);
    let q = queue.clone();
    wait_until("all jobs fetched", Duration::from_secs(30), || {
        let q = q.clone();
        async move { q.stats().await.unwrap().pending == 10 }
    })
    .await;
    // One job running (fetched is not yet started: a stop then would give it back too).
    let mut conn = server.conn().await;
    wait_until("a job started", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        async move { !counts(&mut conn, &started_key(name)).await.is_empty() }
    })
    .await;
    worker.stop().await;
    let done = counts(&mut conn, &processed_key(name)).await.len() as u64;
    assert!(
        done >= 1,
        "the running job finished before the worker stopped"
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        stats.pending, 0,
        "nothing left for orphan recovery: {stats:?}"
    );
    assert_eq!(
        stats.waiting,
        10 - done,
        "prefetched jobs are back in the queue: {stats:?}"
    );
    assert_eq!(stats.workers_alive, 0, "heartbeat removed");
}
