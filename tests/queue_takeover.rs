//! A worker frozen (SIGSTOP) past the orphan timeout loses its job to another worker; when it
//! wakes and reports the job done, that stale outcome is dropped, and the new holder's retry
//! or death decides what happens to the job (nothing is lost).

mod common;

use common::queue::*;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tarspay_worker::queue::{Enqueued, RedisQueue};

/// The job of the `queue_worker` binary, with its takeover field.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TakeoverJob {
    n: u64,
    sleep_ms: u64,
    /// 1: the second attempt (the new holder's) retries; 2: it gives up.
    takeover: u8,
}

async fn attempts_started(
    conn: &mut tarspay_worker::redis_conn::RedisConn,
    name: &str,
    n: u64,
) -> u64 {
    counts(conn, &started_key(name))
        .await
        .get(&n)
        .copied()
        .unwrap_or(0)
}

/// Runs the takeover and returns (queue, log of the frozen worker, job id); the new holder is
/// waiting for the go signal when this returns, and the frozen worker's stale "done" has been
/// dropped.
async fn freeze_and_take_over(
    server: &RedisServer,
    name: &str,
    takeover: u8,
    log: &std::path::Path,
) -> (
    RedisQueue<TakeoverJob>,
    WorkerProcess,
    WorkerProcess,
    String,
) {
    let queue: RedisQueue<TakeoverJob> = RedisQueue::connect(&server.url(), config(name))
        .await
        .unwrap();
    let mut conn = server.conn().await;
    let frozen = WorkerProcess::spawn_with_env(server, name, 1, "2s", &[], Some(log));
    let job = TakeoverJob {
        n: 1,
        sleep_ms: 3_000,
        takeover,
    };
    let Enqueued::Queued { job_id } = queue.enqueue(&job).await.unwrap() else {
        panic!("not queued");
    };
    wait_until(
        "the first worker started the job",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move { attempts_started(&mut conn, name, 1).await == 1 }
        },
    )
    .await;
    frozen.signal("STOP");

    // The job's entry idles past the orphan timeout; a live worker takes it over.
    let holder = WorkerProcess::spawn(server, name, 1, "2s");
    wait_until(
        "the new holder started the job",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move { attempts_started(&mut conn, name, 1).await == 2 }
        },
    )
    .await;

    // The frozen worker wakes, finishes its run and reports done: dropped as stale.
    frozen.signal("CONT");
    let id = job_id.clone();
    wait_until(
        "the woken worker reported its stale settlement",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let seen = text
                .lines()
                .any(|l| l.contains("stale settlement dropped") && l.contains(id.as_str()));
            async move { seen }
        },
    )
    .await;
    let processed = counts(&mut conn, &processed_key(name)).await;
    assert_eq!(
        processed.get(&1),
        Some(&1),
        "the woken worker's run finished"
    );
    // The entry is still there and still the new holder's.
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (1, 0), "{stats:?}");
    (queue, frozen, holder, job_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_workers_done_does_not_drop_the_new_holders_retry() {
    let server = RedisServer::start(false);
    let name = "takeover_retry";
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("frozen.log");
    let (queue, _frozen, _holder, _) = freeze_and_take_over(&server, name, 1, &log).await;
    let mut conn = server.conn().await;

    // The new holder retries: the retry is kept and runs (third attempt succeeds).
    let _: () = conn.set(format!("{PREFIX}:{name}:go:1"), 1).await.unwrap();
    wait_until("the retried job ran", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        async move { counts(&mut conn, &processed_key(name)).await.get(&1) == Some(&2) }
    })
    .await;
    assert_eq!(attempts_started(&mut conn, name, 1).await, 3);
    let q = queue.clone();
    wait_until("the queue is empty", Duration::from_secs(60), || {
        let q = q.clone();
        async move {
            let s = q.stats().await.unwrap();
            s.depth() == 0 && s.delayed == 0
        }
    })
    .await;
    assert_eq!(queue.stats().await.unwrap().dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_workers_done_does_not_drop_the_new_holders_burial() {
    let server = RedisServer::start(false);
    let name = "takeover_dead";
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("frozen.log");
    let (queue, _frozen, _holder, job_id) = freeze_and_take_over(&server, name, 2, &log).await;
    let mut conn = server.conn().await;

    // The new holder gives up: the job reaches the dead stream.
    let _: () = conn.set(format!("{PREFIX}:{name}:go:1"), 1).await.unwrap();
    let q = queue.clone();
    wait_until("the job is dead", Duration::from_secs(60), || {
        let q = q.clone();
        async move { q.stats().await.unwrap().dead == 1 }
    })
    .await;
    let dead = queue.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].job_id.as_deref(), Some(job_id.as_str()));
    assert!(dead[0].reason.contains("given up"), "{}", dead[0].reason);
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.depth(), 0, "{stats:?}");
    assert_eq!(attempts_started(&mut conn, name, 1).await, 2);
}

/// A worker that could not renew its entries for longer than the orphan timeout (Redis out of
/// reach, the process frozen) finds its own running job among the orphans it claims: the job
/// must not start a second time beside the run still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_missed_its_renewals_does_not_start_its_own_running_job_again() {
    let server = RedisServer::start(false);
    let name = "self_claim";
    let config = config(name).with_orphan_timeout(Duration::from_millis(400));
    // The worker's renewals fail (its Redis user may not run `XCLAIM`; the orphan claim's
    // `XAUTOCLAIM` works): its running job goes idle past the orphan timeout, as it would
    // when the renewals could not reach Redis.
    let mut admin = server.conn().await;
    let () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "norenew", "on", "nopass", "~*", "&*", "+@all", "-xclaim",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let as_norenew = server.url().replacen("redis://", "redis://norenew:any@", 1);
    let queue: RedisQueue<TestJob> = RedisQueue::connect(&as_norenew, config).await.unwrap();
    let worker = starts_counting_worker(name, queue.clone());
    enqueue_sleeping(&queue, 2_500).await;
    let mut conn = server.conn().await;
    settled(&queue).await;
    // Several claim passes ran during the job's 2.5 s (one every 200 ms, each finding the
    // entry idle, since it was never renewed): none started it again.
    let started = counts(&mut conn, &started_key(name)).await;
    assert_eq!(started.get(&1), Some(&1), "starts of the job: {started:?}");
    assert_eq!(queue.stats().await.unwrap().dead, 0);
    worker.stop().await;
}

/// Queues job 1, sleeping `sleep_ms` when it runs.
async fn enqueue_sleeping(queue: &RedisQueue<TestJob>, sleep_ms: u64) {
    let job = TestJob { n: 1, sleep_ms };
    assert!(matches!(
        queue.enqueue(&job).await.unwrap(),
        Enqueued::Queued { .. }
    ));
}

/// Waits until `queue` holds nothing, waiting or delayed.
async fn settled(queue: &RedisQueue<TestJob>) {
    wait_until("the job is settled", Duration::from_secs(30), || {
        let q = queue.clone();
        async move {
            let s = q.stats().await.unwrap();
            s.depth() == 0 && s.delayed == 0
        }
    })
    .await;
}

/// The pending entries of `queue`: (id, consumer, deliveries).
async fn pending_entries(
    conn: &mut tarspay_worker::redis_conn::RedisConn,
    queue: &RedisQueue<TestJob>,
) -> Vec<(String, String, u64)> {
    let keys = queue.keys();
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&keys.stream)
        .arg(&keys.group)
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(conn)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(id, consumer, _idle, deliveries)| (id, consumer, deliveries))
        .collect()
}

/// A job this worker still runs comes back to it from another consumer (one that took it
/// over while this worker stalled, then went away): the claim does not start it again, and
/// the delivery it counted is taken back, so a later takeover does not read it as one more
/// lost worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_claimed_back_is_not_started_again_nor_counted_as_a_delivery() {
    let server = RedisServer::start(false);
    let name = "claimed_back";
    let config = config(name).with_orphan_timeout(Duration::from_millis(400));
    let queue = queue(&server, config).await;
    let worker = starts_counting_worker(name, queue.clone());
    enqueue_sleeping(&queue, 3_000).await;
    let mut conn = server.conn().await;
    let (id, ours) = {
        let q = queue.clone();
        let mut c = conn.clone();
        wait_until("the job runs", Duration::from_secs(30), || {
            let mut c = c.clone();
            async move { counts(&mut c, &started_key(name)).await.get(&1) == Some(&1) }
        })
        .await;
        let pending = pending_entries(&mut c, &q).await;
        assert_eq!(pending.len(), 1, "{pending:?}");
        (pending[0].0.clone(), pending[0].1.clone())
    };
    // Another consumer holds it now (`JUSTID`: no delivery counted); this worker's renewals
    // leave it alone, and after the orphan timeout its orphan scan takes it back.
    let keys = queue.keys();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&keys.stream)
        .arg(&keys.group)
        .arg("ghost")
        .arg(0)
        .arg(&id)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Claimed back (the claim counts a second delivery), then the count taken back to 1.
    wait_until(
        "the job claimed back with one delivery",
        Duration::from_secs(10),
        || {
            let mut c = conn.clone();
            let q = queue.clone();
            let expected = vec![(id.clone(), ours.clone(), 1)];
            async move { pending_entries(&mut c, &q).await == expected }
        },
    )
    .await;
    settled(&queue).await;
    let started = counts(&mut conn, &started_key(name)).await;
    assert_eq!(started.get(&1), Some(&1), "starts of the job: {started:?}");
    worker.stop().await;
}

/// An in-process worker (concurrency 4) whose handler counts each start of a job in
/// `started_key(queue)` before it sleeps the job's `sleep_ms`.
fn starts_counting_worker(name: &str, queue: RedisQueue<TestJob>) -> InProcessWorker {
    use apalis::prelude::*;
    #[derive(Clone)]
    struct Starts {
        conn: tarspay_worker::redis_conn::RedisConn,
        key: String,
    }
    async fn handle(job: TestJob, starts: Data<Starts>) -> Result<(), BoxDynError> {
        let mut conn = starts.conn.clone();
        let _: i64 = conn.hincr(&starts.key, job.n, 1).await?;
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
        Ok(())
    }
    let starts = Starts {
        conn: queue.connection(),
        key: started_key(name),
    };
    let (stop, signal) = stop_signal();
    let worker = WorkerBuilder::new(name)
        .backend(queue)
        .data(starts)
        .concurrency(4)
        .build(handle);
    InProcessWorker::spawn(stop, tokio::spawn(worker.run_until(signal)))
}

/// A job fetched into a worker's buffer, behind the one it runs, is taken over while that
/// worker is frozen: after the thaw it is not started there (the new holder ran it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_over_from_a_frozen_workers_buffer_is_not_started_there_after_the_thaw() {
    let server = RedisServer::start(false);
    let name = "takeover_buffered";
    let queue: RedisQueue<TakeoverJob> = RedisQueue::connect(&server.url(), config(name))
        .await
        .unwrap();
    let mut conn = server.conn().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("frozen.log");
    // One job place: the first job runs, the second waits in the fetch buffer.
    let frozen = WorkerProcess::spawn_with_env(&server, name, 1, "2s", &[], Some(&log));
    for (n, sleep_ms) in [(1, 10_000), (2, 50)] {
        let job = TakeoverJob {
            n,
            sleep_ms,
            takeover: 0,
        };
        assert!(matches!(
            queue.enqueue(&job).await.unwrap(),
            Enqueued::Queued { .. }
        ));
    }
    wait_until(
        "the first job runs and the second waits in the buffer",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            let q = queue.clone();
            async move {
                attempts_started(&mut conn, name, 1).await == 1
                    && q.stats().await.unwrap().pending == 2
            }
        },
    )
    .await;
    assert_eq!(attempts_started(&mut conn, name, 2).await, 0);
    frozen.signal("STOP");

    let _holder = WorkerProcess::spawn(&server, name, 2, "2s");
    wait_until(
        "the new holder ran the buffered job",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move { counts(&mut conn, &processed_key(name)).await.get(&2) == Some(&1) }
        },
    )
    .await;
    frozen.signal("CONT");
    wait_until(
        "the woken worker dropped the buffered job, or started it",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let dropped = text
                .lines()
                .any(|l| l.contains("stale settlement dropped") && l.contains("start"));
            let mut conn = conn.clone();
            async move { dropped || attempts_started(&mut conn, name, 2).await > 1 }
        },
    )
    .await;
    assert_eq!(
        attempts_started(&mut conn, name, 2).await,
        1,
        "the buffered job started once, by its new holder"
    );
}
