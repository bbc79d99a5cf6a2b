//! Bounded memory: final orders' records expire after the retention (a re-submission after it
//! is settled by the gateway's duplicate answer, never paid twice), batch memberships expire,
//! and the outcome stream is trimmed only below what every consumer group has read.

mod common;

use common::app::{inr, spawn_app_with};
use redis::AsyncCommands;
use std::time::Duration;
use tarspay_worker::ids::BatchId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_final_order_resubmitted_is_settled_by_the_gateway_not_paid_again() {
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_RETENTION", "2s")]).await;
    let pool = app.pool(4);
    let batch = BatchId::parse("ret-batch").unwrap();
    app.producer
        .enqueue_json(&inr("RET-1", "150.00"), Some(&batch))
        .await
        .unwrap();
    let first = app.wait_outcomes(1).await;
    assert_eq!(first["RET-1"].status.as_str(), "succeeded");
    let balance = app.sandbox.balance(common::app::MCH_NO).unwrap();

    let partition = app.partition("RET-1");
    let mut conn = partition.queue.connection();
    let order_key = partition.ledger.keys().order("RET-1");
    let ttl: i64 = conn.pttl(&order_key).await.unwrap();
    assert!(ttl > 0 && ttl <= 2_000, "final record's TTL {ttl} ms");
    let batch_ttl: i64 = conn
        .pttl(partition.ledger.keys().batch("ret-batch"))
        .await
        .unwrap();
    assert!(
        batch_ttl > 2_000 && batch_ttl <= 4_000,
        "batch membership's TTL {batch_ttl} ms"
    );

    common::eventually("the final record to expire", || {
        let mut conn = conn.clone();
        let key = order_key.clone();
        async move {
            let exists: bool = conn.exists(&key).await.ok()?;
            (!exists).then_some(())
        }
    })
    .await;

    // The same payout again: a new registration, whose create the gateway refuses as a
    // duplicate; the worker settles it from the gateway's record.
    app.enqueue(inr("RET-1", "150.00")).await;
    let outcomes = common::eventually("the second outcome", || async {
        let all = app.outcomes().await;
        (all.len() >= 2).then_some(all)
    })
    .await;
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(outcomes[1].mch_order_no.as_str(), "RET-1");
    assert_eq!(outcomes[1].status.as_str(), "succeeded");
    assert_eq!(
        outcomes[1].pay_order_id, outcomes[0].pay_order_id,
        "settled from the order the gateway already holds"
    );
    assert!(app.sandbox.create_attempts("RET-1") >= 2);
    assert_eq!(
        app.sandbox.balance(common::app::MCH_NO).unwrap(),
        balance,
        "paid once"
    );
    pool.stop().await;
    // Both `final` entries are in the stream; only the current registration's counts.
    let (code, report) = app.audit();
    assert_eq!(code, 0, "audit: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_trimmed_only_past_the_retention_and_below_every_groups_reading() {
    let app = spawn_app_with(false, |_| {}, &[("TARSPAY_RETENTION", "1s")]).await;
    let pool = app.pool(4);
    // Three orders of one partition: its stream is the one trimmed here.
    let ids = app.ids_in_partition_of("TRIM-1", 3);
    for id in &ids {
        app.enqueue(inr(id, "100.00")).await;
    }
    app.wait_outcomes(3).await;
    pool.stop().await;
    let partition = app.partition(&ids[0]);
    let ledger = &partition.ledger;
    let stream = ledger.keys().outcomes();
    let mut conn = partition.queue.connection();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("app")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Every entry is past the retention from here on.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(ledger.trim_outcomes().await.unwrap(), 0, "unread by `app`");

    let reader = conn.clone();
    let read = |count: usize| {
        let mut conn = reader.clone();
        let stream = stream.clone();
        async move {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("app")
                .arg("c1")
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut conn)
                .await
                .unwrap();
            reply.keys[0]
                .ids
                .iter()
                .map(|e| e.id.clone())
                .collect::<Vec<_>>()
        }
    };
    let first = read(1).await;
    assert_eq!(
        ledger.trim_outcomes().await.unwrap(),
        0,
        "read but not acknowledged"
    );
    let _: i64 = conn.xack(&stream, "app", &first).await.unwrap();
    assert_eq!(
        ledger.trim_outcomes().await.unwrap(),
        1,
        "only the acked one"
    );

    let rest = read(10).await;
    assert_eq!(rest.len(), 2);
    let _: i64 = conn.xack(&stream, "app", &rest).await.unwrap();
    // A handle with a longer retention trims nothing that young.
    let patient = ledger
        .clone()
        .with_retention(Some(Duration::from_secs(3600)));
    assert_eq!(
        patient.trim_outcomes().await.unwrap(),
        0,
        "within retention"
    );
    assert_eq!(ledger.trim_outcomes().await.unwrap(), 2);
    let left: u64 = conn.xlen(&stream).await.unwrap();
    assert_eq!(left, 0);
}
