//! First polls held in hand (`jobs::PollsInHand`): a create job whose create was accepted
//! waits out the first poll's delay in its worker and polls itself; an order still pending
//! then goes on as its poll job (the same job id), and a holder that dies, freezes or stops
//! leaves the poll to another worker, and one whose poll Redis fails hands it to the poll job.
//! Once a held poll has found its order final, the next acceptance waits for its own first
//! poll (written only if that poll does not find the order final): the tests at the end.
//! Real redis-server, sandbox over loopback HTTP, worker processes.

mod common;

use common::app::{MCH_NO, TestApp, WorkerProcess, inr, spawn_app_with};
use common::{eventually, gauge, no_job_left_and_audit_clean, violations, worker_metrics};
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

/// Once the order's stream holds nothing and its delayed set one job (`what` it means), that
/// job's envelope.
async fn delayed_alone(app: &TestApp, id: &str, what: &str) -> serde_json::Value {
    eventually(what, || async {
        let (stream, delayed) = envelopes(app, id).await;
        (stream.is_empty() && delayed.len() == 1).then(|| delayed[0].clone())
    })
    .await
}

/// Puts `key` aside (renamed, if it exists) and writes a string in its place, so that Redis
/// fails the commands of its type on it; whether it existed.
async fn stand_in_for(conn: &mut tarspay_worker::redis_conn::RedisConn, key: &str) -> bool {
    let existed: bool = conn.exists(key).await.unwrap();
    if existed {
        let () = conn.rename(key, format!("{key}:aside")).await.unwrap();
    }
    let () = conn.set(key, "a stand-in").await.unwrap();
    existed
}

/// Takes back what [`stand_in_for`] did.
async fn put_back(conn: &mut tarspay_worker::redis_conn::RedisConn, key: &str, existed: bool) {
    let _: i64 = conn.del(key).await.unwrap();
    if existed {
        let () = conn.rename(format!("{key}:aside"), key).await.unwrap();
    }
}

/// The order's history keeps the line of its create (in a milestone or its list).
async fn assert_create_line_kept(app: &TestApp, id: &str) {
    let events = app.partition(id).ledger.events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| event.kind == tarspay_worker::ledger::history::EventKind::Create),
        "{events:?}"
    );
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

const READ_FIRST: &str = "tarspay_polls_in_hand_read_first_total";
const OVERTAKEN: &str = "tarspay_polls_in_hand_overtaken_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_callback_beats_a_held_poll_the_next_held_polls_read_the_ledger_before_querying() {
    // Callbacks make orders final 200 ms after create (SLOW… ones after 8 s); the first poll
    // waits 5 s in hand.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let notify = format!("http://{}/tarspay/notify", listener.local_addr().unwrap());
    let system = PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY).unwrap();
    let system_public = system.public_key().to_hex();
    let app = spawn_app_with(
        false,
        |c| {
            c.callbacks = true;
            let mut slow = common::outcome_rule("SLOW", 2);
            slow.final_after_ms = Some(Duration::from_secs(8));
            c.outcomes = vec![slow];
        },
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
    // Counted once its job is done too (the poll counts first).
    let text = worker_metrics(&addr, "the second held poll overtaken", |text| {
        gauge(text, OVERTAKEN) == Some(2.0) && jobs(text, "create_payout", "done") == 2
    })
    .await;
    // Its job counts as done before its settlement is written (the settler batches them):
    // killed before that, the worker would leave it pending, for another to take over.
    eventually("the second create job acknowledged", || async {
        let stats = app.deployment.queue_stats().await.unwrap();
        (stats.pending == 0).then_some(())
    })
    .await;
    assert_eq!(gauge(&text, READ_FIRST), Some(1.0), "{text}");
    assert_eq!(calls(), 3, "the second payout's create alone");
    // The first held poll's query found its order final, so the second's acceptance waited
    // for its poll, which found the callback's final state: none was written.
    assert_eq!(gauge(&text, DEFERRED), Some(1.0), "{text}");
    assert!(acceptance(&app, "CB-1").await.is_some());
    assert_eq!(acceptance(&app, "CB-2").await, None);
    assert_eq!(jobs(&text, "create_payout", "done"), 2, "{text}");
    assert_eq!(app.outcomes().await.len(), 2, "one outcome each");
    assert_eq!(app.sandbox.create_attempts("CB-1"), 1);
    assert_eq!(app.sandbox.create_attempts("CB-2"), 1);

    // A deferred acceptance whose held poll's query finds the order pending is written, and
    // ends the deferral.
    app.enqueue(inr("SLOW-3", "100")).await;
    let poll = delayed_alone(&app, "SLOW-3", "SLOW-3's held job gone on as its poll job").await;
    assert_eq!(poll["p"]["job"], "poll_status", "{poll}");
    let accepted = acceptance(&app, "SLOW-3")
        .await
        .expect("SLOW-3's acceptance");
    assert_eq!(accepted["pollInHand"], true, "{accepted}");
    // A held poll that reads a callback's final state first asked the gateway nothing: it
    // does not turn the deferral back on. CB-4's acceptance is written when the gateway
    // accepts, and so is CB-5's after CB-4's poll found the callback's final state.
    app.enqueue(inr("CB-4", "100")).await;
    worker_metrics(&addr, "CB-4's create job done", |text| {
        jobs(text, "create_payout", "done") == 3
    })
    .await;
    app.enqueue(inr("CB-5", "100")).await;
    let outcomes = app.wait_outcomes(5).await;
    for id in ["SLOW-3", "CB-4", "CB-5"] {
        assert_eq!(outcomes[id].status, "succeeded", "{id}");
        assert_eq!(app.sandbox.create_attempts(id), 1, "{id}");
    }
    let text = worker_metrics(&addr, "every create job done", |text| {
        jobs(text, "create_payout", "done") == 4
    })
    .await;
    // SLOW-3's poll job ends when it finds the callback's final state, or with it.
    eventually("no job left", || async {
        let stats = app.deployment.queue_stats().await.unwrap();
        (stats.waiting + stats.pending + stats.delayed == 0).then_some(())
    })
    .await;
    drop(worker);
    assert_eq!(
        gauge(&text, DEFERRED),
        Some(2.0),
        "CB-2's and SLOW-3's: {text}"
    );
    assert_eq!(
        gauge(&text, OVERTAKEN),
        Some(4.0),
        "CB-1, 2, 4 and 5: {text}"
    );
    assert!(
        acceptance(&app, "CB-4").await.is_some(),
        "CB-4 accepted at once"
    );
    assert!(
        acceptance(&app, "CB-5").await.is_some(),
        "CB-5 accepted at once"
    );
    assert_eq!(app.outcomes().await.len(), 5, "one outcome each");
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
    let poll = delayed_alone(&app, "ON-1", "the create job gone on as the poll job").await;
    assert_eq!(poll["id"], create_id, "{poll}");
    assert_eq!(poll["p"]["job"], "poll_status", "{poll}");
    assert_eq!(poll["p"]["mchOrderNo"], "ON-1", "{poll}");
    assert_eq!(poll["a"], 1, "{poll}");
    // Accepted when the gateway accepted (no held poll had found its order final yet),
    // marked as polled in hand, with the create's history line.
    assert_eq!(phase(&app, "ON-1").await, Phase::Accepted);
    let accepted = acceptance(&app, "ON-1").await.expect("the acceptance");
    assert_eq!(accepted["pollInHand"], true, "{accepted}");
    assert_eq!(accepted["events"][0]["kind"], "create", "{accepted}");

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

/// The order's acceptance milestone as written (JSON), if any.
async fn acceptance(app: &TestApp, id: &str) -> Option<serde_json::Value> {
    let key = app.partition(id).ledger.keys().order(id);
    let mut conn = app.partition(id).queue.connection();
    let text: Option<String> = conn.hget(&key, "accepted").await.unwrap();
    text.map(|text| serde_json::from_str(&text).unwrap())
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
    let mut conn = app.partition("FAILED-1").queue.connection();
    let existed = stand_in_for(&mut conn, &order).await;
    // The job goes on as the order's poll job, one attempt made, due after the first delay
    // again (5 s): not retried as a create job, not polled at once.
    let poll = delayed_alone(&app, "FAILED-1", "the held job gone on as the poll job").await;
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
    put_back(&mut conn, &order, existed).await;
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
    handed_over_unpolled_then_paid(&app, "STOP-1", 1).await;
}

/// After a stop during `id`'s hold: accepted (marked as polled in hand), its poll job delayed
/// and not attempted; a next worker then pays it (the `outcomes`th outcome), once.
async fn handed_over_unpolled_then_paid(app: &TestApp, id: &str, outcomes: usize) {
    assert_eq!(phase(app, id).await, Phase::Accepted);
    let accepted = acceptance(app, id).await.expect("the acceptance");
    assert_eq!(accepted["pollInHand"], true, "{accepted}");
    let (stream, delayed) = envelopes(app, id).await;
    assert!(stream.is_empty(), "{stream:?}");
    assert_eq!(delayed.len(), 1, "{delayed:?}");
    assert_eq!(delayed[0]["p"]["job"], "poll_status", "{delayed:?}");
    assert_eq!(delayed[0]["a"], 0, "{delayed:?}");

    let _next = app.worker_process(4);
    let paid = app.wait_outcomes(outcomes).await;
    assert_eq!(paid[id].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts(id), 1);
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

/// The acceptance deferred by a worker whose last held poll found its order final (first
/// polls held for 5 s): the first payout (`WARM-…`) is paid through a hold first.
const DEFERRED: &str = "tarspay_polls_in_hand_acceptance_deferred_total";

/// A worker holding `id`'s first poll for 5 s with its acceptance deferred (after one payout
/// whose held poll found it final), with no lifeline sweep, and `extra` settings; the app, the
/// worker and the address of its metrics, once `id` is held with no acceptance written (its
/// create job pending, nothing delayed, the order still as its submit lease left it).
async fn holding_deferred(id: &str, extra: &[(&str, &str)]) -> (TestApp, WorkerProcess, String) {
    holding_deferred_on(id, |_| {}, extra).await
}

/// [`holding_deferred`] on a sandbox `configure`d so.
async fn holding_deferred_on(
    id: &str,
    configure: impl FnOnce(&mut tarspay_sandbox::SandboxConfig),
    extra: &[(&str, &str)],
) -> (TestApp, WorkerProcess, String) {
    let mut env = vec![
        ("TARSPAY_POLL_FIRST_DELAY", "5s"),
        ("TARSPAY_LIFELINE_INTERVAL", "1h"),
    ];
    env.extend_from_slice(extra);
    let app = spawn_app_with(false, configure, &env).await;
    let (holder, addr) = app.worker_process_with_metrics(4);
    let warm = format!("WARM-{id}");
    app.enqueue(inr(&warm, "100")).await;
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes[&warm].status, "succeeded");
    // Its acceptance was written when the gateway accepted: no held poll had found its order
    // final before.
    assert!(
        acceptance(&app, &warm).await.is_some(),
        "{warm} accepted at once"
    );
    app.enqueue(inr(id, "100")).await;
    let http = reqwest::Client::new();
    eventually(
        "the accepted order's create job held, its acceptance deferred",
        || async {
            let text = common::scrape_metrics(&http, &addr).await;
            let deferred =
                gauge(&text, DEFERRED) == Some(1.0) && gauge(&text, HOLDING) == Some(1.0);
            let stats = app.deployment.queue_stats().await.unwrap();
            let held = stats.pending == 1 && stats.waiting == 0 && stats.delayed == 0;
            let leased = phase(&app, id).await == Phase::Submitting;
            (deferred && held && leased && app.sandbox.create_attempts(id) == 1).then_some(())
        },
    )
    .await;
    (app, holder, addr)
}

/// The gauge of first polls a worker holds.
const HOLDING: &str = "tarspay_polls_in_hand";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_held_poll_found_its_order_final_the_next_acceptance_waits_for_its_own_poll() {
    // The first payout's held poll found it final (its acceptance was written when the
    // gateway accepted); the second's acceptance waits for its poll.
    let (mut app, worker, addr) = holding_deferred("LATE-1", &[]).await;
    // Accepted by the gateway, yet nothing says so: the audit sees a create in flight (its
    // job the create job), and counts the first payout's hold alone.
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["phases"]["submitting"], 1, "{report}");
    assert_eq!(report["polledInHand"], 1, "{report}");
    let milestones_before = app.redis.server().command_calls("hsetnx");
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["LATE-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("LATE-1"), 1);
    // Its poll found the order final: the final state was the one milestone written after
    // the create, and it keeps the create's history line (the acceptance would have).
    assert_eq!(
        app.redis.server().command_calls("hsetnx") - milestones_before,
        1,
        "the final state's HSETNX alone"
    );
    let ledger = &app.partition("LATE-1").ledger;
    let record = ledger.get("LATE-1").await.unwrap().unwrap();
    assert!(!record.accepted, "no acceptance written: {record:?}");
    assert!(record.pay_order_id.is_some(), "{record:?}");
    assert_create_line_kept(&app, "LATE-1").await;
    let text = worker_metrics(&addr, "both create jobs counted", |text| {
        jobs(text, "create_payout", "done") == 2
    })
    .await;
    drop(worker);
    assert_eq!(jobs(&text, "poll_status", "done"), 0, "{text}");
    assert_eq!(gauge(&text, DEFERRED), Some(1.0), "{text}");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_its_acceptance_waits_leaves_the_order_to_a_lookup_after_its_lease() {
    let (app, mut holder, _) = holding_deferred("LATE-KILLED-1", &[]).await;
    holder.kill();
    // The next worker takes the entry over after the orphan timeout (3 s here). No acceptance
    // was written: the order shows the dead run's submit lease, so the job waits it out, then
    // takes the order as one whose create may exist and looks it up first.
    let rescuer = app.worker_process(4);
    let outcomes = app.wait_outcomes(2).await;
    drop(rescuer);
    assert_eq!(outcomes["LATE-KILLED-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("LATE-KILLED-1"), 1);
    let record = app
        .deployment
        .order("LATE-KILLED-1")
        .await
        .unwrap()
        .unwrap();
    assert!(
        record.ambiguous,
        "taken as a create that may exist: {record:?}"
    );
    assert_eq!(
        record.attempts, 2,
        "the dead run's lease, then the rescuer's: {record:?}"
    );
    assert_eq!(app.outcomes().await.len(), 2, "one outcome each");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_its_acceptance_waits_under_lagging_lookups_leaves_one_order_and_one_outcome()
 {
    // The documented cost of the deferral: the gateway's lookups of LAGGED… orders miss for
    // 16 s after create, past the dead run's submit lease (13 s here). The rescuer's lookup
    // after the lease misses, so it sends the create again under the same `mchOrderNo`; the
    // gateway answers it as a duplicate (5003011), whose lookup misses too, so each later
    // attempt looks up and, missing, sends it again, until a lookup finds the order.
    let lagging = |c: &mut tarspay_sandbox::SandboxConfig| {
        c.faults = vec![common::fault_rule(
            "LAGGED",
            tarspay_sandbox::Endpoint::QueryPayout,
            None,
            tarspay_sandbox::FaultAction::LookupLag { ms: 16_000 },
        )];
    };
    // The harness's settle window (1 s) is far shorter than the lag: the gateway's word that
    // the number exists is what keeps the order from being failed on the lookups' misses.
    let (app, mut holder, _) = holding_deferred_on("LAGGED-1", lagging, &[]).await;
    holder.kill();
    let (rescuer, addr) = app.worker_process_with_metrics(4);
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["LAGGED-1"].status, "succeeded");
    // More create calls than one, every one after the first answered as a duplicate: one
    // order at the gateway and one outcome, the one rule held by the gateway's duplicate
    // check, which a written acceptance would not have needed. (How many depends on the
    // retries' waits against the lag; the attempts allowed, 5, bound them.)
    let creates = app.sandbox.create_attempts("LAGGED-1");
    assert!((2..=5).contains(&creates), "{creates} create calls");
    let text = worker_metrics(&addr, "the rescuer's metrics", |_| true).await;
    drop(rescuer);
    let duplicates = common::counter_with(&text, "tarspay_gateway_codes_total", "code=\"5003011\"");
    assert_eq!(duplicates, u64::from(creates) - 1, "{text}");
    let held = app.sandbox.order("LAGGED-1").expect("the gateway's order");
    assert_eq!(
        outcomes["LAGGED-1"].pay_order_id.as_deref(),
        Some(held.pay_order_id.as_str())
    );
    let record = app.deployment.order("LAGGED-1").await.unwrap().unwrap();
    assert!(
        record.ambiguous,
        "taken as a create that may exist: {record:?}"
    );
    assert_eq!(app.outcomes().await.len(), 2, "one outcome each");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_while_its_acceptance_waits_wakes_to_an_adopted_order_and_leaves_it() {
    // Orders numbered LATE-FROZEN… are final 25 s after create, after the rescue below.
    let slow = |c: &mut tarspay_sandbox::SandboxConfig| {
        let mut rule = common::outcome_rule("LATE-FROZEN", 2);
        rule.final_after_ms = Some(Duration::from_secs(25));
        c.outcomes = vec![rule];
    };
    let (app, holder, holder_metrics) = holding_deferred_on("LATE-FROZEN-1", slow, &[]).await;
    holder.signal("STOP");
    // Another worker takes the entry over after the orphan timeout (3 s), waits out the
    // frozen run's submit lease (13 s here), looks the order up and adopts it: accepted, with
    // its poll job queued rather than held.
    let (rescuer, rescuer_metrics) = app.worker_process_with_metrics(4);
    let adopted = eventually("the order adopted by the rescuer", || async {
        acceptance(&app, "LATE-FROZEN-1").await
    })
    .await;
    assert_eq!(adopted.get("pollInHand"), None, "{adopted}");
    assert_eq!(phase(&app, "LATE-FROZEN-1").await, Phase::Accepted);
    // The holder wakes long past its hold: it reads the order first, finds another run's
    // acceptance, so its own (deferred) one is not written and it asks the gateway nothing;
    // the poll job the adoption queued follows the order.
    let queried = app.sandbox.calls(MCH_NO).map(|calls| calls.total);
    holder.signal("CONT");
    let text = worker_metrics(
        &holder_metrics,
        "the woken holder's stale settlement",
        |text| gauge(text, "tarspay_queue_stale_settlements_total").is_some_and(|n| n >= 1.0),
    )
    .await;
    assert_eq!(gauge(&text, READ_FIRST), Some(1.0), "{text}");
    assert_eq!(
        jobs(&text, "create_payout", "done"),
        2,
        "the warm-up's and this: {text}"
    );
    assert_eq!(
        app.sandbox.calls(MCH_NO).map(|calls| calls.total),
        queried,
        "the woken holder queried the gateway"
    );
    // Only the rescuer follows the order from here.
    drop(holder);
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["LATE-FROZEN-1"].status, "succeeded");
    let text = worker_metrics(
        &rescuer_metrics,
        "the adoption's poll job counted",
        |text| jobs(text, "poll_status", "done") == 1,
    )
    .await;
    drop(rescuer);
    assert_eq!(
        jobs(&text, "create_payout", "done"),
        1,
        "the adoption: {text}"
    );
    assert_eq!(app.sandbox.create_attempts("LATE-FROZEN-1"), 1);
    let record = app
        .deployment
        .order("LATE-FROZEN-1")
        .await
        .unwrap()
        .unwrap();
    assert!(
        record.ambiguous,
        "taken as a create that may exist: {record:?}"
    );
    assert_eq!(app.outcomes().await.len(), 2, "one outcome each");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_poll_whose_final_write_redis_fails_writes_the_deferred_acceptance_and_goes_on() {
    let (app, holder, addr) = holding_deferred("LATE-FAILED-1", &[]).await;
    // Redis fails the held poll's ledger step (its final state's write): the partition's
    // outcome stream is a key of another type for a while. The order's record stays writable.
    let outcomes = app.partition("LATE-FAILED-1").ledger.keys().outcomes();
    let mut conn = app.partition("LATE-FAILED-1").queue.connection();
    let existed = stand_in_for(&mut conn, &outcomes).await;
    // The job goes on as the order's poll job, one attempt made, after the deferred
    // acceptance was written (the poll job follows accepted orders), marked as polled in hand
    // and dated before the poll.
    let poll = delayed_alone(
        &app,
        "LATE-FAILED-1",
        "the held job gone on as the poll job",
    )
    .await;
    assert_eq!(poll["p"]["job"], "poll_status", "{poll}");
    assert_eq!(poll["a"], 1, "{poll}");
    assert_eq!(phase(&app, "LATE-FAILED-1").await, Phase::Accepted);
    let accepted = acceptance(&app, "LATE-FAILED-1")
        .await
        .expect("the acceptance");
    assert_eq!(accepted["pollInHand"], true, "{accepted}");
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let at_s = accepted["at"].as_u64().expect("at") / 1000;
    assert!(
        at_s + 4 <= secs,
        "dated when the gateway accepted, 5 s before: {accepted}"
    );
    // Writable again: the poll job pays it, once.
    put_back(&mut conn, &outcomes, existed).await;
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["LATE-FAILED-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("LATE-FAILED-1"), 1);
    // The create's history line went to the order's list with the failed final write (a
    // milestone not written leaves its lines to the list).
    assert_create_line_kept(&app, "LATE-FAILED-1").await;
    let text = worker_metrics(&addr, "the poll job counted", |text| {
        jobs(text, "poll_status", "done") == 1
    })
    .await;
    drop(holder);
    assert_eq!(jobs(&text, "create_payout", "continued"), 1, "{text}");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_poll_whose_deferred_acceptance_redis_fails_too_is_tried_again_as_the_create_job() {
    let (app, holder, _) = holding_deferred("LATE-FAILED-2", &[]).await;
    // Redis fails every write to the order (its record is a key of another type for a
    // while): the final state and the acceptance written instead. Nothing says the order is
    // accepted, so the job cannot go on as the poll job: it is tried again as the create job.
    let order = app
        .partition("LATE-FAILED-2")
        .ledger
        .keys()
        .order("LATE-FAILED-2");
    let mut conn = app.partition("LATE-FAILED-2").queue.connection();
    let existed = stand_in_for(&mut conn, &order).await;
    let retried = delayed_alone(
        &app,
        "LATE-FAILED-2",
        "the held job tried again as the create job",
    )
    .await;
    assert_eq!(retried["p"]["job"], "create_payout", "{retried}");
    // Readable again: the retried job waits out the held run's submit lease, takes the order
    // as one whose create may exist and looks it up first (the sandbox knows it).
    put_back(&mut conn, &order, existed).await;
    let outcomes = app.wait_outcomes(2).await;
    drop(holder);
    assert_eq!(outcomes["LATE-FAILED-2"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("LATE-FAILED-2"), 1);
    let record = app
        .deployment
        .order("LATE-FAILED-2")
        .await
        .unwrap()
        .unwrap();
    assert!(record.ambiguous, "{record:?}");
    assert_eq!(app.outcomes().await.len(), 2, "one outcome each");
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_acceptance_whose_poll_finds_the_order_pending_is_written_and_the_next_one_is_not_deferred()
 {
    // Orders numbered SLOW… are final 8 s after create: the held poll (after 5 s) finds this
    // one pending.
    let slow = |c: &mut tarspay_sandbox::SandboxConfig| {
        let mut rule = common::outcome_rule("SLOW", 2);
        rule.final_after_ms = Some(Duration::from_secs(8));
        c.outcomes = vec![rule];
    };
    let (app, worker, addr) = holding_deferred_on("SLOW-1", slow, &[]).await;
    // The job goes on as the order's poll job, one attempt made, after the acceptance was
    // written, marked as polled in hand and dated when the gateway accepted.
    let poll = delayed_alone(&app, "SLOW-1", "the held job gone on as the poll job").await;
    assert_eq!(poll["p"]["job"], "poll_status", "{poll}");
    assert_eq!(poll["a"], 1, "{poll}");
    assert_eq!(phase(&app, "SLOW-1").await, Phase::Accepted);
    let accepted = acceptance(&app, "SLOW-1").await.expect("the acceptance");
    assert_eq!(accepted["pollInHand"], true, "{accepted}");
    assert_eq!(accepted["events"][0]["kind"], "create", "{accepted}");
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["SLOW-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("SLOW-1"), 1);
    // A held poll found its order pending: the next acceptance is written at once.
    app.enqueue(inr("SLOW-2", "100")).await;
    held_in_hand(&app, "SLOW-2").await;
    let text = worker_metrics(&addr, "the worker's metrics", |_| true).await;
    assert_eq!(gauge(&text, DEFERRED), Some(1.0), "SLOW-1's alone: {text}");
    let outcomes = app.wait_outcomes(3).await;
    drop(worker);
    assert_eq!(outcomes["SLOW-2"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("SLOW-2"), 1);
    no_job_left_and_audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_its_acceptance_waits_writes_it_and_queues_the_poll_unpolled() {
    let (app, mut holder, _) =
        holding_deferred("LATE-STOP-1", &[("TARSPAY_SHUTDOWN_GRACE", "30s")]).await;
    assert_eq!(holder.terminate(), Some(0), "a clean exit");
    // The first poll is queued, not polled, and the acceptance was written before it went on.
    handed_over_unpolled_then_paid(&app, "LATE-STOP-1", 2).await;
}
