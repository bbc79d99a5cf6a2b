//! One worker over several partitions of a queue (`queue::Partitioned`): a deep backlog in one
//! partition does not starve another, and the worker's concurrency is one budget for all.

mod common;

use apalis::prelude::*;
use common::queue::{RedisServer, TestJob, config, queue, stop_signal};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarspay_worker::queue::Partitioned;

/// What the handler saw: jobs in start order, and how many ran at once at most.
#[derive(Clone, Default)]
struct Seen {
    started: Arc<Mutex<Vec<u64>>>,
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

async fn handle(job: TestJob, seen: Data<Seen>) -> Result<(), BoxDynError> {
    seen.started.lock().unwrap().push(job.n);
    let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    seen.running.fetch_sub(1, Ordering::SeqCst);
    Ok(())
}

/// Runs one worker of `concurrency` over `queues` until `jobs` have started.
async fn run(
    queues: Vec<tarspay_worker::queue::RedisQueue<TestJob>>,
    concurrency: usize,
    jobs: usize,
) -> Seen {
    let seen = Seen::default();
    let (stop, signal) = stop_signal();
    let worker = WorkerBuilder::new("partitioned")
        .backend(Partitioned::new(queues).unwrap())
        .data(seen.clone())
        .concurrency(concurrency)
        .build(handle);
    let handle = tokio::spawn(worker.run_until(signal));
    common::eventually("the jobs to start", || async {
        (seen.started.lock().unwrap().len() >= jobs).then_some(())
    })
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_backlog_in_one_partition_does_not_starve_another() {
    let server = RedisServer::start(false);
    let hot = queue(&server, config("fair:0")).await;
    let cold = queue(&server, config("fair:1")).await;
    let backlog: Vec<TestJob> = (0..200).map(|n| TestJob { n, sleep_ms: 5 }).collect();
    hot.enqueue_bulk(&backlog).await.unwrap();
    cold.enqueue(&TestJob {
        n: 1_000,
        sleep_ms: 5,
    })
    .await
    .unwrap();
    let seen = run(vec![hot, cold], 1, 20).await;
    let started = seen.started.lock().unwrap().clone();
    let position = started.iter().position(|&n| n == 1_000);
    // In arrival order it would be the 201st; taking turns, it is among the first few (its
    // partition's fetch may land a moment after the first hot jobs).
    assert!(
        position.is_some_and(|p| p < 10),
        "the cold partition's job started at {position:?} of {started:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_is_one_budget_over_every_partition() {
    let server = RedisServer::start(false);
    let mut queues = Vec::new();
    for p in 0..3 {
        let q = queue(&server, config(&format!("budget:{p}"))).await;
        let jobs: Vec<TestJob> = (0..10)
            .map(|n| TestJob {
                n: p * 100 + n,
                sleep_ms: 30,
            })
            .collect();
        q.enqueue_bulk(&jobs).await.unwrap();
        queues.push(q);
    }
    let seen = run(queues, 2, 30).await;
    assert_eq!(seen.most.load(Ordering::SeqCst), 2, "at most 2 at once");
    let started = seen.started.lock().unwrap().clone();
    for p in 0..3u64 {
        assert_eq!(
            started.iter().filter(|&&n| n / 100 == p).count(),
            10,
            "partition {p}: {started:?}"
        );
    }
}
