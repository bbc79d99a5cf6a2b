//! `bench cost`: after the retention, Redis gives back what the payouts used (final records
//! expired, outcomes trimmed by the workers' lifeline sweep); a lone payout (`-n 1`) is counted
//! alone, its idle rate reported beside it.

mod common;

use std::process::Command;

#[test]
fn memory_comes_back_after_the_retention() {
    let output = Command::new(common::app::BIN)
        .args(["bench", "cost", "-n", "2000", "--retention", "1s"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tarspay-dev bench cost");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    let number = |name: &str| {
        line[name]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    let in_flight = number("redis_bytes_per_payout_in_flight");
    let left = number("redis_bytes_per_payout_after_retention");
    assert!(in_flight > 500.0, "{line}");
    assert!(left * 5.0 < in_flight, "memory not given back: {line}");
    // The bench stops waiting 180 s after the retention: below that, it saw memory return.
    assert!(number("memory_returned_after_s") < 181.0, "{line}");
}

#[test]
fn a_lone_payout_is_counted_alone() {
    let output = Command::new(common::app::BIN)
        .args(["bench", "cost", "-n", "1"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tarspay-dev bench cost");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    let number = |name: &str| {
        line[name]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    assert_eq!(number("peak_in_flight"), 1.0, "{line}");
    // Register, accept, finalize: the warm-up payout before the window is not counted.
    assert_eq!(
        line["redis_calls_incl_lua_by_name"]["HSETNX"], 3.0,
        "{line}"
    );
    let (raw, less_idle) = (
        number("redis_cmds_per_payout"),
        number("redis_cmds_per_payout_less_idle"),
    );
    assert!(raw >= less_idle && less_idle > 0.0, "{line}");
    assert!(number("redis_calls_incl_lua_per_payout") > raw, "{line}");
    assert!(number("idle_redis_calls_incl_lua_per_s") > 0.0, "{line}");
    assert!(number("window_s") > 0.0, "{line}");
}
