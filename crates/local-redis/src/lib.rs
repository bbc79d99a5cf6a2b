//! A private `redis-server` in a temporary directory on a free loopback port, for the demo, the
//! benchmarks and the tests (never the shared Redis). Killed, and its directory removed, on
//! drop. Tests also stop it gracefully, crash it and restart it on the same port and directory.
//! [`LocalCluster`] does the same for a Redis Cluster, with fault helpers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cluster;

pub use cluster::{LocalCluster, NodeInfo, Role, SlotRange};

#[derive(Debug, thiserror::Error)]
pub enum LocalRedisError {
    #[error(
        "redis-server is not on PATH ({0}); install it (Debian/Ubuntu: apt-get install redis-server, macOS: brew install redis) or point TARSPAY_REDIS_URL at a Redis"
    )]
    NotInstalled(String),
    #[error("cannot prepare a private redis-server: {0}")]
    Setup(String),
    #[error("the private redis-server did not answer within 20 s")]
    NoAnswer,
    #[error(
        "redis-cli is not on PATH ({0}); it ships with redis-server (Debian/Ubuntu: apt-get install redis-tools, macOS: brew install redis)"
    )]
    CliNotInstalled(String),
    #[error("local Redis Cluster: {0}")]
    Cluster(String),
    #[error("the private redis-server did not answer a query: {0}")]
    Query(String),
    #[error("the local Redis Cluster has no node {0}")]
    NoSuchNode(usize),
    #[error("the local Redis Cluster was not {what} after {waited:?}: {last}")]
    NotReady {
        what: &'static str,
        waited: Duration,
        last: String,
    },
}

/// What the server keeps on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Nothing (the demo and benches: a scratch Redis).
    Off,
    /// AOF, fsynced every second: what `worker` accepts, with a warning.
    AofEverySec,
    /// AOF, fsynced on every write: every acknowledged write survives a crash.
    AofAlways,
}

pub struct LocalRedis {
    child: Option<Child>,
    port: u16,
    url: String,
    durability: Durability,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl LocalRedis {
    /// Starts redis-server (always with `noeviction`) and waits until it answers.
    pub fn start(durability: Durability) -> Result<Self, LocalRedisError> {
        Self::start_with(durability, &[])
    }

    /// `start`, then these `--name value` settings (later ones win).
    pub fn start_with(durability: Durability, extra: &[&str]) -> Result<Self, LocalRedisError> {
        let dir = tempfile::tempdir().map_err(|e| LocalRedisError::Setup(e.to_string()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| LocalRedisError::Setup(e.to_string()))?
            .port();
        let mut local = Self {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}/"),
            durability,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            dir,
        };
        local.launch()?;
        Ok(local)
    }

    fn launch(&mut self) -> Result<(), LocalRedisError> {
        let (appendonly, fsync) = match self.durability {
            Durability::Off => ("no", "everysec"),
            Durability::AofEverySec => ("yes", "everysec"),
            Durability::AofAlways => ("yes", "always"),
        };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", ""])
            .args(["--appendonly", appendonly, "--appendfsync", fsync])
            .args(["--maxmemory-policy", "noeviction"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LocalRedisError::NotInstalled(e.to_string()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if answers(&self.url) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.crash();
        Err(LocalRedisError::NoAnswer)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many times the server has run `command` (lower case; client calls and calls from
    /// Lua alike), from `INFO commandstats`: 0 if it never ran. For tests that count the
    /// commands a step costs.
    pub fn command_calls(&self, command: &str) -> Result<u64, LocalRedisError> {
        let query = |e: redis::RedisError| LocalRedisError::Query(e.to_string());
        let mut conn = redis::Client::open(self.url.as_str())
            .and_then(|client| client.get_connection())
            .map_err(query)?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut conn)
            .map_err(query)?;
        let prefix = format!("cmdstat_{command}:calls=");
        let Some(rest) = info
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
        else {
            return Ok(0);
        };
        let calls = rest.split(',').next().unwrap_or_default();
        calls
            .parse()
            .map_err(|_| LocalRedisError::Query(format!("unreadable count {calls:?} of {command}")))
    }

    /// The process id while it runs (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM and wait: with AOF, everything written so far survives.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGKILL: a crash, with no shutdown save.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (gracefully) and starts again on the same port and directory.
    pub fn restart(&mut self) -> Result<(), LocalRedisError> {
        self.stop();
        self.launch()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.crash();
    }
}

/// True when a Redis at `url` answers PING within about a second.
pub fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut conn).is_ok()
}

/// Deletes every key of a deployment prefix on the node `conn` reaches, in SCAN pages: the
/// queues' and ledger's keys (all carry the hash tag `{prefix:…}`) and the console's
/// (`prefix:console:…`, no tag). The demo and the benches clean up after themselves in a
/// shared Redis (on a cluster, call it for every master).
pub async fn delete_prefix<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    prefix: &str,
) -> Result<(), redis::RedisError> {
    delete_matching(conn, &format!("{{{prefix}:*")).await?;
    delete_matching(conn, &format!("{prefix}:*")).await
}

/// Deletes the keys matching `pattern` (a SCAN pattern).
async fn delete_matching<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    pattern: &str,
) -> Result<(), redis::RedisError> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        // One UNLINK per hash tag: on a cluster node a multi-key command must stay in one
        // slot, and keys of one tag always do.
        let mut by_tag: std::collections::BTreeMap<&str, Vec<&String>> = Default::default();
        for key in &keys {
            by_tag.entry(hash_tag(key)).or_default().push(key);
        }
        for keys in by_tag.values() {
            redis::cmd("UNLINK")
                .arg(keys)
                .query_async::<i64>(conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The hash tag of a key (`{…}`'s content), or the whole key without one.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&len| len > 0)
                .map(|len| &rest[..len])
        })
        .unwrap_or(key)
}
