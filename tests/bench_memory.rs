//! `bench cost`: after the retention, Redis gives back what the payouts used (final records
//! expired, outcomes trimmed by the workers' lifeline sweep); a lone payout (`-n 1`) is counted
//! alone, its idle rate reported beside it.

mod common;

/// The single JSON line of a bench run.
fn one_line(args: &[&str]) -> serde_json::Value {
    let mut lines = common::app::bench_lines(args);
    assert_eq!(lines.len(), 1, "one JSON line: {lines:?}");
    lines.remove(0)
}

fn number(line: &serde_json::Value, name: &str) -> f64 {
    line[name]
        .as_f64()
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn memory_comes_back_after_the_retention() {
    let line = one_line(&["cost", "-n", "2000", "--retention", "1s"]);
    let number = |name: &str| number(&line, name);
    let in_flight = number("redis_bytes_per_payout_in_flight");
    let left = number("redis_bytes_per_payout_after_retention");
    assert!(in_flight > 500.0, "{line}");
    assert!(left * 5.0 < in_flight, "memory not given back: {line}");
    // The bench stops waiting 180 s after the retention: below that, it saw memory return.
    assert!(number("memory_returned_after_s") < 181.0, "{line}");
}

#[test]
fn a_lone_payout_is_counted_alone() {
    let line = one_line(&["cost", "-n", "1"]);
    let number = |name: &str| number(&line, name);
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
