//! `bench fairness`, small: one JSON line, every try measured, the payroll still queued at
//! the first try, ordered percentiles. No timing thresholds: the numbers depend on the
//! machine.

mod common;

use common::app::assert_percentiles;
use serde_json::Value;

const ROWS: u64 = 2_000;
const TRIES: u64 = 10;

fn count(line: &Value, field: &str) -> u64 {
    line[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
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
    assert_percentiles(line, "enqueue_to_create_ms", true);
    assert_percentiles(line, "payroll_created_during_wait", true);
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
    assert_percentiles(line, "enqueue_to_create_ms_while_backlogged", true);
    // The machine, and the line for a human.
    assert!(count(line, "cpus") >= 1, "{line}");
    assert!(line.get("loadavg_1m").is_some(), "{line}");
    assert!(line.get("host_busy_pct").is_some(), "{line}");
    let summary = line["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("fairness: 10 urgent payouts"), "{line}");
}
