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
    // Workers read the flag when jobs arrive (at most 500 ms stale) and give back what they
    // fetched while paused; give them more than a full period plus a fetch.
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

/// A key read with the pause flag (`QueueConfig::read_with_pause`: the payout queue reads its
/// guard count so) does not pause the queue by being there; the flag set as well does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_read_with_the_pause_flag_does_not_pause_the_queue_the_flag_does() {
    use redis::AsyncCommands;
    let server = RedisServer::start(false);
    let name = "withflag";
    let watched = format!("{{{PREFIX}:{name}}}:guard");
    let queue = queue(
        &server,
        config(name).reading_with_pause(vec![watched.clone()]),
    )
    .await;
    let mut conn = server.conn().await;
    let _: i64 = conn.sadd(&watched, "REFUSED-1").await.unwrap();
    let worker = recording_worker("withflag-a", queue.clone(), 4);
    let first: Vec<TestJob> = (0..10).map(TestJob::new).collect();
    queue.enqueue_bulk(&first).await.unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        10,
        Duration::from_secs(60),
    )
    .await;

    queue.pause().await.unwrap();
    // As in the test above: more than a reading's period plus a fetch.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused: Vec<TestJob> = (10..20).map(TestJob::new).collect();
    queue.enqueue_bulk(&paused).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.pending),
        (10, 0),
        "nothing fetched while paused: {stats:?}"
    );

    queue.resume().await.unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        20,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let tally = tally(&counts(&mut conn, &processed_key(name)).await, 0..20);
    assert!(tally.missing.is_empty());
    assert_eq!(tally.duplicates, 0);
    let left: bool = conn.exists(&watched).await.unwrap();
    assert!(left, "read, never written");
}
