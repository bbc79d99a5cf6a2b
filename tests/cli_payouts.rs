//! The payout commands as a user runs them: enqueue from a JSON-lines file, a worker process,
//! status, outcomes, queue numbers, pause/resume, dead jobs.

mod common;

use common::app::{BIN, spawn_app};
use common::redis_server::RedisServer;
use std::process::Command;
use tarspay_worker::jobs::PayoutJob;
use tarspay_worker::ledger::{NewOrder, OrderKind};

fn command(app: &common::app::TestApp) -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TARSPAY_") {
            command.env_remove(name);
        }
    }
    command.envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command.env("RUST_LOG", "warn");
    command
}

use common::run;

/// Ids, currencies and amounts given as arguments are checked by their types' rules before
/// the command does anything (no settings, Redis or gateway are needed to refuse them).
#[test]
fn arguments_are_checked_by_the_domain_rules_where_they_enter() {
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["enqueue", "--file", "-", "--batch", "a b"],
            "--batch",
            "must be 1-64 characters",
        ),
        (
            &[
                "follow-deposit",
                "D 1",
                "--amount",
                "100",
                "--currency",
                "INR",
            ],
            "<ID>",
            "must be 1-64 characters",
        ),
        (
            &[
                "follow-deposit",
                "D-1",
                "--amount",
                "100",
                "--currency",
                "inr",
            ],
            "--currency",
            "three capital letters",
        ),
        (
            &[
                "follow-deposit",
                "D-1",
                "--amount",
                "1.234",
                "--currency",
                "INR",
            ],
            "--amount",
            "decimal places",
        ),
    ];
    for (args, names, rule) in cases {
        let (code, _, err) = run(Command::new(BIN).args(*args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(names) && err.contains(rule), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_work_and_read_back_from_the_command_line() {
    let app = spawn_app(false, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payouts.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"mchOrderNo":"C-1","amount":"100","currency":"INR","wayCode":"UPI","customerName":"A","customerEmail":"a@x.in","customerContact":"9876543210"}"#,
            r#"{"mchOrderNo":"C-2","amount":"500","currency":"BDT","wayCode":"EWALLET_BKASH","walletId":"01712345678"}"#,
            "",
            r#"{"mchOrderNo":"C-3","amount":"12.5","currency":"KES","wayCode":"EWALLET_MPESA"}"#,
            r#"{"mchOrderNo": "C-4", "amount": "#,
            r#"{"mchOrderNo":"C-1","amount":"100","currency":"INR","wayCode":"UPI","customerName":"A","customerEmail":"a@x.in","customerContact":"9876543210"}"#,
            r#"{"mchOrderNo":"C-5","amount":"100","amount":"45000","currency":"INR","wayCode":"UPI","customerName":"A","customerEmail":"a@x.in","customerContact":"9876543210"}"#,
            r#"{"mchOrderNo":"C-1","amount":"900","currency":"INR","wayCode":"UPI","customerName":"A","customerEmail":"a@x.in","customerContact":"9876543210"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (code, out, err) = run(command(&app).args(["enqueue", "--file"]).arg(&file));
    assert_eq!(code, 1, "a bad line makes the exit code 1: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "queued C-1");
    assert_eq!(lines[1], "queued C-2");
    assert!(
        lines[2].starts_with("line 4: ")
            && lines[2].contains("amount: KES takes whole numbers: no decimal point"),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].contains("customerContact: is required for KES payouts"),
        "{}",
        lines[2]
    );
    assert!(lines[3].starts_with("line 5: invalid JSON"), "{}", lines[3]);
    assert_eq!(lines[4], "exists C-1");
    assert!(
        lines[5].starts_with("line 7: invalid JSON: duplicate key \"amount\""),
        "{}",
        lines[5]
    );
    assert_eq!(
        lines[6],
        "line 8: conflict C-1: it exists with a different payout; this line was not queued"
    );
    assert_eq!(
        app.deployment.order("C-1").await.unwrap().unwrap().amount,
        "100"
    );
    assert!(app.deployment.order("C-5").await.unwrap().is_none());
    // Alone, a repeat is fine and a conflict is not.
    for (line, expected) in [
        (
            r#"{"mchOrderNo":"C-1","amount":"100.00","currency":"INR","wayCode":"UPI","customerName":"A","customerEmail":"a@x.in","customerContact":"9876543210"}"#,
            0,
        ),
        (
            r#"{"mchOrderNo":"C-1","amount":"900","currency":"INR","wayCode":"UPI","customerName":"A","customerEmail":"a@x.in","customerContact":"9876543210"}"#,
            1,
        ),
    ] {
        std::fs::write(&file, line).unwrap();
        let (code, out, err) = run(command(&app).args(["enqueue", "--file"]).arg(&file));
        assert_eq!(code, expected, "{out} {err}");
    }
    assert!(
        app.deployment.order("C-3").await.unwrap().is_none(),
        "the bad line queued nothing"
    );

    let (code, out, _) = run(command(&app).arg("queue"));
    assert_eq!(code, 0);
    assert!(out.contains("waiting  2"), "{out}");

    let mut worker = app.worker_process(4);
    app.wait_outcomes(2).await;
    assert_eq!(
        worker.terminate(),
        Some(0),
        "SIGTERM ends the worker cleanly"
    );

    let (code, out, _) = run(command(&app).args(["outcomes", "--json"]));
    assert_eq!(code, 0);
    let outcomes: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outcomes.len(), 2);
    for outcome in &outcomes {
        for field in [
            "kind",
            "mchOrderNo",
            "status",
            "gatewayState",
            "payOrderId",
            "amount",
            "currency",
            "fee",
            "code",
            "msg",
            "attempts",
            "batchId",
            "at",
        ] {
            assert!(outcome.get(field).is_some(), "{field} in {outcome}");
        }
        assert_eq!(outcome["status"], "succeeded");
    }
    let (_, human, _) = run(command(&app).arg("outcomes"));
    assert!(human.contains("C-2 succeeded 500 BDT"), "{human}");

    let (code, out, _) = run(command(&app).args(["status", "C-1", "--json"]));
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["phase"], "succeeded");
    assert_eq!(status["amount"], "100");
    let (code, out, _) = run(command(&app).args(["status", "C-1"]));
    assert_eq!(code, 0);
    assert!(out.contains("phase        succeeded"), "{out}");
    let (code, _, err) = run(command(&app).args(["status", "NOPE"]));
    assert_eq!(code, 1);
    assert!(err.contains("no order NOPE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_dead_jobs() {
    let app = spawn_app(false, |_| {}).await;
    let (code, out, _) = run(command(&app).arg("pause"));
    assert_eq!(code, 0, "{out}");
    assert!(app.deployment.is_paused().await.unwrap());
    let (_, out, _) = run(command(&app).arg("queue"));
    assert!(out.contains("paused   true"), "{out}");
    let (code, _, _) = run(command(&app).arg("resume"));
    assert_eq!(code, 0);
    assert!(!app.deployment.is_paused().await.unwrap());

    // A job that cannot be decoded goes to the dead stream; so does a create whose stored
    // request is unreadable (given up at once). Both are listed; the second can be requeued.
    let mut conn = app.redis.conn().await;
    let partition = app.partition("BROKEN-1");
    let stream = partition.queue.keys().stream.clone();
    redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("e")
        .arg("not a job")
        .query_async::<String>(&mut conn)
        .await
        .unwrap();
    partition
        .ledger
        .register(&NewOrder {
            mch_order_no: &"BROKEN-1".parse().unwrap(),
            kind: OrderKind::Payout,
            fingerprint: "f",
            amount: "1",
            currency: &"INR".parse().unwrap(),
            request: "not json",
            batch_id: None,
            merchant: &Default::default(),
        })
        .await
        .unwrap();
    partition
        .queue
        .enqueue(&PayoutJob::CreatePayout {
            mch_order_no: "BROKEN-1".parse().unwrap(),
            merchant: Default::default(),
        })
        .await
        .unwrap();
    let worker = app.pool(1);
    common::eventually("both jobs in the dead stream", || async {
        (app.deployment.dead_count().await.unwrap() >= 2).then_some(())
    })
    .await;
    worker.stop().await;
    let (code, out, _) = run(command(&app).args(["dead", "list"]));
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let broken = lines.iter().find(|l| l.contains("BROKEN-1")).unwrap();
    assert!(broken.contains("unreadable"), "{broken}");
    let (code, _, err) = run(command(&app).args(["dead", "retry", "0-1"]));
    assert_eq!(code, 2);
    assert!(err.contains("no dead job 0-1"), "{err}");
    let dead_id = broken.split_whitespace().next().unwrap().to_owned();
    let (code, out, err) = run(command(&app).args(["dead", "retry", &dead_id]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued"));
    assert_eq!(app.deployment.dead_count().await.unwrap(), 1);
    assert_eq!(app.deployment.queue_stats().await.unwrap().waiting, 1);
}

/// `tarspay-worker worker` against `redis_url`, stderr captured.
fn worker_on(app: &common::app::TestApp, redis_url: &str, unsafe_ok: bool) -> std::process::Child {
    let mut command = command(app);
    command
        .env("TARSPAY_REDIS_URL", redis_url)
        .args(["worker", "--concurrency", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if unsafe_ok {
        command.env("TARSPAY_REDIS_UNSAFE", "true");
    }
    command.spawn().unwrap()
}

/// Waits for the process to end by itself (hang guard, not a speed assertion).
fn exit_code_within(child: &mut std::process::Child, secs: u64) -> Option<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// SIGTERM, then everything the process wrote to stderr.
fn stop_and_read_stderr(child: std::process::Child) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until a worker registered itself in the Redis at `redis_url`: it started.
async fn wait_worker_alive(app: &common::app::TestApp, redis_url: &str) {
    let mut env = app.env.clone();
    env.retain(|(k, _)| k != "TARSPAY_REDIS_URL");
    env.push(("TARSPAY_REDIS_URL".into(), redis_url.to_owned()));
    let settings = tarspay_worker::config::Settings::load_with_env(None, env).unwrap();
    let deployment = tarspay_worker::deployment::Deployment::connect(&settings)
        .await
        .unwrap();
    common::eventually("the worker to start", || async {
        (deployment.queue_stats().await.unwrap().workers_alive > 0).then_some(())
    })
    .await;
}

/// The one-thread default is what every other test's worker process runs on; here the other
/// runtimes `TARSPAY_WORKER_THREADS` chooses pay and stop the same way, and a value out of
/// range stops the worker naming the setting before it touches anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_thread_per_core_or_on_four_pays_and_a_bad_thread_count_is_refused() {
    let app = spawn_app(false, |_| {}).await;
    for (threads, id) in [("0", "THR-0"), ("4", "THR-4")] {
        app.enqueue(common::app::inr(id, "100")).await;
        let mut worker = app.worker_process_with(4, &[("TARSPAY_WORKER_THREADS", threads)]);
        let outcomes = app.wait_outcomes(if threads == "0" { 1 } else { 2 }).await;
        assert_eq!(
            outcomes[id].status.as_str(),
            "succeeded",
            "{threads} threads"
        );
        assert_eq!(
            worker.terminate(),
            Some(0),
            "{threads} threads: SIGTERM ends it cleanly"
        );
    }
    let (code, _, err) = run(command(&app).env("TARSPAY_WORKER_THREADS", "2000").args([
        "worker",
        "--concurrency",
        "1",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("TARSPAY_WORKER_THREADS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_a_redis_that_may_drop_acknowledged_writes() {
    let app = spawn_app(false, |_| {}).await;
    for (extra, needle) in [
        (&["--appendonly", "no"][..], "appendonly is no"),
        (
            &["--maxmemory-policy", "allkeys-lru"][..],
            "maxmemory-policy is allkeys-lru",
        ),
    ] {
        let redis = RedisServer::start_with(false, extra);
        let mut child = worker_on(&app, &redis.url(), false);
        let code = exit_code_within(&mut child, 60);
        let err = stop_and_read_stderr(child);
        assert!(
            code.is_some_and(|c| c != 0),
            "refused with a non-zero exit: {code:?} {err}"
        );
        assert!(err.contains("refusing to start"), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("TARSPAY_REDIS_UNSAFE=true"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_a_wrong_redis_password_stops_at_once_instead_of_waiting() {
    // A worker waits for a Redis that is not reachable yet; a wrong password is not that:
    // no wait mends it, so the start ends with the reason (and never the password).
    let app = spawn_app(false, |_| {}).await;
    let redis = RedisServer::start(false);
    let mut admin = redis.conn().await;
    let () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "payouts",
            "on",
            ">the-right-one",
            "~*",
            "&*",
            "+@all",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = redis
        .url()
        .replacen("redis://", "redis://payouts:not-the-password@", 1);
    let mut child = worker_on(&app, &url, false);
    let code = exit_code_within(&mut child, 60);
    let err = stop_and_read_stderr(child);
    assert_eq!(code, Some(2), "stopped with the error: {err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(
        !err.contains("not-the-password"),
        "the password leaked: {err}"
    );
    assert!(!err.contains("not ready"), "it waited: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_on_an_unsafe_redis_only_when_told_and_says_so() {
    let app = spawn_app(false, |_| {}).await;
    let redis = RedisServer::start_with(false, &["--appendonly", "no"]);
    let mut child = worker_on(&app, &redis.url(), true);
    wait_worker_alive(&app, &redis.url()).await;
    assert_eq!(child.try_wait().unwrap(), None, "still running");
    let err = stop_and_read_stderr(child);
    assert!(err.contains("appendonly is no"), "{err}");
    assert!(
        err.contains("running anyway (redis_unsafe = true)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_starts_on_aof_with_noeviction_and_warns_where_config_is_refused() {
    let app = spawn_app(false, |_| {}).await;
    // The app's own Redis: AOF (fsync every second) and noeviction. Starts; the lazy fsync is
    // only a warning naming what a crash can lose.
    let mut child = worker_on(&app, &app.redis.url(), false);
    wait_worker_alive(&app, &app.redis.url()).await;
    assert_eq!(child.try_wait().unwrap(), None, "still running");
    let err = stop_and_read_stderr(child);
    assert!(err.contains("appendfsync is everysec"), "{err}");
    assert!(!err.contains("refusing"), "{err}");

    // A managed Redis that does not allow CONFIG: warn what could not be checked, run.
    let managed = RedisServer::start_with(false, &["--rename-command", "CONFIG", ""]);
    let mut child = worker_on(&app, &managed.url(), false);
    wait_worker_alive(&app, &managed.url()).await;
    assert_eq!(child.try_wait().unwrap(), None, "still running");
    let err = stop_and_read_stderr(child);
    assert!(
        err.contains("cannot read Redis persistence and eviction settings"),
        "{err}"
    );
}
