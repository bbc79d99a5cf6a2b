//! First polls held in hand (`jobs::PollsInHand`): a create job whose create was accepted
//! waits out the first poll's delay in its worker and polls itself; an order still pending
//! then goes on as its poll job (the same job id), and a holder that dies, freezes or stops
//! leaves the poll to another worker, and one whose poll Redis fails hands it to the poll job.
//! Real redis-server, sandbox over loopback HTTP, worker processes.

mod common;

use common::app::{MCH_NO, TestApp, WorkerProcess, inr, spawn_app_with};
use common::{eventually, gauge, violations, worker_metrics};
use redis::AsyncCommands;
use std::time::Duration;
use tarspay_sandbox::rules::SANDBOX_SYSTEM_PRIVATE_KEY;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::ledger::Phase;

/// `tarspay_jobs_total` for one kind and result (0 when the line is absent).
fn jobs(text: &str, kind: &str, result: &str) -> u64 {
    let labels = [format!("kind=\"{kind}\""), format!("result=\"{result}\"")];
    text.lines()
        .filter(|l| l.starts_with("tarspay_jobs_total{"))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The stored envelopes (JSON) of the order's partition: its stream's entries and its
/// delayed set's members.
async fn envelopes(app: &TestApp, id: &str) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let partition = app.partition(id);
    let keys = partition.queue.keys().clone();
    let mut conn = partition.queue.connection();
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&keys.stream).await.unwrap();
    let stream = entries
        .ids
        .iter()
        .filter_map(|entry| entry.get::<String>("e"))
        .map(|text| serde_json::from_str(&text).unwrap())
        .collect();
    let members: Vec<String> = conn.zrange(&keys.delayed, 0, -1).await.unwrap();
    let delayed = members
        .iter()
        .map(|text| serde_json::from_str(text).unwrap())
        .collect();
    (stream, delayed)
}

/// Nothing left in the queue (waiting, pending or delayed) and a clean audit.
async fn no_job_left_and_audit_clean(app: &TestApp) {
    let stats = app.deployment.queue_stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.pending, stats.delayed),
        (0, 0, 0),
        "{stats:?}"
    );
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

async fn phase(app: &TestApp, id: &str) -> Phase {
    app.deployment.order(id).await.unwrap().unwrap().phase
}

/// Waits until the order is accepted and its create job is held (pending, nothing delayed),
/// sampled so that the order was still accepted after the queue was read; the envelopes
/// (stream, delayed) of that sample.
async fn held_in_hand(app: &TestApp, id: &str) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    eventually("the accepted order's create job held in hand", || async {
        let stats = app.deployment.queue_stats().await.unwrap();
        let held = stats.pending == 1 && stats.waiting == 0 && stats.delayed == 0;
        let seen = envelopes(app, id).await;
        (held && phase(app, id).await == Phase::Accepted).then_some(seen)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_payouts_first_poll_is_held_by_its_create_job_and_queues_no_poll_job() {
    // The first poll waits 5 s (held); the sandbox has the order final after 200 ms.
    // No lifeline sweep (its reads would be counted below).
    let mut app = spawn_app_with(
        false,
        |_| {},
        &[
            ("TARSPAY_POLL_FIRST_DELAY", "5s"),
            ("TARSPAY_LIFELINE_INTERVAL", "1h"),
        ],
    )
    .await;
    app.enqueue(inr("HELD-1", "100")).await;
    let (create, _) = envelopes(&app, "HELD-1").await;
    let create_id = create[0]["id"].clone();
    let (worker, addr) = app.worker_process_with_metrics(4);
    // Accepted with no poll job queued: the create job is its only job.
    let (stream, delayed) = held_in_hand(&app, "HELD-1").await;
    assert!(delayed.is_empty(), "{delayed:?}");
    assert_eq!(stream.len(), 1, "{stream:?}");
    assert_eq!(stream[0]["id"], create_id);
    // The audit counts the held create job as its work (had the hold ended meanwhile, the
    // order is final and the audit just as clean), and the hold itself.
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["polledInHand"], 1, "{report}");
    // Records read from here on (the worker's, and this test's own until the outcome: none),
    // counted from before the held poll: the gateway has had the create alone so far.
    let reads_before = app.redis.server().command_calls("hgetall");
    assert_eq!(
        app.sandbox.calls(MCH_NO).map(|calls| calls.total),
        Some(1),
        "the held poll has not queried yet"
    );

    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["HELD-1"].status, "succeeded");
    // The held poll queried the gateway without reading the order's record first.
    assert_eq!(
        app.redis.server().command_calls("hgetall"),
        reads_before,
        "the held poll read the record"
    );
    assert_eq!(app.sandbox.create_attempts("HELD-1"), 1);
    // One job did it all: the create job, acknowledged by the step that wrote the final state.
    let text = worker_metrics(&addr, "the create job counted", |text| {
        jobs(text, "create_payout", "done") == 1
    })
    .await;
    drop(worker);
    assert_eq!(jobs(&text, "poll_status", "done"), 0, "{text}");
    assert_eq!(jobs(&text, "create_payout", "continued"), 0, "{text}");
    // No callback made it final first: the held poll queried the gateway without reading the
    // ledger before (the record its acceptance left was enough).
    assert_eq!(gauge(&text, READ_FIRST), None, "{text}");
    assert_eq!(gauge(&text, OVERTAKEN), None, "{text}");
    no_job_left_and_audit_clean(&app).await;
}

/// A counter's value on the lines of `name` whose labels include `label` (0 when absent).
fn counter_with(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

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

const EMPTY_READS: &str = "tarspay_queue_empty_reads_total";
const ON_DELIVERY_CLOCK: &str = "tarspay_lease_steps_on_delivery_clock_total";
const READ_FIRST: &str = "tarspay_polls_in_hand_read_first_total";
const OVERTAKEN: &str = "tarspay_polls_in_hand_overtaken_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_callback_beats_a_held_poll_the_next_held_polls_read_the_ledger_before_querying() {
    // Callbacks make orders final 200 ms after create; the first poll waits 5 s in hand.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let notify = format!("http://{}/tarspay/notify", listener.local_addr().unwrap());
    let system = PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY).unwrap();
    let system_public = system.public_key().to_hex();
    let app = spawn_app_with(
        false,
        |c| c.callbacks = true,
        &[
            ("TARSPAY_NOTIFY_URL", &notify),
            ("TARSPAY_SYSTEM_PUBLIC_KEY", &system_public),
            ("TARSPAY_API_TOKEN", "polls-in-hand-test-token"),
            ("TARSPAY_POLL_FIRST_DELAY", "5s"),
        ],
    )
    .await;
    let _server = app.serve_on(listener);
    let (worker, addr) = app.worker_process_with_metrics(4);
    let calls = || app.sandbox.calls(MCH_NO).map_or(0, |report| report.total);

    // The first held poll knows of no callback: it queries the gateway, and finds the order
    // final already (the callback's outcome stands, written once).
    app.enqueue(inr("CB-1", "100")).await;
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["CB-1"].status, "succeeded");
    let text = worker_metrics(&addr, "the first held poll overtaken", |text| {
        gauge(text, OVERTAKEN) == Some(1.0)
    })
    .await;
    assert_eq!(gauge(&text, READ_FIRST), None, "{text}");
    assert_eq!(calls(), 2, "a create and the held poll's query");

    // The next one reads the ledger first, finds the callback's final state and asks the
    // gateway nothing.
    app.enqueue(inr("CB-2", "100")).await;
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["CB-2"].status, "succeeded");
    let text = worker_metrics(&addr, "the second held poll overtaken", |text| {
        gauge(text, OVERTAKEN) == Some(2.0)
    })
    .await;
    // Its job counts as done before its settlement is written (the settler batches them):
    // killed before that, the worker would leave it pending, for another to take over.
    eventually("the second create job acknowledged", || async {
        let stats = app.deployment.queue_stats().await.unwrap();
        (stats.pending == 0).then_some(())
    })
    .await;
    drop(worker);
    assert_eq!(gauge(&text, READ_FIRST), Some(1.0), "{text}");
    assert_eq!(calls(), 3, "the second payout's create alone");
    assert_eq!(jobs(&text, "create_payout", "done"), 2, "{text}");
    assert_eq!(app.outcomes().await.len(), 2, "one outcome each");
    assert_eq!(app.sandbox.create_attempts("CB-1"), 1);
    assert_eq!(app.sandbox.create_attempts("CB-2"), 1);
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_still_pending_at_its_first_poll_goes_on_as_its_poll_job() {
    // Final only after 3 s: the first poll (in hand, after 1 s) finds it pending, and the
    // poll job it goes on as waits 1 s more before its first run.
    let app = spawn_app_with(
        false,
        |c| c.final_after = Duration::from_secs(3),
        &[
            ("TARSPAY_POLL_FIRST_DELAY", "1s"),
            ("TARSPAY_POLL_MAX_INTERVAL", "5s"),
        ],
    )
    .await;
    app.enqueue(inr("ON-1", "100")).await;
    let (create, _) = envelopes(&app, "ON-1").await;
    let create_id = create[0]["id"].clone();
    let (worker, addr) = app.worker_process_with_metrics(4);
    // The same job, delayed as the order's poll job with one attempt made.
    let poll = eventually("the create job gone on as the poll job", || async {
        let (stream, delayed) = envelopes(&app, "ON-1").await;
        (stream.is_empty() && delayed.len() == 1).then(|| delayed[0].clone())
    })
    .await;
    assert_eq!(poll["id"], create_id, "{poll}");
    assert_eq!(poll["p"]["job"], "poll_status", "{poll}");
    assert_eq!(poll["p"]["mchOrderNo"], "ON-1", "{poll}");
    assert_eq!(poll["a"], 1, "{poll}");
    assert_eq!(phase(&app, "ON-1").await, Phase::Accepted);

    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["ON-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("ON-1"), 1);
    let text = worker_metrics(&addr, "the poll job counted", |text| {
        jobs(text, "poll_status", "done") == 1
    })
    .await;
    drop(worker);
    assert_eq!(jobs(&text, "create_payout", "continued"), 1, "{text}");
    assert_eq!(jobs(&text, "create_payout", "done"), 0, "{text}");
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

/// A worker holding `id`'s first poll for 5 s (the longest hold), with no lifeline sweep
/// during the test (only the held job can bring the order home), and `extra` settings; the
/// app, the worker and the address of its metrics.
async fn holding(id: &str, extra: &[(&str, &str)]) -> (TestApp, WorkerProcess, String) {
    let mut env = vec![
        ("TARSPAY_POLL_FIRST_DELAY", "5s"),
        ("TARSPAY_LIFELINE_INTERVAL", "1h"),
    ];
    env.extend_from_slice(extra);
    let app = spawn_app_with(false, |_| {}, &env).await;
    app.enqueue(inr(id, "100")).await;
    let (holder, addr) = app.worker_process_with_metrics(4);
    held_in_hand(&app, id).await;
    (app, holder, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_a_first_poll_leaves_it_to_another_worker() {
    let (app, mut holder, _) = holding("KILLED-1", &[]).await;
    holder.kill();
    // The next worker takes the entry over after the orphan timeout (3 s here) and turns it
    // into the order's poll job, due at once.
    let (rescuer, addr) = app.worker_process_with_metrics(4);
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["KILLED-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("KILLED-1"), 1);
    let text = worker_metrics(&addr, "the taken-over job counted", |text| {
        jobs(text, "poll_status", "done") == 1
    })
    .await;
    drop(rescuer);
    assert_eq!(jobs(&text, "create_payout", "continued"), 1, "{text}");
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_poll_in_hand_that_redis_fails_goes_on_as_the_poll_job_after_the_first_delay() {
    let (app, holder, addr) = holding("FAILED-1", &[]).await;
    // Redis fails the held poll's ledger step (its final state's write, as no callback has
    // made a read worth it): the order's record is a key of another type for a while (as a
    // step that errors or times out would).
    let order = app.partition("FAILED-1").ledger.keys().order("FAILED-1");
    let aside = format!("{order}:aside");
    let mut conn = app.partition("FAILED-1").queue.connection();
    let () = conn.rename(&order, &aside).await.unwrap();
    let () = conn.set(&order, "unreadable").await.unwrap();
    // The job goes on as the order's poll job, one attempt made, due after the first delay
    // again (5 s): not retried as a create job, not polled at once.
    let poll = eventually("the held job gone on as the poll job", || async {
        let (stream, delayed) = envelopes(&app, "FAILED-1").await;
        (stream.is_empty() && delayed.len() == 1).then(|| delayed[0].clone())
    })
    .await;
    assert_eq!(poll["p"]["job"], "poll_status", "{poll}");
    assert_eq!(poll["a"], 1, "{poll}");
    let scored: Vec<(String, f64)> = conn
        .zrange_withscores(&app.partition("FAILED-1").queue.keys().delayed, 0, -1)
        .await
        .unwrap();
    let due = scored.first().map(|(_, score)| *score).unwrap_or_default();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = (secs * 1000 + micros / 1000) as f64;
    assert!(
        due - now_ms > 2_000.0,
        "due {} ms from now, not at once",
        due - now_ms
    );
    // Readable again before it is due: the poll job pays it, once.
    let _: i64 = conn.del(&order).await.unwrap();
    let () = conn.rename(&aside, &order).await.unwrap();
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["FAILED-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("FAILED-1"), 1);
    let text = worker_metrics(&addr, "the poll job counted", |text| {
        jobs(text, "poll_status", "done") == 1
    })
    .await;
    drop(holder);
    assert_eq!(jobs(&text, "create_payout", "continued"), 1, "{text}");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_holding_a_first_poll_queues_it_unpolled() {
    // The grace (30 s) is far longer than the hold: a worker that waited the hold out would
    // still exit cleanly, but after polling the order (final by then).
    let (app, mut holder, _) = holding("STOP-1", &[("TARSPAY_SHUTDOWN_GRACE", "30s")]).await;
    assert_eq!(holder.terminate(), Some(0), "a clean exit");
    // The first poll is queued, not polled: still accepted, its job delayed and not
    // attempted.
    assert_eq!(phase(&app, "STOP-1").await, Phase::Accepted);
    let (stream, delayed) = envelopes(&app, "STOP-1").await;
    assert!(stream.is_empty(), "{stream:?}");
    assert_eq!(delayed.len(), 1, "{delayed:?}");
    assert_eq!(delayed[0]["p"]["job"], "poll_status", "{delayed:?}");
    assert_eq!(delayed[0]["a"], 0, "{delayed:?}");

    let _next = app.worker_process(4);
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["STOP-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("STOP-1"), 1);
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_while_holding_a_first_poll_is_overtaken_and_wakes_to_nothing() {
    let (app, holder, holder_metrics) = holding("FROZEN-1", &[]).await;
    // The hold began before this instant (the order was accepted): it is due within 5 s.
    let held_by = std::time::Instant::now();
    holder.signal("STOP");
    // Another worker takes the job over after the orphan timeout (3 s), turns it into the
    // poll job and pays the order.
    let (rescuer, addr) = app.worker_process_with_metrics(4);
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["FROZEN-1"].status, "succeeded");
    let text = worker_metrics(&addr, "the taken-over job counted", |text| {
        jobs(text, "poll_status", "done") == 1
    })
    .await;
    assert_eq!(jobs(&text, "create_payout", "continued"), 1, "{text}");
    // The holder wakes, its hold long over (more than a second past due, however fast the
    // rescue was): it reads the order first, finds it final and asks the gateway nothing, and
    // its settlement finds the entry gone.
    let late = held_by + Duration::from_millis(6_500);
    tokio::time::sleep_until(late.into()).await;
    let queried = app.sandbox.calls(MCH_NO).map(|calls| calls.total);
    holder.signal("CONT");
    let text = worker_metrics(
        &holder_metrics,
        "the woken holder's stale settlement",
        |text| gauge(text, "tarspay_queue_stale_settlements_total").is_some_and(|n| n >= 1.0),
    )
    .await;
    assert_eq!(jobs(&text, "create_payout", "done"), 1, "{text}");
    assert_eq!(gauge(&text, READ_FIRST), Some(1.0), "{text}");
    assert_eq!(
        app.sandbox.calls(MCH_NO).map(|calls| calls.total),
        queried,
        "the woken holder queried the gateway"
    );
    drop((holder, rescuer));
    assert_eq!(app.sandbox.create_attempts("FROZEN-1"), 1);
    let all = app.outcomes().await;
    assert_eq!(all.len(), 1, "one outcome, nothing more: {all:?}");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_that_finds_a_poll_left_in_hand_queues_the_poll_job_and_the_audit_counts_one_job()
 {
    // The held acceptance does not check the submit lease. Its run may have lost the lease
    // (frozen past it) to a run adopting the order: that run's acceptance then queues its
    // poll job all the same, and from then on the poll job, not the create job, is the
    // order's work, for the ledger (a create job that finds it is not told to poll) and for
    // the audit (one job moves it, not two). No worker runs: the steps are the ledger's.
    use tarspay_worker::jobs::PayoutJob;
    use tarspay_worker::ledger::{InHandAcceptance, SubmitTicket};
    use tarspay_worker::queue::JobOptions;
    let app = spawn_app_with(false, |_| {}, &[]).await;
    app.enqueue(inr("ADOPT-1", "100")).await;
    let partition = app.partition("ADOPT-1");
    let ledger = &partition.ledger;
    let lease = Duration::from_secs(30);
    let ticket = ledger
        .begin_submit("ADOPT-1", "frozen", Duration::from_millis(1))
        .await
        .unwrap();
    assert!(matches!(ticket, SubmitTicket::Go { .. }), "{ticket:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The lease lapsed: the adopting run takes it over.
    let ticket = ledger
        .begin_submit("ADOPT-1", "adopter", lease)
        .await
        .unwrap();
    assert!(matches!(ticket, SubmitTicket::Go { .. }), "{ticket:?}");
    // The frozen run wakes with its create accepted and leaves the poll in hand.
    assert_eq!(
        ledger
            .accept_polling_in_hand("ADOPT-1", "P-ADOPT-1")
            .await
            .unwrap(),
        InHandAcceptance::Recorded
    );
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["polledInHand"], 1, "{report}");

    // The adopting run found the order at the gateway: its acceptance queues the poll job.
    let record = ledger.get("ADOPT-1").await.unwrap().unwrap();
    let poll = partition
        .queue
        .prepare(
            &PayoutJob::poll(&record, false),
            &JobOptions {
                delay: Some(Duration::from_secs(60)),
                ..JobOptions::default()
            },
        )
        .unwrap();
    assert!(
        ledger
            .accept("ADOPT-1", Some("P-ADOPT-1"), Some(&poll))
            .await
            .unwrap()
    );
    let (stream, delayed) = envelopes(&app, "ADOPT-1").await;
    assert_eq!(
        (stream.len(), delayed.len()),
        (1, 1),
        "{stream:?} {delayed:?}"
    );
    let ticket = ledger
        .begin_submit("ADOPT-1", "later", lease)
        .await
        .unwrap();
    assert_eq!(
        ticket,
        SubmitTicket::Accepted {
            poll_in_hand: false
        }
    );
    // The create job still in the stream no longer counts as the order's work.
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["polledInHand"], 0, "{report}");
}
