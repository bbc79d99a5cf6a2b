//! `demo --console`: after the payroll the demo keeps serving, prints the console's URL and
//! both login tokens (one from the environment, one made up), and each printed token logs in;
//! SIGTERM ends it cleanly and its keys are gone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const VIEWER_TOKEN: &str = "viewer-token-from-the-environment";

/// The demo's stdout, line by line, from a thread (the demo keeps running).
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Kills the demo if the test fails before it is ended.
struct Demo(Option<std::process::Child>);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_its_console_until_stopped() {
    let redis = common::redis_server::RedisServer::start(false);
    let mut command = Command::new(common::app::BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TARSPAY_") {
            command.env_remove(name);
        }
    }
    let mut child = command
        .env("RUST_LOG", "warn")
        .env("TARSPAY_REDIS_URL", redis.url())
        // A token from the environment is used as given; the other is made up.
        .env("TARSPAY_VIEWER_TOKEN", VIEWER_TOKEN)
        .args(["demo", "--payouts", "5", "--console"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let lines = lines_of(&mut child);
    let mut demo = Demo(Some(child));

    let mut printed = Vec::new();
    let (mut url, mut admin, mut viewer) = (None, None, None);
    while url.is_none() || admin.is_none() || viewer.is_none() {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no console URL and tokens printed: {printed:?}"));
        let field = |label: &str| line.trim().strip_prefix(label).map(|v| v.trim().to_owned());
        url = url.or(field("console:"));
        admin = admin.or(field("admin token:"));
        viewer = viewer.or(field("viewer token:"));
        printed.push(line);
    }
    let (url, admin, viewer) = (url.unwrap(), admin.unwrap(), viewer.unwrap());
    assert!(
        printed.iter().any(|l| l.starts_with("payouts: 5 ")),
        "{printed:?}"
    );
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/console/"),
        "{url}"
    );
    assert_eq!(admin.len(), 32, "{admin}");
    assert!(admin.bytes().all(|b| b.is_ascii_hexdigit()), "{admin}");
    assert_eq!(viewer, VIEWER_TOKEN);

    let base = url.trim_end_matches("/console/");
    tarspay_worker::gateway::install_crypto_provider();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for token in [&admin, &viewer] {
        let login = client
            .post(format!("{base}/console/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("origin", base)
            .body(format!("operator=demo-test&token={token}"))
            .send()
            .await
            .unwrap();
        assert!(login.status().is_redirection(), "login: {}", login.status());
        let cookie = login
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .find(|pair| pair.starts_with("tarspay_console="))
            .expect("a session cookie")
            .to_owned();
        let overview = client
            .get(format!("{base}/console/"))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(overview.status(), 200);
        let body = overview.text().await.unwrap();
        assert!(body.contains("id=\"role\""), "{body}");
    }
    // A wrong token opens nothing.
    let refused = client
        .post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", base)
        .body("operator=demo-test&token=wrong")
        .send()
        .await
        .unwrap();
    let session = refused
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|pair| pair.len() > "tarspay_console=".len() && pair.starts_with("tarspay_console="))
        .map(str::to_owned);
    assert_eq!(session, None, "a wrong token got a session");

    // SIGTERM: a graceful end, and the demo's keys are deleted.
    let mut child = demo.0.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}
