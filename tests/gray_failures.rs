//! The one rule under gray failures: frozen workers, lost work, lagging gateways. Real
//! redis-server, real sandbox over loopback HTTP, real worker processes and signals.

mod common;

use common::app::{inr, spawn_app_with};
use common::{eventually, fault_rule, gauge, violations, worker_metrics};
use redis::AsyncCommands;
use std::time::Duration;
use tarspay_sandbox::{Endpoint, FaultAction};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_sees_an_order_whose_job_was_deleted_and_the_lifeline_repairs_it() {
    let metrics = tarspay_worker::metrics::install();
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_LIFELINE_INTERVAL", "1s")]).await;
    for id in ["KEEP-1", "KEEP-2", "LOST-1"] {
        app.enqueue(inr(id, "100")).await;
    }
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["phases"]["queued"], 3);

    // An operator deletes LOST-1's job by hand.
    let keys = app.partition("LOST-1").queue.keys().clone();
    let mut conn = app.partition("LOST-1").queue.connection();
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&keys.stream).await.unwrap();
    let lost: Vec<String> = entries
        .ids
        .iter()
        .filter(|e| {
            matches!(e.map.get("e"), Some(redis::Value::BulkString(b))
                if String::from_utf8_lossy(b).contains("LOST-1"))
        })
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(lost.len(), 1);
    let _: i64 = conn.xdel(&keys.stream, &lost).await.unwrap();

    let (code, report) = app.audit();
    assert_eq!(code, 1, "{report}");
    let found = violations(&report);
    assert_eq!(found.len(), 1, "{report}");
    assert!(
        found[0].contains("order_without_work") && found[0].contains("LOST-1"),
        "{report}"
    );

    // A running worker's lifeline gives it a job again; every order ends once.
    let repairs = || {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("tarspay_lifeline_repairs_total "))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let before = repairs();
    let pool = app.pool(4);
    let outcomes = app.wait_outcomes(3).await;
    pool.stop().await;
    assert_eq!(outcomes["LOST-1"].status, "succeeded");
    assert_eq!(app.sandbox.create_attempts("LOST-1"), 1);
    assert_eq!(repairs(), before + 1);
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["phases"]["succeeded"], 3);
    assert_eq!(report["outcomeEntries"], 3);
}

/// What the lifeline does inside a worker process is visible at that worker's `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_shows_its_lifeline_repairs_at_its_metrics_endpoint() {
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_LIFELINE_INTERVAL", "1s")]).await;
    app.enqueue(inr("LOST-9", "100")).await;
    let keys = app.partition("LOST-9").queue.keys().clone();
    let mut conn = app.partition("LOST-9").queue.connection();
    let _: i64 = conn.del(&keys.stream).await.unwrap();
    let (worker, addr) = app.worker_process_with_metrics(2);
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["LOST-9"].status, "succeeded");
    let text = worker_metrics(&addr, "the worker's metrics", |text| {
        text.contains("tarspay_lifeline_repairs_total")
    })
    .await;
    drop(worker);
    assert!(
        text.lines()
            .any(|l| l == "tarspay_lifeline_repairs_total 1"),
        "{text}"
    );
    assert!(text.contains("tarspay_orders_without_work"), "{text}");
    assert!(text.contains("tarspay_jobs_total"), "{text}");
}

/// A payout job that finishes is acknowledged by the ledger step that writes its last effect
/// (the acceptance, the final state a poll found), not by a settlement of its own: the
/// worker's counters show as many jobs acknowledged that way as jobs done, none dropped as
/// stale (which a second, settler's acknowledgement of each would be), and nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_acknowledges_each_finished_payout_job_in_its_ledger_step() {
    // Every poll queued as a job of its own, so that both kinds of job are acknowledged by a
    // ledger step and every poll is promoted (first polls in hand: tests/polls_in_hand.rs).
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_POLL_IN_HAND", "false")]).await;
    let ids: Vec<String> = (0..12).map(|i| format!("STEP-{i}")).collect();
    for id in &ids {
        app.enqueue(inr(id, "100")).await;
    }
    let (worker, addr) = app.worker_process_with_metrics(4);
    let outcomes = app.wait_outcomes(ids.len()).await;
    assert!(
        outcomes.values().all(|o| o.status == "succeeded"),
        "{outcomes:?}"
    );
    let (_, report) = app.audit();
    assert_eq!(report["polledInHand"], 0, "holds are off: {report}");
    let counter = |text: &str, name: &str, labels: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // A create and a final poll per payout; the job counter moves just after the step.
    let text = worker_metrics(&addr, "every finished job counted", |text| {
        counter(text, "tarspay_jobs_total{", "result=\"done\"") >= 2 * ids.len() as u64
    })
    .await;
    drop(worker);
    let done = counter(&text, "tarspay_jobs_total{", "result=\"done\"");
    assert_eq!(done, 2 * ids.len() as u64, "{text}");
    assert_eq!(
        counter(&text, "tarspay_queue_acked_in_step_total", ""),
        done,
        "{text}"
    );
    assert_eq!(
        counter(&text, "tarspay_queue_stale_settlements_total", ""),
        0,
        "{text}"
    );
    // Every gateway call slot came back.
    let slots_in_use: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tarspay_call_slots_in_use "))
        .collect();
    assert_eq!(slots_in_use, ["tarspay_call_slots_in_use 0"], "{text}");
    // Each payout's poll was delayed: the passes that promoted them (one observation per
    // pass that moved jobs) are in the lateness histogram.
    let passes = gauge(&text, "tarspay_queue_promotion_lateness_seconds_count")
        .expect("the promotion lateness histogram");
    assert!(passes >= 1.0, "{text}");
    for id in &ids {
        let partition = app.partition(id);
        let keys = partition.queue.keys().clone();
        let mut conn = partition.queue.connection();
        let pending: redis::streams::StreamPendingReply =
            conn.xpending(&keys.stream, &keys.group).await.unwrap();
        assert_eq!(pending.count(), 0, "{id}'s partition");
    }
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

/// An order whose only job was given up into the dead stream is an operator's call: the
/// audit reports it, the lifeline leaves it, and `dead retry` brings it home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_job_is_dead_is_reported_not_repaired() {
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_LIFELINE_INTERVAL", "1s")]).await;
    app.enqueue(inr("DEAD-1", "100")).await;
    // Bury the job by hand, as an exhausted one would be.
    let partition = app.partition("DEAD-1");
    let keys = partition.queue.keys().clone();
    let mut conn = partition.queue.connection();
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&keys.stream).await.unwrap();
    assert_eq!(entries.ids.len(), 1);
    let entry = &entries.ids[0];
    let Some(redis::Value::BulkString(envelope)) = entry.map.get("e") else {
        panic!("no envelope in {entry:?}");
    };
    let _: String = conn
        .xadd(
            &keys.dead,
            "*",
            &[
                ("e", envelope.as_slice()),
                ("reason", b"attempts exhausted (test)".as_slice()),
                ("worker", b"test".as_slice()),
                ("at", b"0".as_slice()),
            ],
        )
        .await
        .unwrap();
    let _: i64 = conn.xdel(&keys.stream, &[&entry.id]).await.unwrap();

    let (code, report) = app.audit();
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["violations"][0]["violation"], "order_without_work");
    assert_eq!(report["violations"][0]["deadJobs"], 1, "{report}");

    let pool = app.pool(2);
    // Several sweep intervals pass: nothing is re-queued behind the operator's back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(app.deployment.outcome_count().await.unwrap(), 0);
    assert_eq!(app.deployment.queue_stats().await.unwrap().dead, 1);
    let dead = partition.queue.list_dead(None, 10).await.unwrap();
    assert!(
        partition
            .queue
            .requeue_dead(&dead[0].dead_id)
            .await
            .unwrap()
    );
    let outcomes = app.wait_outcomes(1).await;
    pool.stop().await;
    assert_eq!(outcomes["DEAD-1"].status, "succeeded");
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_mid_create_past_its_lease_and_takeover_breaks_nothing() {
    // FRZ-1's create is committed by the gateway, whose answer then takes 800 ms: the worker
    // is frozen (SIGSTOP) while it waits, for longer than the orphan timeout (3 s) and the
    // submit lease (3 x 1 s + 10 s).
    let app = spawn_app_with(
        false,
        |c| {
            c.faults = vec![fault_rule(
                "FRZ",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Slow { ms: 800 },
            )]
        },
        &[],
    )
    .await;
    let frozen = app.worker_process(4);
    app.enqueue(inr("FRZ-1", "100")).await;
    eventually("the gateway holds FRZ-1", || async {
        app.sandbox.order("FRZ-1").is_some().then_some(())
    })
    .await;
    frozen.signal("STOP");
    for i in 0..5 {
        app.enqueue(inr(&format!("OK-{i}"), "100")).await;
    }
    // Another worker takes the entry over (its lease is still held: a retry), then, once the
    // lease has expired, looks the order up and adopts it.
    let pool = app.pool(4);
    let outcomes = app.wait_outcomes(6).await;
    assert_eq!(outcomes["FRZ-1"].status, "succeeded");
    // The frozen worker wakes up and carries on with its stale run.
    frozen.signal("CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pool.stop().await;
    drop(frozen);

    assert_eq!(app.sandbox.create_attempts("FRZ-1"), 1, "one create");
    assert_eq!(app.sandbox.orders().len(), 6);
    let all = app.outcomes().await;
    assert_eq!(all.len(), 6, "one outcome each, nothing more: {all:?}");
    for outcome in &all {
        let gateway = app.sandbox.order(&outcome.mch_order_no).unwrap();
        assert_eq!(outcome.gateway_state, Some(gateway.state), "{outcome:?}");
    }
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
    assert_eq!(report["liveJobs"], 0, "{report}");
}

/// A gateway that loses the answer to a committed create, whose lookups lag its writes, and
/// that refuses a repeated create for balance, key or IP before its duplicate check: no order
/// the gateway holds is ever reported `failed`. Orders it never got are failed, but only once
/// its "no such order" was repeated over the settle window, and a first create refused
/// outright still fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_lookups_and_refused_repeats_never_fail_an_order_the_gateway_holds() {
    use Endpoint::{CreatePayout, QueryPayout};
    let refusal = |code: i64| FaultAction::RefuseRepeat { code, msg: None };
    let app = spawn_app_with(
        false,
        |c| {
            c.final_after = Duration::from_millis(300);
            let mut faults = Vec::new();
            for prefix in ["LAG", "BAL", "KEY", "IP"] {
                faults.push(fault_rule(
                    prefix,
                    CreatePayout,
                    Some(1),
                    FaultAction::CommitThenDrop,
                ));
                faults.push(fault_rule(
                    prefix,
                    QueryPayout,
                    None,
                    FaultAction::LookupLag { ms: 1_500 },
                ));
            }
            faults.push(fault_rule("BAL", CreatePayout, None, refusal(5004006)));
            faults.push(fault_rule("KEY", CreatePayout, None, refusal(5003006)));
            faults.push(fault_rule("IP", CreatePayout, None, refusal(5003007)));
            // Never reaches the gateway, every time: only repeated absence may fail it.
            faults.push(fault_rule("GONE", CreatePayout, None, FaultAction::Drop));
            // A first create refused for balance: nothing can exist, failed at once.
            faults.push(fault_rule(
                "POOR",
                CreatePayout,
                None,
                FaultAction::Code {
                    code: 5004006,
                    msg: Some("balance insufficient".into()),
                },
            ));
            c.faults = faults;
        },
        &[("TARSPAY_SETTLE_WINDOW", "3s")],
    )
    .await;
    let mut ids = Vec::new();
    for prefix in ["LAG", "BAL", "KEY", "IP", "GONE", "POOR"] {
        for i in 0..3 {
            let id = format!("{prefix}-{i}");
            app.enqueue(inr(&id, "100")).await;
            ids.push(id);
        }
    }
    let pool = app.pool(8);
    let outcomes = app.wait_outcomes(ids.len()).await;
    pool.stop().await;

    for id in &ids {
        let outcome = &outcomes[id];
        match app.sandbox.order(id) {
            Some(held) => {
                assert_eq!(outcome.status, "succeeded", "{id} is held: {outcome:?}");
                assert_eq!(outcome.gateway_state, Some(held.state), "{id}");
                assert_eq!(
                    outcome.pay_order_id.as_deref(),
                    Some(held.pay_order_id.as_str())
                );
            }
            None => assert_eq!(outcome.status, "failed", "{id}: {outcome:?}"),
        }
    }
    for prefix in ["LAG", "BAL", "KEY", "IP"] {
        for i in 0..3 {
            assert!(app.sandbox.order(&format!("{prefix}-{i}")).is_some());
        }
    }
    for i in 0..3 {
        let gone = &outcomes[&format!("GONE-{i}")];
        assert!(app.sandbox.order(&format!("GONE-{i}")).is_none());
        let record = app
            .deployment
            .order(&format!("GONE-{i}"))
            .await
            .unwrap()
            .unwrap();
        assert!(record.ambiguous, "dropped creates may have landed");
        assert!(gone.attempts > 5, "lookups after the last create: {gone:?}");
        assert_eq!(app.sandbox.create_attempts(&format!("GONE-{i}")), 5);
        let poor = &outcomes[&format!("POOR-{i}")];
        assert_eq!(
            (poor.status.as_str(), poor.code, poor.attempts),
            ("failed", Some(5004006), 1)
        );
    }
    // Nothing was paused by the key and IP refusals of repeats.
    assert!(!app.deployment.queue_stats().await.unwrap().paused);
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

/// Workers whose wall clocks are ten minutes fast and slow (libfaketime) pay like the others:
/// their nonces come from the Redis server's clock (a gateway refuses nonces far from its own
/// as signature errors, which would trip the systemic guard), and their retries and polls are
/// due on the server's clock (no attempt burned early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_with_skewed_clocks_pay_like_the_others() {
    let Some(lib) = common::faketime::libfaketime() else {
        eprintln!("SKIPPED: faketime is not installed (.ci/run installs it)");
        return;
    };
    let lib = lib.display().to_string();
    let app = spawn_app_with(
        false,
        |c| {
            c.faults = vec![fault_rule(
                "SYS",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Code {
                    code: -1,
                    msg: None,
                },
            )]
        },
        &[],
    )
    .await;
    let skew = |offset: &'static str| {
        [
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
    };
    let fast = app.worker_process_with(4, &skew("+10m"));
    let slow = app.worker_process_with(4, &skew("-10m"));
    let mut ids = Vec::new();
    for i in 0..10 {
        for prefix in ["OK", "SYS"] {
            let id = format!("{prefix}-{i}");
            app.enqueue(inr(&id, "100")).await;
            ids.push(id);
        }
    }
    let outcomes = app.wait_outcomes(ids.len()).await;
    drop((fast, slow));
    for id in &ids {
        assert_eq!(outcomes[id].status, "succeeded", "{id}: {:?}", outcomes[id]);
        let expected = if id.starts_with("SYS") { 2 } else { 1 };
        assert_eq!(app.sandbox.create_attempts(id), expected, "{id}");
        assert_eq!(outcomes[id].attempts, expected, "{id}: no attempt burned");
    }
    assert!(!app.deployment.queue_stats().await.unwrap().paused);
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}
