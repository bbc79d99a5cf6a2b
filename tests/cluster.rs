//! The pipeline on Redis Cluster: local clusters of real `redis-server --cluster-enabled yes`
//! processes on free ports (`local_redis::LocalCluster`), worker processes pointed at their
//! seeds, partitions spread over the masters; and failovers, with and without lost writes.

mod common;

use common::app::{AppRedis, TestApp, inr, spawn_app_on};
use local_redis::LocalCluster;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// An app on `cluster` with `partitions` partitions. The nodes keep nothing on disk (their
/// durability here is replication), hence `redis_unsafe`.
async fn cluster_app(cluster: LocalCluster, partitions: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![
        ("TARSPAY_PARTITIONS", partitions),
        ("TARSPAY_REDIS_UNSAFE", "true"),
    ];
    env.extend_from_slice(extra);
    spawn_app_on(
        AppRedis::Cluster(cluster),
        |c| c.final_after = Duration::from_millis(300),
        &env,
    )
    .await
}

/// Keys each node holds (`DBSIZE`), by node index.
fn keys_per_node(cluster: &LocalCluster) -> Vec<u64> {
    cluster
        .urls()
        .iter()
        .map(|url| {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client
                .get_connection_with_timeout(Duration::from_secs(2))
                .unwrap();
            redis::cmd("DBSIZE").query(&mut conn).unwrap()
        })
        .collect()
}

/// Every outcome by mchOrderNo, after deduping by (mchOrderNo, event, status) as the README
/// tells consumers to; panics if an order has two different final outcomes.
async fn deduped_finals(app: &TestApp) -> HashMap<String, String> {
    let mut seen = HashSet::new();
    let mut finals = HashMap::new();
    for outcome in app.outcomes().await {
        let key = (
            outcome.mch_order_no.to_string(),
            outcome.event.to_string(),
            outcome.status.to_string(),
        );
        if seen.insert(key) && !outcome.is_correction() {
            let earlier =
                finals.insert(outcome.mch_order_no.to_string(), outcome.status.to_string());
            assert!(
                earlier.is_none(),
                "two different finals for {}",
                outcome.mch_order_no
            );
        }
    }
    finals
}

/// Enqueues payouts `{prefix}-0` … `{prefix}-{n-1}` of 100.00 INR; their ids.
async fn enqueue_payroll(app: &TestApp, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        app.enqueue(inr(id, "100.00")).await;
    }
    ids
}

/// Two worker processes of `concurrency` each, once a payroll is moving: returned after its
/// first outcomes.
async fn workers_in_flight(app: &TestApp, concurrency: usize) -> [common::app::WorkerProcess; 2] {
    let workers = [
        app.worker_process(concurrency),
        app.worker_process(concurrency),
    ];
    common::eventually("some payouts final", || async {
        (app.deployment.outcome_count().await.ok()? >= 10).then_some(())
    })
    .await;
    workers
}

/// Nothing lost or repeated: one outcome per payout and one create each, and a clean audit.
async fn assert_exactly_once(app: &TestApp, ids: &[String]) {
    let outcomes = app.outcomes().await;
    assert_eq!(
        outcomes.len(),
        ids.len(),
        "one outcome per payout, none repeated"
    );
    for id in ids {
        assert_eq!(
            app.sandbox.create_attempts(id),
            1,
            "{id}: one create, never repeated"
        );
    }
    let (code, report) = app.audit();
    assert_eq!(code, 0, "{report}");
}

async fn wait_final(app: &TestApp, ids: &[String]) {
    common::poll(
        "every payout final",
        Duration::from_secs(180),
        Duration::from_millis(200),
        || async {
            let finals = deduped_finals(app).await;
            let missing: Vec<&String> = ids.iter().filter(|id| !finals.contains_key(*id)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            // What the stragglers look like, for the failure message.
            let mut states = Vec::new();
            for id in missing.iter().take(3) {
                let record = app.deployment.order(id).await;
                states.push(format!("{id}: {record:?}"));
            }
            let dead = app.deployment.dead_count().await;
            let stats = app.deployment.queue_stats().await;
            Err(format!(
                "{} missing; dead jobs {dead:?}; queue {stats:?}; {}",
                missing.len(),
                states.join("; ")
            ))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payroll_runs_on_a_three_master_cluster_with_partitions_on_every_master() {
    let cluster = LocalCluster::start(3, 0).expect("a local cluster");
    let app = cluster_app(cluster, "6", &[]).await;
    let ids = enqueue_payroll(&app, "CL", 60).await;
    let workers = [app.worker_process(8), app.worker_process(8)];
    let outcomes = app.wait_outcomes(ids.len()).await;
    drop(workers);
    for id in &ids {
        assert_eq!(outcomes[id].status, "succeeded", "{id}");
        assert_eq!(app.sandbox.create_attempts(id), 1, "{id}");
    }
    let AppRedis::Cluster(cluster) = &app.redis else {
        unreachable!()
    };
    let spread = keys_per_node(cluster);
    assert!(
        spread.iter().all(|&keys| keys > 0),
        "keys per master: {spread:?}"
    );
    let (code, report) = app.audit();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["phases"]["succeeded"], 60, "{report}");
    // The CLI reads the cluster from its seeds and adds the partitions up.
    let (code, out, err) = common::run(app.command().arg("queue"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("waiting  0"), "{out}");
    let (code, out, err) = common::run(app.command().arg("outcomes"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 60, "{out}");
    // The README's recipe from another language reads every partition's stream too.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/outcomes_consumer.py");
    let output = std::process::Command::new("python3")
        .args([script, "--cluster", "--redis-url", &cluster.urls()[0]])
        .args(["--prefix", "apptest", "--group", "py", "--count", "60"])
        .output()
        .expect("python3 runs (.ci/run installs it with redis-py)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: HashSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let fields: HashMap<String, String> = serde_json::from_str(line).unwrap();
            fields["mchOrderNo"].clone()
        })
        .collect();
    assert_eq!(read, ids.iter().cloned().collect::<HashSet<_>>());
}

/// A process set to another number of partitions than the deployment was written with is
/// refused, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_partition_count_refuses_to_run() {
    let cluster = LocalCluster::single_node().expect("a one-node cluster");
    let app = cluster_app(cluster, "4", &[]).await;
    let output = app
        .command()
        .env("TARSPAY_PARTITIONS", "8")
        .args(["worker", "--concurrency", "2"])
        .output()
        .expect("run the worker");
    assert_eq!(output.status.code(), Some(2), "refused as an error");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("written with 4 partition(s)") && err.contains("TARSPAY_PARTITIONS=4"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_mid_payroll_loses_and_repeats_nothing() {
    let cluster = LocalCluster::start(3, 1).expect("a local cluster with replicas");
    let mut app = cluster_app(cluster, "6", &[("TARSPAY_REDIS_MIN_REPLICAS", "1")]).await;
    let mut ids = enqueue_payroll(&app, "PF", 45).await;
    let workers = workers_in_flight(&app, 8).await;
    // Every master hands over to its replica, one after another, while payouts move.
    let cluster = app.redis.cluster();
    let mut masters: Vec<usize> = cluster
        .slot_ranges()
        .expect("the slot map")
        .iter()
        .map(|range| range.master)
        .collect();
    masters.dedup();
    assert_eq!(masters.len(), 3, "{masters:?}");
    for master in masters {
        let replica = cluster.replicas_of(master)[0];
        cluster.failover(replica).expect("CLUSTER FAILOVER");
    }
    ids.extend(enqueue_payroll(&app, "PF-late", 45).await);
    wait_final(&app, &ids).await;
    drop(workers);
    assert_exactly_once(&app, &ids).await;
}

/// Outcome entries (partition, entry id) of the partitions whose keys live on `master`.
async fn entries_on(app: &TestApp, cluster_master: usize) -> HashSet<(usize, String)> {
    let mut entries = HashSet::new();
    let AppRedis::Cluster(cluster) = &app.redis else {
        unreachable!()
    };
    for partition in app.deployment.partitions() {
        let slot = tarspay_worker::partition::slot(&partition.ledger.keys().outcomes());
        if cluster.master_of_slot(slot) == Some(cluster_master)
            && let Ok(page) = partition.ledger.outcomes_after("0", 100_000).await
        {
            entries.extend(page.into_iter().map(|(id, _)| (partition.index, id)));
        }
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_lost_with_unreplicated_writes_pays_no_one_twice_and_misses_no_one() {
    let cluster = LocalCluster::start(3, 1).expect("a local cluster with replicas");
    let mut app = cluster_app(
        cluster,
        "6",
        &[
            ("TARSPAY_REDIS_MIN_REPLICAS", "1"),
            ("TARSPAY_REDIS_REPLICA_TIMEOUT", "300ms"),
        ],
    )
    .await;
    let ids = enqueue_payroll(&app, "LOSS", 300).await;
    let workers = workers_in_flight(&app, 4).await;
    // The replica of one master stops taking writes: what the master acknowledges from here
    // on exists only there. Once it holds outcomes its replica never saw, it dies and the
    // stale replica takes over.
    let master = app
        .redis
        .cluster()
        .master_of_slot(0)
        .expect("a master for slot 0");
    let replica = app.redis.cluster().replicas_of(master)[0];
    let before = entries_on(&app, master).await;
    app.redis
        .cluster()
        .pause(replica)
        .expect("SIGSTOP the replica");
    let unreplicated = common::eventually("outcomes only the master holds", || async {
        let now = entries_on(&app, master).await;
        let new: HashSet<_> = now.difference(&before).cloned().collect();
        (new.len() >= 5).then_some(new)
    })
    .await;
    app.redis
        .cluster()
        .kill(master)
        .expect("SIGKILL the master");
    app.redis
        .cluster()
        .resume(replica)
        .expect("SIGCONT the replica");
    app.redis
        .cluster()
        .wait_promoted(master, Duration::from_secs(30))
        .expect("the replica promoted");
    // The promoted master has no replica: with TARSPAY_REDIS_MIN_REPLICAS=1 its partitions
    // send no create (nothing it writes could be confirmed) until the old master comes back
    // as its replica.
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.redis
        .cluster()
        .restart(master)
        .expect("restart the old master");
    app.redis
        .cluster()
        .wait_ok(Duration::from_secs(30))
        .expect("the old master back as a replica");
    wait_final(&app, &ids).await;
    drop(workers);

    let finals = deduped_finals(&app).await;
    for id in &ids {
        assert_eq!(finals[id], "succeeded", "{id}");
        let order = app.sandbox.order(id).expect("the gateway holds the order");
        assert_eq!(order.amount, "100.00", "{id}");
    }
    assert_eq!(
        app.sandbox.orders().len(),
        ids.len(),
        "one gateway order per payout"
    );
    let creates: u32 = ids.iter().map(|id| app.sandbox.create_attempts(id)).sum();
    let after = entries_on(&app, master).await;
    let lost = unreplicated.difference(&after).count();
    eprintln!(
        "{lost} of {} outcomes seen on the old master were lost; {} outcome entries and {creates} creates for {} payouts",
        unreplicated.len(),
        app.outcomes().await.len(),
        ids.len()
    );
    let (code, report) = app.audit();
    assert_eq!(code, 0, "{report}");
}

/// Adding capacity moves slots between masters; a partition lives in one slot, so it moves
/// whole, and its clients meet `ASK`/`TRYAGAIN` while it is half moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_to_another_master_mid_payroll_loses_and_repeats_nothing() {
    let cluster = LocalCluster::start(3, 0).expect("a local cluster");
    let app = cluster_app(cluster, "3", &[]).await;
    let ids = enqueue_payroll(&app, "MV", 240).await;
    let workers = workers_in_flight(&app, 4).await;
    let partition = &app.deployment.partitions()[0];
    let slot = tarspay_worker::partition::slot(&partition.ledger.keys().outcomes());
    let AppRedis::Cluster(cluster) = &app.redis else {
        unreachable!()
    };
    let from = cluster
        .master_of_slot(slot)
        .expect("the partition's master");
    let to = (0..3)
        .find(|&i| i != from && cluster.role(i) == Some(local_redis::Role::Master))
        .expect("another master");
    // A few keys at a time, so jobs run while the slot is split between the two.
    let moved = cluster
        .migrate_slot(slot, to, 10, Duration::from_millis(20))
        .expect("the slot migrates");
    assert!(moved > 10, "{moved} keys moved");
    assert_eq!(cluster.master_of_slot(slot), Some(to));
    wait_final(&app, &ids).await;
    drop(workers);
    assert_exactly_once(&app, &ids).await;
}
