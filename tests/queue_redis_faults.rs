//! Redis restarts and stalls in the middle of a run: workers reconnect and every job completes.

mod common;

use common::queue::*;
use std::process::Command;
use std::time::Duration;

async fn run_with_fault(name: &str, fault: impl FnOnce(&mut RedisServer)) {
    let mut server = RedisServer::start(true);
    let n = 3000u64;
    let queue = queue(&server, config(name)).await;
    let jobs: Vec<TestJob> = (0..n).map(|n| TestJob { n, sleep_ms: 25 }).collect();
    queue.enqueue_bulk(&jobs).await.unwrap();
    let mut workers = [
        WorkerProcess::spawn(&server, name, 16, "5s"),
        WorkerProcess::spawn(&server, name, 16, "5s"),
    ];
    let mut conn = server.conn().await;
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        300,
        Duration::from_secs(120),
    )
    .await;

    fault(&mut server);

    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        n,
        Duration::from_secs(240),
    )
    .await;
    let tally = tally(&counts(&mut conn, &processed_key(name)).await, 0..n);
    assert!(tally.missing.is_empty(), "lost jobs: {:?}", tally.missing);
    // At-least-once: only jobs in flight around the fault may run twice.
    let in_flight_bound = 2 * (16 + 100);
    assert!(
        tally.duplicates <= in_flight_bound,
        "duplicates: {}",
        tally.duplicates
    );
    eprintln!("{name}: {n} jobs, duplicates = {}", tally.duplicates);
    let q = queue.clone();
    wait_until("queue settles", Duration::from_secs(60), || {
        let q = q.clone();
        async move {
            let s = stats_retrying(&q).await;
            s.depth() == 0 && s.delayed == 0
        }
    })
    .await;
    assert_eq!(stats_retrying(&queue).await.dead, 0);
    for worker in &mut workers {
        assert!(
            worker.terminate().success(),
            "worker survived the fault and exits cleanly"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_a_redis_restart() {
    run_with_fault("restart", |server| {
        server.stop();
        std::thread::sleep(Duration::from_secs(4));
        server.restart();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_a_redis_stall_longer_than_the_client_timeout() {
    run_with_fault("stall", |server| {
        let pid = redis_pid(server.port);
        // Response timeout is 5 s; stall 7 s.
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap()
                .success()
        );
        std::thread::sleep(Duration::from_secs(7));
        assert!(
            Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .unwrap()
                .success()
        );
    })
    .await;
}

fn redis_pid(port: u16) -> String {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut conn = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The consumer group vanishes mid-run (a Redis that came back empty loses it; so does an
/// `XGROUP DESTROY`), taking every delivery with it, while the worker is full. The worker
/// recreates the group (its fetch loop on `NOGROUP`, and its settler, whose writes of the
/// jobs that finish meanwhile fail so; the settler's own recreation matters when the fetch
/// loop waits for room and never reads) and every job still in the stream runs. This test
/// does not isolate the settler's path: here the fetch loop saw the group gone first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_consumer_group_vanishes_recreates_it_and_goes_on() {
    let server = RedisServer::start(true);
    let name = "nogroup";
    let queue = queue(&server, config(name)).await;
    // 4 running and 100 prefetched (the worker's buffer) fill the worker; more wait behind,
    // so its fetch loop waits for room, not on the stream.
    let slow: Vec<TestJob> = (0..200).map(|n| TestJob { n, sleep_ms: 100 }).collect();
    queue.enqueue_bulk(&slow).await.unwrap();
    let mut worker = WorkerProcess::spawn(&server, name, 4, "30s");
    let mut conn = server.conn().await;
    // Every job place is busy, and the fetch loop has filled the buffer behind them.
    wait_for_distinct(
        &server.url(),
        &started_key(name),
        4,
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let keys = queue.keys().clone();
    let destroyed: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&keys.stream)
        .arg(&keys.group)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(destroyed, 1);
    // A quick job queued now runs once the slow ones are through (all of them again: the
    // recreated group delivers the stream from its start).
    let stream_len: u64 = redis::cmd("XLEN")
        .arg(&keys.stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stream_len > 0);
    queue
        .enqueue_bulk(&[TestJob {
            n: 1000,
            sleep_ms: 0,
        }])
        .await
        .unwrap();
    let processed = processed_key(name);
    wait_until(
        "the job queued after the group vanished runs",
        Duration::from_secs(90),
        || {
            let url = server.url();
            let processed = processed.clone();
            async move {
                let client = redis::Client::open(url).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let ran: Option<u64> = redis::cmd("HGET")
                    .arg(&processed)
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                ran.is_some()
            }
        },
    )
    .await;
    assert!(worker.terminate().success(), "the worker exits cleanly");
}
