//! The README's recipe for reading outcomes from another language, run as written:
//! `examples/outcomes_consumer.py` (redis-py) with a consumer group, against a real pipeline.

mod common;

use common::app::{inr, spawn_app};
use std::collections::HashMap;
use std::process::Command;

fn consume(url: &str, count: usize) -> Vec<HashMap<String, String>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/outcomes_consumer.py");
    let output = Command::new("python3")
        .args([script, "--redis-url", url, "--prefix", "apptest"])
        .args(["--group", "python-app", "--count", &count.to_string()])
        .output()
        .expect("python3 runs (.ci/run installs it with redis-py)");
    assert!(
        output.status.success(),
        "the example failed (redis-py missing? `pip install redis`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON object of strings"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_consumer_group_reads_every_outcome_once() {
    let app = spawn_app(false, |sandbox| {
        sandbox.outcomes = vec![common::outcome_rule("PY-F", 3)];
    })
    .await;
    let pool = app.pool(4);
    for id in ["PY-1", "PY-2", "PY-F3"] {
        app.enqueue(inr(id, "100.00")).await;
    }
    let expected = app.wait_outcomes(3).await;
    pool.stop().await;

    let read = consume(&app.redis.url(), 3);
    let by_id: HashMap<&str, &HashMap<String, String>> = read
        .iter()
        .map(|fields| (fields["mchOrderNo"].as_str(), fields))
        .collect();
    assert_eq!(by_id.len(), 3, "{read:?}");
    for (id, outcome) in &expected {
        let fields = by_id[id.as_str()];
        assert_eq!(fields["status"], outcome.status.as_str(), "{id}");
        assert_eq!(fields["event"], "final");
        assert_eq!(fields["amount"], outcome.amount);
    }
    assert_eq!(by_id["PY-F3"]["status"], "failed");

    // Everything was acknowledged: the group has nothing pending, and a new outcome is the
    // only thing the next run reads.
    let pool = app.pool(2);
    app.enqueue(inr("PY-4", "100.00")).await;
    app.enqueue(inr("PY-5", "100.00")).await;
    app.wait_outcomes(5).await;
    pool.stop().await;
    // `--count 1` stops after one, though it read both: the other is left pending, and the
    // next run (the same consumer) reads it first.
    let first = consume(&app.redis.url(), 1);
    assert_eq!(first.len(), 1, "{first:?}");
    let second = consume(&app.redis.url(), 1);
    assert_eq!(second.len(), 1, "{second:?}");
    let mut ids = [&first[0]["mchOrderNo"], &second[0]["mchOrderNo"]];
    ids.sort();
    assert_eq!(ids, ["PY-4", "PY-5"]);
}
