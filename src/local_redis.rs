//! A private `redis-server` in a temporary directory on a free loopback port, for the demo and
//! the benchmarks when no Redis is given. Stopped (and its directory removed) on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LocalRedisError {
    #[error(
        "redis-server is not on PATH ({0}); install it (Debian/Ubuntu: apt-get install redis-server, macOS: brew install redis) or point TARSPAY_REDIS_URL at a Redis"
    )]
    NotInstalled(String),
    #[error("cannot prepare a private redis-server: {0}")]
    Setup(String),
    #[error("the private redis-server did not answer within 10 s")]
    NoAnswer,
}

pub struct LocalRedis {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl LocalRedis {
    /// Starts redis-server with persistence off (or AOF on when `appendonly`).
    pub fn start(appendonly: bool) -> Result<Self, LocalRedisError> {
        let dir = tempfile::tempdir().map_err(|e| LocalRedisError::Setup(e.to_string()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| LocalRedisError::Setup(e.to_string()))?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", if appendonly { "yes" } else { "no" }])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LocalRedisError::NotInstalled(e.to_string()))?;
        let mut local = Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if answers(&local.url) {
                return Ok(local);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = local.child.kill();
        Err(LocalRedisError::NoAnswer)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Deletes every key of a deployment prefix (all carry the hash tag `{prefix:…}`), in SCAN
/// pages: the demo and the benches clean up after themselves in a shared Redis.
pub async fn delete_prefix<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    prefix: &str,
) -> Result<(), redis::RedisError> {
    let pattern = format!("{{{prefix}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<i64>(conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
