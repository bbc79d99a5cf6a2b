//! `bench latency`: one JSON line per (rate, mode), every payout with exactly one outcome, and
//! ordered percentiles. No timing thresholds: the numbers depend on the machine.

mod common;

use common::app::assert_percentiles;
use serde_json::Value;

const N: u64 = 20;

fn run_bench(args: &[&str]) -> Vec<Value> {
    common::app::bench_lines(&[&["latency"], args].concat())
}

fn count(line: &Value, field: &str) -> u64 {
    line[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

#[test]
fn both_modes_report_every_payout_once() {
    let lines = run_bench(&["-n", &N.to_string(), "--rate", "100"]);
    let modes: Vec<&str> = lines.iter().filter_map(|l| l["mode"].as_str()).collect();
    assert_eq!(modes, ["callback", "poll"], "{lines:?}");
    for line in &lines {
        assert_eq!(line["bench"], "latency", "{line}");
        assert_eq!(count(line, "n"), N, "{line}");
        assert_eq!(count(line, "offered_per_s"), 100, "{line}");
        assert_eq!(count(line, "workers"), 1, "{line}");
        // Every payout once: the bench fails the run on a second outcome or a missing one.
        assert_eq!(count(line, "outcomes"), N, "{line}");
        assert_eq!(
            count(line, "via_callback") + count(line, "via_poll"),
            N,
            "{line}"
        );
        // Ordered in time on one clock (the outcome bound is capped by when it was read).
        assert_percentiles(line, "enqueue_to_create_ms", true);
        assert_percentiles(line, "final_to_outcome_ms", true);
        assert_percentiles(line, "enqueue_to_outcome_ms", true);
    }
    let (callback, poll) = (&lines[0], &lines[1]);
    assert!(callback["over_floor_ms"].is_null(), "{callback}");
    assert_percentiles(callback, "final_to_callback_ack_ms", true);
    // Every order got a verified callback (whether or not it came before the poll).
    assert!(count(callback, "callbacks_verified") >= N, "{callback}");
    assert!(count(callback, "callbacks_sent") >= N, "{callback}");
    // The first poll is due on whole milliseconds of Redis's clock, so an outcome may read a
    // fraction of a millisecond under the floor: only the order is checked.
    assert_percentiles(poll, "over_floor_ms", false);
    assert!(poll["final_to_callback_ack_ms"].is_null(), "{poll}");
    assert_eq!(count(poll, "callbacks_sent"), 0, "{poll}");
    assert_eq!(count(poll, "callbacks_verified"), 0, "{poll}");
    assert_eq!(count(poll, "via_poll"), N, "{poll}");
}

#[test]
fn one_mode_and_several_rates() {
    let lines = run_bench(&["-n", "5", "--rate", "100,200", "--mode", "poll"]);
    let rates: Vec<u64> = lines.iter().map(|l| count(l, "offered_per_s")).collect();
    assert_eq!(rates, [100, 200], "{lines:?}");
    assert!(lines.iter().all(|l| l["mode"] == "poll"), "{lines:?}");
}
