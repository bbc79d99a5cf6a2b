//! The local Redis Cluster against real redis-server processes (redis-server and redis-cli on
//! PATH): a one-node cluster refuses cross-slot commands; a 3+3 cluster routes every key to the
//! master `master_of_slot` names, fails over on request, and replaces a killed or a paused master.

use std::time::{Duration, Instant};

use local_redis::{LocalCluster, Role};

fn connect(url: &str) -> redis::Connection {
    let con = redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .expect("connect");
    con.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    con
}

fn keyslot(con: &mut redis::Connection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(con)
        .expect("CLUSTER KEYSLOT")
}

#[test]
fn single_node_is_ok_and_refuses_cross_slot() {
    let cluster = LocalCluster::single_node().expect("single-node cluster");
    let urls = cluster.urls();
    assert_eq!(urls.len(), 1);
    assert_eq!(cluster.seeds(), urls[0]);
    let mut con = connect(&urls[0]);
    let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_slots_ok:16384"), "{info}");

    let err = redis::cmd("MSET")
        .arg(&["{a}x", "1", "{b}y", "2"])
        .query::<()>(&mut con)
        .expect_err("a cross-slot MSET must be refused");
    assert_eq!(err.code(), Some("CROSSSLOT"), "{err}");
    // The same command within one slot passes.
    redis::cmd("MSET")
        .arg(&["{a}x", "1", "{a}y", "2"])
        .query::<()>(&mut con)
        .expect("same-slot MSET");

    let nodes = cluster.nodes();
    assert_eq!(nodes[0].role, Some(Role::Master));
    assert_eq!(nodes[0].id.len(), 40);
    assert_eq!(cluster.master_of_slot(0), Some(0));
    assert_eq!(cluster.master_of_slot(16383), Some(0));
}

#[test]
fn three_masters_route_fail_over_and_replace_killed_and_paused_masters() {
    let started = Instant::now();
    let mut cluster = LocalCluster::start(3, 1).expect("3+3 cluster");
    eprintln!("formed in {:?}", started.elapsed());
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 6);
    let masters: Vec<usize> = nodes
        .iter()
        .filter(|n| n.role == Some(Role::Master))
        .map(|n| n.index)
        .collect();
    assert_eq!(masters.len(), 3, "{nodes:?}");
    for &m in &masters {
        assert_eq!(cluster.replicas_of(m).len(), 1, "master {m}");
    }
    assert_eq!(cluster.seeds().split(',').count(), 3);

    // Every slot is served, by a master, once.
    let ranges = cluster.slot_ranges().expect("slot map");
    let mut next = 0usize;
    for r in &ranges {
        assert_eq!(usize::from(r.first), next, "{ranges:?}");
        assert!(masters.contains(&r.master), "{r:?}");
        next = usize::from(r.last) + 1;
    }
    assert_eq!(next, 16384);

    // Keys land where master_of_slot says: that master takes them, another one answers MOVED
    // to it.
    let urls = cluster.urls();
    let mut any = connect(&urls[masters[0]]);
    for i in 0..30 {
        let key = format!("key:{i}");
        let slot = keyslot(&mut any, &key);
        let owner = cluster.master_of_slot(slot).expect("slot served");
        let mut con = connect(&urls[owner]);
        redis::cmd("SET")
            .arg(&key)
            .arg(i)
            .query::<()>(&mut con)
            .unwrap_or_else(|e| panic!("SET {key} (slot {slot}) on its master {owner}: {e}"));
        let other = masters.iter().copied().find(|&m| m != owner).unwrap();
        let err = redis::cmd("GET")
            .arg(&key)
            .query::<Option<String>>(&mut connect(&urls[other]))
            .expect_err("another master must redirect");
        assert_eq!(err.code(), Some("MOVED"), "{err}");
        let to = format!("127.0.0.1:{}", nodes[owner].port);
        assert_eq!(err.redirect_node(), Some((to.as_str(), slot)), "{err}");
    }

    // A requested failover swaps master and replica, keeping the data.
    let key = "failover:key";
    let slot = keyslot(&mut any, key);
    let master = cluster.master_of_slot(slot).unwrap();
    let replica = cluster.replicas_of(master)[0];
    redis::cmd("SET")
        .arg(key)
        .arg("before")
        .query::<()>(&mut connect(&urls[master]))
        .unwrap();
    let t = Instant::now();
    cluster.failover(replica).expect("failover");
    eprintln!("failover in {:?}", t.elapsed());
    assert_eq!(cluster.role(replica), Some(Role::Master));
    assert_eq!(cluster.role(master), Some(Role::Replica));
    assert_eq!(cluster.master_of_slot(slot), Some(replica));
    assert_eq!(cluster.replicas_of(replica), vec![master]);
    let got: Option<String> = redis::cmd("GET")
        .arg(key)
        .query(&mut connect(&urls[replica]))
        .unwrap();
    assert_eq!(got.as_deref(), Some("before"));

    // A killed master is replaced by its replica (the former master), with a write that
    // reached the replica before the crash.
    let mut con = connect(&urls[replica]);
    redis::cmd("SET")
        .arg(key)
        .arg("acked")
        .query::<()>(&mut con)
        .unwrap();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(1000).query(&mut con).unwrap();
    assert_eq!(acked, 1);
    drop(con);
    cluster.kill(replica).expect("kill");
    assert!(cluster.nodes()[replica].pid.is_none());
    let t = Instant::now();
    cluster
        .wait_promoted(replica, Duration::from_secs(15))
        .expect("a replica of the killed master takes over");
    eprintln!("killed master replaced in {:?}", t.elapsed());
    assert_eq!(cluster.role(master), Some(Role::Master));
    assert_eq!(cluster.master_of_slot(slot), Some(master));
    let got: Option<String> = redis::cmd("GET")
        .arg(key)
        .query(&mut connect(&urls[master]))
        .unwrap();
    assert_eq!(got.as_deref(), Some("acked"));

    // A paused (hung) master is replaced too, and comes back as a replica once resumed.
    let hung = masters
        .iter()
        .copied()
        .find(|&m| m != master && m != replica);
    let hung = hung.expect("a third master");
    let its_replica = cluster.replicas_of(hung);
    cluster.pause(hung).expect("pause");
    assert!(cluster.nodes()[hung].paused);
    assert_eq!(cluster.role(hung), None);
    let t = Instant::now();
    cluster
        .wait_promoted(hung, Duration::from_secs(15))
        .expect("a replica of the paused master takes over");
    eprintln!("paused master replaced in {:?}", t.elapsed());
    assert_eq!(cluster.role(its_replica[0]), Some(Role::Master));
    cluster.resume(hung).expect("resume");
    cluster
        .wait_ok(Duration::from_secs(10))
        .expect("ok with the resumed node");
    assert_eq!(cluster.role(hung), Some(Role::Replica));
    assert_eq!(cluster.replicas_of(its_replica[0]), vec![hung]);
    eprintln!("whole test {:?}", started.elapsed());
}
