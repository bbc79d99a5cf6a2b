//! Delays, retries with durable attempt counts, the dead stream, and re-enqueueing dead jobs.

mod common;

use apalis::prelude::*;
use common::queue::*;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tarspay_worker::queue::{Delivery, Enqueued, GiveBack, JobOptions, RedisQueue};
use tarspay_worker::redis_conn::RedisConn;
use tarspay_worker::wall_clock::now_ms;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Mode {
    Succeed,
    /// Fails with `RetryAfterError(100 ms)` this many times, then succeeds.
    RetryAfter(u32),
    /// Always fails with a plain error.
    AlwaysFail,
    /// Gives up with `AbortError`.
    Abort,
    Panic,
    /// Fails while the Redis key `<prefix>:flag` exists.
    FailWhileFlag,
    /// Gives the job back unstarted (`GiveBack`) this many times, then succeeds.
    GiveBack(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Flaky {
    n: u64,
    mode: Mode,
}

#[derive(Clone)]
struct Recorder {
    conn: RedisConn,
    queue: String,
}

async fn flaky(
    job: Flaky,
    attempt: Attempt,
    delivery: Data<Delivery>,
    rec: Data<Recorder>,
) -> Result<(), BoxDynError> {
    let mut conn = rec.conn.clone();
    let q = &rec.queue;
    let seen = format!("{}:{}", attempt.current(), delivery.attempts_before());
    let _: i64 = conn
        .rpush(format!("{PREFIX}:{q}:attempts:{}", job.n), seen)
        .await?;
    match job.mode {
        Mode::Succeed => {}
        Mode::RetryAfter(times) => {
            if attempt.current() <= times as usize {
                return Err(RetryAfterError::new("not yet", Duration::from_millis(100)).into());
            }
        }
        Mode::AlwaysFail => return Err("always fails".into()),
        Mode::Abort => return Err(AbortError::new("beneficiary invalid").into()),
        Mode::Panic => panic!("handler bug"),
        Mode::GiveBack(times) => {
            let given: u32 = conn
                .hincr(format!("{PREFIX}:{q}:given_back"), job.n, 1)
                .await?;
            if given <= times {
                return Err(GiveBack.into());
            }
        }
        Mode::FailWhileFlag => {
            if conn.exists(format!("{PREFIX}:flag")).await? {
                return Err("flag is set".into());
            }
        }
    }
    let _: i64 = conn
        .hset(format!("{PREFIX}:{q}:ran_at"), job.n, now_ms())
        .await?;
    let _: i64 = conn.hincr(processed_key(q), job.n, 1).await?;
    Ok(())
}

fn flaky_worker(name: &str, queue: RedisQueue<Flaky>) -> InProcessWorker {
    let rec = Recorder {
        conn: queue.connection(),
        queue: queue.config().queue.clone(),
    };
    let (stop, signal) = stop_signal();
    let worker = WorkerBuilder::new(name)
        .backend(queue)
        .data(rec)
        .catch_panic()
        .concurrency(8)
        .build(flaky);
    InProcessWorker::spawn(stop, tokio::spawn(worker.run_until(signal)))
}

async fn flaky_queue(server: &RedisServer, name: &str) -> RedisQueue<Flaky> {
    RedisQueue::connect(&server.url(), config(name))
        .await
        .unwrap()
}

async fn attempts_seen(conn: &mut RedisConn, queue: &str, n: u64) -> Vec<String> {
    conn.lrange(format!("{PREFIX}:{queue}:attempts:{n}"), 0, -1)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_are_honoured() {
    let server = RedisServer::start(false);
    let name = "delay";
    let queue = flaky_queue(&server, name).await;
    let worker = flaky_worker("delay-1", queue.clone());
    let delays = [0u64, 1000, 2000, 3000];
    let mut enqueued_at = Vec::new();
    for (n, delay) in delays.iter().enumerate() {
        enqueued_at.push(now_ms());
        let job = Flaky {
            n: n as u64,
            mode: Mode::Succeed,
        };
        queue
            .enqueue_with(&job, JobOptions::delayed(Duration::from_millis(*delay)))
            .await
            .unwrap();
    }
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        4,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let mut conn = server.conn().await;
    let ran_at: std::collections::HashMap<u64, u64> = conn
        .hgetall(format!("{PREFIX}:{name}:ran_at"))
        .await
        .unwrap();
    // Promotion every 200 ms and a 200 ms blocking read; the upper bound adds 4 s of slack so a
    // loaded CI machine does not fail it (it catches a delay that is ignored or doubled, not
    // jitter), the lower bound is exact.
    for (n, delay) in delays.iter().enumerate() {
        let waited = ran_at[&(n as u64)] - enqueued_at[n];
        assert!(
            waited >= *delay,
            "job {n} ran after {waited} ms, before its {delay} ms delay"
        );
        assert!(
            waited <= delay + 400 + 4000,
            "job {n} ran {waited} ms after enqueue ({delay} ms delay)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_count_attempts_across_redeliveries() {
    let server = RedisServer::start(false);
    let name = "attempts";
    let queue = flaky_queue(&server, name).await;
    let mut conn = server.conn().await;

    // Retried by the handler's decision.
    queue
        .enqueue(&Flaky {
            n: 1,
            mode: Mode::RetryAfter(2),
        })
        .await
        .unwrap();
    // Redelivered after its first holder vanished: a ghost consumer reads and never acks.
    queue
        .enqueue(&Flaky {
            n: 2,
            mode: Mode::Succeed,
        })
        .await
        .unwrap();
    let one_try = JobOptions {
        max_attempts: Some(1),
        ..JobOptions::default()
    };
    queue
        .enqueue_with(
            &Flaky {
                n: 3,
                mode: Mode::Succeed,
            },
            one_try,
        )
        .await
        .unwrap();
    let keys = queue.keys().clone();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&keys.group)
        .arg("ghost")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&keys.stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The ghost took all three jobs; the worker recovers them after the orphan timeout.
    let worker = flaky_worker("attempts-1", queue.clone());
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        2,
        Duration::from_secs(60),
    )
    .await;
    let q = queue.clone();
    wait_until("n=3 buried", Duration::from_secs(60), || {
        let q = q.clone();
        async move { q.dead_count().await.unwrap() == 1 }
    })
    .await;
    worker.stop().await;

    // "attempt:attempts_before" as the handler saw them.
    assert_eq!(
        attempts_seen(&mut conn, name, 1).await,
        ["2:1", "3:2"],
        "n=1 after the ghost's delivery"
    );
    assert_eq!(
        attempts_seen(&mut conn, name, 2).await,
        ["2:1"],
        "the lost delivery counts"
    );
    assert!(
        attempts_seen(&mut conn, name, 3).await.is_empty(),
        "n=3 had no attempt left"
    );
    let dead = queue.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("attempts exhausted"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].attempts, Some(1));
}

/// Runs one job (`n` = 1) in queue `name` until it succeeded, checks that nothing of it is
/// left, and returns "attempt:attempts_before" as its handler saw each delivery.
async fn run_to_success(name: &str, job: Mode, options: JobOptions) -> Vec<String> {
    let server = RedisServer::start(false);
    let queue = flaky_queue(&server, name).await;
    let mut conn = server.conn().await;
    let worker = flaky_worker(&format!("{name}-1"), queue.clone());
    queue
        .enqueue_with(&Flaky { n: 1, mode: job }, options)
        .await
        .unwrap();
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        1,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.depth(), stats.delayed, stats.dead),
        (0, 0, 0),
        "{stats:?}"
    );
    attempts_seen(&mut conn, name, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_given_back_unstarted_runs_again_without_spending_an_attempt() {
    // Three give-backs with a ceiling of two attempts: counted, the job would be dead.
    let options = JobOptions {
        max_attempts: Some(2),
        ..JobOptions::default()
    };
    assert_eq!(
        run_to_success("give-back", Mode::GiveBack(3), options).await,
        ["1:0", "1:0", "1:0", "1:0"],
        "every delivery is the first attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_retries_are_counted() {
    assert_eq!(
        run_to_success("retry", Mode::RetryAfter(2), JobOptions::default()).await,
        ["1:0", "2:1", "3:2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_stream_gets_exhausted_and_undecodable_jobs_and_worker_keeps_going() {
    let server = RedisServer::start(false);
    let name = "dead";
    let queue = flaky_queue(&server, name).await;
    let mut conn = server.conn().await;
    let worker = flaky_worker("dead-1", queue.clone());

    let two_tries = JobOptions {
        max_attempts: Some(2),
        ..JobOptions::default()
    };
    queue
        .enqueue_with(
            &Flaky {
                n: 1,
                mode: Mode::AlwaysFail,
            },
            two_tries,
        )
        .await
        .unwrap();
    queue
        .enqueue(&Flaky {
            n: 2,
            mode: Mode::Abort,
        })
        .await
        .unwrap();
    queue
        .enqueue(&Flaky {
            n: 3,
            mode: Mode::Panic,
        })
        .await
        .unwrap();
    // Garbage in the stream, and a valid envelope whose job is not a `Flaky`.
    let keys = queue.keys().clone();
    let _: String = conn
        .xadd(&keys.stream, "*", &[("e", "not json at all")])
        .await
        .unwrap();
    let wrong = r#"{"id":"wrong-type","a":0,"t":0,"p":{"amount":"1.00"}}"#;
    let _: String = conn.xadd(&keys.stream, "*", &[("e", wrong)]).await.unwrap();
    // Normal jobs after the bad ones still run.
    for n in 10..30 {
        queue
            .enqueue(&Flaky {
                n,
                mode: Mode::Succeed,
            })
            .await
            .unwrap();
    }
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        20,
        Duration::from_secs(60),
    )
    .await;
    let q = queue.clone();
    wait_until("five dead jobs", Duration::from_secs(60), || {
        let q = q.clone();
        async move { q.dead_count().await.unwrap() == 5 }
    })
    .await;
    worker.stop().await;

    assert_eq!(
        attempts_seen(&mut conn, name, 1).await.len(),
        2,
        "exactly max_attempts tries"
    );
    assert_eq!(
        attempts_seen(&mut conn, name, 2).await.len(),
        1,
        "abort is not retried"
    );
    assert_eq!(
        attempts_seen(&mut conn, name, 3).await.len(),
        1,
        "a panic is not retried"
    );
    let dead = queue.list_dead(None, 100).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let has = |needle: &str| reasons.iter().filter(|r| r.contains(needle)).count();
    assert_eq!(has("attempts exhausted"), 1, "{reasons:?}");
    assert_eq!(has("given up"), 2, "abort and panic: {reasons:?}");
    assert_eq!(has("undecodable job envelope"), 1, "{reasons:?}");
    assert_eq!(has("undecodable job:"), 1, "{reasons:?}");
    let wrong_type = dead
        .iter()
        .find(|d| d.job_id.as_deref() == Some("wrong-type"))
        .unwrap();
    assert_eq!(
        wrong_type.payload, r#"{"amount":"1.00"}"#,
        "kept byte for byte"
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.depth(), stats.delayed, stats.dead),
        (0, 0, 5),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_can_be_listed_requeued_and_deleted() {
    let server = RedisServer::start(false);
    let name = "requeue";
    let queue = flaky_queue(&server, name).await;
    let mut conn = server.conn().await;
    let _: () = conn.set(format!("{PREFIX}:flag"), 1).await.unwrap();
    let worker = flaky_worker("requeue-1", queue.clone());

    let once = |key: &str| JobOptions {
        max_attempts: Some(1),
        unique_key: Some(key.to_owned()),
        ..JobOptions::default()
    };
    for n in 1..=3 {
        queue
            .enqueue_with(
                &Flaky {
                    n,
                    mode: Mode::FailWhileFlag,
                },
                once(&format!("order-{n}")),
            )
            .await
            .unwrap();
    }
    let q = queue.clone();
    wait_until("three dead jobs", Duration::from_secs(60), || {
        let q = q.clone();
        async move { q.dead_count().await.unwrap() == 3 }
    })
    .await;
    // Paging through the dead list.
    let first = queue.list_dead(None, 2).await.unwrap();
    let rest = queue.list_dead(Some(&first[1].dead_id), 2).await.unwrap();
    assert_eq!((first.len(), rest.len()), (2, 1));
    let all: Vec<_> = first.into_iter().chain(rest).collect();

    // A dead job still holds its unique key.
    let dup = queue
        .enqueue_with(
            &Flaky {
                n: 9,
                mode: Mode::Succeed,
            },
            JobOptions::unique("order-1"),
        )
        .await
        .unwrap();
    assert!(dup.is_duplicate());

    let _: () = conn.del(format!("{PREFIX}:flag")).await.unwrap();
    let by_n = |n: u64| {
        all.iter()
            .find(|d| d.payload.contains(&format!("\"n\":{n}")))
            .unwrap()
            .dead_id
            .clone()
    };
    assert!(queue.requeue_dead(&by_n(1)).await.unwrap());
    assert!(queue.requeue_dead(&by_n(2)).await.unwrap());
    assert!(
        !queue.requeue_dead(&by_n(1)).await.unwrap(),
        "requeued only once"
    );
    assert!(queue.delete_dead(&by_n(3)).await.unwrap());
    wait_for_distinct(
        &server.url(),
        &processed_key(name),
        2,
        Duration::from_secs(60),
    )
    .await;
    worker.stop().await;

    let processed = counts(&mut conn, &processed_key(name)).await;
    assert_eq!(processed.get(&1), Some(&1));
    assert_eq!(processed.get(&2), Some(&1));
    assert_eq!(queue.dead_count().await.unwrap(), 0);
    // Deleting the dead job released its key; the finished ones released theirs.
    for key in ["order-1", "order-3"] {
        let again = queue
            .enqueue_with(
                &Flaky {
                    n: 20,
                    mode: Mode::Succeed,
                },
                JobOptions::unique(key),
            )
            .await
            .unwrap();
        assert!(matches!(again, Enqueued::Queued { .. }), "{key}: {again:?}");
    }
}

/// A queue whose dead stream is capped at `cap` entries.
async fn dead_capped_queue(server: &RedisServer, name: &str, cap: usize) -> RedisQueue<Flaky> {
    let mut capped = config(name);
    capped.dead_max_len = cap;
    RedisQueue::connect(&server.url(), capped).await.unwrap()
}

/// The dead stream is kept to its cap, the oldest entries dropped first; a dropped job's
/// unique key is released (it would otherwise refuse its key for ever), while the jobs still
/// in the dead list keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_stream_kept_to_its_cap_releases_the_unique_keys_of_jobs_it_drops() {
    let server = RedisServer::start(false);
    let name = "dead_cap";
    let queue = dead_capped_queue(&server, name, 2).await;
    let worker = flaky_worker("dead-cap-1", queue.clone());
    let once = |key: &str| JobOptions {
        max_attempts: Some(1),
        unique_key: Some(key.to_owned()),
        ..JobOptions::default()
    };
    // One at a time, so they die in order.
    for n in 1..=3u64 {
        let job = Flaky {
            n,
            mode: Mode::Abort,
        };
        assert!(matches!(
            queue
                .enqueue_with(&job, once(&format!("order-{n}")))
                .await
                .unwrap(),
            Enqueued::Queued { .. }
        ));
        let q = queue.clone();
        wait_until("the job is dead", Duration::from_secs(60), || {
            let q = q.clone();
            async move {
                q.list_dead(None, 10)
                    .await
                    .unwrap()
                    .iter()
                    .any(|dead| dead.payload.contains(&format!("\"n\":{n}")))
            }
        })
        .await;
    }
    worker.stop().await;
    let dead = queue.list_dead(None, 10).await.unwrap();
    let kept: Vec<bool> = (1..=3u64)
        .map(|n| {
            dead.iter()
                .any(|d| d.payload.contains(&format!("\"n\":{n}")))
        })
        .collect();
    assert_eq!(kept, [false, true, true], "the oldest dropped: {dead:?}");
    let again = |n: u64| {
        let queue = queue.clone();
        async move {
            queue
                .enqueue_with(
                    &Flaky {
                        n: 10 + n,
                        mode: Mode::Succeed,
                    },
                    JobOptions::unique(format!("order-{n}")),
                )
                .await
                .unwrap()
        }
    };
    assert!(
        matches!(again(1).await, Enqueued::Queued { .. }),
        "the dropped job's key is free"
    );
    assert!(again(2).await.is_duplicate(), "a dead job keeps its key");
    assert!(again(3).await.is_duplicate(), "a dead job keeps its key");
}

/// A dead stream far over its cap (the cap lowered) shrinks by at most 100 entries per
/// burial, releasing the dropped jobs' keys, rather than in one long script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stream_far_over_its_cap_shrinks_by_at_most_100_per_burial() {
    let server = RedisServer::start(false);
    let name = "dead_far_over";
    let queue = dead_capped_queue(&server, name, 2).await;
    let keys = queue.keys().clone();
    let mut conn = server.conn().await;
    // 150 dead jobs from before the cap was lowered, each holding its unique key.
    for n in 0..150 {
        let envelope = format!(r#"{{"id":"old-{n}","u":"key-{n}","p":{{}}}}"#);
        let _: String = conn
            .xadd(
                &keys.dead,
                "*",
                &[("e", envelope.as_str()), ("reason", "old")],
            )
            .await
            .unwrap();
        let _: i64 = conn
            .hset(&keys.unique, format!("key-{n}"), format!("old-{n}"))
            .await
            .unwrap();
    }
    let worker = flaky_worker("dead-far-1", queue.clone());
    let once = JobOptions {
        max_attempts: Some(1),
        ..JobOptions::default()
    };
    let job = Flaky {
        n: 1,
        mode: Mode::Abort,
    };
    queue.enqueue_with(&job, once).await.unwrap();
    let dead_key = keys.dead.clone();
    wait_until(
        "one burial trimmed the stream",
        Duration::from_secs(60),
        || {
            let mut c = conn.clone();
            let dead_key = dead_key.clone();
            async move { c.xlen::<_, u64>(&dead_key).await.unwrap() == 51 }
        },
    )
    .await;
    worker.stop().await;
    let held: Vec<String> = conn.hkeys(&keys.unique).await.unwrap();
    let held_old: Vec<u32> = held
        .iter()
        .filter_map(|key| key.strip_prefix("key-")?.parse().ok())
        .collect();
    assert_eq!(held_old.len(), 50, "the 100 oldest released: {held:?}");
    assert!(held_old.iter().all(|n| *n >= 100), "{held_old:?}");
}
