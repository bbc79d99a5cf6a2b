//! `bench console` at a tiny scale: a seed line, then one line per console page, each answered
//! 200 every time. No timing thresholds: the numbers depend on the machine.

mod common;

use common::app::assert_percentiles;
use serde_json::Value;

const ORDERS: u64 = 3_000;
const REQUESTS: u64 = 5;

const PAGES: [&str; 10] = [
    "overview",
    "payouts",
    "payouts_status_failed",
    "payouts_currency",
    "payouts_batch",
    "payouts_mch_order_no",
    "payout_detail",
    "batches",
    "batch",
    "dead",
];

fn number(line: &Value, field: &str) -> f64 {
    line[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

#[test]
fn every_page_answers_over_a_seeded_history() {
    let lines = common::app::bench_lines(&[
        "console",
        "--orders",
        &ORDERS.to_string(),
        "--requests",
        &REQUESTS.to_string(),
    ]);
    assert!(lines.iter().all(|l| l["bench"] == "console"), "{lines:?}");

    let seed = lines
        .iter()
        .find(|l| l["mode"] == "seed")
        .unwrap_or_else(|| panic!("no seed line: {lines:?}"));
    assert_eq!(number(seed, "n"), ORDERS as f64, "{seed}");
    // Finished orders, plus the open ones and the dead jobs' orders.
    assert!(number(seed, "orders_total") > ORDERS as f64, "{seed}");
    assert_eq!(number(seed, "batches"), 3.0, "{seed}");
    for field in [
        "finished_per_s",
        "open_queued",
        "open_unknown",
        "open_stuck",
        "dead_jobs",
        "redis_bytes_per_order",
        "redis_used_memory_bytes",
    ] {
        assert!(number(seed, field) > 0.0, "{field}: {seed}");
    }

    let pages: Vec<&Value> = lines.iter().filter(|l| l["mode"] == "page").collect();
    let names: Vec<&str> = pages.iter().filter_map(|l| l["page"].as_str()).collect();
    assert_eq!(names, PAGES, "{lines:?}");
    for line in pages {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["ok"], true, "{line}");
        assert_eq!(number(line, "n"), ORDERS as f64, "{line}");
        assert_eq!(number(line, "requests"), REQUESTS as f64, "{line}");
        assert!(number(line, "bytes") > 0.0, "{line}");
        assert!(
            line["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/console/")),
            "{line}"
        );
        assert_percentiles(line, "ms", true);
        assert!(line["ms"]["p50"].as_f64().unwrap() > 0.0, "{line}");
        // Each page shows what was seeded (rows: its stable `data-…` row attributes).
        let rows = number(line, "rows");
        match line["page"].as_str().unwrap() {
            "payouts_mch_order_no" => assert_eq!(rows, 1.0, "{line}"),
            // Registered, the create, accepted, the callback, final.
            "payout_detail" => assert!(rows >= 5.0, "{line}"),
            "dead" => assert!(rows >= 20.0, "{line}"),
            _ => assert!(rows > 0.0, "{line}"),
        }
    }
}
