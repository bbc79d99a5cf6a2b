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
