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

/// The group's last delivered id.
async fn last_delivered(conn: &mut tarspay_worker::redis_conn::RedisConn, stream: &str) -> String {
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    groups.groups[0].last_delivered_id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_written_by_hand_is_followed_up_at_a_workers_next_flag_check() {
    const PARKED: &str = "18446744073709551615-18446744073709551615";
    let server = RedisServer::start(false);
    let name = "pause-by-hand";
    let queue = queue(&server, config(name)).await;
    let worker = recording_worker("by-hand", queue.clone(), 4);
    let mut conn = server.conn().await;
    let first: Vec<TestJob> = (0..5).map(TestJob::new).collect();
    queue.enqueue_bulk(&first).await.unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        5,
        Duration::from_secs(60),
    )
    .await;

    // Not through `pause`: the group is not parked by the write. The worker's next flag check
    // (before an orphan scan: every 750 ms here) parks it.
    let keys = queue.keys().clone();
    let () = redis::cmd("SET")
        .arg(&keys.paused)
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    common::eventually("the group parked by a flag check", || {
        let mut conn = conn.clone();
        let stream = keys.stream.clone();
        async move { (last_delivered(&mut conn, &stream).await == PARKED).then_some(()) }
    })
    .await;
    let paused: Vec<TestJob> = (5..10).map(TestJob::new).collect();
    queue.enqueue_bulk(&paused).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counts(&mut conn, &processed_key(name)).await.len(), 5);
    assert_eq!(queue.stats().await.unwrap().waiting, 5);

    // The flag deleted by hand: the next check puts the group back, and the jobs run.
    let () = redis::cmd("DEL")
        .arg(&keys.paused)
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        10,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let tally = tally(&counts(&mut conn, &processed_key(name)).await, 0..10);
    assert!(tally.missing.is_empty());
    assert_eq!(tally.duplicates, 0);
}
