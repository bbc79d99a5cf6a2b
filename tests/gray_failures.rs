//! The one rule under gray failures: frozen workers, lost work, lagging gateways. Real
//! redis-server, real sandbox over loopback HTTP, real worker processes and signals.

mod common;

use common::app::{inr, spawn_app_with};
use redis::AsyncCommands;
use std::time::Duration;
use tarspay_worker::sandbox::{Endpoint, FaultAction, FaultRule};

/// Polls `check` until it is true (hang guard only: never a timing assertion).
async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn violations(report: &serde_json::Value) -> Vec<String> {
    report["violations"]
        .as_array()
        .map(|all| all.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default()
}

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
    let keys = app.deployment.queue.keys().clone();
    let mut conn = app.deployment.queue.connection();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_mid_create_past_its_lease_and_takeover_breaks_nothing() {
    // FRZ-1's create is committed by the gateway, whose answer then takes 800 ms: the worker
    // is frozen (SIGSTOP) while it waits, for longer than the orphan timeout (3 s) and the
    // submit lease (3 x 1 s + 10 s).
    let app = spawn_app_with(
        false,
        |c| {
            c.faults = vec![FaultRule {
                prefix: "FRZ".into(),
                endpoint: Endpoint::CreatePayout,
                times: Some(1),
                action: FaultAction::Slow { ms: 800 },
            }]
        },
        &[],
    )
    .await;
    let frozen = app.worker_process(4);
    app.enqueue(inr("FRZ-1", "100")).await;
    eventually(
        "the gateway holds FRZ-1",
        Duration::from_secs(60),
        async || app.sandbox.order("FRZ-1").is_some(),
    )
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
