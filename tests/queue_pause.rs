//! Pause stops fetching on every worker; resume continues.

mod common;

use common::queue::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_all_workers_and_resume_continues() {
    let server = RedisServer::start(false);
    let name = "pause";
    let queue = queue(&server, config(name)).await;
    let a = recording_worker("pause-a", queue.clone(), 8);
    let b = recording_worker("pause-b", queue.clone(), 8);
    let mut conn = server.conn().await;

    // Both workers run normally first.
    let first: Vec<TestJob> = (0..20).map(TestJob::new).collect();
    queue.enqueue_bulk(&first).await.unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        20,
        Duration::from_secs(60),
    )
    .await;

    queue.pause().await.unwrap();
    // The pause parks the group: the reads workers have in flight deliver nothing from here
    // on; give them more than a fetch block.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused: Vec<TestJob> = (20..70).map(TestJob::new).collect();
    queue.enqueue_bulk(&paused).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = queue.stats().await.unwrap();
    assert!(stats.paused);
    assert_eq!(
        (stats.waiting, stats.pending),
        (50, 0),
        "nothing fetched while paused: {stats:?}"
    );
    assert!(
        stats.oldest_waiting_age.is_some(),
        "the parked group's saved position finds the oldest waiting job: {stats:?}"
    );
    assert_eq!(counts(&mut conn, &processed_key(name)).await.len(), 20);

    queue.resume().await.unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        70,
        Duration::from_secs(60),
    )
    .await;
    a.stop().await;
    b.stop().await;
    let tally = tally(&counts(&mut conn, &processed_key(name)).await, 0..70);
    assert!(tally.missing.is_empty());
    assert_eq!(tally.duplicates, 0);
}
