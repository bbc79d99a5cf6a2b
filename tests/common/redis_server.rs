//! A redis-server owned by one test (`local_redis::LocalRedis`: a free port, a temporary
//! directory, killed on drop), always with AOF and noeviction as `worker` and `serve` require.
//! The shared Redis on 6379 is never touched.

use local_redis::{Durability, LocalRedis};
use std::path::Path;

pub struct RedisServer {
    server: LocalRedis,
    pub port: u16,
}

impl RedisServer {
    /// `fsync_always`: fsync on every write (restart and crash tests); otherwise AOF fsyncs
    /// every second, which is cheaper and only warned about.
    pub fn start(fsync_always: bool) -> Self {
        Self::start_with(fsync_always, &[])
    }

    /// `start`, then these `--name value` settings (later ones win), e.g. AOF off.
    pub fn start_with(fsync_always: bool, extra: &[&str]) -> Self {
        let durability = if fsync_always {
            Durability::AofAlways
        } else {
            Durability::AofEverySec
        };
        let server = LocalRedis::start_with(durability, extra).expect("start redis-server");
        let port = server.port();
        Self { server, port }
    }

    /// The process id (to freeze it with SIGSTOP, say).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Sends a signal by name (`STOP` freezes it, `CONT` thaws it).
    #[allow(dead_code)]
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    pub fn url(&self) -> String {
        self.server.url().to_owned()
    }

    /// How many times the server ran `command` (lower case; Lua's calls included).
    #[allow(dead_code)]
    pub fn command_calls(&self, command: &str) -> u64 {
        self.server
            .command_calls(command)
            .expect("INFO commandstats")
    }

    pub fn dir(&self) -> &Path {
        self.server.dir()
    }

    /// SIGTERM: with AOF, everything written so far survives.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts again on the same port and directory.
    pub fn restart(&mut self) {
        self.server.restart().expect("restart redis-server");
    }

    /// SIGKILL: a crash, with no shutdown save. With AOF and `appendfsync always`, every
    /// acknowledged write survives it. `restart` starts the server again.
    #[allow(dead_code)]
    pub fn crash(&mut self) {
        self.server.crash();
    }

    /// A reconnecting connection with a generous response timeout: tests read large hashes on
    /// a busy 2-core machine, and a timeout there would be a false failure.
    pub async fn conn(&self) -> tarspay_worker::redis_conn::RedisConn {
        let client = redis::Client::open(self.url()).expect("client");
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)))
            .set_connection_timeout(Some(std::time::Duration::from_secs(10)));
        tarspay_worker::redis_conn::RedisConn::Single(
            redis::aio::ConnectionManager::new_with_config(client, config)
                .await
                .expect("connect")
                .into(),
        )
    }
}

/// A Redis that is down, as a process starting against it sees it: a listener on its port
/// (`down`, non-blocking) that drops every connection at once. Returns once `tries`
/// connections came in; `still_running` runs between polls and panics if the process gave
/// up. Hang guard 60 s.
#[allow(dead_code)]
pub fn drop_connections(
    down: &std::net::TcpListener,
    tries: usize,
    mut still_running: impl FnMut(),
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = 0;
    while seen < tries {
        match down.accept() {
            Ok((connection, _)) => {
                drop(connection);
                seen += 1;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
        still_running();
        assert!(
            std::time::Instant::now() < deadline,
            "hang guard: {seen} tries"
        );
    }
}
