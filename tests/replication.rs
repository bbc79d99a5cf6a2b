//! Failover safety with `TARSPAY_REDIS_MIN_REPLICAS`: a registration counts, and a create is
//! sent, only once a replica confirmed the write. A frozen replica (SIGSTOP: connected, but
//! confirming nothing) makes enqueues fail as "not yet" and holds creates back, without a
//! create reaching the gateway; once it thaws, everything completes with one create each.

mod common;

use common::app::{inr, spawn_app_with};
use common::redis_server::RedisServer;
use redis::AsyncCommands;
use tarspay_worker::ledger::LedgerError;
use tarspay_worker::producer::{Enqueued, ProducerError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_count_only_once_a_replica_confirmed_them() {
    let app = spawn_app_with(
        false,
        |_| {},
        &[
            ("TARSPAY_REDIS_MIN_REPLICAS", "1"),
            ("TARSPAY_REDIS_REPLICA_TIMEOUT", "200ms"),
        ],
    )
    .await;
    let port = app.redis.port().to_string();
    let replica = RedisServer::start_with(false, &["--replicaof", "127.0.0.1", &port]);
    let primary = app.redis.conn().await;
    common::replica_in_sync(&primary).await;

    // Healthy replica: the pipeline runs as usual.
    let pool = app.pool(4);
    app.enqueue(inr("REP-1", "100.00")).await;
    app.wait_outcomes(1).await;

    // Frozen replica: the registration reaches the primary but is not confirmed.
    replica.signal("STOP");
    let err = app
        .producer
        .enqueue_json(&inr("REP-2", "100.00"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProducerError::Ledger(LedgerError::Unreplicated { wanted: 1, .. })
        ),
        "{err}"
    );
    // The worker found its job on the primary, took the lease, saw it unconfirmed and gave it
    // back without sending a create.
    let order_key = app.partition("REP-2").ledger.keys().order("REP-2");
    common::eventually("a lease given back unconfirmed", || {
        let mut primary = primary.clone();
        let key = order_key.clone();
        async move {
            let msg: Option<String> = primary.hget(&key, "lastMsg").await.ok()?;
            msg.filter(|m| m.contains("replicas")).map(|_| ())
        }
    })
    .await;
    assert_eq!(app.sandbox.create_attempts("REP-2"), 0, "nothing sent");

    // Thawed: the retried enqueue finds the order, and the create goes once.
    replica.signal("CONT");
    let again = common::eventually("the enqueue confirmed", || async {
        app.producer
            .enqueue_json(&inr("REP-2", "100.00"), None)
            .await
            .ok()
    })
    .await;
    assert!(
        matches!(
            again,
            Enqueued::Exists {
                same_request: true,
                ..
            }
        ),
        "{again:?}"
    );
    let outcomes = app.wait_outcomes(2).await;
    assert_eq!(outcomes["REP-2"].status.as_str(), "succeeded");
    assert_eq!(app.sandbox.create_attempts("REP-2"), 1);
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_refusing_writes_for_want_of_replicas_queues_nothing_and_recovers() {
    let app = spawn_app_with(false, |_| {}, &[]).await;
    let mut primary = app.redis.conn().await;
    // Redis' own guard: with no replica attached, every write is refused (NOREPLICAS).
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("min-replicas-to-write")
        .arg("1")
        .query_async(&mut primary)
        .await
        .unwrap();
    let err = app
        .producer
        .enqueue_json(&inr("NOREP-1", "100.00"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOREPLICAS"), "{err}");
    let order_key = app.partition("NOREP-1").ledger.keys().order("NOREP-1");
    let exists: bool = primary.exists(&order_key).await.unwrap();
    assert!(!exists, "nothing registered");

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("min-replicas-to-write")
        .arg("0")
        .query_async(&mut primary)
        .await
        .unwrap();
    let pool = app.pool(2);
    let queued = app
        .producer
        .enqueue_json(&inr("NOREP-1", "100.00"), None)
        .await
        .unwrap();
    assert_eq!(queued, Enqueued::Queued);
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["NOREP-1"].status.as_str(), "succeeded");
    assert_eq!(app.sandbox.create_attempts("NOREP-1"), 1);
    pool.stop().await;
}
