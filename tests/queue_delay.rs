//! Delayed jobs start on time, not at a worker's next periodic promotion: the promoter sleeps
//! until the next due job it knows of, and a job delayed to before every other one wakes a
//! sleeping worker with a marker. The periodic pass here is 60 s, so nothing below can be its
//! work; the bounds are hang guards, far above what a slow machine needs.

mod common;

use apalis::prelude::*;
use common::queue::{RedisServer, TestJob, config, queue, stop_signal};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarspay_worker::queue::{JobOptions, QueueConfig, RedisQueue};

/// Job number → the server's time (ms) when it started.
type Starts = Arc<Mutex<Vec<(u64, u64)>>>;

async fn server_ms(server: &RedisServer) -> u64 {
    let mut conn = server.conn().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Waits until `started` says the jobs waited for have started, and checks they did not wait
/// for a periodic pass (60 s here).
async fn wait_on_time(what: &str, begun: Instant, started: impl Fn() -> bool) {
    common::eventually(what, || async { started().then_some(()) }).await;
    assert!(
        begun.elapsed() < Duration::from_secs(30),
        "started by a periodic pass, not on time: {:?}",
        begun.elapsed()
    );
}

/// [`wait_on_time`], then stops the worker.
async fn started_on_time(
    what: &str,
    begun: Instant,
    started: impl Fn() -> bool,
    stop: StopSender,
    running: RunHandle,
) {
    wait_on_time(what, begun, started).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}

/// The wake markers in the queue's wake stream.
async fn wake_markers(server: &RedisServer, jobs: &RedisQueue<TestJob>) -> u64 {
    let mut conn = server.conn().await;
    redis::cmd("XLEN")
        .arg(&jobs.keys().wake)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The promoter lease's value (`<consumer>|<expiry ms>`), if anyone holds it.
async fn promoter_lease(server: &RedisServer, jobs: &RedisQueue<TestJob>) -> Option<String> {
    let mut conn = server.conn().await;
    redis::cmd("GET")
        .arg(&jobs.keys().promoter)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A handler that notes when each job started.
async fn record_start(job: TestJob, starts: Data<Starts>) -> Result<(), BoxDynError> {
    let now = tarspay_worker::wall_clock::since_epoch().as_millis() as u64;
    starts.lock().unwrap().push((job.n, now));
    Ok(())
}

type StopSender = tokio::sync::oneshot::Sender<()>;
type RunHandle = tokio::task::JoinHandle<Result<(), WorkerError>>;

/// Stops a worker gracefully and checks that it stopped cleanly.
async fn stop_cleanly(stop: StopSender, run: RunHandle) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the worker stops")
        .expect("its task ends")
        .expect("it stops cleanly");
}

/// Stops workers, as a test's last step.
async fn stop_all(running: Running) {
    for (stop, run) in running {
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
    }
}

/// Idle workers named `names` on `jobs`, each with its stop sender and run handle.
type Running = Vec<(StopSender, RunHandle)>;
fn idle_workers(jobs: &RedisQueue<TestJob>, names: &[&str]) -> Running {
    async fn handle(_job: TestJob) -> Result<(), BoxDynError> {
        Ok(())
    }
    let mut running = Vec::new();
    for name in names {
        let (stop, signal) = stop_signal();
        let worker = WorkerBuilder::new(*name)
            .backend(jobs.clone())
            .concurrency(1)
            .build(handle);
        running.push((stop, tokio::spawn(worker.run_until(signal))));
    }
    running
}

fn slow_periodic(name: &str) -> QueueConfig {
    let mut config = config(name);
    config.promote_interval = Duration::from_secs(60);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_start_at_their_due_time_not_at_the_next_periodic_pass() {
    let server = RedisServer::start(false);
    let jobs = queue(&server, slow_periodic("ontime")).await;
    let starts: Starts = Arc::default();
    let (stop, signal) = stop_signal();
    let worker = WorkerBuilder::new("ontime")
        .backend(jobs.clone())
        .data(starts.clone())
        .concurrency(4)
        .build(record_start);
    let running = tokio::spawn(worker.run_until(signal));
    // Let the worker make its first (periodic) pass over an empty delayed set.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A lone delayed job wakes the sleeping worker with a marker; a later one, due before
    // the first, too; one due after both is learnt by the promoter.
    let enqueued_at = server_ms(&server).await;
    let begun = Instant::now();
    for (n, delay_ms) in [(1u64, 1_500u64), (2, 700), (3, 2_500)] {
        jobs.enqueue_with(
            &TestJob::new(n),
            JobOptions::delayed(Duration::from_millis(delay_ms)),
        )
        .await
        .unwrap();
    }
    started_on_time(
        "the three delayed jobs to start",
        begun,
        || starts.lock().unwrap().len() >= 3,
        stop,
        running,
    )
    .await;
    let mut order: Vec<(u64, u64)> = starts.lock().unwrap().clone();
    order.sort_by_key(|&(_, at)| at);
    assert_eq!(
        order.iter().map(|&(n, _)| n).collect::<Vec<_>>(),
        [2, 1, 3],
        "in due order"
    );
    // Never early (the local wall clock here is the server's: same host).
    for (n, at) in order {
        let delay = match n {
            1 => 1_500,
            2 => 700,
            _ => 2_500,
        };
        assert!(at + 5 >= enqueued_at + delay, "job {n} started early");
    }
    let mut conn = server.conn().await;
    // Acknowledged (nothing pending), not deleted: `MAXLEN ~ 64` at each `XADD` bounds them.
    let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(&jobs.keys().wake)
        .arg(&jobs.keys().group)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "wake markers are acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_markers_stay_bounded_without_a_worker() {
    let server = RedisServer::start(false);
    let jobs = queue(&server, slow_periodic("markers")).await;
    // Each job is due before every earlier one, so each writes a marker; nobody reads them.
    for n in 0..500u64 {
        jobs.enqueue_with(
            &TestJob::new(n),
            JobOptions::delayed(Duration::from_secs(3_600 - n)),
        )
        .await
        .unwrap();
    }
    let markers = wake_markers(&server, &jobs).await;
    // `MAXLEN ~ 64` trims whole stream nodes (100 entries by default).
    assert!(
        (64..=200).contains(&markers),
        "{markers} markers kept for 500 written"
    );
    assert_eq!(
        jobs.stats().await.unwrap().delayed,
        500,
        "every job is kept"
    );
}

/// The job numbers in the stream, oldest entry first.
async fn stream_order(server: &RedisServer, stream: &str) -> Vec<u64> {
    let mut conn = server.conn().await;
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .ids
        .iter()
        .map(|entry| {
            let envelope: String = entry.get("e").expect("an envelope");
            let envelope: serde_json::Value = serde_json::from_str(&envelope).unwrap();
            envelope["p"]["n"].as_u64().expect("a job number")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_moves_exactly_the_due_jobs_in_due_order_whatever_its_chunk() {
    // A pass reads the head of the delayed set first and reads on by score only when all of
    // it is due: chunks below, at and above that head, and one larger than the set.
    let server = RedisServer::start(false);
    for chunk in [1usize, 7, 8, 9, 15, 500] {
        let mut config = slow_periodic(&format!("chunk{chunk}"));
        config.promote_chunk = chunk;
        let jobs = queue(&server, config).await;
        // 20 due soon, in groups of 3 due at the same moment (so ties straddle the head the
        // pass reads first), listed in reverse so that due order is not enqueue order, and 3
        // due in an hour; one call, so every delay counts from the same server time.
        let soon: Vec<(TestJob, JobOptions)> = (0..20u64)
            .rev()
            .map(|n| {
                let delay = Duration::from_millis(50 + 5 * (n / 3));
                (TestJob::new(n), JobOptions::delayed(delay))
            })
            .chain((100..103u64).map(|n| {
                (
                    TestJob::new(n),
                    JobOptions::delayed(Duration::from_secs(3_600)),
                )
            }))
            .collect();
        jobs.enqueue_bulk_with(soon.iter().map(|(job, options)| (job, options.clone())))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;

        let moved = jobs.promote_due().await.unwrap();
        assert_eq!(moved, 20, "chunk {chunk}");
        let stats = jobs.stats().await.unwrap();
        assert_eq!(
            (stats.delayed, stats.waiting),
            (3, 20),
            "chunk {chunk}: {stats:?}"
        );
        let order = stream_order(&server, &jobs.keys().stream).await;
        let mut each = order.clone();
        each.sort_unstable();
        assert_eq!(
            each,
            (0..20).collect::<Vec<_>>(),
            "chunk {chunk}: each once"
        );
        assert!(
            order.windows(2).all(|pair| pair[0] / 3 <= pair[1] / 3),
            "chunk {chunk}: promoted in due order: {order:?}"
        );
        assert_eq!(
            jobs.promote_due().await.unwrap(),
            0,
            "chunk {chunk}: nothing else due"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_promoter_keeps_its_lease_though_it_renews_it_only_now_and_then() {
    // Two idle workers, passing every 200 ms; the lease lasts 2 s and its holder renews it
    // only once an eighth of it is gone. It must never lapse, nor change hands.
    let server = RedisServer::start(false);
    let jobs = queue(&server, config("lease")).await;
    let running = idle_workers(&jobs, &["lease-a", "lease-b"]);
    let holder = || promoter_lease(&server, &jobs);
    let first = common::eventually("a promoter", || async { holder().await }).await;
    let mut renewed = 0;
    let mut last = first.clone();
    // 5 s: two and a half leases.
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = holder().await.expect("the lease never lapses");
        let (who, _) = now.split_once('|').expect("holder|expiry");
        assert_eq!(
            Some(who),
            first.split_once('|').map(|(w, _)| w),
            "changed hands"
        );
        if now != last {
            renewed += 1;
            last = now;
        }
    }
    // Every 250–450 ms (the first pass past 250 ms): between 10 and 20 in 5 s; on every
    // 200 ms pass it would be 25.
    assert!(
        (5..=22).contains(&renewed),
        "renewed {renewed} times in 5 s"
    );
    stop_all(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoter_that_stops_hands_its_lease_to_the_next_worker() {
    // Two idle workers passing every 200 ms; the lease lasts 2 s. The holder stops
    // gracefully: it must not keep the lease for the rest of those 2 s (jobs nobody follows
    // would wait that long), and the other worker takes it at its next pass.
    let server = RedisServer::start(false);
    let jobs = queue(&server, config("handback")).await;
    let names = ["handback-a", "handback-b"];
    let mut running = idle_workers(&jobs, &names);
    let first = common::eventually("a promoter", || promoter_lease(&server, &jobs)).await;
    let holder = names
        .iter()
        .position(|name| first.contains(&format!(":{name}:")))
        .expect("the lease names one of the two workers");
    let (stop, run) = running.remove(holder);
    stop_cleanly(stop, run).await;
    let (stopped_as, _) = first.split_once('|').expect("holder|expiry");
    let left = promoter_lease(&server, &jobs).await;
    assert!(
        left.as_deref()
            .is_none_or(|value| !value.starts_with(&format!("{stopped_as}|"))),
        "a stopped worker still holds the promoter lease: {left:?}"
    );
    let other = names[1 - holder];
    common::eventually("the other worker to take the lease", || async {
        promoter_lease(&server, &jobs)
            .await
            .filter(|value| value.contains(&format!(":{other}:")))
    })
    .await;
    stop_all(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_promoter_hands_the_next_due_time_to_another_worker() {
    // Worker A, alone, promotes job 1 (woken by its marker) and learns from that pass when
    // job 2 is due (job 2 wrote no marker: job 1 was due before it). Then worker B starts
    // and A stops before job 2 is due. The periodic passes are 60 s apart, so only A handing
    // its next due time over can start job 2 on time.
    let server = RedisServer::start(false);
    let jobs = queue(&server, slow_periodic("handover")).await;
    let starts: Starts = Arc::default();
    let start = |name: &'static str| {
        let (stop, signal) = stop_signal();
        let worker = WorkerBuilder::new(name)
            .backend(jobs.clone())
            .data(starts.clone())
            .concurrency(2)
            .build(record_start);
        (stop, tokio::spawn(worker.run_until(signal)))
    };
    let (stop_a, running_a) = start("handover-a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (n, delay_ms) in [(1u64, 300u64), (2, 3_000)] {
        jobs.enqueue_with(
            &TestJob::new(n),
            JobOptions::delayed(Duration::from_millis(delay_ms)),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        wake_markers(&server, &jobs).await,
        1,
        "job 2 wrote no marker"
    );
    let started = |job: u64| starts.lock().unwrap().iter().any(|&(n, _)| n == job);
    wait_on_time("job 1 to start", Instant::now(), || started(1)).await;
    let (stop_b, running_b) = start("handover-b");
    let begun = Instant::now();
    stop_cleanly(stop_a, running_a).await;
    wait_on_time("job 2 to start", begun, || started(2)).await;
    // A gave the lease back before the marker: B's pass for it took the lease.
    let lease = promoter_lease(&server, &jobs).await;
    assert!(
        lease.as_deref().is_some_and(|v| v.contains(":handover-b:")),
        "B holds the promoter lease: {lease:?}"
    );
    stop_cleanly(stop_b, running_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_its_own_worker_queued_starts_on_time_without_a_marker() {
    // A job's ledger step (an acceptance) queues a poll due before every other delayed job:
    // it writes no wake marker, and the worker's own promoter wakes for it. The periodic pass
    // is 60 s, so nothing else could start the poll on time.
    use tarspay_worker::ledger::{Ledger, LedgerKeys, NewOrder, OrderKind};
    use tarspay_worker::queue::Delivery;

    #[derive(Clone)]
    struct Own {
        ledger: Ledger,
        jobs: RedisQueue<TestJob>,
        starts: Starts,
    }
    async fn handle(
        job: TestJob,
        delivery: Data<Delivery>,
        own: Data<Own>,
    ) -> Result<(), BoxDynError> {
        if job.n == 1 {
            let poll = own.jobs.prepare(
                &TestJob::new(2),
                &JobOptions::delayed(Duration::from_millis(300)),
            )?;
            own.ledger
                .accept_finishing("OWN-1", Some("P1"), Some(&poll), Some(&delivery))
                .await?;
        } else {
            let now = tarspay_worker::wall_clock::since_epoch().as_millis() as u64;
            own.starts.lock().unwrap().push((job.n, now));
        }
        Ok(())
    }

    let server = RedisServer::start(false);
    let jobs = queue(&server, slow_periodic("own")).await;
    let tag = format!("{{{}:own}}", common::queue::PREFIX);
    let ledger = Ledger::new(jobs.connection(), LedgerKeys::new(&tag, jobs.keys()));
    let number = "OWN-1".parse().unwrap();
    let currency = "INR".parse().unwrap();
    let merchant = "default".parse().unwrap();
    ledger
        .register(&NewOrder {
            mch_order_no: &number,
            kind: OrderKind::Payout,
            fingerprint: "fp",
            amount: "10.00",
            currency: &currency,
            request: "{}",
            batch_id: None,
            merchant: &merchant,
        })
        .await
        .unwrap();
    let starts: Starts = Arc::default();
    let (stop, signal) = stop_signal();
    let worker = WorkerBuilder::new("own")
        .backend(jobs.clone())
        .data(Own {
            ledger,
            jobs: jobs.clone(),
            starts: starts.clone(),
        })
        .concurrency(2)
        .build(handle);
    let running = tokio::spawn(worker.run_until(signal));
    // Let the worker make its first (periodic) pass over an empty delayed set.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let begun = Instant::now();
    jobs.enqueue(&TestJob::new(1)).await.unwrap();
    started_on_time(
        "the poll to start",
        begun,
        || !starts.lock().unwrap().is_empty(),
        stop,
        running,
    )
    .await;
    assert_eq!(
        wake_markers(&server, &jobs).await,
        0,
        "its worker followed the poll without a marker"
    );
}
