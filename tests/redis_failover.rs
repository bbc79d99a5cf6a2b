//! A single-node connection follows a failover: when the node behind the Redis URL is demoted
//! to a replica (it answers `READONLY`) or freezes (no answers), while the URL's address now
//! leads to the promoted replica, the connection is rebuilt and reaches the new primary.
//! redis-rs alone reconnects only when a connection drops: the old connection would stay on
//! the old node. The address switch is a TCP proxy here, as a virtual IP, a DNS name or a
//! proxy in front of Redis would be in production: connections made before the switch stay
//! on the old node, new ones reach the new.

mod common;

use common::redis_server::RedisServer;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarspay_worker::redis_conn::{RedisClient, RedisConn, Timeouts};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    response: Duration::from_millis(500),
};

/// A TCP proxy whose target can be switched; returns its address.
async fn switchable_proxy(target: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = *target.lock().unwrap();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    address
}

fn address_of(server: &RedisServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server.port))
}

/// A primary, its replica in sync, and a connection to the primary through a proxy the test
/// switches.
struct Pair {
    primary: RedisServer,
    replica: RedisServer,
    target: Arc<Mutex<SocketAddr>>,
    client: RedisClient,
    conn: RedisConn,
}

async fn pair() -> Pair {
    let primary = RedisServer::start(false);
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(false, &["--replicaof", "127.0.0.1", &port]);
    let target = Arc::new(Mutex::new(address_of(&primary)));
    let proxy = switchable_proxy(Arc::clone(&target)).await;
    let client = RedisClient::single(&format!("redis://{proxy}")).unwrap();
    let conn = client.connect(TIMEOUTS).unwrap();
    let mut admin = primary.conn().await;
    let before: Result<(), _> = redis::cmd("SET")
        .arg("before")
        .arg("1")
        .query_async(&mut conn.clone())
        .await;
    before.expect("the primary takes writes");
    common::replica_in_sync(&admin).await;
    let _: () = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(&mut admin)
        .await
        .map(|_: i64| ())
        .unwrap();
    Pair {
        primary,
        replica,
        target,
        client,
        conn,
    }
}

/// Promotes the replica and points the proxy at it.
async fn promote_replica(pair: &Pair) {
    let mut replica = pair.replica.conn().await;
    let () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut replica)
        .await
        .unwrap();
    *pair.target.lock().unwrap() = address_of(&pair.replica);
}

/// Makes the old primary a replica of the promoted one: writes on connections still made to
/// it answer `READONLY`.
async fn demote_old_primary(pair: &Pair) {
    let mut old = pair.primary.conn().await;
    let () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(pair.replica.port)
        .query_async(&mut old)
        .await
        .unwrap();
}

/// Writes through `conn` until one succeeds (at most 40 tries, 100 ms apart); the errors
/// seen before it.
async fn write_until_it_lands(conn: &RedisConn) -> Vec<String> {
    let mut errors = Vec::new();
    for _ in 0..40 {
        let written: Result<(), _> = redis::cmd("SET")
            .arg("after")
            .arg("1")
            .query_async(&mut conn.clone())
            .await;
        match written {
            Ok(()) => return errors,
            Err(err) => errors.push(err.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no write reached the new primary: {errors:?}");
}

async fn written_on(server: &RedisServer) -> Option<String> {
    let mut conn = server.conn().await;
    redis::cmd("GET")
        .arg("after")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_a_demoted_primary_moves_to_the_promoted_replica() {
    let pair = pair().await;
    promote_replica(&pair).await;
    demote_old_primary(&pair).await;

    let errors = write_until_it_lands(&pair.conn).await;
    assert!(
        errors
            .iter()
            .any(|err| err.to_lowercase().contains("read only replica")),
        "the first write went to the demoted node: {errors:?}"
    );
    assert!(
        errors.len() <= 2,
        "rebuilt at the first READONLY: {errors:?}"
    );
    assert_eq!(written_on(&pair.replica).await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_a_frozen_primary_moves_to_the_promoted_replica() {
    let pair = pair().await;
    pair.primary.signal("STOP");
    promote_replica(&pair).await;

    let errors = write_until_it_lands(&pair.conn).await;
    pair.primary.signal("CONT");
    assert!(
        errors.len() >= tarspay_worker::redis_conn::REBUILD_AFTER_TIMEOUTS as usize,
        "the writes timed out on the frozen node before the rebuild: {errors:?}"
    );
    assert!(
        errors
            .iter()
            .all(|err| err.to_lowercase().contains("timed out")),
        "{errors:?}"
    );
    assert_eq!(written_on(&pair.replica).await.as_deref(), Some("1"));
}

/// The ledger's batch script catches its operations' errors and answers them as data, so a
/// batch run on a demoted node is no `READONLY` reply: the ledger reports it, and its
/// connection moves too. With replicas to confirm its writes, the batch's `WAIT` is refused
/// on the demoted node, which fails the whole pipeline: that refusal moves it as well.
async fn the_ledger_follows_a_demotion(replicated: bool) {
    use tarspay_worker::ledger::{
        Ledger, LedgerKeys, NewOrder, OrderKind, Registered, Replication,
    };
    let pair = pair().await;
    let keys = tarspay_worker::queue::QueueKeys::new("ftest", "payouts").unwrap();
    let ledger_keys = || LedgerKeys::new("{ftest:payouts}", &keys);
    let mut probe: Option<RedisConn> = None;
    let ledger = if replicated {
        // Connected now, to the node that is still the primary.
        let batcher_conn = pair.client.connect(TIMEOUTS).unwrap();
        let () = redis::cmd("PING")
            .query_async(&mut batcher_conn.clone())
            .await
            .map(|_: String| ())
            .unwrap();
        probe = Some(batcher_conn.clone());
        Ledger::with_replicas(
            pair.conn.clone(),
            batcher_conn,
            ledger_keys(),
            Replication {
                replicas: 1,
                timeout: Duration::from_millis(200),
            },
        )
    } else {
        Ledger::new(pair.conn.clone(), ledger_keys())
    };
    let id = "F-1".parse().unwrap();
    let currency = "INR".parse().unwrap();
    let merchant = "default".parse().unwrap();
    let order = NewOrder {
        mch_order_no: &id,
        kind: OrderKind::Payout,
        fingerprint: "f1",
        amount: "100.00",
        currency: &currency,
        request: "{}",
        batch_id: None,
        merchant: &merchant,
    };
    promote_replica(&pair).await;
    demote_old_primary(&pair).await;

    let mut refusals = Vec::new();
    let registered = loop {
        match ledger.register(&order).await {
            Ok(registered) => break registered,
            Err(err) => refusals.push(err.to_string()),
        }
        assert!(refusals.len() < 40, "never registered: {refusals:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(registered, Registered::Created);
    match &probe {
        None => assert!(
            refusals.len() == 1 && refusals[0].contains("replica"),
            "refused once on the demoted node, then moved: {refusals:?}"
        ),
        // The demoted node's answer (its script cache emptied by its resync, and `WAIT`
        // refused) moved the batcher's connection before the ledger sent the batch again.
        Some(probe) => {
            let role: Vec<redis::Value> = redis::cmd("ROLE")
                .query_async(&mut probe.clone())
                .await
                .unwrap();
            assert_eq!(
                role.first(),
                Some(&redis::Value::BulkString(b"master".to_vec())),
                "the batcher's connection reaches the new primary ({refusals:?})"
            );
        }
    }
    // Read on the new primary (the old one follows it now, so it is there too).
    let on_new = Ledger::new(pair.replica.conn().await, ledger_keys());
    assert!(
        on_new.get("F-1").await.unwrap().is_some(),
        "the order is on the new primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_moves_to_the_promoted_replica_after_a_readonly_operation() {
    the_ledger_follows_a_demotion(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_ledger_moves_to_the_promoted_replica_after_its_wait_is_refused() {
    the_ledger_follows_a_demotion(true).await;
}

/// Commands queued behind slow ones on a healthy primary (here `WAIT`s for a replica that does
/// not exist, 300 ms each, as a batcher's `WAIT`s for lagging replicas queue one after
/// another) time out while the node still answers the ones before them: the connection is
/// kept. Only a node silent for a whole response timeout is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_behind_slow_commands_on_a_live_primary_keep_the_connection() {
    let primary = RedisServer::start(false);
    let client = RedisClient::single(&primary.url()).unwrap();
    let conn = client
        .connect(Timeouts {
            connect: Duration::from_secs(2),
            response: Duration::from_millis(1_000),
        })
        .unwrap();
    let () = redis::cmd("PING")
        .query_async(&mut conn.clone())
        .await
        .map(|_: String| ())
        .unwrap();
    let waits = (0..8).map(|_| {
        let mut conn = conn.clone();
        async move {
            let answered: Result<i64, _> = redis::cmd("WAIT")
                .arg(1)
                .arg(300)
                .query_async(&mut conn)
                .await;
            answered
        }
    });
    let answers = futures::future::join_all(waits).await;
    let timed_out = answers
        .iter()
        .filter(|answer| answer.as_ref().is_err_and(|err| err.is_timeout()))
        .count();
    assert!(
        timed_out >= 3,
        "the later WAITs timed out behind the earlier ones: {answers:?}"
    );
    assert_eq!(conn.generation(), 0, "the connection was rebuilt");
}
