//! `bench fairness`, small: one JSON line, every try measured, the payroll still queued at
//! the first try, ordered percentiles. No timing thresholds: the numbers depend on the
//! machine.

mod common;

use serde_json::Value;

const ROWS: u64 = 2_000;
const TRIES: u64 = 10;

fn count(line: &Value, field: &str) -> u64 {
    line[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

/// p50 ≤ p99 ≤ max, all finite and non-negative (unless null is allowed and found).
fn assert_summary(line: &Value, field: &str) {
    let summary = &line[field];
    let value = |p: &str| {
        summary[p]
            .as_f64()
            .unwrap_or_else(|| panic!("no {field}.{p} in {line}"))
    };
    let (p50, p99, max) = (value("p50"), value("p99"), value("max"));
    assert!(p50 <= p99 && p99 <= max, "{field} unordered: {line}");
    assert!(p50 >= 0.0 && max.is_finite(), "{field}: {line}");
}

#[test]
fn every_try_is_measured_behind_a_queued_payroll() {
    let lines = common::app::bench_lines(&[
        "fairness",
        "--rows",
        &ROWS.to_string(),
        "--tries",
        &TRIES.to_string(),
        "--interval",
        "20ms",
        "--workers",
        "1",
    ]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["bench"], "fairness", "{line}");
    assert_eq!(count(line, "rows"), ROWS, "{line}");
    assert_eq!(count(line, "tries"), TRIES, "{line}");
    assert_eq!(count(line, "interval_ms"), 20, "{line}");
    assert_eq!(count(line, "workers"), 1, "{line}");
    assert_eq!(count(line, "partitions"), 1, "{line}");
    // Every try measured: the bench fails the run when an urgent order is missing.
    assert_eq!(count(line, "tries_measured"), TRIES, "{line}");
    // Enqueue → created: on one host's clock, the order cannot be created before its
    // enqueue started.
    assert_summary(line, "enqueue_to_create_ms");
    assert_summary(line, "payroll_created_during_wait");
    assert!(count(line, "tries_under_1s") <= TRIES, "{line}");
    assert!(line["p99_under_1s"].is_boolean(), "{line}");
    // The payroll was queued before the workers started: rows were still to create at the
    // first try, never more than the payroll, and the backlog only shrinks.
    let first = count(line, "payroll_remaining_first_try");
    let last = count(line, "payroll_remaining_last_try");
    let after = count(line, "payroll_remaining_after_tries");
    assert!(first > 0 && first <= ROWS, "{line}");
    assert!(last <= first && after <= last, "{line}");
    assert_eq!(
        line["payroll_drained_during_tries"].as_bool(),
        Some(last == 0),
        "{line}"
    );
    let backlogged = count(line, "tries_while_backlogged");
    assert!((1..=TRIES).contains(&backlogged), "{line}");
    assert_summary(line, "enqueue_to_create_ms_while_backlogged");
    // The machine, and the line for a human.
    assert!(count(line, "cpus") >= 1, "{line}");
    assert!(line.get("loadavg_1m").is_some(), "{line}");
    assert!(line.get("host_busy_pct").is_some(), "{line}");
    let summary = line["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("fairness: 10 urgent payouts"), "{line}");
}
