//! The binary's subcommands, run as real processes: sign, verify, settings errors, the
//! sandbox as its own process, the demo.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::gateway::callback::sign_callback;

const BIN: &str = env!("CARGO_BIN_EXE_tarspay-dev");

/// The binary with a clean environment: no TARSPAY_* leaks in from the developer's shell.
fn command() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TARSPAY_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const DOC_BODY: &str = r#"{"amount":"100","currency":"MYR","customerAccountNumber":"123456789","customerContact":"13116709877","customerEmail":"g13116709877@163.com","customerName":"DW","mchNo":"M1688457769","mchOrderNo":"ML202211111111773","notifyUrl":"http://47.241.33.220:8896/tarspay/notify","returnUrl":"https://www.tarspay.com/notify/return","wayCode":"CASHIER"}"#;
const DOC_KEY: &str = "03828e8e30fb0a705776e32302d7f54a8037ae3926220bbc19c588eedc3b26ec12";
const DOC_SIG: &str = "304402207113128d16fc37707fdc8095b878e70d2d9799b4a14402a6244065a208a99968022004e1b9bead988594c715a40b5fc87642e0f738ff0f97c167c1cab20d5c5a3783";

#[test]
fn verify_accepts_the_documented_example_and_rejects_changes() {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, DOC_BODY).unwrap();
    let verify = |nonce: &str| {
        run(command()
            .args([
                "verify",
                "--public-key",
                DOC_KEY,
                "--signature",
                DOC_SIG,
                "--path",
                "/api/pay/unifiedOrder",
                "--nonce",
                nonce,
                "--body",
            ])
            .arg(&body))
    };
    let (code, out, _) = verify("1704180814988");
    assert_eq!((code, out.trim()), (0, "valid"));
    let (code, out, _) = verify("1704180814989");
    assert_eq!((code, out.trim()), (1, "invalid"));
}

#[test]
fn a_printing_command_whose_reader_is_gone_ends_without_a_panic() {
    // `tarspay-worker verify … | head -0`: the pipe has no reader when the answer is written.
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, DOC_BODY).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = command()
        .args(["verify", "--public-key", DOC_KEY, "--signature", DOC_SIG])
        .args([
            "--path",
            "/api/pay/unifiedOrder",
            "--nonce",
            "1704180814988",
            "--body",
        ])
        .arg(&body)
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        output.status.code(),
        Some(tarspay_worker::cli::CLOSED_STDOUT_EXIT),
        "{:?} {stderr}",
        output.status
    );
}

#[test]
fn sign_then_verify_round_trip_with_key_from_env_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(
        &body,
        r#"{"mchNo":"M1234567890","mchOrderNo":"X-1","amount":"10.50","empty":""}"#,
    )
    .unwrap();
    let key = PrivateKey::generate();
    let key_file = dir.path().join("key.hex");
    std::fs::write(&key_file, format!("{}\n", key.expose_hex())).unwrap();

    let (code, out, err) = run(command()
        .env("TARSPAY_PRIVATE_KEY_FILE", &key_file)
        .args([
            "sign",
            "--path",
            "/api/payOutInfo",
            "--nonce",
            "1700000000000",
            "--body",
        ])
        .arg(&body));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "POST|/api/payOutInfo|1700000000000|amount=10.50&mchNo=M1234567890&mchOrderNo=X-1"
    );
    assert!(
        err.contains("empty"),
        "warns about the dropped empty field: {err}"
    );
    let signature = lines[1];
    assert!(!out.contains(&key.expose_hex()) && !err.contains(&key.expose_hex()));

    let public = key.public_key().to_hex();
    let verify = || {
        let mut verify = command();
        verify
            .args(["verify", "--public-key", &public, "--signature", signature])
            .args([
                "--path",
                "/api/payOutInfo",
                "--nonce",
                "1700000000000",
                "--body",
            ]);
        verify
    };
    let (code, out, _) = run(verify().arg(&body));
    assert_eq!((code, out.trim()), (0, "valid"));

    // Same signature read from stdin as the body.
    let mut child = verify()
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"mchNo":"M1234567890","mchOrderNo":"X-2","amount":"10.50"}"#)
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "invalid");
}

#[test]
fn verify_callback_mode() {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("callback.json");
    let text = r#"{"bizType":2,"mchOrderNo":"A-1","payOrderId":"P1","state":2}"#;
    std::fs::write(&body, text).unwrap();
    let system = PrivateKey::generate();
    let signature = sign_callback(&system, text.as_bytes());
    let public = system.public_key().to_hex();
    let verify = |key: &str| {
        let (code, out, _) = run(command()
            .args(["verify", "--callback", "--public-key", key])
            .args(["--signature", &signature, "--body"])
            .arg(&body));
        (code, out.trim().to_owned())
    };
    assert_eq!(verify(&public), (0, "valid".to_owned()));
    let other = PrivateKey::generate().public_key().to_hex();
    assert_eq!(verify(&other), (1, "invalid".to_owned()));
}

#[test]
fn bad_settings_fail_at_start_naming_the_setting_only() {
    let secret = "a1b2c3d4e5f6";
    let (code, _, err) = run(command()
        .env("TARSPAY_PRIVATE_KEY", secret)
        .args(["sign", "--path", "/x", "--body", "-"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("TARSPAY_PRIVATE_KEY") && err.contains("64 hex characters"),
        "{err}"
    );
    assert!(!err.contains(secret), "{err}");

    let (code, _, err) = run(command()
        .env("TARSPAY_GATEWAY__REQUEST_TIMEOUT", "forever")
        .arg("balance"));
    assert_eq!(code, 2);
    assert!(err.contains("TARSPAY_GATEWAY__REQUEST_TIMEOUT"), "{err}");

    let (code, _, err) = run(command().arg("balance"));
    assert_eq!(code, 2);
    assert!(err.contains("TARSPAY_MCH_NO"), "{err}");

    let (code, _, err) = run(command().args(["--config", "/nonexistent/settings.toml", "balance"]));
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/settings.toml"), "{err}");
}

/// Kills the child on drop so a failing test leaves no process behind.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sandbox_runs_as_its_own_process_and_balance_works_against_it() {
    let key = PrivateKey::generate();
    let mut sandbox = Child(
        command()
            .env("TARSPAY_MCH_NO", "M1234567890")
            .env("TARSPAY_PRIVATE_KEY", key.expose_hex())
            .args(["sandbox", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(sandbox.0.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let url = first
        .trim()
        .strip_prefix("sandbox listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();

    let (code, out, err) = run(command()
        .env("TARSPAY_MCH_NO", "M1234567890")
        .env("TARSPAY_PRIVATE_KEY", key.expose_hex())
        .env("TARSPAY_GATEWAY_URL", &url)
        .arg("balance"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "available 1000000000  frozen 0");

    // A key the sandbox does not know is refused with TarsPay's code.
    let (code, _, err) = run(command()
        .env("TARSPAY_MCH_NO", "M1234567890")
        .env("TARSPAY_PRIVATE_KEY", PrivateKey::generate().expose_hex())
        .env("TARSPAY_GATEWAY_URL", &url)
        .arg("balance"));
    assert_eq!(code, 2);
    assert!(err.contains("5003002"), "{err}");
    drop(sandbox);
    std::thread::sleep(Duration::from_millis(10));
}

/// A child process killed (and reaped) when the test ends, even by a failed assertion.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// What it wrote to stderr (all of it once it has exited).
    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(stderr) = self.0.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A deploy's SIGTERM may come while a process is still starting: here while it waits for a
/// Redis that took the connection and has not answered (the check of its persistence
/// settings gives up after about a second). `worker` and `serve` stop gracefully, exit 0,
/// instead of ending by the signal's default action.
#[test]
fn a_stop_signal_while_starting_is_a_graceful_stop() {
    for subcommand in ["worker", "serve"] {
        let redis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        redis.set_nonblocking(true).unwrap();
        let mut child = KillOnDrop(
            command()
                .env(
                    "TARSPAY_REDIS_URL",
                    format!("redis://{}", redis.local_addr().unwrap()),
                )
                .env("TARSPAY_API_TOKEN", "a-token-of-twenty-chars")
                .env("TARSPAY_LISTEN", "127.0.0.1:0")
                .arg(subcommand)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Starting: it has connected to "Redis" (hang guard 60 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let _connection = loop {
            match redis.accept() {
                Ok((connection, _)) => break connection,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) => panic!("accept: {err}"),
            }
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!(
                    "{subcommand} ended before connecting ({status}): {}",
                    child.stderr()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hang guard: no connection"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let sent = Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hang guard: {subcommand} still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            status.code(),
            Some(0),
            "{subcommand} after SIGTERM while starting: {}",
            child.stderr()
        );
    }
}

/// `serve` started during a Redis restart (a listener that drops every connection holds the
/// port meanwhile) keeps trying instead of exiting, and listens once Redis is back.
#[test]
fn serve_started_while_redis_is_down_waits_for_it_and_then_listens() {
    let mut redis = common::redis_server::RedisServer::start(false);
    redis.stop();
    let down = std::net::TcpListener::bind(("127.0.0.1", redis.port)).expect("the Redis port");
    down.set_nonblocking(true).unwrap();
    let mut serve = KillOnDrop(
        command()
            .env("TARSPAY_REDIS_URL", redis.url())
            .env("TARSPAY_API_TOKEN", "a-token-of-twenty-chars")
            .env("TARSPAY_LISTEN", "127.0.0.1:0")
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    common::redis_server::drop_connections(&down, 3, || {
        if let Some(status) = serve.0.try_wait().unwrap() {
            panic!(
                "serve exited while Redis was down ({status}): {}",
                serve.stderr()
            );
        }
    });
    drop(down);
    redis.restart();
    let stdout = serve.0.stdout.take().unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let line = read
        .recv_timeout(Duration::from_secs(60))
        .expect("hang guard: serve never listened");
    assert!(line.starts_with("listening on http://"), "{line}");
}

fn count(out: &str, label: &str) -> usize {
    out.lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix(label)
                .map(|rest| rest.trim().parse().unwrap())
        })
        .unwrap_or(0)
}

#[test]
fn demo_runs_to_completion_with_a_small_payroll() {
    let redis = common::redis_server::RedisServer::start(false);
    let (code, out, err) = run(command().env("TARSPAY_REDIS_URL", redis.url()).args([
        "demo",
        "--payouts",
        "60",
        "--concurrency",
        "16",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("payouts: 60"), "{out}");
    // The sample's prefixes decide each outcome: 3 of 60 rejected, 3 failed, the rest succeed.
    assert_eq!(count(&out, "rejected"), 3, "{out}");
    assert_eq!(count(&out, "failed"), 3, "{out}");
    assert_eq!(count(&out, "succeeded"), 54, "{out}");
    // Retries by code: -1 once for 3 orders, 500323 twice for 3, and one each of the
    // ambiguous kinds, which are then settled by a query.
    assert_eq!(count(&out, "-1"), 3, "{out}");
    assert_eq!(count(&out, "500323"), 6, "{out}");
    assert_eq!(count(&out, "connection_lost"), 3, "{out}");
    assert_eq!(count(&out, "http_status"), 3, "{out}");
    assert_eq!(count(&out, "timeout"), 3, "{out}");
    assert!(
        out.contains("gateway orders: 60 from 72 create calls"),
        "{out}"
    );
    assert!(out.contains("callbacks acknowledged: 60"), "{out}");
    // Nothing is left behind in the Redis it used.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[test]
fn demo_starts_a_private_redis_when_none_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("redis://{}/", listener.local_addr().unwrap());
    drop(listener);
    let (code, out, err) =
        run(command()
            .env("TARSPAY_REDIS_URL", &dead)
            .args(["demo", "--payouts", "20"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("private redis-server at"), "{out}");
    assert_eq!(count(&out, "succeeded"), 18, "{out}");
}

#[test]
fn demo_without_any_redis_says_how_to_get_one() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("redis://{}/", listener.local_addr().unwrap());
    drop(listener);
    let (code, _, err) = run(command()
        .env("TARSPAY_REDIS_URL", &dead)
        .env("PATH", "/nonexistent")
        .args(["demo", "--payouts", "5"]));
    assert_eq!(code, 2);
    assert!(err.contains(&dead), "{err}");
    assert!(err.contains("apt-get install redis-server"), "{err}");
    assert!(err.contains("TARSPAY_REDIS_URL"), "{err}");
}
