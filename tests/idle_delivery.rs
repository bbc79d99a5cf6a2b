//! A payout that comes to an idle worker (its fetch loop blocked in a read that found the
//! queue empty): its delivery brings a bound of the server's clock, so its lease reads no
//! `TIME`, and shows the queue was not paused, so nothing reads the pause flag for it. In
//! their own test binary (with each other only): the second depends on the worker reaching
//! the lease step within a few milliseconds of the delivery, which more tests' processes on
//! the same cores could delay. Real redis-server, sandbox over loopback HTTP, worker
//! processes.

mod common;

use common::app::{inr, spawn_app_with};
use common::{counter_with, gauge, no_job_left_and_audit_clean, worker_metrics};
use std::time::Duration;

const EMPTY_READS: &str = "tarspay_queue_empty_reads_total";
const ON_DELIVERY_CLOCK: &str = "tarspay_lease_steps_on_delivery_clock_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_that_comes_to_an_idle_worker_takes_its_lease_on_the_clock_its_delivery_brings() {
    // The job is added after the worker's fetch loop found its queue empty: the entry's id
    // (the server's clock when it was added) and the time since that read bound the server's
    // clock, so the lease step needs no `TIME`.
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_LIFELINE_INTERVAL", "1h")]).await;
    let (worker, addr) = app.worker_process_with_metrics(4);
    worker_metrics(&addr, "an empty read of the payout queue", |text| {
        counter_with(text, EMPTY_READS, "queue=\"payouts\"") >= 1
    })
    .await;
    app.enqueue(inr("IDLE-1", "100")).await;
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["IDLE-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("IDLE-1"), 1);
    let text = worker_metrics(&addr, "the lease counted", |text| {
        gauge(text, ON_DELIVERY_CLOCK).is_some()
    })
    .await;
    drop(worker);
    assert_eq!(gauge(&text, ON_DELIVERY_CLOCK), Some(1.0), "{text}");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_that_comes_to_an_idle_worker_reads_no_pause_flag_its_delivery_proves_the_queue_unpaused()
 {
    // A pause parks the queue's consumer group, so the job's delivery shows the queue was not
    // paused when the read ran: neither the fetch loop (`MGET` in its flag check) nor the
    // lease step (`EXISTS`) reads the flag for it.
    // One partition: both payouts go through one fetch loop. A long orphan timeout: the
    // first orphan scan (and its flag check) comes 10 s after the worker starts, past this
    // test's window on any machine that runs it in time.
    let mut app = spawn_app_with(
        false,
        |_| {},
        &[
            ("TARSPAY_LIFELINE_INTERVAL", "1h"),
            ("TARSPAY_PARTITIONS", "1"),
            ("TARSPAY_ORPHAN_TIMEOUT", "60s"),
        ],
    )
    .await;
    let (worker, addr) = app.worker_process_with_metrics(4);
    // The first job a fetch loop gets is checked against the flag itself.
    app.enqueue(inr("IDLE-0", "100")).await;
    app.wait_outcomes(1).await;
    let empty_reads = |text: &str| counter_with(text, EMPTY_READS, "queue=\"payouts\"");
    let reads = empty_reads(&worker_metrics(&addr, "the worker's metrics", |_| true).await);
    worker_metrics(&addr, "an empty read after the first payout", |text| {
        empty_reads(text) > reads
    })
    .await;
    // Into the next read's block (500 ms): the job comes long after that read was sent, so
    // only the server's clock (its entry id) places the delivery late enough to be fresh.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (exists, mget, scans) = (
        app.redis.server().command_calls("exists"),
        app.redis.server().command_calls("mget"),
        app.redis.server().command_calls("xautoclaim"),
    );
    app.enqueue(inr("IDLE-1", "100")).await;
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["IDLE-1"].status, "succeeded");
    assert_eq!(
        app.redis.server().command_calls("exists"),
        exists,
        "the lease step read the pause flag"
    );
    // An orphan scan reads the flag first: only those may have read it.
    assert!(
        app.redis.server().command_calls("mget") - mget
            <= app.redis.server().command_calls("xautoclaim") - scans,
        "the fetch loop read the pause flag for the delivery: {} reads, {} scans",
        app.redis.server().command_calls("mget") - mget,
        app.redis.server().command_calls("xautoclaim") - scans
    );
    drop(worker);
    no_job_left_and_audit_clean(&app).await;
}
