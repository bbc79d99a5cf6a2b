//! `bench latency`: where the time of one payout goes, per payout, at a paced rate (100 and
//! 1,000 payouts/s), by the route its final state takes back to the worker:
//!
//! * `callback`: the sandbox sends a signed callback to a `tarspay-worker serve` process,
//!   which verifies it and applies the final state to the outcome stream. The workers' first
//!   poll waits the production default (2 s), so it is only the fallback.
//! * `poll`: no callbacks; the workers' poll-status job finds the final state (first poll
//!   150 ms after the create, as in `bench e2e`).
//!
//! Each (rate, route) runs on a fresh pipeline (Redis, sandbox, workers, and `serve` for
//! callbacks). Per payout it joins three clocks of the one host, all wall-clock µs: the
//! bench's (enqueue started), the sandbox's (`createdAtUs`, `finalAtUs` of
//! `/sandbox/orders`) and Redis's (the outcome's stream entry id, ms; see
//! [`PipelineRun::outcome_at_us`]), and reports p50/p99/max of
//! * enqueue → create received by the sandbox,
//! * gateway final → outcome appended,
//! * enqueue → outcome, and for `poll` that minus its floor (create + max(final after, first
//!   poll delay)): what the pipeline adds to the timers.

use super::e2e::{
    DEFAULT_CONCURRENCY, Pipeline, PipelineRun, PipelineTimers, check_one_rule, drive,
};
use super::shared::{HostCpu, RedisChoice, load_average, percentile, round};
use super::{BenchError, BenchOptions, Report};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

/// Offered loads when `--rate` is not given, payouts per second.
pub const DEFAULT_RATES: [u64; 2] = [100, 1_000];
/// Worker processes when `--workers` is not given (`bench e2e`'s first run).
pub const DEFAULT_WORKERS: usize = 1;
/// Payouts per run when `-n` is not given: this many seconds of load at the run's rate
/// (1,000 at 100/s, 10,000 at 1,000/s).
const DEFAULT_SECONDS: u64 = 10;
const ID_PREFIX: &str = "LAT";

/// How a final state reaches the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Callback,
    Poll,
}

impl Route {
    pub const ALL: [Route; 2] = [Route::Callback, Route::Poll];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Callback => "callback",
            Route::Poll => "poll",
        }
    }

    fn timers(self) -> PipelineTimers {
        match self {
            Route::Callback => PipelineTimers {
                // The production default: the poll is the fallback, so a run whose outcomes
                // all come sooner than this measured the callback path alone.
                poll_first_delay: "2s",
                callbacks: true,
                ..PipelineTimers::default()
            },
            Route::Poll => PipelineTimers::default(),
        }
    }
}

/// What `bench latency` runs; every (rate, route) pair is one run and one JSON line.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    pub rates: Vec<u64>,
    pub routes: Vec<Route>,
    pub workers: usize,
}

impl Default for LatencyOptions {
    fn default() -> Self {
        Self {
            rates: DEFAULT_RATES.to_vec(),
            routes: Route::ALL.to_vec(),
            workers: DEFAULT_WORKERS,
        }
    }
}

pub async fn run(
    options: &BenchOptions,
    latency: &LatencyOptions,
    report: Report<'_>,
) -> Result<(), BenchError> {
    if latency.rates.contains(&0) || latency.workers == 0 {
        return Err(BenchError::Setup(
            "--rate and --workers must be at least 1".into(),
        ));
    }
    for &rate in &latency.rates {
        for &route in &latency.routes {
            report(run_one(options, latency.workers, rate, route).await?);
        }
    }
    Ok(())
}

/// One run on a fresh pipeline; its JSON line.
async fn run_one(
    options: &BenchOptions,
    workers: usize,
    rate: u64,
    route: Route,
) -> Result<Value, BenchError> {
    let n = options.n.unwrap_or(rate * DEFAULT_SECONDS).max(1);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let partitions = options.partitions()?;
    let timers = route.timers();
    let pipeline = Pipeline::start(
        RedisChoice::of(options)?,
        partitions,
        &format!("latency-{}-{rate}", route.as_str()),
        workers,
        concurrency,
        &timers,
        &[],
    )
    .await?;
    let measured = measure(&pipeline, &timers, route, rate, n).await;
    let redis = pipeline.target.describe();
    pipeline.finish().await?;
    let mut line = measured?;
    line.extend([
        ("bench".to_owned(), json!("latency")),
        ("mode".to_owned(), json!(route.as_str())),
        ("n".to_owned(), json!(n)),
        ("workers".to_owned(), json!(workers)),
        ("concurrency".to_owned(), json!(concurrency)),
        ("partitions".to_owned(), json!(partitions)),
        ("redis".to_owned(), json!(redis)),
        ("offered_per_s".to_owned(), json!(rate)),
        ("sandbox_final_after".to_owned(), json!(timers.final_after)),
        (
            "poll_first_delay".to_owned(),
            json!(timers.poll_first_delay),
        ),
    ]);
    Ok(Value::Object(line))
}

/// Drives `n` payouts at `rate` a second through the pipeline and reads the sandbox's stamps
/// and the receiver's counters; the run's measured fields.
async fn measure(
    pipeline: &Pipeline,
    timers: &PipelineTimers,
    route: Route,
    rate: u64,
    n: u64,
) -> Result<serde_json::Map<String, Value>, BenchError> {
    let mut tail = pipeline.tail().await?;
    let host_before = HostCpu::read();
    let run = drive(pipeline, &mut tail, ID_PREFIX, n, Some(rate as f64)).await?;
    let host_after = HostCpu::read();
    let load = load_average();
    check_one_rule(pipeline, &[&run]).await?;
    let stamps = sandbox_stamps(&pipeline.sandbox.orders().await?)?;
    let callbacks_verified = match &pipeline.serve {
        Some(serve) => serve
            .callbacks()
            .await?
            .into_iter()
            .filter(|(result, _)| result == "verified")
            .map(|(_, count)| count)
            .sum(),
        None => 0,
    };
    let floor = Floor::of(timers)?;
    let payouts = join(&run, &stamps, floor)?;
    if let Some(dir) = std::env::var_os(CSV_DIR_VAR) {
        let path =
            std::path::Path::new(&dir).join(format!("latency-{}-{rate}.csv", route.as_str()));
        write_csv(&path, &run, &stamps)
            .map_err(|err| BenchError::Setup(format!("{}: {err}", path.display())))?;
    }
    let callbacks_sent: u64 = stamps.values().map(|s| u64::from(s.callbacks_sent)).sum();
    if route == Route::Poll && callbacks_sent > 0 {
        return Err(BenchError::Check(format!(
            "the sandbox sent {callbacks_sent} callbacks with callbacks off"
        )));
    }
    let via_callback = match route {
        Route::Callback => payouts.iter().filter(|p| p.before_first_poll).count(),
        // The sandbox sent none (checked above).
        Route::Poll => 0,
    };
    let summary = |pick: fn(&PayoutLatency) -> Option<f64>| {
        summarise(payouts.iter().filter_map(pick).collect())
    };
    let shares = host_before
        .zip(host_after)
        .and_then(|(before, after)| before.shares_until(&after));
    let mut line = serde_json::Map::new();
    line.extend([
        (
            "achieved_per_s".to_owned(),
            json!(round(n as f64 / run.enqueue_elapsed.as_secs_f64(), 0)),
        ),
        (
            "enqueue_to_create_ms".to_owned(),
            summary(|p| Some(p.enqueue_to_create)),
        ),
        (
            "final_to_outcome_ms".to_owned(),
            summary(|p| Some(p.final_to_outcome)),
        ),
        (
            "enqueue_to_outcome_ms".to_owned(),
            summary(|p| Some(p.enqueue_to_outcome)),
        ),
        (
            "over_floor_ms".to_owned(),
            match route {
                Route::Poll => summary(|p| Some(p.over_floor)),
                Route::Callback => Value::Null,
            },
        ),
        (
            "final_to_callback_ack_ms".to_owned(),
            match route {
                Route::Callback => summary(|p| p.final_to_callback_ack),
                Route::Poll => Value::Null,
            },
        ),
        ("outcomes".to_owned(), json!(run.outcomes.len())),
        ("via_callback".to_owned(), json!(via_callback)),
        ("via_poll".to_owned(), json!(payouts.len() - via_callback)),
        ("callbacks_sent".to_owned(), json!(callbacks_sent)),
        ("callbacks_verified".to_owned(), json!(callbacks_verified)),
        (
            "host_steal_pct".to_owned(),
            json!(shares.map(|(steal, _)| round(steal, 1))),
        ),
        (
            "host_busy_pct".to_owned(),
            json!(shares.map(|(_, busy)| round(busy, 1))),
        ),
        ("loadavg_1m".to_owned(), json!(load)),
        ("note".to_owned(), json!(NOTE)),
    ]);
    Ok(line)
}

const NOTE: &str = "per payout, wall clock of one host: enqueue = when the bench's enqueue call started; create/final = the sandbox's createdAtUs/finalAtUs; outcome = end of the ms of its Redis stream entry id, or when the bench read it if earlier (an upper bound, 1 ms resolution). via_callback (mode callback): outcomes appended before their first poll could run (create + poll_first_delay); via_poll: the rest. over_floor (poll): enqueue→outcome time past create + max(sandbox_final_after, poll_first_delay)";

/// With this variable set to a directory, each run also writes its raw stamps there, one row
/// per payout (`latency-{mode}-{rate}.csv`), to see when in a run the slow ones happened.
pub const CSV_DIR_VAR: &str = "BENCH_LATENCY_CSV";

/// index, then the four clocks of one payout (µs since the epoch; the ack empty without one).
fn write_csv(
    path: &std::path::Path,
    run: &PipelineRun,
    stamps: &HashMap<String, SandboxStamps>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        out,
        "index,enqueued_us,created_us,final_us,outcome_us,callback_acknowledged_us"
    )?;
    for index in 0..run.n as usize {
        let Some(order) = stamps.get(&format!("{ID_PREFIX}-{index:07}")) else {
            continue;
        };
        let ack = order
            .callback_acknowledged_at_us
            .map_or(String::new(), |at| at.to_string());
        writeln!(
            out,
            "{index},{},{},{},{},{ack}",
            run.enqueued_at_us[index],
            order.created_at_us,
            order.final_at_us,
            run.outcome_at_us[index]
        )?;
    }
    out.flush()
}

/// What the sandbox stamped on one order (µs since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SandboxStamps {
    created_at_us: u64,
    final_at_us: u64,
    callback_acknowledged_at_us: Option<u64>,
    callbacks_sent: u32,
}

/// `mchOrderNo` → stamps, from `/sandbox/orders`; every order must be final.
fn sandbox_stamps(orders: &[Value]) -> Result<HashMap<String, SandboxStamps>, BenchError> {
    orders
        .iter()
        .map(|order| {
            let missing =
                |field: &str| BenchError::Sandbox(format!("an order without {field}: {order}"));
            let id = order["mchOrderNo"]
                .as_str()
                .ok_or_else(|| missing("mchOrderNo"))?;
            let stamps = SandboxStamps {
                created_at_us: order["createdAtUs"]
                    .as_u64()
                    .ok_or_else(|| missing("createdAtUs"))?,
                final_at_us: order["finalAtUs"]
                    .as_u64()
                    .ok_or_else(|| missing("finalAtUs"))?,
                callback_acknowledged_at_us: order["callbackAcknowledgedAtUs"].as_u64(),
                callbacks_sent: order["callbacksSent"]
                    .as_u64()
                    .and_then(|sent| u32::try_from(sent).ok())
                    .ok_or_else(|| missing("callbacksSent"))?,
            };
            Ok((id.to_owned(), stamps))
        })
        .collect()
}

/// The earliest a polled outcome can be, after the create: the sandbox must have finalised
/// the order and the first poll must be due.
#[derive(Debug, Clone, Copy)]
struct Floor {
    final_after: Duration,
    poll_first_delay: Duration,
}

impl Floor {
    fn of(timers: &PipelineTimers) -> Result<Self, BenchError> {
        let parse = |text: &str| {
            humantime::parse_duration(text)
                .map_err(|err| BenchError::Setup(format!("timer {text}: {err}")))
        };
        Ok(Self {
            final_after: parse(timers.final_after)?,
            poll_first_delay: parse(timers.poll_first_delay)?,
        })
    }

    fn after_create_us(&self) -> u64 {
        self.final_after.max(self.poll_first_delay).as_micros() as u64
    }
}

/// One payout's intervals, ms (negative only if clocks disagree: kept, not hidden).
#[derive(Debug, Clone, PartialEq)]
struct PayoutLatency {
    enqueue_to_create: f64,
    final_to_outcome: f64,
    enqueue_to_outcome: f64,
    over_floor: f64,
    final_to_callback_ack: Option<f64>,
    /// The outcome was appended before the first poll of the order could run: only the
    /// callback can have applied it.
    before_first_poll: bool,
}

/// `later - earlier` in ms, signed.
fn ms_between(earlier: u64, later: u64) -> f64 {
    (later as f64 - earlier as f64) / 1000.0
}

/// Every payout of the run with the sandbox's stamps of its order.
fn join(
    run: &PipelineRun,
    stamps: &HashMap<String, SandboxStamps>,
    floor: Floor,
) -> Result<Vec<PayoutLatency>, BenchError> {
    (0..run.n as usize)
        .map(|index| {
            let id = format!("{ID_PREFIX}-{index:07}");
            let order = stamps
                .get(&id)
                .ok_or_else(|| BenchError::Check(format!("the sandbox has no order {id}")))?;
            let enqueued = run.enqueued_at_us[index];
            let outcome = run.outcome_at_us[index];
            Ok(PayoutLatency {
                enqueue_to_create: ms_between(enqueued, order.created_at_us),
                final_to_outcome: ms_between(order.final_at_us, outcome),
                enqueue_to_outcome: ms_between(enqueued, outcome),
                over_floor: ms_between(order.created_at_us + floor.after_create_us(), outcome),
                final_to_callback_ack: order
                    .callback_acknowledged_at_us
                    .map(|acked| ms_between(order.final_at_us, acked)),
                before_first_poll: outcome
                    < order.created_at_us + floor.poll_first_delay.as_micros() as u64,
            })
        })
        .collect()
}

/// `{"p50", "p99", "max"}` in ms (0.01 ms), or null for no values.
pub fn summarise(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    json!({
        "p50": round(percentile(&values, 50.0), 2),
        "p99": round(percentile(&values, 99.0), 2),
        "max": round(values.last().copied().unwrap_or(0.0), 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(enqueued_at_us: Vec<u64>, outcome_at_us: Vec<u64>) -> PipelineRun {
        PipelineRun {
            n: enqueued_at_us.len() as u64,
            elapsed: Duration::ZERO,
            enqueue_elapsed: Duration::ZERO,
            latency_ms: (0.0, 0.0, 0.0),
            peak_in_flight: 0,
            outcomes: HashMap::new(),
            enqueued_at_us,
            outcome_at_us,
        }
    }

    #[test]
    fn payouts_join_the_sandbox_stamps_by_order_number() {
        let stamps = sandbox_stamps(&[json!({"mchOrderNo": "LAT-0000000",
            "createdAtUs": 1_002_000u64, "finalAtUs": 1_102_000u64,
            "callbackAcknowledgedAtUs": 1_105_000u64, "callbacksSent": 1})])
        .unwrap();
        let floor = Floor {
            final_after: Duration::from_millis(100),
            poll_first_delay: Duration::from_millis(150),
        };
        let joined = join(&run_of(vec![1_000_000], vec![1_104_500]), &stamps, floor).unwrap();
        assert_eq!(
            joined,
            vec![PayoutLatency {
                enqueue_to_create: 2.0,
                final_to_outcome: 2.5,
                enqueue_to_outcome: 104.5,
                over_floor: -47.5,
                final_to_callback_ack: Some(3.0),
                before_first_poll: true,
            }]
        );
        let late = join(&run_of(vec![1_000_000], vec![1_160_000]), &stamps, floor).unwrap();
        assert!(!late[0].before_first_poll);
        assert_eq!(late[0].over_floor, 8.0);
        assert!(join(&run_of(vec![0, 0], vec![0, 0]), &stamps, floor).is_err());
    }

    #[test]
    fn the_csv_has_one_row_per_payout() {
        let stamps = sandbox_stamps(&[json!({"mchOrderNo": "LAT-0000000",
            "createdAtUs": 20u64, "finalAtUs": 30u64, "callbackAcknowledgedAtUs": null,
            "callbacksSent": 0})])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.csv");
        write_csv(&path, &run_of(vec![10], vec![40]), &stamps).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "index,enqueued_us,created_us,final_us,outcome_us,callback_acknowledged_us\n0,10,20,30,40,\n"
        );
    }

    #[test]
    fn an_order_without_its_final_stamp_is_an_error() {
        let unfinished = json!({"mchOrderNo": "LAT-0000000", "createdAtUs": 1u64,
            "finalAtUs": null, "callbacksSent": 0});
        assert!(sandbox_stamps(&[unfinished]).is_err());
    }

    #[test]
    fn summaries_are_ordered_percentiles() {
        assert_eq!(summarise(Vec::new()), Value::Null);
        let summary = summarise((1..=200).rev().map(f64::from).collect());
        assert_eq!(summary, json!({"p50": 100.0, "p99": 198.0, "max": 200.0}));
    }
}
