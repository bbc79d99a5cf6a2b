//! Test harness: a sandbox on a free loopback port with one registered merchant, and a signed
//! client for that merchant (zero2prod's `spawn_app`, for the gateway).
#![allow(dead_code)]

pub mod app;
pub mod browser;
pub mod faketime;
pub mod queue;
pub mod redis_server;

use std::time::Duration;
use tarspay_sandbox::{
    Endpoint, FaultAction, FaultRule, OutcomeRule, Sandbox, SandboxConfig, SandboxMerchant,
};
use tarspay_worker::gateway::{ClientSettings, PrivateKey, TarsPayClient};

pub const MCH_NO: &str = "M1234567890";

/// Tests come in two tiers. The default (`cargo test`, the README's and CI's command) keeps a
/// developer's loop to minutes; `TARSPAY_TEST_TIER=long` (see `.ci/long`) runs the long soak
/// and the 100,000-job drains. Returns `long` in the long tier, `quick` otherwise; an explicit
/// `var` (a number) wins over both.
pub fn tiered(var: &str, quick: u64, long: u64) -> u64 {
    if let Some(value) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
        return value;
    }
    if std::env::var("TARSPAY_TEST_TIER").is_ok_and(|tier| tier == "long") {
        long
    } else {
        quick
    }
}

pub struct TestGateway {
    pub sandbox: Sandbox,
    pub client: TarsPayClient,
    pub key: PrivateKey,
}

pub fn merchant(key: &PrivateKey, balance: u64) -> SandboxMerchant {
    SandboxMerchant {
        mch_no: MCH_NO.into(),
        public_key: key.public_key(),
        balance: balance.into(),
    }
}

pub fn client_for(url: &str, key: &PrivateKey, request_timeout: Duration) -> TarsPayClient {
    TarsPayClient::new(ClientSettings {
        base_url: url.to_owned(),
        mch_no: MCH_NO.into(),
        private_key: key.clone(),
        connect_timeout: Duration::from_secs(2),
        request_timeout,
        max_response_bytes: 64 * 1024,
    })
    .unwrap()
}

/// A sandbox whose orders turn final after `final_after`, without callbacks unless the
/// config says otherwise.
pub async fn spawn_gateway(change: impl FnOnce(&mut SandboxConfig)) -> TestGateway {
    let key = PrivateKey::generate();
    let mut config = SandboxConfig {
        merchants: vec![merchant(&key, 1_000_000)],
        final_after: Duration::from_millis(300),
        callbacks: false,
        ..SandboxConfig::default()
    };
    change(&mut config);
    let sandbox = Sandbox::start(config, "127.0.0.1:0").await.unwrap();
    let client = client_for(&sandbox.url(), &key, Duration::from_secs(5));
    TestGateway {
        sandbox,
        client,
        key,
    }
}

/// A worker process' `/metrics` text at `addr` (empty while it does not answer).
pub async fn scrape_metrics(http: &reqwest::Client, addr: &str) -> String {
    match http.get(format!("http://{addr}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The worker process' `/metrics` text at `addr`, once `ready` says it shows what the test
/// waits for.
pub async fn worker_metrics(addr: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    eventually(what, || async {
        let text = scrape_metrics(&http, addr).await;
        ready(&text).then_some(text)
    })
    .await
}

/// The violations in an `audit --json` report, one line each.
pub fn violations(report: &serde_json::Value) -> Vec<String> {
    report["violations"]
        .as_array()
        .map(|all| all.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default()
}

/// The value of an unlabelled gauge in a `/metrics` text, if it is there.
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `check` until it returns Some, or panics after a generous hang guard (not a speed
/// assertion: only a hung test trips it).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let every = Duration::from_millis(20);
    poll(what, Duration::from_secs(60), every, || {
        let checked = check();
        async move { checked.await.ok_or_else(String::new) }
    })
    .await
}

/// Waits until the Redis behind `primary` reports a replica online.
#[allow(dead_code)]
pub async fn replica_in_sync(primary: &tarspay_worker::redis_conn::RedisConn) {
    eventually("the replica in sync", || {
        let mut primary = primary.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut primary)
                .await
                .ok()?;
            info.contains("state=online").then_some(())
        }
    })
    .await;
}

/// The one polling loop of the tests: runs `check` every `every` until it answers `Ok`; past
/// `limit` panics naming `what` and what the last `Err` said (a hang guard, not a speed
/// assertion).
pub async fn poll<T, F, Fut>(what: &str, limit: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} {last}"
        );
        tokio::time::sleep(every).await;
    }
}

/// A sandbox rule: orders whose `mchOrderNo` starts with `prefix` end in `state` at the
/// sandbox's usual time.
pub fn outcome_rule(prefix: &str, state: i64) -> OutcomeRule {
    OutcomeRule {
        prefix: prefix.into(),
        state,
        final_after_ms: None,
    }
}

/// A sandbox fault rule for orders whose `mchOrderNo` starts with `prefix`.
pub fn fault_rule(
    prefix: &str,
    endpoint: Endpoint,
    times: Option<u32>,
    action: FaultAction,
) -> FaultRule {
    FaultRule {
        prefix: prefix.into(),
        endpoint,
        times,
        action,
    }
}

/// Runs a command to its end: exit code, stdout, stderr (logs at `warn`).
#[allow(dead_code)]
pub fn run(command: &mut std::process::Command) -> (i32, String, String) {
    let output = command.env("RUST_LOG", "warn").output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Nothing left in the queue (waiting, pending or delayed) and a clean audit.
pub async fn no_job_left_and_audit_clean(app: &app::TestApp) {
    let stats = app.deployment.queue_stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.pending, stats.delayed),
        (0, 0, 0),
        "{stats:?}"
    );
    let (code, report) = app.audit();
    assert_eq!((code, violations(&report)), (0, vec![]), "{report}");
}

/// A counter's value on the lines of `name` whose labels include `label` (0 when absent).
pub fn counter_with(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
