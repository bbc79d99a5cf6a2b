//! Three worker processes share one queue.

mod common;

use common::queue::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_a_queue_without_loss_or_duplicates() {
    let server = RedisServer::start(false);
    let name = "multi";
    let n = 6000u64;
    let queue = queue(&server, config(name)).await;
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(&server, name, 8, "5s"))
        .collect();
    let q = queue.clone();
    wait_until("three workers alive", Duration::from_secs(30), || {
        let q = q.clone();
        async move { q.stats().await.unwrap().workers_alive == 3 }
    })
    .await;
    let jobs: Vec<TestJob> = (0..n).map(|n| TestJob { n, sleep_ms: 1 }).collect();
    // Enqueued while the workers run, in chunks, like a producer would.
    for chunk in jobs.chunks(500) {
        queue.enqueue_bulk(chunk).await.unwrap();
    }
    let mut conn = server.conn().await;
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        n,
        Duration::from_secs(240),
    )
    .await;
    let tally = tally(&counts(&mut conn, &processed_key(name)).await, 0..n);
    eprintln!("three workers: {n} jobs, duplicates = {}", tally.duplicates);
    assert!(tally.missing.is_empty(), "lost jobs: {:?}", tally.missing);
    assert_eq!(tally.duplicates, 0, "no faults, so no duplicates");

    for worker in &mut workers {
        assert!(worker.terminate().success());
    }
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.depth(), stats.workers_alive), (0, 0), "{stats:?}");
}
