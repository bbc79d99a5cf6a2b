//! The docker-compose topology as plain processes: a sandbox process, a `serve` process (API and
//! callback receiver), three `worker` processes, all on one redis-server; payouts enter through
//! the HTTP API and each ends with exactly one outcome, finalised by signed callbacks.

mod common;

use common::app::BIN;
use common::redis_server::RedisServer;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tarspay_worker::gateway::PrivateKey;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(env: &[(String, String)], args: &[&str]) -> Process {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TARSPAY_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command
        .env("RUST_LOG", "warn")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Process(command.spawn().expect("spawn tarspay-worker"))
}

/// Reads the next `n` stdout lines through one reader (a reader per line could swallow the
/// next line into a buffer that is then dropped).
fn read_lines(process: &mut Process, n: usize) -> Vec<String> {
    let mut reader = BufReader::new(process.0.stdout.take().expect("stdout piped"));
    let lines = (0..n)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            line.trim().to_owned()
        })
        .collect();
    // Keep draining in the background so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    lines
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_serve_three_workers_and_a_sandbox_as_processes() {
    let redis = RedisServer::start(true);
    let key = PrivateKey::generate();
    let merchant = vec![
        ("TARSPAY_MCH_NO".to_owned(), "M1234567890".to_owned()),
        ("TARSPAY_PRIVATE_KEY".to_owned(), key.expose_hex()),
    ];
    let mut sandbox = spawn(
        &merchant,
        &[
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--final-after",
            "200ms",
        ],
    );
    let lines = read_lines(&mut sandbox, 2);
    let gateway = lines[0]
        .strip_prefix("sandbox listening on ")
        .unwrap()
        .to_owned();
    let system_key = lines[1].rsplit(' ').next().unwrap().to_owned();

    let port = free_port();
    let token = "topology-token-123";
    let mut env = merchant.clone();
    for (k, v) in [
        ("TARSPAY_REDIS_URL", redis.url()),
        ("TARSPAY_GATEWAY_URL", gateway.clone()),
        (
            "TARSPAY_NOTIFY_URL",
            format!("http://127.0.0.1:{port}/tarspay/notify"),
        ),
        ("TARSPAY_SYSTEM_PUBLIC_KEY", system_key),
        ("TARSPAY_LISTEN", format!("127.0.0.1:{port}")),
        ("TARSPAY_API_TOKEN", token.to_owned()),
        // Polls far away: outcomes come from the signed callbacks.
        ("TARSPAY_POLL_FIRST_DELAY", "30s".to_owned()),
    ] {
        env.push((k.to_owned(), v));
    }
    let mut serve = spawn(&env, &["serve"]);
    assert!(read_lines(&mut serve, 1)[0].starts_with("listening on"));
    let _workers: Vec<Process> = (0..3)
        .map(|_| spawn(&env, &["worker", "--concurrency", "8"]))
        .collect();

    tarspay_worker::gateway::install_crypto_provider();
    // Bounded calls: a hung process must fail the test, not stall it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let api = format!("http://127.0.0.1:{port}");
    for i in 0..60 {
        let payout = serde_json::json!({"mchOrderNo": format!("T-{i}"), "amount": "500", "currency": "BDT",
            "wayCode": "EWALLET_BKASH", "walletId": "01712345678"});
        let status = http
            .post(format!("{api}/v1/payouts"))
            .bearer_auth(token)
            .json(&payout)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, reqwest::StatusCode::CREATED);
    }
    let every = Duration::from_millis(200);
    common::poll("60 payouts", Duration::from_secs(120), every, || async {
        let mut done = 0;
        for i in 0..60 {
            let body: serde_json::Value = http
                .get(format!("{api}/v1/payouts/T-{i}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            done += usize::from(body["phase"] == "succeeded");
        }
        (done == 60)
            .then_some(())
            .ok_or(format!("({done} of 60 succeeded)"))
    })
    .await;
    // One outcome each, in the stream the applications read.
    let mut conn = redis.conn().await;
    let outcomes: u64 = redis::cmd("XLEN")
        .arg("{tarspay:payouts}:outcomes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(outcomes, 60);
    // Each order exactly once at the gateway.
    let orders: Vec<serde_json::Value> = http
        .get(format!("{gateway}/sandbox/orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(orders.len(), 60);
    assert!(
        orders
            .iter()
            .all(|o| o["createAttempts"] == 1 && o["callbackAcknowledged"] == true)
    );
    let health: serde_json::Value = http
        .get(format!("{api}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["workersAlive"], 3);
}
