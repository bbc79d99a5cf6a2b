//! A redis-server owned by one test: a free port, a temporary directory, killed on drop. The
//! shared Redis on 6379 is never touched.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl RedisServer {
    /// Starts redis-server with AOF and noeviction, as `worker` and `serve` require.
    /// `appendonly` means fsync on every write (restart and crash tests); otherwise AOF
    /// fsyncs every second, which is cheaper and only warned about.
    pub fn start(appendonly: bool) -> Self {
        Self::start_with(appendonly, &[])
    }

    /// `start`, then these `--name value` settings (later ones win), e.g. AOF off.
    pub fn start_with(appendonly: bool, extra: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            appendonly,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args([
                "--appendfsync",
                if self.appendonly {
                    "always"
                } else {
                    "everysec"
                },
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM: with AOF, everything written so far survives.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// SIGKILL: a crash, with no shutdown save. With AOF and `appendfsync always`, every
    /// acknowledged write survives it. `restart` starts the server again.
    #[allow(dead_code)]
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A reconnecting connection with a generous response timeout: tests read large hashes on
    /// a busy 2-core machine, and a timeout there would be a false failure.
    pub async fn conn(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.url()).expect("client");
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)))
            .set_connection_timeout(Some(std::time::Duration::from_secs(10)));
        redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .expect("connect")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
