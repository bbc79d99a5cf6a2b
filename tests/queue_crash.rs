//! Worker processes that die, and workers that are merely busy.

mod common;

use common::queue::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_killed_worker_finish_on_another() {
    let server = RedisServer::start(false);
    let name = "crash";
    let queue = queue(&server, config(name)).await;
    let mut conn = server.conn().await;

    let mut doomed = WorkerProcess::spawn(&server, name, 8, "3s");
    let jobs: Vec<TestJob> = (0..40).map(|n| TestJob { n, sleep_ms: 1000 }).collect();
    queue.enqueue_bulk(&jobs).await.unwrap();
    // Mid-batch: some jobs started, most are prefetched and pending on the doomed worker.
    wait_until(
        "the first worker started jobs",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move { counts(&mut conn, &started_key(name)).await.len() >= 4 }
        },
    )
    .await;
    doomed.kill();
    let before = queue.stats().await.unwrap();
    assert!(
        before.pending > 0,
        "the killed worker held jobs: {before:?}"
    );

    let _rescuer = WorkerProcess::spawn(&server, name, 8, "3s");
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        40,
        Duration::from_secs(120),
    )
    .await;
    let processed = counts(&mut conn, &processed_key(name)).await;
    let tally = tally(&processed, 0..40);
    assert!(tally.missing.is_empty(), "lost jobs: {:?}", tally.missing);
    // A job may run twice only if the killed worker finished it but died before acknowledging.
    let started_by_doomed = 8 + 1;
    assert!(
        tally.duplicates <= started_by_doomed,
        "duplicates: {}",
        tally.duplicates
    );
    eprintln!("killed-worker test: duplicates = {}", tally.duplicates);
    let q = queue.clone();
    wait_until("queue settles", Duration::from_secs(30), || {
        let q = q.clone();
        async move { q.stats().await.unwrap().depth() == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_worker_keeps_its_jobs() {
    let server = RedisServer::start(false);
    let name = "busy";
    let queue = queue(&server, config(name)).await;
    let mut conn = server.conn().await;

    // Jobs four times longer than the orphan timeout, all running on one worker.
    let _busy = WorkerProcess::spawn(&server, name, 20, "2s");
    let jobs: Vec<TestJob> = (0..20).map(|n| TestJob { n, sleep_ms: 8000 }).collect();
    queue.enqueue_bulk(&jobs).await.unwrap();
    wait_until(
        "all jobs started on the busy worker",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move { counts(&mut conn, &started_key(name)).await.len() == 20 }
        },
    )
    .await;
    // An idle worker hunting for orphans the whole time.
    let _hunter = WorkerProcess::spawn(&server, name, 20, "2s");

    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        20,
        Duration::from_secs(120),
    )
    .await;
    let started = counts(&mut conn, &started_key(name)).await;
    let processed = counts(&mut conn, &processed_key(name)).await;
    assert!(
        started.values().all(|&c| c == 1),
        "a live job was started twice: {started:?}"
    );
    assert!(
        processed.values().all(|&c| c == 1),
        "a live job ran twice: {processed:?}"
    );
}
