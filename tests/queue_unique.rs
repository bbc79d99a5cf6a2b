//! Unique keys and introspection numbers.

mod common;

use common::queue::*;
use std::time::Duration;
use tarspay_worker::queue::{Enqueued, JobOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_enqueue_with_same_unique_key_is_a_duplicate() {
    let server = RedisServer::start(false);
    let queue = queue(&server, config("unique")).await;
    let first = queue
        .enqueue_with(&TestJob::new(1), JobOptions::unique("order-1"))
        .await
        .unwrap();
    let Enqueued::Queued { job_id } = first else {
        panic!("first enqueue must be queued: {first:?}");
    };
    let second = queue
        .enqueue_with(&TestJob::new(2), JobOptions::unique("order-1"))
        .await
        .unwrap();
    assert_eq!(
        second,
        Enqueued::Duplicate {
            held_by: job_id.clone()
        }
    );

    // Inside one bulk chunk too, and a delayed duplicate is refused as well.
    let jobs = [TestJob::new(3), TestJob::new(4), TestJob::new(5)];
    let results = queue
        .enqueue_bulk_with([
            (&jobs[0], JobOptions::unique("order-2")),
            (&jobs[1], JobOptions::unique("order-2")),
            (
                &jobs[2],
                JobOptions {
                    delay: Some(Duration::from_secs(60)),
                    unique_key: Some("order-1".into()),
                    ..JobOptions::default()
                },
            ),
        ])
        .await
        .unwrap();
    assert!(matches!(results[0], Enqueued::Queued { .. }));
    assert!(results[1].is_duplicate());
    assert_eq!(results[2], Enqueued::Duplicate { held_by: job_id });
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.delayed),
        (2, 0),
        "duplicates are not stored: {stats:?}"
    );

    // Once the job is done its key is free again.
    let worker = recording_worker("unique-1", queue.clone(), 4);
    wait_for_distinct(
        &server.url(),
        &processed_key("unique"),
        2,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let again = queue
        .enqueue_with(&TestJob::new(6), JobOptions::unique("order-1"))
        .await
        .unwrap();
    assert!(matches!(again, Enqueued::Queued { .. }), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_real_numbers() {
    let server = RedisServer::start(false);
    let queue = queue(&server, config("stats")).await;
    let empty = queue.stats().await.unwrap();
    assert_eq!(
        empty.depth() + empty.delayed + empty.dead + empty.workers_alive,
        0
    );
    assert_eq!(
        (empty.oldest_job_age, empty.oldest_waiting_age),
        (None, None)
    );

    for n in 0..5 {
        queue.enqueue(&TestJob::new(n)).await.unwrap();
    }
    for n in 5..8 {
        queue
            .enqueue_with(
                &TestJob::new(n),
                JobOptions::delayed(Duration::from_secs(3600)),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.pending, stats.delayed),
        (5, 0, 3),
        "{stats:?}"
    );
    assert!(
        stats
            .oldest_job_age
            .is_some_and(|age| age >= Duration::from_millis(50))
    );
    assert!(
        stats
            .oldest_waiting_age
            .is_some_and(|age| age >= Duration::from_millis(50)),
        "{stats:?}"
    );

    // Long jobs keep entries pending while the worker is alive.
    queue
        .enqueue(&TestJob {
            n: 100,
            sleep_ms: 3000,
        })
        .await
        .unwrap();
    let worker = recording_worker("stats-1", queue.clone(), 8);
    let q = queue.clone();
    wait_until(
        "the long job is pending and the worker alive",
        Duration::from_secs(30),
        || {
            let q = q.clone();
            async move {
                let s = q.stats().await.unwrap();
                s.pending == 1 && s.waiting == 0 && s.workers_alive == 1
            }
        },
    )
    .await;
    // In flight is not waiting: the long job has an age, nothing waits.
    let running = queue.stats().await.unwrap();
    assert!(running.oldest_job_age.is_some(), "{running:?}");
    assert_eq!(running.oldest_waiting_age, None, "{running:?}");
    queue.pause().await.unwrap();
    assert!(queue.stats().await.unwrap().paused);
    queue.resume().await.unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key("stats"),
        6,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let done = queue.stats().await.unwrap();
    assert_eq!(
        (done.depth(), done.delayed, done.workers_alive),
        (0, 3, 0),
        "{done:?}"
    );
}
