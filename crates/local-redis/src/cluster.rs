//! A private Redis Cluster on free loopback ports, one temporary directory per node, for tests
//! that need slots, redirections and failovers (never a shared Redis). Every node is killed, and
//! its directory removed, on drop. Fault helpers pause, kill and fail over nodes and wait until
//! the cluster serves every slot again.
//!
//! Everything is synchronous and every call to a node carries a timeout, so a paused node
//! (SIGSTOP) can never hang the caller.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::LocalRedisError;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;
/// How long a node has to answer a TCP connect: loopback, so short.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a node has to answer a command; a paused node runs into this, never forever.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long starting and forming a cluster, or a failover, may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// What a node currently is, asked live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
}

/// One node as seen now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its position in `urls()`; the index every fault helper takes.
    pub index: usize,
    pub port: u16,
    pub url: String,
    /// `None` once killed.
    pub pid: Option<u32>,
    /// Its cluster node id (`CLUSTER MYID`, stable for its lifetime).
    pub id: String,
    /// Stopped with SIGSTOP and not resumed yet.
    pub paused: bool,
    /// Asked live (`INFO replication`); `None` when killed, paused or not answering.
    pub role: Option<Role>,
    /// Its temporary directory (`nodes.conf`), removed when the cluster drops.
    pub dir: PathBuf,
}

/// A contiguous range of slots and the node serving it, as one live node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    /// Index of the master serving the range.
    pub master: usize,
}

struct ClusterNode {
    child: Option<Child>,
    port: u16,
    /// The cluster bus port.
    bus: u16,
    url: String,
    id: String,
    paused: bool,
    /// Its replicas when it was last paused or killed: `wait_promoted` looks for one of them,
    /// since once promoted they no longer show as its replicas.
    replicas_at_fault: Vec<usize>,
    dir: tempfile::TempDir,
}

impl ClusterNode {
    /// Running and not paused: the nodes that can be asked anything.
    fn live(&self) -> bool {
        self.child.is_some() && !self.paused
    }
}

pub struct LocalCluster {
    nodes: Vec<ClusterNode>,
}

impl LocalCluster {
    /// Starts `masters * (1 + replicas_per_master)` nodes, forms a cluster with `redis-cli
    /// --cluster create` (which needs at least 3 masters) and waits until every node sees all
    /// slots served and every replica is in sync with its master.
    pub fn start(masters: usize, replicas_per_master: usize) -> Result<Self, LocalRedisError> {
        if masters < 3 {
            return Err(LocalRedisError::Cluster(format!(
                "{masters} masters asked; redis-cli --cluster create needs at least 3 (single_node gives a one-node cluster)"
            )));
        }
        let count = masters * (1 + replicas_per_master);
        let cluster = Self::spawn(count)?;
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LocalRedisError::CliNotInstalled(e.to_string()),
                _ => LocalRedisError::Setup(format!("cannot run redis-cli: {e}")),
            })?;
        if !output.status.success() {
            let mut said = String::from_utf8_lossy(&output.stdout).into_owned();
            said.push_str(&String::from_utf8_lossy(&output.stderr));
            return Err(LocalRedisError::Cluster(format!(
                "redis-cli --cluster create failed ({}): {}",
                output.status,
                tail(&said, 800)
            )));
        }
        cluster.wait_until("formed", SETUP_TIMEOUT, || {
            cluster.check(Some((masters, count - masters)))
        })?;
        Ok(cluster)
    }

    /// One cluster-enabled node serving all 16384 slots: cheap, and it still refuses
    /// cross-slot commands (CROSSSLOT) like a real cluster.
    pub fn single_node() -> Result<Self, LocalRedisError> {
        let cluster = Self::spawn(1)?;
        let port = cluster.nodes[0].port;
        connect(port)
            .and_then(|mut con| {
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(0)
                    .arg(SLOTS - 1)
                    .query::<()>(&mut con)
            })
            .map_err(|e| LocalRedisError::Cluster(format!("CLUSTER ADDSLOTSRANGE: {e}")))?;
        cluster.wait_until("formed", SETUP_TIMEOUT, || cluster.check(Some((1, 0))))?;
        Ok(cluster)
    }

    /// Starts `count` cluster-enabled, empty nodes and waits until each answers and tells its
    /// id. On error the nodes started so far are killed (drop).
    fn spawn(count: usize) -> Result<Self, LocalRedisError> {
        // Client and bus ports are chosen together, all distinct: the default bus port
        // (port + 10000) could be taken, even by another node's client port.
        let ports = free_ports(2 * count)?;
        let mut cluster = Self {
            nodes: Vec::with_capacity(count),
        };
        for pair in ports.chunks_exact(2) {
            let (port, bus) = (pair[0], pair[1]);
            let dir = tempfile::tempdir().map_err(|e| LocalRedisError::Setup(e.to_string()))?;
            let child = launch(port, bus, dir.path())?;
            cluster.nodes.push(ClusterNode {
                child: Some(child),
                port,
                bus,
                url: format!("redis://127.0.0.1:{port}/"),
                id: String::new(),
                paused: false,
                replicas_at_fault: Vec::new(),
                dir,
            });
        }
        let deadline = Instant::now() + SETUP_TIMEOUT;
        for node in &mut cluster.nodes {
            loop {
                if let Some(child) = node.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    node.child = None;
                    return Err(LocalRedisError::Setup(format!(
                        "redis-server on port {} exited at start ({status}); is the port taken, or is it older than 7.0 (--cluster-port)?",
                        node.port
                    )));
                }
                if let Ok(id) = connect(node.port)
                    .and_then(|mut con| redis::cmd("CLUSTER").arg("MYID").query::<String>(&mut con))
                {
                    node.id = id;
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LocalRedisError::NoAnswer);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// `redis://127.0.0.1:PORT/` of every node, in index order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// Comma-separated URLs of the nodes now serving slots (every node if none answers): the
    /// seed list for a cluster client setting such as `TARSPAY_REDIS_URL`.
    pub fn seeds(&self) -> String {
        let mut masters: Vec<usize> = self
            .slot_ranges()
            .map(|ranges| ranges.iter().map(|r| r.master).collect())
            .unwrap_or_default();
        masters.sort_unstable();
        masters.dedup();
        if masters.is_empty() {
            masters = (0..self.nodes.len()).collect();
        }
        masters
            .iter()
            .map(|&i| self.nodes[i].url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node with its role asked now (paused and killed nodes are not asked).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, node)| NodeInfo {
                index,
                port: node.port,
                url: node.url.clone(),
                pid: node.child.as_ref().map(Child::id),
                id: node.id.clone(),
                paused: node.paused,
                role: self.role(index),
                dir: node.dir.path().to_path_buf(),
            })
            .collect()
    }

    /// The role node `index` reports now; `None` when it is killed, paused or does not answer.
    pub fn role(&self, index: usize) -> Option<Role> {
        let node = self.nodes.get(index).filter(|n| n.live())?;
        let info = query_text(node.port, redis::cmd("INFO").arg("replication")).ok()?;
        match field(&info, "role") {
            Some("master") => Some(Role::Master),
            Some("slave") => Some(Role::Replica),
            _ => None,
        }
    }

    /// The slot map of the first live node that answers, as ranges in slot order.
    pub fn slot_ranges(&self) -> Option<Vec<SlotRange>> {
        let owners = self.any_view(|text| self.slot_owners(text))?;
        let mut ranges: Vec<SlotRange> = Vec::new();
        for (slot, owner) in owners.iter().enumerate() {
            let (Some(master), Ok(slot)) = (*owner, u16::try_from(slot)) else {
                continue;
            };
            match ranges.last_mut() {
                Some(r) if r.master == master && usize::from(r.last) + 1 == usize::from(slot) => {
                    r.last = slot;
                }
                _ => ranges.push(SlotRange {
                    first: slot,
                    last: slot,
                    master,
                }),
            }
        }
        Some(ranges)
    }

    /// Index of the master serving `slot`, as the first live node that answers sees it.
    pub fn master_of_slot(&self, slot: u16) -> Option<usize> {
        let owners = self.any_view(|text| self.slot_owners(text))?;
        owners.get(usize::from(slot)).copied().flatten()
    }

    /// Indices of the nodes replicating `master`, as the first live node that answers sees it
    /// (failed replicas included; empty when it is not a master).
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let Some(id) = self.nodes.get(master).map(|n| n.id.as_str()) else {
            return Vec::new();
        };
        self.any_view(|text| {
            let mut replicas: Vec<usize> = parse_nodes(text)
                .iter()
                .filter(|line| line.master_id == id)
                .filter_map(|line| self.index_of(line.id))
                .collect();
            replicas.sort_unstable();
            Ok(replicas)
        })
        .unwrap_or_default()
    }

    /// SIGSTOP: the node holds its connections but answers nothing, like a hung host. Its
    /// peers mark it failed after the node timeout (1 s) and promote a replica if it is a master.
    pub fn pause(&mut self, index: usize) -> Result<(), LocalRedisError> {
        let replicas = self.replicas_of(index);
        let node = self.running(index)?;
        if !node.paused {
            signal(node, "-STOP")?;
            node.paused = true;
            node.replicas_at_fault = replicas;
        }
        Ok(())
    }

    /// SIGCONT after `pause`: a master that was replaced meanwhile comes back as a replica.
    pub fn resume(&mut self, index: usize) -> Result<(), LocalRedisError> {
        let node = self.running(index)?;
        if node.paused {
            signal(node, "-CONT")?;
            node.paused = false;
        }
        Ok(())
    }

    /// Starts a killed node again on its ports and directory (its `nodes.conf` is there, its
    /// data is not: nodes keep nothing on disk), and waits until it answers. A master that
    /// was replaced rejoins as a replica of its successor and syncs from it.
    pub fn restart(&mut self, index: usize) -> Result<(), LocalRedisError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or(LocalRedisError::NoSuchNode(index))?;
        if node.child.is_some() {
            return Err(LocalRedisError::Cluster(format!(
                "node {index} is running; kill it first"
            )));
        }
        node.child = Some(launch(node.port, node.bus, node.dir.path())?);
        let deadline = Instant::now() + SETUP_TIMEOUT;
        while connect(node.port).is_err() {
            if Instant::now() >= deadline {
                return Err(LocalRedisError::NoAnswer);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILL, and reap it: a crash. Its directory stays until the cluster drops.
    pub fn kill(&mut self, index: usize) -> Result<(), LocalRedisError> {
        let replicas = self.replicas_of(index);
        let node = self.running(index)?;
        node.replicas_at_fault = replicas;
        node.paused = false;
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Moves `slot` and its keys from its master to master `to`, as `redis-cli --cluster
    /// reshard` does slot by slot: `IMPORTING` on the target, `MIGRATING` on the source, the
    /// keys moved `batch` at a time with `MIGRATE` (waiting `pause` between batches, so clients
    /// meet the slot half moved: `ASK` and `TRYAGAIN`), then `SETSLOT … NODE` on every master;
    /// waits until the cluster is ok. Returns the keys moved.
    pub fn migrate_slot(
        &self,
        slot: u16,
        to: usize,
        batch: usize,
        pause: Duration,
    ) -> Result<usize, LocalRedisError> {
        let from = self
            .master_of_slot(slot)
            .ok_or_else(|| LocalRedisError::Cluster(format!("no master serves slot {slot}")))?;
        let target = self.nodes.get(to).ok_or(LocalRedisError::NoSuchNode(to))?;
        if from == to {
            return Ok(0);
        }
        let source = &self.nodes[from];
        let step = |port: u16, cmd: &redis::Cmd, what: &str| {
            connect(port)
                .and_then(|mut con| cmd.query::<redis::Value>(&mut con))
                .map_err(|e| LocalRedisError::Cluster(format!("{what}: {e}")))
        };
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        step(target.port, &setslot("IMPORTING", &source.id), "IMPORTING")?;
        step(source.port, &setslot("MIGRATING", &target.id), "MIGRATING")?;
        let mut moved = 0;
        loop {
            let keys: Vec<String> = connect(source.port)
                .and_then(|mut con| {
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(batch.max(1))
                        .query(&mut con)
                })
                .map_err(|e| LocalRedisError::Cluster(format!("GETKEYSINSLOT: {e}")))?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(target.port)
                .arg("")
                .arg(0)
                .arg(5_000)
                .arg("KEYS")
                .arg(&keys);
            step(source.port, &migrate, "MIGRATE")?;
            moved += keys.len();
            std::thread::sleep(pause);
        }
        // The new owner first, then the old one, then everyone else (as redis-cli does).
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|i| *i != to && *i != from));
        for index in order {
            let node = &self.nodes[index];
            if node.live() && self.role(index) == Some(Role::Master) {
                step(node.port, &setslot("NODE", &target.id), "SETSLOT NODE")?;
            }
        }
        self.wait_ok(SETUP_TIMEOUT)?;
        Ok(moved)
    }

    /// `CLUSTER FAILOVER` on replica `index` (a coordinated switch, no write lost), then waits
    /// until it reports itself master and the cluster is ok again.
    pub fn failover(&self, replica: usize) -> Result<(), LocalRedisError> {
        let node = self
            .nodes
            .get(replica)
            .ok_or(LocalRedisError::NoSuchNode(replica))?;
        let port = node.port;
        if self.role(replica) != Some(Role::Replica) {
            return Err(LocalRedisError::Cluster(format!(
                "node {replica} is not an answering replica; CLUSTER FAILOVER needs one"
            )));
        }
        connect(port)
            .and_then(|mut con| redis::cmd("CLUSTER").arg("FAILOVER").query::<()>(&mut con))
            .map_err(|e| LocalRedisError::Cluster(format!("CLUSTER FAILOVER on {replica}: {e}")))?;
        let start = Instant::now();
        self.wait_until("failed over", SETUP_TIMEOUT, || match self.role(replica) {
            Some(Role::Master) => Ok(()),
            other => Err(format!("node {replica} reports {other:?}")),
        })?;
        self.wait_ok(SETUP_TIMEOUT.saturating_sub(start.elapsed()))
    }

    /// Waits until every live, unpaused node reports `cluster_state:ok` with all 16384 slots
    /// ok; all of them agree on the master of every slot and on who replicates whom, as each
    /// node says of itself; every such master is live and unpaused (so right after a pause or
    /// kill this waits for the failover); and every live replica has its master link up.
    pub fn wait_ok(&self, timeout: Duration) -> Result<(), LocalRedisError> {
        self.wait_until("ok", timeout, || self.check(None))
    }

    /// After `kill` or `pause` of a master: waits until one of the replicas it had then is a
    /// master and the cluster is ok (`wait_ok`).
    pub fn wait_promoted(
        &self,
        old_master: usize,
        timeout: Duration,
    ) -> Result<(), LocalRedisError> {
        let node = self
            .nodes
            .get(old_master)
            .ok_or(LocalRedisError::NoSuchNode(old_master))?;
        let candidates = if node.replicas_at_fault.is_empty() {
            self.replicas_of(old_master)
        } else {
            node.replicas_at_fault.clone()
        };
        if candidates.is_empty() {
            return Err(LocalRedisError::Cluster(format!(
                "node {old_master} has no replicas to promote"
            )));
        }
        self.wait_until("promoted", timeout, || {
            if !candidates
                .iter()
                .any(|&r| self.role(r) == Some(Role::Master))
            {
                return Err(format!(
                    "no replica of node {old_master} ({candidates:?}) is master yet"
                ));
            }
            self.check(None)
        })
    }

    fn running(&mut self, index: usize) -> Result<&mut ClusterNode, LocalRedisError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or(LocalRedisError::NoSuchNode(index))?;
        if node.child.is_none() {
            return Err(LocalRedisError::Cluster(format!("node {index} was killed")));
        }
        Ok(node)
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// `read` applied to `CLUSTER NODES` of the first live node that answers and parses.
    fn any_view<T>(&self, read: impl Fn(&str) -> Result<T, String>) -> Option<T> {
        self.nodes
            .iter()
            .filter(|n| n.live())
            .filter_map(|n| query_text(n.port, redis::cmd("CLUSTER").arg("NODES")).ok())
            .find_map(|text| read(&text).ok())
    }

    /// Slot → index of its master, from one node's `CLUSTER NODES`.
    fn slot_owners(&self, text: &str) -> Result<Vec<Option<usize>>, String> {
        let mut owners = vec![None; SLOTS];
        for line in parse_nodes(text) {
            if line.slots.is_empty() {
                continue;
            }
            let index = self
                .index_of(line.id)
                .ok_or_else(|| format!("unknown node {} serves slots", line.id))?;
            for &(first, last) in &line.slots {
                for owner in owners.iter_mut().take(last + 1).skip(first) {
                    *owner = Some(index);
                }
            }
        }
        Ok(owners)
    }

    /// Live node → index of the master it replicates (`None` for a master, and for nodes that
    /// are killed or paused), from one node's `CLUSTER NODES`.
    fn replication_links(&self, text: &str) -> Vec<Option<usize>> {
        let mut links = vec![None; self.nodes.len()];
        for line in parse_nodes(text) {
            if let Some(i) = self.index_of(line.id).filter(|&i| self.nodes[i].live()) {
                links[i] = self.index_of(line.master_id);
            }
        }
        links
    }

    /// Why the cluster is not ok yet, if it is not. With `expect = (masters, replicas)` (right
    /// after forming) also that every node knows every other and the roles add up.
    fn check(&self, expect: Option<(usize, usize)>) -> Result<(), String> {
        // The first view (slot owners, replication links) that every other must equal.
        type View = (Vec<Option<usize>>, Vec<Option<usize>>);
        let mut reference: Option<(usize, View)> = None;
        // Live node → the master port it says it replicates (`None`: it says it is a master).
        let mut says: Vec<(usize, Option<u16>)> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.live()) {
            let ask = |cmd: &mut redis::Cmd| {
                query_text(node.port, cmd)
                    .map_err(|e| format!("node {i} (port {}): {e}", node.port))
            };
            let info = ask(redis::cmd("CLUSTER").arg("INFO"))?;
            for (name, want) in [("cluster_state", "ok"), ("cluster_slots_ok", "16384")] {
                let got = field(&info, name).unwrap_or("?");
                if got != want {
                    return Err(format!("node {i} reports {name}:{got}"));
                }
            }
            if expect.is_some() {
                let known = field(&info, "cluster_known_nodes").unwrap_or("?");
                if known != self.nodes.len().to_string() {
                    return Err(format!(
                        "node {i} knows {known} nodes of {}",
                        self.nodes.len()
                    ));
                }
            }
            let text = ask(redis::cmd("CLUSTER").arg("NODES"))?;
            let owners = self.slot_owners(&text)?;
            if let Some(slot) = owners.iter().position(Option::is_none) {
                return Err(format!("node {i} sees slot {slot} unserved"));
            }
            if let Some(owner) = owners
                .iter()
                .flatten()
                .find(|&&o| !self.nodes.get(o).is_some_and(ClusterNode::live))
            {
                return Err(format!(
                    "node {i} sees slots served by node {owner}, which is down"
                ));
            }
            let view = (owners, self.replication_links(&text));
            match &reference {
                None => reference = Some((i, view)),
                Some((first, seen)) if seen.0 != view.0 => {
                    return Err(format!("nodes {first} and {i} disagree on the slot map"));
                }
                Some((first, seen)) if seen.1 != view.1 => {
                    return Err(format!(
                        "nodes {first} and {i} disagree on who replicates whom"
                    ));
                }
                Some(_) => {}
            }
            let replication = ask(redis::cmd("INFO").arg("replication"))?;
            match field(&replication, "role") {
                Some("master") => says.push((i, None)),
                Some("slave") => {
                    let link = field(&replication, "master_link_status").unwrap_or("?");
                    if link != "up" {
                        return Err(format!("replica {i} has its master link {link}"));
                    }
                    let port = field(&replication, "master_port").and_then(|p| p.parse().ok());
                    says.push((i, Some(port.unwrap_or(0))));
                }
                other => return Err(format!("node {i} reports role {other:?}")),
            }
        }
        let Some((first, (_, links))) = reference else {
            return Err("no node is running and unpaused".to_owned());
        };
        for &(i, master_port) in &says {
            let seen = links[i].map(|m| self.nodes[m].port);
            if seen != master_port {
                return Err(format!(
                    "node {i} replicates port {master_port:?} by its own account, {seen:?} as node {first} sees it"
                ));
            }
        }
        let replicas = says.iter().filter(|(_, m)| m.is_some()).count();
        if let Some(want) = expect
            && (says.len() - replicas, replicas) != want
        {
            return Err(format!(
                "{} masters and {replicas} replicas, expected {} and {}",
                says.len() - replicas,
                want.0,
                want.1
            ));
        }
        Ok(())
    }

    /// Polls `ready` until it passes or `timeout` ends; the error tells the last reason.
    fn wait_until(
        &self,
        what: &'static str,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<(), String>,
    ) -> Result<(), LocalRedisError> {
        let start = Instant::now();
        loop {
            match ready() {
                Ok(()) => return Ok(()),
                Err(last) if start.elapsed() >= timeout => {
                    return Err(LocalRedisError::NotReady {
                        what,
                        waited: start.elapsed(),
                        last,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if node.paused {
                let _ = signal(node, "-CONT");
                node.paused = false;
            }
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The temporary directories go with the nodes.
    }
}

/// Sends a signal with `kill` (no libc binding needed for a test helper).
/// One cluster node's `redis-server` on `port` (bus `bus`) in `dir`.
fn launch(port: u16, bus: u16, dir: &std::path::Path) -> Result<Child, LocalRedisError> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", "1000"])
        .args(["--cluster-port", &bus.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "noeviction"])
        // A replica's first full sync otherwise waits 5 s (7.0's diskless default) for more
        // replicas to share the transfer.
        .args(["--repl-diskless-sync-delay", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| LocalRedisError::NotInstalled(e.to_string()))
}

fn signal(node: &ClusterNode, sig: &str) -> Result<(), LocalRedisError> {
    let Some(pid) = node.child.as_ref().map(Child::id) else {
        return Ok(());
    };
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map_err(|e| LocalRedisError::Setup(format!("kill {sig} {pid}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(LocalRedisError::Setup(format!(
            "kill {sig} {pid}: {status}"
        )))
    }
}

/// `count` distinct free loopback ports: all listeners stay bound until every port is picked.
fn free_ports(count: usize) -> Result<Vec<u16>, LocalRedisError> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LocalRedisError::Setup(e.to_string()))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LocalRedisError::Setup(e.to_string()))
}

/// A connection whose connect, reads and writes all time out.
fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

fn query_text(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<String> {
    let mut con = connect(port)?;
    cmd.query(&mut con)
}

/// The value of `name:value` in an INFO-style reply.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// At most the last `max` bytes of `text` (on a char boundary), for error messages.
fn tail(text: &str, max: usize) -> &str {
    let text = text.trim();
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// One line of `CLUSTER NODES`.
struct NodeLine<'a> {
    id: &'a str,
    /// `-` for a master.
    master_id: &'a str,
    /// Inclusive slot ranges it serves (migration entries in brackets skipped).
    slots: Vec<(usize, usize)>,
}

/// `<id> <addr> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_nodes(text: &str) -> Vec<NodeLine<'_>> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let id = fields.next()?;
            let master_id = fields.nth(2)?;
            let slots = fields
                .skip(4)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| {
                    let (first, last) = s.split_once('-').unwrap_or((s, s));
                    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
                    (first <= last && last < SLOTS).then_some((first, last))
                })
                .collect();
            Some(NodeLine {
                id,
                master_id,
                slots,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 6000 [5461->-b2]
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-5999 6001-16383
c3 127.0.0.1:7002@17002 slave a1 0 1 1 connected
";
        let lines = parse_nodes(text);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].id, "a1");
        assert_eq!(lines[0].master_id, "-");
        assert_eq!(lines[0].slots, vec![(0, 5460), (6000, 6000)]);
        assert_eq!(lines[1].slots, vec![(5461, 5999), (6001, 16383)]);
        assert_eq!(lines[2].master_id, "a1");
        assert!(lines[2].slots.is_empty());
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert_eq!(field(info, "role"), Some("slave"));
        assert_eq!(field(info, "master_link_status"), Some("up"));
        assert_eq!(field(info, "master_link"), None);
    }
}
