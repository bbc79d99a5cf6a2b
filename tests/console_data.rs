//! The console's data written by the ledger: each order's event history (gateway calls with
//! their answers and latency, callbacks, held calls), the per-minute counters and the order
//! and batch indexes. Real redis-server and sandbox over HTTP.

mod common;

use common::app::{inr, spawn_app, spawn_app_with};
use common::eventually;
use redis::AsyncCommands;
use std::collections::HashSet;
use std::time::Duration;
use tarspay_sandbox::{Endpoint, FaultAction};
use tarspay_worker::ids::BatchId;
use tarspay_worker::ledger::history::{EventKind, MAX_EVENTS, OrderEvent, TimelineEntry, timeline};
use tarspay_worker::ledger::index::OrderQuery;
use tarspay_worker::ledger::{FinalResult, Finalized, Phase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_leaves_each_attempt_with_its_code_and_latency() {
    let app = spawn_app_with(
        false,
        |c| {
            c.faults = vec![common::fault_rule(
                "HIST",
                Endpoint::CreatePayout,
                Some(2),
                FaultAction::Code {
                    code: -1,
                    msg: Some("system busy".into()),
                },
            )]
        },
        &[("TARSPAY_RETENTION", "1h")],
    )
    .await;
    app.enqueue(inr("HIST-1", "100.00")).await;
    let pool = app.pool(2);
    let outcomes = app.wait_outcomes(1).await;
    pool.stop().await;
    assert_eq!(outcomes["HIST-1"].status, "succeeded");

    let events = app.deployment.order_events("HIST-1").await.unwrap();
    let creates: Vec<&OrderEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::Create)
        .collect();
    assert_eq!(creates.len(), 3, "{events:?}");
    for (i, create) in creates.iter().enumerate() {
        assert_eq!(create.attempt, Some(i as u32 + 1), "{create:?}");
        assert!(create.latency_ms.is_some(), "{create:?}");
    }
    assert_eq!(creates[0].code, Some(-1));
    assert!(
        creates[0]
            .msg
            .as_deref()
            .is_some_and(|m| m.contains("system busy"))
    );
    assert_eq!(creates[2].code, Some(0));
    // The poll that found it final.
    assert!(
        events.iter().any(|e| e.kind == EventKind::Query
            && e.reason.as_deref() == Some("poll")
            && e.state == Some(2)),
        "{events:?}"
    );
    let record = app.deployment.order("HIST-1").await.unwrap().unwrap();
    let lines = timeline(&record, &events);
    assert!(matches!(
        lines.first(),
        Some(TimelineEntry::Registered { .. })
    ));
    assert!(
        lines
            .iter()
            .any(|l| matches!(l, TimelineEntry::Accepted { .. }))
    );
    assert!(
        matches!(lines.last(), Some(TimelineEntry::Final { status, .. }) if status == "succeeded")
    );
    assert!(lines.windows(2).all(|w| w[0].at_ms() <= w[1].at_ms()));

    // The failed creates' lines are in a list begun in flight: it goes with the order's
    // index entry (tests/ledger.rs), the record with its retention.
    let ledger = app.deployment.ledger_of("HIST-1");
    let mut conn = app.redis.conn().await;
    let listed: Vec<String> = conn
        .lrange(ledger.keys().events("HIST-1"), 0, -1)
        .await
        .unwrap();
    let listed: Vec<OrderEvent> = listed
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let listed_creates: Vec<Option<i64>> = listed
        .iter()
        .filter(|e| e.kind == EventKind::Create)
        .map(|e| e.code)
        .collect();
    assert_eq!(
        listed_creates,
        [Some(-1), Some(-1)],
        "the failed creates are listed, the accepted one is in its milestone: {listed:?}"
    );
    let ttl: i64 = conn.pttl(ledger.keys().order("HIST-1")).await.unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "record ttl {ttl}");

    // The minute counters (added by the worker every 2 s) saw three creates, two failed,
    // and one succeeded payout.
    let minutes = eventually("the minute counters", || async {
        let minutes = app.deployment.minute_stats(2).await.unwrap();
        let creates: u64 = minutes.iter().map(|m| m.creates).sum();
        let errors: u64 = minutes.iter().map(|m| m.create_errors).sum();
        let succeeded: u64 = minutes
            .iter()
            .map(|m| m.finals.get("succeeded").copied().unwrap_or(0))
            .sum();
        ((creates, errors, succeeded) == (3, 2, 1)).then_some(minutes)
    })
    .await;
    assert!(minutes.iter().any(|m| m.latency_quantile_ms(0.5).is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_is_capped_and_never_kept_for_an_order_that_does_not_exist() {
    let app = spawn_app(false, |_| {}).await;
    app.enqueue(inr("CAP-1", "100.00")).await;
    for i in 0..(MAX_EVENTS + 10) {
        let mut event = OrderEvent::now(EventKind::Operator);
        event.actor = Some(format!("op{i}"));
        app.deployment.note_event("CAP-1", event).await.unwrap();
    }
    let events = app.deployment.order_events("CAP-1").await.unwrap();
    assert_eq!(events.len(), MAX_EVENTS);
    // The oldest went first.
    assert_eq!(events[0].actor.as_deref(), Some("op10"));

    app.deployment
        .note_event("NOPE-1", OrderEvent::now(EventKind::Operator))
        .await
        .unwrap();
    let mut conn = app.redis.conn().await;
    let kept: bool = conn
        .exists(app.deployment.ledger_of("NOPE-1").keys().events("NOPE-1"))
        .await
        .unwrap();
    assert!(!kept, "a history for an order that does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_callback_is_in_the_history_as_unverified() {
    let app = spawn_app_with(
        false,
        |_| {},
        &[("TARSPAY_API_TOKEN", "history-test-token")],
    )
    .await;
    app.enqueue(inr("CB-1", "500.00")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _stop = app.serve_on(listener);
    let body = serde_json::json!({
        "mchNo": common::app::MCH_NO, "mchOrderNo": "CB-1", "bizType": 2,
        "state": 2, "orderAmount": "500.00", "currency": "INR", "payOrderId": "P1"
    });
    let client = reqwest::Client::new();
    let forge = || async {
        let answer = client
            .post(format!("http://{addr}/tarspay/notify"))
            .header("X-RESP-SIGNATURE", "forged")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    };
    forge().await;
    let events = eventually("the callback in the history", || async {
        let events = app.deployment.order_events("CB-1").await.unwrap();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Callback);
    assert_eq!(events[0].verified, Some(false));
    assert_eq!(events[0].state, Some(2));
    assert!(
        events[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("untrusted"))
    );
    // A flood of forged callbacks: each answered, none more in the history (its 64 lines
    // keep the real timeline).
    for _ in 0..100 {
        forge().await;
    }
    let events = app.deployment.order_events("CB-1").await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
}

/// Pages through a search to its end; the orders' numbers, in page order.
async fn all_pages(app: &common::app::TestApp, mut query: OrderQuery) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        let page = app.deployment.search_orders(&query).await.unwrap();
        assert!(
            page.orders.len() <= query.limit,
            "page of {}",
            page.orders.len()
        );
        seen.extend(page.orders.iter().map(|o| o.mch_order_no.to_string()));
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => return seen,
        }
    }
    panic!("more than 100 pages: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_newest_first_by_status_time_and_batch() {
    let app = spawn_app(false, |c| c.outcomes = vec![common::outcome_rule("REJ", 8)]).await;
    let batch = BatchId::parse("B-NOV").unwrap();
    for i in 0..20 {
        app.producer
            .enqueue_json(&inr(&format!("OK-{i:02}"), "100"), Some(&batch))
            .await
            .unwrap();
    }
    // A time strictly between the two groups' registrations (the index has ms resolution).
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let before_rejects = tarspay_worker::queue::server_now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    for i in 0..5 {
        app.enqueue(inr(&format!("REJ-{i}"), "100")).await;
    }
    let pool = app.pool(4);
    app.wait_outcomes(25).await;
    pool.stop().await;

    // Everything, 7 per page, newest first, each order once.
    let all = all_pages(
        &app,
        OrderQuery {
            limit: 7,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 25, "{all:?}");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 25, "{all:?}");
    let records = app.deployment.records(&all).await.unwrap();
    let times: Vec<u64> = records
        .iter()
        .map(|r| r.as_ref().unwrap().created_at_ms)
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {times:?}"
    );
    assert!(all[..5].iter().all(|id| id.starts_with("REJ-")), "{all:?}");

    // A status, two per page.
    let rejected = all_pages(
        &app,
        OrderQuery {
            phase: Some(Phase::Rejected),
            limit: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rejected.len(), 5, "{rejected:?}");
    assert!(rejected.iter().all(|id| id.starts_with("REJ-")));

    // A time window: registered from the first reject on.
    let recent = all_pages(
        &app,
        OrderQuery {
            from_ms: Some(before_rejects),
            limit: 50,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(recent.iter().filter(|id| id.starts_with("REJ-")).count(), 5);
    assert!(recent.iter().all(|id| id.starts_with("REJ-")), "{recent:?}");

    // A batch, in number order, with a status that none of it has.
    let in_batch = all_pages(
        &app,
        OrderQuery {
            batch_id: Some("B-NOV".into()),
            limit: 6,
            ..Default::default()
        },
    )
    .await;
    let expected: Vec<String> = (0..20).map(|i| format!("OK-{i:02}")).collect();
    assert_eq!(in_batch, expected);
    let none = all_pages(
        &app,
        OrderQuery {
            batch_id: Some("B-NOV".into()),
            phase: Some(Phase::Rejected),
            limit: 6,
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty(), "{none:?}");

    // An exact number, and one that matches no filter.
    let exact = all_pages(
        &app,
        OrderQuery {
            mch_order_no: Some("REJ-3".into()),
            limit: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(exact, ["REJ-3"]);
    let mismatched = all_pages(
        &app,
        OrderQuery {
            mch_order_no: Some("REJ-3".into()),
            phase: Some(Phase::Succeeded),
            limit: 10,
            ..Default::default()
        },
    )
    .await;
    assert!(mismatched.is_empty());

    let batches = app.deployment.recent_batches(10).await.unwrap();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].batch_id, "B-NOV");
    // The batch's progress from counters: every row final, none counted twice.
    let progress = app
        .deployment
        .batch_progress(&["B-NOV".to_owned(), "B-NONE".to_owned()])
        .await
        .unwrap();
    assert_eq!(progress[0].total, 20, "{progress:?}");
    assert_eq!(
        progress[0].finals.get("succeeded"),
        Some(&20),
        "{progress:?}"
    );
    assert_eq!(progress[0].finished(), 20);
    assert_eq!(
        progress[0].amounts["succeeded"]["INR"].to_string(),
        "2000",
        "{progress:?}"
    );
    assert!(!progress[0].amounts_unknown);
    assert_eq!(progress[1].total, 0);
    assert!(progress[1].finals.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_counts_its_rows_amounts_and_corrections() {
    let app = spawn_app(false, |c| c.outcomes = vec![common::outcome_rule("BF", 3)]).await;
    let batch = BatchId::parse("B-DEC").unwrap();
    for (id, amount) in [("BS-1", "100.25"), ("BS-2", "250.50"), ("BF-1", "300")] {
        app.producer
            .enqueue_json(&inr(id, amount), Some(&batch))
            .await
            .unwrap();
    }
    // Held back from the workers: counted in the batch, not finished.
    app.producer
        .enqueue_json(&inr("BLATE-1", "400"), Some(&batch))
        .await
        .unwrap();
    let ledger = app.deployment.ledger_of("BLATE-1");
    ledger
        .begin_submit("BLATE-1", "run-a", Duration::from_secs(30))
        .await
        .unwrap();
    let pool = app.pool(2);
    app.wait_outcomes(3).await;
    pool.stop().await;

    let read = || async {
        app.deployment
            .batch_progress(&["B-DEC".to_owned()])
            .await
            .unwrap()
            .remove(0)
    };
    let progress = read().await;
    assert_eq!(progress.total, 4, "{progress:?}");
    assert_eq!(progress.in_progress(), 1, "{progress:?}");
    assert_eq!(progress.finals.get("succeeded"), Some(&2), "{progress:?}");
    assert_eq!(progress.finals.get("failed"), Some(&1), "{progress:?}");
    let amounts = |p: &tarspay_worker::ledger::BatchProgress, status: &str| {
        p.amounts
            .get(status)
            .and_then(|by| by.get("INR"))
            .map(ToString::to_string)
    };
    assert_eq!(amounts(&progress, "succeeded").as_deref(), Some("350.75"));
    assert_eq!(amounts(&progress, "failed").as_deref(), Some("300"));

    // The held row ends failed by its lease holder; then the gateway says it paid it: the
    // batch's counts and amounts move with the correction, and nothing is counted twice.
    let seen = ledger.get("BLATE-1").await.unwrap().unwrap();
    let failed = FinalResult {
        code: Some(5004006),
        ..Default::default()
    };
    let applied = ledger
        .finalize_leased(&seen, "run-a", Phase::Failed, &failed, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(applied, Finalized::Recorded);
    let progress = read().await;
    assert_eq!(progress.finals.get("failed"), Some(&2), "{progress:?}");
    assert_eq!(amounts(&progress, "failed").as_deref(), Some("700"));
    let paid = FinalResult {
        pay_order_id: Some("P-BLATE".into()),
        ..Default::default()
    };
    for expected in [Finalized::Corrected, Finalized::Unchanged] {
        let applied = ledger
            .apply_gateway_final(&seen, Phase::Succeeded, &paid)
            .await
            .unwrap();
        assert_eq!(applied, expected);
    }
    let progress = read().await;
    assert_eq!(progress.total, 4);
    assert_eq!(progress.in_progress(), 0, "{progress:?}");
    assert_eq!(progress.finals.get("succeeded"), Some(&3), "{progress:?}");
    assert_eq!(progress.finals.get("failed"), Some(&1), "{progress:?}");
    assert_eq!(amounts(&progress, "succeeded").as_deref(), Some("750.75"));
    assert_eq!(amounts(&progress, "failed").as_deref(), Some("300"));
    assert_eq!(
        progress.finished_amounts()["INR"].to_string(),
        "1050.75",
        "every row's amount once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amount_sum_that_would_overflow_is_flagged_and_the_rows_still_counted() {
    let app = spawn_app(false, |_| {}).await;
    let batch = BatchId::parse("B-HUGE").unwrap();
    app.producer
        .enqueue_json(&inr("HUGE-1", "150"), Some(&batch))
        .await
        .unwrap();
    // A sum already near the largest Redis integer: this row's 15,000 minor units overflow it.
    let key = app
        .deployment
        .ledger_of("HUGE-1")
        .keys()
        .batch_progress("B-HUGE");
    let mut conn = app.redis.conn().await;
    let _: () = conn
        .hset(&key, "amt:succeeded:INR", i64::MAX - 10)
        .await
        .unwrap();
    let pool = app.pool(1);
    app.wait_outcomes(1).await;
    pool.stop().await;

    let progress = app
        .deployment
        .batch_progress(&["B-HUGE".to_owned()])
        .await
        .unwrap()
        .remove(0);
    // The payout's finalisation went through; only its amount could not be kept.
    assert_eq!(app.outcomes().await.len(), 1);
    assert_eq!(progress.finals.get("succeeded"), Some(&1), "{progress:?}");
    assert!(progress.amounts_unknown, "{progress:?}");
    let kept: i64 = conn.hget(&key, "amt:succeeded:INR").await.unwrap();
    assert_eq!(kept, i64::MAX - 10, "never wrapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rerun_after_the_records_expired_counts_no_row_twice() {
    let app = spawn_app(false, |_| {}).await;
    let batch = BatchId::parse("B-RERUN").unwrap();
    let pool = app.pool(2);
    app.producer
        .enqueue_json(&inr("RR-1", "120.50"), Some(&batch))
        .await
        .unwrap();
    app.wait_outcomes(1).await;
    // The retention ends the record (as its expiry would); the batch's set and counters
    // outlive it, and the same payroll file is run again.
    let keys = app.deployment.ledger_of("RR-1").keys().clone();
    let mut conn = app.redis.conn().await;
    let _: i64 = conn
        .del(&[keys.order("RR-1"), keys.events("RR-1")])
        .await
        .unwrap();
    app.producer
        .enqueue_json(&inr("RR-1", "120.50"), Some(&batch))
        .await
        .unwrap();
    // Settled again by the gateway's duplicate answer: a second outcome (the documented
    // price of a re-run after the retention), no second row.
    eventually("the re-run's outcome", || async {
        (app.outcomes().await.len() == 2).then_some(())
    })
    .await;
    pool.stop().await;
    let progress = app
        .deployment
        .batch_progress(&["B-RERUN".to_owned()])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(progress.total, 1, "{progress:?}");
    assert_eq!(progress.finals.get("succeeded"), Some(&1), "{progress:?}");
    assert_eq!(
        progress.amounts["succeeded"]["INR"].to_string(),
        "120.50",
        "{progress:?}"
    );
    assert_eq!(
        app.sandbox.create_attempts("RR-1"),
        2,
        "the gateway saw the re-run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_search_that_matches_nothing_within_its_budget_still_offers_the_rest() {
    let app = spawn_app(false, |_| {}).await;
    let batch = BatchId::parse("B-WIDE").unwrap();
    let rows = tarspay_worker::ledger::index::SCAN_BUDGET + 40;
    let enqueue = |i: usize| {
        let (producer, batch) = (&app.producer, &batch);
        async move {
            producer
                .enqueue_json(&inr(&format!("W-{i:05}"), "100"), Some(batch))
                .await
                .unwrap();
        }
    };
    futures::future::join_all((0..rows).map(enqueue)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let since = tarspay_worker::queue::server_now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Registered last, and sorting after every other row of the batch.
    futures::future::join_all((rows..rows + 5).map(enqueue)).await;

    let query = OrderQuery {
        batch_id: Some("B-WIDE".into()),
        from_ms: Some(since),
        limit: 50,
        ..Default::default()
    };
    let first = app.deployment.search_orders(&query).await.unwrap();
    assert!(first.orders.is_empty(), "{:?}", first.orders.len());
    assert!(
        first.next.is_some(),
        "a page that read its whole budget without a match offers the rest"
    );
    let found = all_pages(&app, query).await;
    let expected: Vec<String> = (rows..rows + 5).map(|i| format!("W-{i:05}")).collect();
    assert_eq!(found, expected);
}
