//! `tarspay-worker payroll`: bad rows queue nothing, the balance check, following the batch to
//! the end with a results CSV, and a re-run that pays no one twice.

mod common;

use common::app::{BIN, TestApp, spawn_app};
use std::path::Path;

async fn payroll(app: &TestApp, args: &[&str], file: &Path) -> (i32, String) {
    let mut command = tokio::process::Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TARSPAY_") {
            command.env_remove(name);
        }
    }
    command.envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command
        .env("RUST_LOG", "warn")
        .arg("payroll")
        .arg(file)
        .args(args);
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), command.output())
        .await
        .expect("payroll finished")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

const GOOD: &str = "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
PR-1,500,BDT,EWALLET_BKASH,01712345678,,,\n\
PR-2,700,BDT,EWALLET_NAGAD,01712345679,,,\n\
PR-3,150.50,INR,UPI,,Asha,asha@example.in,9876543210\n\
REJ-4,300,BDT,EWALLET_BKASH,01712345670,,,\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_all_reported_and_nothing_is_queued() {
    let app = spawn_app(false, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.csv");
    std::fs::write(&file, "mchOrderNo,amount,currency,wayCode,walletId\nA-1,500,BDT,EWALLET_BKASH,01712345678\nA-2,-1,BDT,EWALLET_BKASH,01712345678\nA-3,500,BDT,EWALLET_BKASH,999\n").unwrap();
    let (code, out) = payroll(&app, &[], &file).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("line 3: amount: must not be negative"),
        "{out}"
    );
    assert!(
        out.contains("line 4: walletId: must be 11 digits starting with 0"),
        "{out}"
    );
    assert!(app.deployment.ledger.get("A-1").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_must_cover_the_batch_unless_forced() {
    let app = spawn_app(false, |c| c.merchants[0].balance = 1000u64.into()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payroll.csv");
    std::fs::write(&file, GOOD).unwrap();
    let (code, out) = payroll(&app, &["--detach"], &file).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not cover the batch total"), "{out}");
    assert!(
        app.deployment.ledger.get("PR-1").await.unwrap().is_none(),
        "refused: nothing queued"
    );
    let (code, out) = payroll(&app, &["--detach", "--force"], &file).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 queued"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payroll_runs_to_the_end_and_a_rerun_pays_no_one_twice() {
    let app = spawn_app(false, |c| {
        c.outcomes = vec![tarspay_worker::sandbox::OutcomeRule {
            prefix: "REJ".into(),
            state: 8,
            final_after_ms: None,
        }];
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payroll.csv");
    std::fs::write(&file, GOOD).unwrap();
    let results = dir.path().join("results.csv");
    let pool = app.pool(4);
    let (code, out) = payroll(&app, &["--results", results.to_str().unwrap()], &file).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 queued, 0 already queued"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("succeeded") && l.contains("3")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("rejected") && l.contains("300 BDT")),
        "{out}"
    );

    let mut reader = csv::Reader::from_path(&results).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 4);
    let status_of = |id: &str| {
        rows.iter()
            .find(|r| &r[0] == id)
            .map(|r| r[1].to_owned())
            .unwrap()
    };
    assert_eq!(status_of("PR-1"), "succeeded");
    assert_eq!(status_of("REJ-4"), "rejected");
    assert!(
        rows.iter().all(|r| r[4].starts_with('P')),
        "every row has its payOrderId"
    );

    // The same file again: the same batch, nothing new at the gateway.
    let (code, out) = payroll(&app, &["--results", results.to_str().unwrap()], &file).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 queued, 4 already queued"), "{out}");
    pool.stop().await;
    assert_eq!(app.sandbox.orders().len(), 4);
    for id in ["PR-1", "PR-2", "PR-3", "REJ-4"] {
        assert_eq!(app.sandbox.create_attempts(id), 1, "{id}");
    }
    assert_eq!(app.deployment.ledger.outcome_count().await.unwrap(), 4);
}
