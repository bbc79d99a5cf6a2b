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
    // Register and finalize: the warm-up payout before the window is not counted, and its
    // first poll found its order final, so this one's acceptance waited for its own first
    // poll, which found it final too (the sandbox's 100 ms against the poll's 150 ms).
    assert_eq!(
        line["redis_calls_incl_lua_by_name"]["HSETNX"], 2.0,
        "{line}"
    );
    // The guard's reset was sent alone: its own round trip.
    assert_eq!(line["redis_cmds_by_name"]["DEL"], 1.0, "{line}");
    assert_eq!(line["redis_cmds_by_name"].get("HSETNX"), None, "{line}");
    let (raw, less_idle) = (
        number("redis_cmds_per_payout"),
        number("redis_cmds_per_payout_less_idle"),
    );
    assert!(raw >= less_idle && less_idle > 0.0, "{line}");
    assert!(number("redis_calls_incl_lua_per_payout") > raw, "{line}");
    assert!(number("idle_redis_calls_incl_lua_per_s") > 0.0, "{line}");
    assert!(number("window_s") > 0.0, "{line}");
}

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // `pid (comm) state ppid …`: the name may hold spaces, so read after its ')'.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn running(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie is no longer running.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .is_some_and(|at| !stat[at..].starts_with(") Z"))
    })
}

/// A bench stopped by SIGTERM stops the processes it started (redis-server, sandbox, worker)
/// rather than leaving them running beside the next measurement.
#[test]
fn a_bench_stopped_by_sigterm_stops_what_it_started() {
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_tarspay-dev"))
        .args(["bench", "e2e", "-n", "1000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = bench.id();
    // redis-server, the sandbox and the worker.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut started = children_of(pid);
    while started.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the bench started {started:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        started = children_of(pid);
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = bench.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stopped by a signal"), "{stderr}");
    let left: Vec<u32> = started
        .into_iter()
        .filter(|child| running(*child))
        .collect();
    assert!(
        left.is_empty(),
        "still running after the bench ended: {left:?}"
    );
}
