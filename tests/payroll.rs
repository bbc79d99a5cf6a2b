//! `tarspay-worker payroll`: bad rows queue nothing, the balance check, following the batch to
//! the end with a results CSV, and a re-run that pays no one twice.

mod common;

use common::app::{BIN, TestApp, spawn_app};
use std::path::Path;

async fn payroll(app: &TestApp, args: &[&str], file: &Path) -> (i32, String) {
    let output = payroll_output(app, args, file).await;
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

async fn payroll_output(app: &TestApp, args: &[&str], file: &Path) -> std::process::Output {
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
    tokio::time::timeout(std::time::Duration::from_secs(120), command.output())
        .await
        .expect("payroll finished")
        .unwrap()
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
    assert!(app.deployment.order("A-1").await.unwrap().is_none());
}

/// The CLI checks a batch id by the HTTP API's rule (it becomes part of Redis keys and of
/// `GET /v1/batches/{batchId}`), before reading the file or queuing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_id_is_checked_by_the_api_rule_and_a_bad_one_queues_nothing() {
    let app = spawn_app(false, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payroll.csv");
    std::fs::write(&file, GOOD).unwrap();
    let too_long = "N".repeat(65);
    for bad in ["nov 2026", "nov/2026", "{nov}", too_long.as_str()] {
        let output = payroll_output(&app, &["--detach", "--force", "--batch-id", bad], &file).await;
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("--batch-id")
                && err.contains("must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'"),
            "{bad}: {err}"
        );
    }
    assert!(app.deployment.order("PR-1").await.unwrap().is_none());
    assert_eq!(
        app.deployment
            .batch_summary("nov 2026")
            .await
            .unwrap()
            .total,
        0
    );
    let (code, out) = payroll(
        &app,
        &["--detach", "--force", "--batch-id", "nov-2026_a"],
        &file,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("batch nov-2026_a: 4 queued"), "{out}");
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
        app.deployment.order("PR-1").await.unwrap().is_none(),
        "refused: nothing queued"
    );
    let (code, out) = payroll(&app, &["--detach", "--force"], &file).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 queued"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payroll_runs_to_the_end_and_a_rerun_pays_no_one_twice() {
    let app = spawn_app(false, |c| {
        c.outcomes = vec![common::outcome_rule("REJ", 8)];
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
    assert_eq!(app.deployment.outcome_count().await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_is_checked_per_currency_never_summed_across_currencies() {
    // 600 BDT and 500 INR each fit in 1000; their sum would not, but it is no amount at all.
    let app = spawn_app(false, |c| c.merchants[0].balance = 1000u64.into()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.csv");
    std::fs::write(
        &file,
        "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
         MX-1,600,BDT,EWALLET_BKASH,01712345678,,,\n\
         MX-2,500,INR,UPI,,Asha,asha@example.in,9876543210\n",
    )
    .unwrap();
    let (code, out) = payroll(&app, &["--detach"], &file).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "covers each currency's new total: 600 BDT (available 1000), 500 INR (available 1000)"
        ),
        "{out}"
    );
    assert!(out.contains("2 queued"), "{out}");

    // One currency over the balance: refused, naming that currency's total only.
    let over = dir.path().join("over.csv");
    std::fs::write(
        &over,
        "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
         OV-1,700,BDT,EWALLET_BKASH,01712345678,,,\n\
         OV-2,700,BDT,EWALLET_NAGAD,01712345679,,,\n\
         OV-3,150,INR,UPI,,Asha,asha@example.in,9876543210\n",
    )
    .unwrap();
    let (code, out) = payroll(&app, &["--detach"], &over).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not cover the batch total of 1400 BDT (available 1000) (each currency"),
        "{out}"
    );
    assert!(!out.contains("INR"), "INR is covered: {out}");
    assert!(app.deployment.order("OV-3").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_currency_with_an_account_of_its_own_is_checked_against_that_account() {
    // The merchant's shared account would cover 6000 KES; its KES account (5000) does not.
    let app = spawn_app(false, |c| {
        let mch_no = c.merchants[0].mch_no.clone();
        c.balances.push(tarspay_sandbox::CurrencyBalance {
            mch_no,
            currency: "KES".into(),
            available: 5000u64.into(),
        });
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kenya.csv");
    std::fs::write(
        &file,
        "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
         KE-1,4000,KES,EWALLET_MPESA,,Wanjiru,w@example.ke,254712345678\n\
         KE-2,2000,KES,EWALLET_MPESA,,Otieno,o@example.ke,254712345679\n\
         KI-1,500,INR,UPI,,Asha,asha@example.in,9876543210\n",
    )
    .unwrap();
    let (code, out) = payroll(&app, &["--detach"], &file).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("batch total of 6000 KES (available 5000)"),
        "{out}"
    );
    assert!(
        !out.contains("INR"),
        "INR draws on the shared account: {out}"
    );
    assert!(app.deployment.order("KE-1").await.unwrap().is_none());
}

/// A gateway that refuses the balance query's `currency` (TarsPay documents none): each
/// currency's total is checked against the merchant's one account from the plain query. A
/// transient code instead (500326, "balance query error") says nothing about the field: the
/// check cannot be made, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_refuses_the_currency_field_is_asked_for_the_merchants_one_balance() {
    let app = spawn_app(false, |c| {
        c.refuse_balance_currency = Some(5003001);
        c.merchants[0].balance = 7000u64.into();
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let covered = dir.path().join("covered.csv");
    std::fs::write(
        &covered,
        "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
         DOC-1,4000,KES,EWALLET_MPESA,,Wanjiru,w@example.ke,254712345678\n\
         DOC-2,500,INR,UPI,,Asha,asha@example.in,9876543210\n",
    )
    .unwrap();
    let (code, out) = payroll(&app, &["--detach"], &covered).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("4000 KES (available 7000)") && out.contains("500 INR (available 7000)"),
        "{out}"
    );
    let short = dir.path().join("short.csv");
    std::fs::write(
        &short,
        "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
         DOC-3,8000,KES,EWALLET_MPESA,,Otieno,o@example.ke,254712345679\n",
    )
    .unwrap();
    let (code, out) = payroll(&app, &["--detach"], &short).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("batch total of 8000 KES (available 7000)"),
        "{out}"
    );
    assert!(app.deployment.order("DOC-3").await.unwrap().is_none());
    let calls = app.sandbox.calls(common::app::MCH_NO).unwrap();
    // Per run: the refused query naming each currency, and the plain one once.
    assert_eq!(calls.total, 5, "{calls:?}");

    app.sandbox.set_refuse_balance_currency(Some(500326));
    let small = dir.path().join("small.csv");
    std::fs::write(
        &small,
        "mchOrderNo,amount,currency,wayCode,walletId,customerName,customerEmail,customerContact\n\
         DOC-4,100,KES,EWALLET_MPESA,,Otieno,o@example.ke,254712345679\n",
    )
    .unwrap();
    let (code, out) = payroll(&app, &["--detach"], &small).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot read the balance") && out.contains("500326"),
        "{out}"
    );
    assert!(app.deployment.order("DOC-4").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_batch_id_with_more_members_than_the_file_is_followed_to_the_end() {
    let app = spawn_app(false, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.csv");
    std::fs::write(&first, GOOD).unwrap();
    let second = dir.path().join("second.csv");
    std::fs::write(
        &second,
        "mchOrderNo,amount,currency,wayCode,walletId\nPR-9,400,BDT,EWALLET_BKASH,01712345671\n",
    )
    .unwrap();
    let pool = app.pool(4);
    let (code, out) = payroll(&app, &["--batch-id", "NOV"], &first).await;
    assert_eq!(code, 0, "{out}");
    // The batch now holds 4 final orders, the file 1: following it must not underflow.
    let (code, out) = payroll(&app, &["--batch-id", "NOV"], &second).await;
    pool.stop().await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 queued, 0 already queued"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("total") && l.trim_end().ends_with(" 5")),
        "the whole batch is summarised: {out}"
    );
    assert_eq!(
        app.deployment.order("PR-9").await.unwrap().unwrap().phase,
        tarspay_worker::ledger::Phase::Succeeded
    );
}
