//! Payouts end to end: producer → ledger → queue → worker → sandbox (over HTTP) → outcome
//! stream, against a real redis-server. Each test asserts the one rule: at most one order per
//! mchOrderNo at the gateway, exactly one outcome per payout.

mod common;

use common::app::{MCH_NO, TestApp, inr, spawn_app, spawn_app_with};
use common::{eventually, outcome_rule, poll};
use std::time::Duration;
use tarspay_sandbox::{Endpoint, FaultAction, FaultRule};
use tarspay_worker::ids::BatchId;
use tarspay_worker::jobs::{Step, run_create_payout, run_poll_status};
use tarspay_worker::ledger::history::EventKind;
use tarspay_worker::ledger::{FinalResult, Finalized, OrderKind, Phase};
use tarspay_worker::producer::{Enqueued, ProducerError};

fn fault(prefix: &str, times: Option<u32>, action: FaultAction) -> FaultRule {
    common::fault_rule(prefix, Endpoint::CreatePayout, times, action)
}

/// An app whose gateway refuses every create of `prefix…` orders with the auth-class `code`,
/// the guard pausing after `threshold` different orders.
async fn app_refusing_auth(
    prefix: &str,
    code: i64,
    msg: Option<&str>,
    threshold: &str,
) -> common::app::TestApp {
    let msg = msg.map(str::to_owned);
    spawn_app_with(
        false,
        |c| c.faults = vec![fault(prefix, None, FaultAction::Code { code, msg })],
        &[("TARSPAY_GUARD_AUTH_FAILURES", threshold)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_one_order_one_outcome_each() {
    let app = spawn_app(false, |_| {}).await;
    for i in 0..30 {
        app.enqueue(inr(&format!("OK-{i}"), "150.50")).await;
    }
    let pool = app.pool(8);
    let outcomes = app.wait_outcomes(30).await;
    pool.stop().await;
    for (id, outcome) in &outcomes {
        assert_eq!(outcome.status, "succeeded", "{id}");
        assert_eq!(outcome.kind, OrderKind::Payout);
        assert_eq!(outcome.gateway_state, Some(2));
        assert_eq!(
            (outcome.amount.as_str(), outcome.currency.as_str()),
            ("150.50", "INR")
        );
        assert_eq!(outcome.attempts, 1);
        assert!(
            outcome
                .pay_order_id
                .as_deref()
                .is_some_and(|p| p.starts_with('P'))
        );
        assert_eq!(app.sandbox.create_attempts(id), 1);
    }
    assert_eq!(app.sandbox.orders().len(), 30);
    let record = app.deployment.order("OK-0").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Succeeded);
}

/// A payout built in code through the library, not validated from JSON: a pass-through field
/// that looks like a core one, or an unsafe `wayCode`, is refused by `enqueue` and
/// `enqueue_batch`, naming the field; nothing is registered or queued, not even a batch's good
/// rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_built_in_code_that_fails_the_pass_through_checks_is_refused_and_nothing_is_queued()
 {
    let app = spawn_app(false, |_| {}).await;
    let good = app
        .producer
        .rules()
        .validate_json(&inr("CODE-1", "100"))
        .unwrap();
    let mut lookalike = app
        .producer
        .rules()
        .validate_json(&inr("CODE-2", "100"))
        .unwrap();
    lookalike.fields.insert("Amount".into(), "999999".into());
    let mut bad_way = app
        .producer
        .rules()
        .validate_json(&inr("CODE-3", "100"))
        .unwrap();
    bad_way.way_code = "UPI\n".into();
    for (request, field) in [(&lookalike, "Amount"), (&bad_way, "wayCode")] {
        let refused = app.producer.enqueue(request, None).await.unwrap_err();
        assert!(
            matches!(refused, ProducerError::Invalid(_)) && refused.to_string().contains(field),
            "{refused}"
        );
        let batch = BatchId::parse("CODE-BATCH").unwrap();
        let refused = app
            .producer
            .enqueue_batch(&[good.clone(), request.clone()], &batch)
            .await
            .unwrap_err();
        assert!(refused.to_string().contains(field), "{refused}");
    }
    for id in ["CODE-1", "CODE-2", "CODE-3"] {
        assert!(app.deployment.order(id).await.unwrap().is_none(), "{id}");
    }
    assert_eq!(app.deployment.queue_stats().await.unwrap().depth(), 0);
    // The same payout without the lookalike goes through.
    assert_eq!(
        app.producer.enqueue(&good, None).await.unwrap(),
        Enqueued::Queued
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_class() {
    let app = spawn_app(false, |c| {
        c.faults = vec![
            fault(
                "SYS",
                Some(2),
                FaultAction::Code {
                    code: -1,
                    msg: None,
                },
            ),
            fault(
                "RCE",
                Some(1),
                FaultAction::Code {
                    code: 500323,
                    msg: None,
                },
            ),
            fault(
                "WAY",
                None,
                FaultAction::Code {
                    code: 5003009,
                    msg: Some("wayCode not supported".into()),
                },
            ),
            fault(
                "DOWN",
                None,
                FaultAction::Code {
                    code: -1,
                    msg: Some("system busy".into()),
                },
            ),
            fault(
                "HTML",
                Some(1),
                FaultAction::Http {
                    status: 502,
                    commit: false,
                    body: None,
                },
            ),
        ];
        c.outcomes = vec![outcome_rule("REJ", 8), outcome_rule("FAIL", 3)];
    })
    .await;
    for id in [
        "SYS-1", "RCE-1", "WAY-1", "DOWN-1", "HTML-1", "REJ-1", "FAIL-1",
    ] {
        app.enqueue(inr(id, "100")).await;
    }
    let pool = app.pool(4);
    let outcomes = app.wait_outcomes(7).await;
    pool.stop().await;

    // Retryable: the same create again, then success.
    assert_eq!(
        (
            outcomes["SYS-1"].status.as_str(),
            outcomes["SYS-1"].attempts
        ),
        ("succeeded", 3)
    );
    assert_eq!(
        (
            outcomes["RCE-1"].status.as_str(),
            outcomes["RCE-1"].attempts
        ),
        ("succeeded", 2)
    );
    assert_eq!(app.sandbox.create_attempts("SYS-1"), 3);
    // A 502 without commit: looked up (not found), created again under the same number.
    assert_eq!(outcomes["HTML-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("HTML-1"), 2);
    // Terminal: failed at once with the gateway's code and message.
    let way = &outcomes["WAY-1"];
    assert_eq!(
        (
            way.status.as_str(),
            way.code,
            way.msg.as_deref(),
            way.attempts
        ),
        ("failed", Some(5003009), Some("wayCode not supported"), 1)
    );
    assert_eq!(app.sandbox.create_attempts("WAY-1"), 1);
    // Retryable until the bound (5 creates). `-1` does not prove that nothing was created,
    // so the order is failed (with the last code) only after the gateway said "no such
    // order" twice over the settle window: lookup-only runs after the fifth create.
    let down = &outcomes["DOWN-1"];
    assert_eq!((down.status.as_str(), down.code), ("failed", Some(-1)));
    assert!(down.attempts >= 7, "{down:?}");
    assert_eq!(app.sandbox.create_attempts("DOWN-1"), 5);
    // Gateway final states.
    assert_eq!(
        (
            outcomes["REJ-1"].status.as_str(),
            outcomes["REJ-1"].gateway_state
        ),
        ("rejected", Some(8))
    );
    assert_eq!(
        (
            outcomes["FAIL-1"].status.as_str(),
            outcomes["FAIL-1"].gateway_state
        ),
        ("failed", Some(3))
    );
    for id in ["SYS-1", "RCE-1", "HTML-1", "REJ-1", "FAIL-1"] {
        assert!(app.sandbox.order(id).is_some(), "{id}");
    }
    for id in ["WAY-1", "DOWN-1"] {
        assert!(app.sandbox.order(id).is_none(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_then_drop_and_slow_answers_create_exactly_one_order() {
    let app = spawn_app(false, |c| {
        c.faults = vec![
            fault("CTD", Some(1), FaultAction::CommitThenDrop),
            // Longer than the 1 s client timeout: the gateway commits, the worker times out.
            fault("SLOW", Some(1), FaultAction::Slow { ms: 2_500 }),
            fault(
                "C502",
                Some(1),
                FaultAction::Http {
                    status: 502,
                    commit: true,
                    body: None,
                },
            ),
        ];
    })
    .await;
    for id in ["CTD-1", "SLOW-1", "C502-1"] {
        app.enqueue(inr(id, "100")).await;
    }
    let pool = app.pool(4);
    let outcomes = app.wait_outcomes(3).await;
    pool.stop().await;
    for id in ["CTD-1", "SLOW-1", "C502-1"] {
        assert_eq!(outcomes[id].status, "succeeded", "{id}");
        assert_eq!(
            app.sandbox.create_attempts(id),
            1,
            "{id}: found by a query, never sent again"
        );
        assert_eq!(
            outcomes[id].pay_order_id.as_deref(),
            Some(app.sandbox.order(id).unwrap().pay_order_id.as_str())
        );
    }
    assert_eq!(app.sandbox.orders().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_order_is_adopted_and_a_different_one_is_a_conflict() {
    let app = spawn_app(false, |_| {}).await;
    assert!(app.sandbox.insert_payout(MCH_NO, "SAME-1", "100.00", "INR"));
    assert!(app.sandbox.insert_payout(MCH_NO, "DIFF-1", "999", "INR"));
    app.enqueue(inr("SAME-1", "100")).await;
    app.enqueue(inr("DIFF-1", "100")).await;
    let pool = app.pool(2);
    let outcomes = app.wait_outcomes(2).await;
    pool.stop().await;
    assert_eq!(outcomes["SAME-1"].status, "succeeded");
    assert_eq!(
        outcomes["SAME-1"].pay_order_id.as_deref(),
        Some(app.sandbox.order("SAME-1").unwrap().pay_order_id.as_str())
    );
    let conflict = &outcomes["DIFF-1"];
    assert_eq!(
        (conflict.status.as_str(), conflict.code),
        ("conflict", Some(5003011))
    );
    assert!(
        conflict.msg.as_deref().unwrap().contains("999"),
        "{conflict:?}"
    );
    assert_eq!(app.sandbox.orders().len(), 2, "nothing new was created");
    // The other order's final state is never a correction of ours, and a final order's
    // looks (an untrusted callback asks for one) find nothing to change.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for id in ["DIFF-1", "SAME-1"] {
        let ctx = app.deployment.job_context_for(&app.settings, id).unwrap();
        assert_eq!(
            run_poll_status(&ctx, id, 1, true, None).await.unwrap(),
            Step::Done
        );
    }
    assert_eq!(app.deployment.outcome_count().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_refuses_bad_input_and_reports_existing_orders() {
    let app = spawn_app(false, |_| {}).await;
    let bad = serde_json::json!({"mchOrderNo": "B-1", "amount": "-5", "currency": "INR", "wayCode": "UPI"});
    let err = app.producer.enqueue_json(&bad, None).await.unwrap_err();
    assert!(
        err.to_string().contains("amount: must not be negative"),
        "{err}"
    );
    assert!(
        app.deployment.order("B-1").await.unwrap().is_none(),
        "nothing registered"
    );
    assert_eq!(
        app.deployment.queue_stats().await.unwrap().depth(),
        0,
        "nothing queued"
    );

    assert_eq!(
        app.producer
            .enqueue_json(&inr("E-1", "100"), None)
            .await
            .unwrap(),
        Enqueued::Queued
    );
    match app
        .producer
        .enqueue_json(&inr("E-1", "100"), None)
        .await
        .unwrap()
    {
        Enqueued::Exists {
            record,
            same_request,
        } => assert!(same_request && record.phase == Phase::Queued),
        other => panic!("{other:?}"),
    }
    match app
        .producer
        .enqueue_json(&inr("E-1", "200"), None)
        .await
        .unwrap()
    {
        Enqueued::Exists { same_request, .. } => assert!(!same_request),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        app.deployment.queue_stats().await.unwrap().depth(),
        1,
        "one job for E-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_holding_the_same_create_send_one_create() {
    // The first run's create is slow (the gateway commits, then answers after 600 ms, well
    // within a 20 s timeout even on a loaded machine); a redelivered copy runs meanwhile.
    let app = spawn_app_with(
        false,
        |c| c.faults = vec![fault("DUP", Some(1), FaultAction::Slow { ms: 600 })],
        &[
            ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "20s"),
            ("TARSPAY_ORPHAN_TIMEOUT", "60s"),
        ],
    )
    .await;
    app.enqueue(inr("DUP-1", "100")).await;
    let ctx = app
        .deployment
        .job_context_for(&app.settings, "DUP-1")
        .unwrap();
    let first = {
        let ctx = ctx.clone();
        tokio::spawn(async move { run_create_payout(&ctx, "DUP-1", None).await.unwrap() })
    };
    // Wait until the first run holds the lease.
    let every = Duration::from_millis(5);
    poll(
        "the first run's lease",
        Duration::from_secs(60),
        every,
        || async {
            let record = app.deployment.order("DUP-1").await.unwrap().unwrap();
            (record.phase == Phase::Submitting)
                .then_some(())
                .ok_or(format!("({:?})", record.phase))
        },
    )
    .await;
    let second = run_create_payout(&ctx, "DUP-1", None).await.unwrap();
    assert!(
        matches!(second, Step::RetryAfter(_)),
        "the second holder backs off: {second:?}"
    );
    assert_eq!(first.await.unwrap(), Step::Done);
    // The copy, run again later, sees the order accepted: nothing to send, and no second
    // poll job (the one poll job was queued with the acceptance).
    assert_eq!(
        run_create_payout(&ctx, "DUP-1", None).await.unwrap(),
        Step::Done
    );
    assert_eq!(app.sandbox.create_attempts("DUP-1"), 1);
    assert_eq!(
        app.deployment.queue_stats().await.unwrap().delayed,
        1,
        "one poll job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_style_finalization_racing_polls_gives_one_outcome() {
    let app = spawn_app(false, |c| c.final_after = Duration::from_millis(50)).await;
    app.enqueue(inr("RACE-1", "100")).await;
    let ctx = app
        .deployment
        .job_context_for(&app.settings, "RACE-1")
        .unwrap();
    assert_eq!(
        run_create_payout(&ctx, "RACE-1", None).await.unwrap(),
        Step::Done
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let seen = app.deployment.order("RACE-1").await.unwrap().unwrap();
    let mut racers = Vec::new();
    for i in 0..10 {
        let ctx = ctx.clone();
        let seen = seen.clone();
        racers.push(tokio::spawn(async move {
            if i % 2 == 0 {
                run_poll_status(&ctx, "RACE-1", 1, false, None)
                    .await
                    .map(|_| ())
                    .unwrap();
            } else {
                // What a verified callback does: the same terminal transition.
                ctx.ledger
                    .finalize(
                        &seen,
                        Phase::Succeeded,
                        &FinalResult {
                            gateway_state: Some(2),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for racer in racers {
        racer.await.unwrap();
    }
    assert_eq!(app.deployment.outcome_count().await.unwrap(), 1);
    assert_eq!(
        app.deployment.order("RACE-1").await.unwrap().unwrap().phase,
        Phase::Succeeded
    );
}

/// Waits (hang guard only) until the systemic guard paused the payout queue.
async fn wait_paused(app: &TestApp) {
    eventually("the queue to pause", || async {
        app.deployment.is_paused().await.unwrap().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemic_guard_pauses_and_resume_continues() {
    let app = app_refusing_auth("K", 5003007, Some("IP error"), "3").await;
    for i in 0..8 {
        app.enqueue(inr(&format!("K-{i}"), "100")).await;
    }
    let pool = app.pool(1);
    // The third auth failure pauses the queue; from then on nothing new is sent or burned. A
    // create whose lease was taken before the pause (waiting for the one call slot) may still
    // go: it was in flight when the pause came.
    wait_paused(&app).await;
    let sent_by = |app: &TestApp| -> u32 {
        (0..8)
            .map(|i| app.sandbox.create_attempts(&format!("K-{i}")))
            .sum()
    };
    let sent_at_pause = sent_by(&app);
    let mut leased_at_pause = 0;
    for i in 0..8 {
        let record = app
            .deployment
            .order(&format!("K-{i}"))
            .await
            .unwrap()
            .unwrap();
        if record.phase == Phase::Submitting {
            leased_at_pause += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = sent_by(&app);
    assert!(sent >= 3, "the threshold's creates: {sent}");
    assert!(
        sent <= sent_at_pause + leased_at_pause,
        "after the pause, only creates leased before it: {sent} sent, {sent_at_pause} then and {leased_at_pause} leased"
    );
    assert_eq!(
        app.deployment.outcome_count().await.unwrap(),
        0,
        "the two before the threshold are held for a recheck, then by the pause; the one that tripped it is held"
    );

    // The operator fixes the IP binding and resumes: the rest are paid, the held one too.
    app.sandbox.set_faults(vec![]);
    app.deployment.resume().await.unwrap();
    let outcomes = app.wait_outcomes(8).await;
    pool.stop().await;
    assert_eq!(
        outcomes
            .values()
            .filter(|o| o.status == "succeeded")
            .count(),
        8,
        "a bad key burned no payout"
    );
}

/// One order refused with an auth-class code while others go through (not the merchant's
/// key: the guard does not trip): held once for a recheck, then failed on its second refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_auth_refusal_fails_after_one_recheck_without_pausing() {
    let app = app_refusing_auth("LONE", 5003007, Some("IP error"), "3").await;
    app.enqueue(inr("LONE-1", "100")).await;
    for i in 0..3 {
        app.enqueue(inr(&format!("OK-{i}"), "100")).await;
    }
    let pool = app.pool(2);
    let outcomes = app.wait_outcomes(4).await;
    pool.stop().await;
    let lone = &outcomes["LONE-1"];
    assert_eq!(lone.status, "failed");
    assert_eq!(lone.code, Some(5003007));
    assert_eq!(
        app.sandbox.create_attempts("LONE-1"),
        2,
        "one recheck, then failed"
    );
    assert!(!app.deployment.is_paused().await.unwrap());
    for i in 0..3 {
        assert_eq!(outcomes[&format!("OK-{i}")].status, "succeeded");
    }
}

/// A lone payout's acceptance (held in hand and alone in its batch, it is sent without the
/// script, as the guard's `DEL` and one `HSETNX`) clears the guard's count all the same:
/// refusals counted before it do not add up with later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_acceptance_clears_the_guard_count() {
    use redis::AsyncCommands;
    let app = spawn_app(false, |_| {}).await;
    let guard = app.partition("GP-1").ledger.keys().guard();
    let mut conn = app.redis.conn().await;
    let _: i64 = conn.sadd(&guard, "REFUSED-1").await.unwrap();
    app.enqueue(inr("GP-1", "100")).await;
    let pool = app.pool(1);
    let outcomes = app.wait_outcomes(1).await;
    pool.stop().await;
    assert_eq!(outcomes["GP-1"].status, "succeeded");
    let left: bool = conn.exists(&guard).await.unwrap();
    assert!(!left, "the count starts over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guard_pauses_again_at_once_if_resumed_too_early() {
    let app = app_refusing_auth("G", 5003008, None, "2").await;
    for i in 0..6 {
        app.enqueue(inr(&format!("G-{i}"), "100")).await;
    }
    let pool = app.pool(1);
    wait_paused(&app).await;
    let sent_before: u32 = (0..6)
        .map(|i| app.sandbox.create_attempts(&format!("G-{i}")))
        .sum();
    // Resumed while the key is still bad: the very next failure pauses again, burning nothing.
    app.deployment.resume().await.unwrap();
    eventually("a second pause", || async {
        let sent: u32 = (0..6)
            .map(|i| app.sandbox.create_attempts(&format!("G-{i}")))
            .sum();
        (sent > sent_before && app.deployment.is_paused().await.unwrap()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pool.stop().await;
    assert_eq!(
        app.deployment.outcome_count().await.unwrap(),
        0,
        "no order failed: the first refusal is held for a recheck, the rest by the pause"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_create_may_exist_is_never_failed_on_a_lookup() {
    // Every create is dropped unanswered: the gateway may or may not hold the order. The
    // settle window is long, so its absence is never proven here.
    let app = spawn_app_with(
        false,
        |c| c.faults = vec![fault("AMB", None, FaultAction::Drop)],
        &[("TARSPAY_SETTLE_WINDOW", "1h")],
    )
    .await;
    app.enqueue(inr("AMB-1", "100")).await;
    let pool = app.pool(1);
    let every = Duration::from_millis(50);
    let record = poll("7 attempts", Duration::from_secs(60), every, || async {
        let record = app.deployment.order("AMB-1").await.unwrap().unwrap();
        let attempts = record.attempts;
        (attempts >= 7)
            .then_some(record)
            .ok_or(format!("(stalled at {attempts})"))
    })
    .await;
    assert!(record.ambiguous);
    assert!(!record.phase.is_final(), "{record:?}");
    assert_eq!(
        app.deployment.outcome_count().await.unwrap(),
        0,
        "past max attempts, still no `failed`"
    );
    // Past the attempts no create is sent again: only lookups settle it. Once the gateway
    // shows the order (as if a dropped create had landed), it is adopted.
    let creates = app.sandbox.create_attempts("AMB-1");
    assert_eq!(creates, 5, "no create past the retry bound");
    assert!(app.sandbox.insert_payout(MCH_NO, "AMB-1", "100", "INR"));
    let outcomes = app.wait_outcomes(1).await;
    pool.stop().await;
    assert_eq!(outcomes["AMB-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("AMB-1"), creates);
    assert_eq!(app.sandbox.orders().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_code_after_the_order_was_created_is_checked_not_believed() {
    // The gateway creates the order but answers "channel error": a query finds it.
    let app = spawn_app(false, |c| {
        c.faults = vec![fault(
            "CH",
            Some(1),
            FaultAction::Http {
                status: 200,
                commit: true,
                body: Some(r#"{"code":5003013,"msg":"channel error"}"#.into()),
            },
        )]
    })
    .await;
    app.enqueue(inr("CH-1", "100")).await;
    let pool = app.pool(1);
    let outcomes = app.wait_outcomes(1).await;
    pool.stop().await;
    assert_eq!(outcomes["CH-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("CH-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_create_each_order_once() {
    let app = spawn_app(false, |_| {}).await;
    for i in 0..200 {
        app.enqueue(inr(&format!("MP-{i}"), "120")).await;
    }
    let mut a = app.worker_process(16);
    let mut b = app.worker_process(16);
    let outcomes = app.wait_outcomes(200).await;
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
    assert!(outcomes.values().all(|o| o.status == "succeeded"));
    for i in 0..200 {
        assert_eq!(app.sandbox.create_attempts(&format!("MP-{i}")), 1);
    }
    assert_eq!(app.sandbox.orders().len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_redis_is_down_waits_for_it_and_then_pays() {
    // A deploy during a Redis restart: the worker starts while nothing answers on the Redis
    // port (a listener that drops each connection at once stands in for it), keeps trying
    // instead of exiting, and pays the payout queued before once Redis is back.
    let mut app = spawn_app(false, |_| {}).await;
    app.enqueue(inr("LATE-REDIS-1", "100")).await;
    app.redis.stop();
    let port = app.redis.port();
    let down = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the Redis port");
    down.set_nonblocking(true).unwrap();
    let mut worker = app.worker_process(4);
    tokio::task::block_in_place(|| {
        common::redis_server::drop_connections(&down, 3, || {
            assert_eq!(
                worker.exited(),
                None,
                "the worker exited while Redis was down"
            );
        })
    });
    drop(down);
    tokio::task::block_in_place(|| app.redis.restart());
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["LATE-REDIS-1"].status, "succeeded");
    let code = tokio::task::block_in_place(|| worker.terminate_within(Duration::from_secs(60)));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_makes_at_most_concurrency_calls_at_once() {
    // Each create waits 400 ms at the gateway before the order is made. A worker process
    // holds more jobs than its concurrency (2), yet a third create is sent only once an
    // earlier one was answered: any three orders were made at least ~400 ms apart.
    let app = spawn_app(false, |c| {
        c.faults = vec![fault("SLOT", None, FaultAction::Latency { ms: 400 })];
    })
    .await;
    for i in 0..8 {
        app.enqueue(inr(&format!("SLOT-{i}"), "100")).await;
    }
    let mut worker = app.worker_process(2);
    let outcomes = app.wait_outcomes(8).await;
    assert_eq!(worker.terminate(), Some(0));
    assert!(outcomes.values().all(|o| o.status == "succeeded"));
    let mut made: Vec<u64> = app
        .sandbox
        .orders()
        .iter()
        .map(|order| order.created_at_us)
        .collect();
    made.sort_unstable();
    assert_eq!(made.len(), 8);
    for three in made.windows(3) {
        let spread_ms = (three[2] - three[0]) / 1_000;
        assert!(
            spread_ms >= 350,
            "three creates in flight at once: made within {spread_ms} ms ({made:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_is_replaced_and_no_order_is_created_twice() {
    // Every create takes 300 ms at the gateway, so the kill lands mid-batch with creates in flight.
    let app = spawn_app(false, |c| {
        c.faults = vec![FaultRule {
            prefix: "KILL".into(),
            endpoint: Endpoint::CreatePayout,
            times: None,
            action: FaultAction::Latency { ms: 300 },
        }];
    })
    .await;
    for i in 0..120 {
        app.enqueue(inr(&format!("KILL-{i}"), "100")).await;
    }
    let mut doomed = app.worker_process(16);
    eventually("the first worker's progress", || async {
        (app.sandbox.orders().len() >= 20).then_some(())
    })
    .await;
    doomed.kill();
    let finished_before = app.deployment.outcome_count().await.unwrap();
    assert!(finished_before < 120, "the kill happened mid-batch");
    let _rescuer = app.worker_process(16);
    let outcomes = app.wait_outcomes(120).await;
    assert!(
        outcomes.values().all(|o| o.status == "succeeded"),
        "{:?}",
        outcomes.values().find(|o| o.status != "succeeded")
    );
    for i in 0..120 {
        assert_eq!(
            app.sandbox.create_attempts(&format!("KILL-{i}")),
            1,
            "KILL-{i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_nothing() {
    let mut app = spawn_app(true, |c| c.final_after = Duration::from_millis(300)).await;
    for i in 0..100 {
        app.enqueue(inr(&format!("RR-{i}"), "100")).await;
    }
    let _worker = app.worker_process(8);
    eventually("progress before the restart", || async {
        (app.sandbox.orders().len() >= 10).then_some(())
    })
    .await;
    app.redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.redis.restart();
    let outcomes = app.wait_outcomes(100).await;
    assert!(outcomes.values().all(|o| o.status == "succeeded"));
    assert_eq!(app.sandbox.orders().len(), 100);
    for i in 0..100 {
        assert_eq!(app.sandbox.create_attempts(&format!("RR-{i}")), 1, "RR-{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_the_merchant_created_are_followed_to_their_outcome() {
    use std::collections::BTreeMap;
    use tarspay_worker::gateway::types::CreateDeposit;
    use tarspay_worker::money::Amount;
    let app = spawn_app(false, |c| {
        c.outcomes = vec![outcome_rule("EXP", 6)];
    })
    .await;
    let client = app.deployment.job_contexts(&app.settings).unwrap()[0]
        .client
        .clone();
    for id in ["DEP-1", "EXP-1"] {
        client
            .create_deposit(&CreateDeposit {
                mch_order_no: id.into(),
                way_code: "CASHIER".into(),
                amount: Amount::parse("250").unwrap(),
                currency: "MYR".into(),
                notify_url: "http://127.0.0.1:9/n".into(),
                fields: BTreeMap::new(),
            })
            .await
            .unwrap();
        assert_eq!(
            app.producer
                .track_deposit(
                    &id.parse().unwrap(),
                    &Amount::parse("250").unwrap(),
                    &"MYR".parse().unwrap()
                )
                .await
                .unwrap(),
            Enqueued::Queued
        );
    }
    let pool = app.pool(2);
    let outcomes = app.wait_outcomes(2).await;
    pool.stop().await;
    assert_eq!(
        (
            outcomes["DEP-1"].kind.as_str(),
            outcomes["DEP-1"].status.as_str()
        ),
        ("deposit", "succeeded")
    );
    assert_eq!(
        (
            outcomes["EXP-1"].status.as_str(),
            outcomes["EXP-1"].gateway_state
        ),
        ("expired", Some(6))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_creates_and_leaves_the_rest_claimable() {
    // Each create takes 2 s at the gateway, so SIGTERM lands with the first process's 4
    // creates in flight (its 4 call slots) and more of its jobs waiting for a slot. The
    // grace period is far longer than that, so even a loaded machine finishes them in it.
    let app = spawn_app_with(
        false,
        |c| {
            c.faults = vec![FaultRule {
                prefix: "TERM".into(),
                endpoint: Endpoint::CreatePayout,
                times: None,
                action: FaultAction::Latency { ms: 2_000 },
            }];
        },
        // Calls wait 2 s for their answer; none times out.
        &[
            ("TARSPAY_SHUTDOWN_GRACE", "30s"),
            ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "5s"),
            ("TARSPAY_ORPHAN_TIMEOUT", "8s"),
        ],
    )
    .await;
    for i in 0..40 {
        app.enqueue(inr(&format!("TERM-{i}"), "100")).await;
    }
    let creates_sent = || -> u32 {
        (0..40)
            .map(|i| app.sandbox.create_attempts(&format!("TERM-{i}")))
            .sum()
    };
    let mut first = app.worker_process(4);
    eventually("a create to start", || async {
        (creates_sent() > 0).then_some(())
    })
    .await;
    assert_eq!(
        first.terminate(),
        Some(0),
        "a clean exit within the grace period"
    );
    // No slot came free before SIGTERM (each create takes 2 s), and the jobs that waited
    // for one gave them back unstarted: only the first 4 creates were sent.
    let sent = creates_sent();
    assert!(
        (1..=4).contains(&sent),
        "{sent} creates sent by a process with 4 call slots"
    );
    // Nothing is left held by the stopped process: the unsent creates are back in the
    // queue, beside the poll jobs of the accepted ones.
    let stats = app.deployment.queue_stats().await.unwrap();
    assert_eq!(stats.pending, 0, "{stats:?}");
    assert_eq!(stats.waiting + stats.delayed, 40, "{stats:?}");
    // Every create that reached the gateway was recorded: nothing was left mid-call.
    for i in 0..40 {
        let id = format!("TERM-{i}");
        let phase = app.deployment.order(&id).await.unwrap().unwrap().phase;
        assert_ne!(
            phase,
            Phase::Submitting,
            "{id} left holding the submit lease"
        );
        if app.sandbox.order(&id).is_some() {
            assert!(
                phase == Phase::Accepted || phase.is_final(),
                "{id}: {phase}"
            );
        }
    }
    // The rest, given back, are taken at once by a process with a slot for each.
    let _second = app.worker_process(40);
    let outcomes = app.wait_outcomes(40).await;
    assert!(outcomes.values().all(|o| o.status == "succeeded"));
    for i in 0..40 {
        assert_eq!(app.sandbox.create_attempts(&format!("TERM-{i}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acceptance_after_we_failed_the_order_raises_the_alarm_and_a_correction() {
    let metrics = tarspay_worker::metrics::install();
    let app = spawn_app(false, |_| {}).await;
    app.enqueue(inr("LATE-1", "100")).await;
    let ctx = app
        .deployment
        .job_context_for(&app.settings, "LATE-1")
        .unwrap();
    let ledger = app.deployment.ledger_of("LATE-1");
    // One run fails the order itself while holding the lease...
    ledger
        .begin_submit("LATE-1", "run-a", Duration::from_secs(30))
        .await
        .unwrap();
    let seen = ledger.get("LATE-1").await.unwrap().unwrap();
    let failed = FinalResult {
        code: Some(5004006),
        ..Default::default()
    };
    assert_eq!(
        ledger
            .finalize_leased(&seen, "run-a", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::Recorded
    );
    // ...and a run that outlived its lease records the gateway's acceptance afterwards: the
    // gateway holds the order and pays it.
    assert!(app.sandbox.insert_payout(MCH_NO, "LATE-1", "100", "INR"));
    let poll = ctx.poll_job(&seen).unwrap();
    ledger
        .accept("LATE-1", Some("P-LATE"), Some(&poll))
        .await
        .unwrap();
    let alarms = || {
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("tarspay_accepted_after_failed_total "))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let before = alarms();
    // The order's poll job follows it until the gateway says how it ended.
    let mut attempt = 1;
    while run_poll_status(&ctx, "LATE-1", attempt, false, None)
        .await
        .unwrap()
        != Step::Done
    {
        assert!(attempt < 200, "the gateway never finished LATE-1");
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(alarms(), before + 1, "the alarm counter moved once");
    // The first outcome stands, and one correction says the payout was made.
    let outcomes = app.outcomes().await;
    let events: Vec<_> = outcomes
        .iter()
        .map(|o| {
            (
                o.event.as_str(),
                o.status.as_str(),
                o.previous_status.map(|s| s.as_str()),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("final", "failed", None),
            ("correction", "succeeded", Some("failed"))
        ]
    );
    let record = ledger.get("LATE-1").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Failed);
    assert_eq!(record.corrections.len(), 1);
    assert_eq!(record.corrections[0].status, "succeeded");
    // Polls and looks repeat it: nothing more is appended.
    for once in [false, true] {
        assert_eq!(
            run_poll_status(&ctx, "LATE-1", 1, once, None)
                .await
                .unwrap(),
            Step::Done
        );
    }
    assert_eq!(ledger.outcome_count().await.unwrap(), 2);
}

/// A query answer is read by what it says, not by the sandbox's shape: one without the order
/// number (some gateways leave it out) finishes the order; one naming another order is not
/// about ours, and the order waits for a better answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_answer_without_the_number_counts_and_one_about_another_order_does_not() {
    let raw = |body: &str| FaultAction::Raw { body: body.into() };
    let app = spawn_app(false, |c| {
        c.faults = vec![
            common::fault_rule(
                "NONO-",
                Endpoint::QueryPayout,
                None,
                raw(r#"{"code":0,"msg":"SUCCESS","data":{"payOrderId":"P1","state":2}}"#),
            ),
            common::fault_rule(
                "ELSE-",
                Endpoint::QueryPayout,
                None,
                raw(
                    r#"{"code":0,"msg":"SUCCESS","data":{"mchOrderNo":"SOMEONE-ELSE","payOrderId":"P2","state":3}}"#,
                ),
            ),
        ];
    })
    .await;
    for id in ["NONO-1", "ELSE-1"] {
        app.enqueue(inr(id, "100")).await;
        let ctx = app.deployment.job_context_for(&app.settings, id).unwrap();
        run_create_payout(&ctx, id, None).await.unwrap();
        assert_eq!(
            app.deployment.order(id).await.unwrap().unwrap().phase,
            Phase::Accepted
        );
    }
    let poll = |id: &'static str| {
        let ctx = app.deployment.job_context_for(&app.settings, id).unwrap();
        async move { run_poll_status(&ctx, id, 1, false, None).await.unwrap() }
    };
    assert_eq!(poll("NONO-1").await, Step::Done);
    let record = app.deployment.order("NONO-1").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Succeeded);

    assert_ne!(poll("ELSE-1").await, Step::Done);
    let record = app.deployment.order("ELSE-1").await.unwrap().unwrap();
    assert_eq!(
        record.phase,
        Phase::Accepted,
        "another order's failure is not ours"
    );
    let ledger = app.deployment.ledger_of("ELSE-1");
    ledger.flush_noted("ELSE-1").await.unwrap();
    let events = ledger.events("ELSE-1").await.unwrap();
    let query = events
        .iter()
        .rev()
        .find(|e| e.kind == EventKind::Query)
        .unwrap();
    let msg = query.msg.as_deref().unwrap_or_default();
    assert!(msg.contains(r#"about order "SOMEONE-ELSE""#), "{msg}");
    assert_eq!(app.deployment.outcome_count().await.unwrap(), 1);
}

/// A query that fails before another create leaves the order's last error as the create's:
/// that is what a `failed` outcome would report, and a busy query is not why a payout failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lookup_keeps_the_creates_error_on_the_order() {
    let app = spawn_app(false, |c| {
        let create_502 = |prefix| {
            fault(
                prefix,
                Some(1),
                FaultAction::Http {
                    status: 502,
                    commit: false,
                    body: None,
                },
            )
        };
        c.faults = vec![
            create_502("LQ-"),
            common::fault_rule(
                "LQ-",
                Endpoint::QueryPayout,
                None,
                FaultAction::Code {
                    code: -1,
                    msg: Some("system busy".into()),
                },
            ),
            create_502("LR-"),
            common::fault_rule(
                "LR-",
                Endpoint::QueryPayout,
                None,
                FaultAction::Http {
                    status: 429,
                    commit: false,
                    body: None,
                },
            ),
        ];
    })
    .await;
    // The next run asks the gateway first, and the query fails (LQ), or is refused for its
    // rate before anything happened (LR: nothing sent, the attempt given back).
    for id in ["LQ-1", "LR-1"] {
        app.enqueue(inr(id, "100")).await;
        let ctx = app.deployment.job_context_for(&app.settings, id).unwrap();
        assert_ne!(run_create_payout(&ctx, id, None).await.unwrap(), Step::Done);
        let after_create = app.deployment.order(id).await.unwrap().unwrap();
        assert_eq!(after_create.phase, Phase::Unknown, "a 502 may have landed");
        let create_msg = after_create.last_msg.clone().unwrap();
        assert!(create_msg.contains("502"), "{create_msg}");
        assert_ne!(run_create_payout(&ctx, id, None).await.unwrap(), Step::Done);
        let record = app.deployment.order(id).await.unwrap().unwrap();
        assert_eq!(record.phase, Phase::Unknown, "{id}");
        assert_eq!(
            (record.last_code, record.last_msg.as_deref()),
            (after_create.last_code, Some(create_msg.as_str())),
            "{id}"
        );
        assert_eq!(app.sandbox.create_attempts(id), 1, "{id}: no second create");
    }
}

/// The stream entry of `id`'s job, if its job is in the stream.
async fn stream_entry_of(app: &TestApp, id: &str) -> Option<String> {
    let queue = &app.partition(id).queue;
    let mut conn = queue.connection();
    let read: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&queue.keys().stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    read.ids.into_iter().find_map(|entry| {
        let envelope: String = entry.get("e")?;
        envelope
            .contains(&format!("\"mchOrderNo\":\"{id}\""))
            .then_some(entry.id)
    })
}

/// A worker told to stop fetches nothing more while it finishes the jobs it has: a job queued
/// during its drain stays where it was, never delivered (before, the fetch loop ran until the
/// drain ended, took it, and gave it back at the end as a new entry; past the grace it would
/// have waited for the orphan timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_fetches_nothing_during_its_drain() {
    let app = spawn_app_with(
        false,
        |c| {
            c.faults = vec![fault(
                "DRAIN-SLOW",
                None,
                FaultAction::Latency { ms: 4_000 },
            )]
        },
        &[
            ("TARSPAY_SHUTDOWN_GRACE", "30s"),
            ("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "10s"),
            ("TARSPAY_ORPHAN_TIMEOUT", "30s"),
        ],
    )
    .await;
    app.enqueue(inr("DRAIN-SLOW-1", "100")).await;
    let mut worker = app.worker_process(4);
    eventually("the slow create in flight", || async {
        let record = app.deployment.order("DRAIN-SLOW-1").await.unwrap()?;
        (record.phase == Phase::Submitting).then_some(())
    })
    .await;
    worker.signal("TERM");
    // Longer than a blocking read (500 ms): one that was waiting when the drain began may
    // still bring what arrives meanwhile, and gives it back at the end.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    app.enqueue(inr("DRAIN-LATE-1", "100")).await;
    let entry = stream_entry_of(&app, "DRAIN-LATE-1").await.expect("queued");
    let exit = eventually("the worker's exit", || std::future::ready(worker.exited())).await;
    assert_eq!(exit, Some(0), "a clean exit");
    // The slow job was finished in the drain; the late one was never taken.
    assert_eq!(app.sandbox.create_attempts("DRAIN-SLOW-1"), 1);
    assert_eq!(app.sandbox.create_attempts("DRAIN-LATE-1"), 0);
    assert_eq!(
        stream_entry_of(&app, "DRAIN-LATE-1").await.as_deref(),
        Some(entry.as_str()),
        "the same entry, never delivered and given back"
    );
    let stats = app.partition("DRAIN-LATE-1").queue.stats().await.unwrap();
    assert_eq!((stats.waiting, stats.pending), (1, 0));
}

/// A run that stalled until too little of its submit lease was left for the call (frozen, a
/// paused VM) does not send its create: that is not an attempt, so a worker's stalls alone
/// never use a payout's attempts up and fail a payout that was never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_stopped_before_it_left_is_not_an_attempt() {
    let app = spawn_app(false, |_| {}).await;
    app.enqueue(inr("NS-1", "100")).await;
    let mut ctx = app
        .deployment
        .job_context_for(&app.settings, "NS-1")
        .unwrap();
    // Shorter than any call: every create is stopped before it leaves, as after a stall.
    ctx.lease = Duration::from_millis(1);
    ctx.retry.max_attempts = 2;
    for run in 0..4 {
        let step = run_create_payout(&ctx, "NS-1", None).await.unwrap();
        assert!(matches!(step, Step::RetryAfter(_)), "run {run}: {step:?}");
    }
    let record = app.deployment.order("NS-1").await.unwrap().unwrap();
    assert_eq!(record.attempts, 0, "{record:?}");
    assert!(!record.phase.is_final(), "{record:?}");
    assert_eq!(app.sandbox.create_attempts("NS-1"), 0);
}
