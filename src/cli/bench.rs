//! `bench <queue|e2e|cost|backlog|delay|latency|fairness|console>`: runs a benchmark from `tarspay_dev::bench` and prints
//! one JSON line per result.

use anyhow::Result;
use clap::{Args, ValueEnum};
use std::io::Write;
use std::process::ExitCode;
use tarspay_dev::bench::console::ConsoleOptions;
use tarspay_dev::bench::fairness::FairnessOptions;
use tarspay_dev::bench::latency::{LatencyOptions, Route};
use tarspay_dev::bench::{self, BenchOptions};

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    /// No-op jobs through the queue and an apalis worker (default N 100,000).
    Queue,
    /// Payouts through worker processes against the sandbox process, 1 and 3 workers
    /// (default N 20,000).
    E2e,
    /// Redis commands, worker memory and CPU per payout (default N 10,000 in flight).
    Cost,
    /// Throughput with N jobs already waiting vs an empty queue (default N 100,000).
    Backlog,
    /// Lateness of delayed jobs (due to start) at 100 and 1,000 a second, with 1 and 4 worker
    /// processes, and what idle workers cost Redis.
    Delay,
    /// Per-payout latency (enqueue → create, gateway final → outcome, enqueue → outcome) at
    /// paced rates, with final states arriving by signed callbacks to `serve` or by polls.
    Latency,
    /// One merchant's payout (enqueue → created at the gateway) while another merchant's
    /// payroll is queued, with 2 worker processes (default 20,000 rows, 100 tries).
    Fairness,
    /// Console page render times (`serve` in-process) with `--orders` finished orders seeded
    /// through the ledger (default 1,000,000; `--requests` timed GETs per page, default 50).
    Console,
    /// One worker process of `delay` (started by it).
    #[value(hide = true)]
    DelayWorker,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    which: Which,
    /// Redis to use, under a unique key prefix that is removed afterwards (on every master of
    /// a cluster): one URL, or a cluster's seeds separated by commas (any node's URL works; a
    /// cluster is detected). Without it the bench starts its own redis-server on a free port.
    #[arg(long, value_name = "URL", conflicts_with = "cluster")]
    redis_url: Option<String>,
    /// Start a private Redis Cluster of M masters (no replicas) instead of a private
    /// redis-server; 1 is one cluster-enabled node serving every slot, otherwise at least 3.
    #[arg(long, value_name = "M")]
    cluster: Option<usize>,
    /// Partitions: of the bench's queue (`queue`, `backlog`) or of the deployment (`e2e`,
    /// `cost`, passed to the workers as TARSPAY_PARTITIONS). Default 1.
    #[arg(long, value_name = "P")]
    partitions: Option<usize>,
    /// Jobs or payouts per run.
    #[arg(short = 'n', long = "n")]
    n: Option<u64>,
    /// `queue`: jobs in flight per worker process; benches with payout workers: their
    /// `concurrency` (gateway calls in flight per process).
    #[arg(long)]
    concurrency: Option<usize>,
    /// `cost` only: run the workers with this retention (e.g. "10s") and, after the run, wait
    /// until the final records expire and the outcomes are trimmed, then report the memory
    /// left per payout.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    retention: Option<std::time::Duration>,
    /// `latency` only: offered payouts per second, one run each (repeat the flag or separate
    /// by commas). Default 100 and 1000.
    #[arg(long = "rate", value_name = "PER_S", value_delimiter = ',')]
    rates: Vec<u64>,
    /// `latency` only: how final states reach the workers. Default both.
    #[arg(long, value_enum)]
    mode: Option<LatencyMode>,
    /// `latency` and `fairness`: worker processes. Default 1 (`latency`), 2 (`fairness`).
    #[arg(long)]
    workers: Option<usize>,
    /// `fairness` only: rows of the first merchant's payroll, queued before the workers
    /// start. Default 20000.
    #[arg(long)]
    rows: Option<u64>,
    /// `fairness` only: the other merchant's payouts measured, one at a time. Default 100.
    #[arg(long)]
    tries: Option<u64>,
    /// `fairness` only: between two tries (e.g. "100ms"). Default 100ms.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    interval: Option<std::time::Duration>,
    /// `console` only: finished orders to seed. Default 1000000.
    #[arg(long)]
    orders: Option<u64>,
    /// `console` only: timed requests per page (after a warm-up of 3). Default 50.
    #[arg(long)]
    requests: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LatencyMode {
    /// Signed callbacks to a `serve` process (polls only as the 2 s fallback).
    Callback,
    /// No callbacks: the workers' poll-status job finds each final state.
    Poll,
}

impl BenchArgs {
    /// What `latency` runs, from its flags and defaults.
    fn latency(&self) -> LatencyOptions {
        let defaults = LatencyOptions::default();
        LatencyOptions {
            rates: if self.rates.is_empty() {
                defaults.rates
            } else {
                self.rates.clone()
            },
            routes: match self.mode {
                None => defaults.routes,
                Some(LatencyMode::Callback) => vec![Route::Callback],
                Some(LatencyMode::Poll) => vec![Route::Poll],
            },
            workers: self.workers.unwrap_or(defaults.workers),
        }
    }

    /// What `fairness` runs, from its flags and defaults.
    fn fairness(&self) -> FairnessOptions {
        let defaults = FairnessOptions::default();
        FairnessOptions {
            rows: self.rows.unwrap_or(defaults.rows),
            tries: self.tries.unwrap_or(defaults.tries),
            interval: self.interval.unwrap_or(defaults.interval),
            workers: self.workers.unwrap_or(defaults.workers),
        }
    }

    /// What `console` runs, from its flags and defaults.
    fn console(&self) -> ConsoleOptions {
        let defaults = ConsoleOptions::default();
        ConsoleOptions {
            orders: self.orders.unwrap_or(defaults.orders),
            requests: self.requests.unwrap_or(defaults.requests),
        }
    }
}

pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    let latency = args.latency();
    let fairness = args.fairness();
    let console = args.console();
    let options = BenchOptions {
        redis_url: args.redis_url,
        cluster: args.cluster,
        partitions: args.partitions,
        n: args.n,
        concurrency: args.concurrency,
        retention: args.retention,
    };
    let mut print = |line: serde_json::Value| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", leading_keys_first(line));
        let _ = out.flush();
    };
    // A bench stopped by SIGINT or SIGTERM drops its run, and with it the processes it
    // started (sandbox, workers, redis-server: each is killed on drop), instead of leaving
    // them running to skew the next measurement.
    let child_of_a_bench = matches!(args.which, Which::DelayWorker);
    let bench = async {
        match args.which {
            Which::Queue => bench::queue::run(&options, &mut print).await,
            Which::E2e => bench::e2e::run(&options, &mut print).await,
            Which::Cost => bench::cost::run(&options, &mut print).await,
            Which::Backlog => bench::backlog::run(&options, &mut print).await,
            Which::Delay => bench::delay::run(&options, &mut print).await,
            Which::Latency => bench::latency::run(&options, &latency, &mut print).await,
            Which::Fairness => bench::fairness::run(&options, &fairness, &mut print).await,
            Which::Console => bench::console::run(&options, &console, &mut print).await,
            Which::DelayWorker => bench::delay::worker().await,
        }
    };
    if child_of_a_bench {
        // Stopped by its parent; keeps the worker's own handling of signals.
        bench.await?;
        return Ok(ExitCode::SUCCESS);
    }
    let stopped = tarspay_worker::shutdown::signal();
    tokio::select! {
        finished = bench => finished?,
        () = stopped => anyhow::bail!("stopped by a signal; the processes it started are stopped too"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON line with `bench`, `mode`, `page`, `n`, `workers`, `concurrency`, `partitions` and `redis`
/// first (serde_json sorts the
/// rest by name), so lines read well one under another.
fn leading_keys_first(line: serde_json::Value) -> String {
    let serde_json::Value::Object(mut map) = line else {
        return line.to_string();
    };
    let mut fields = Vec::with_capacity(map.len());
    for key in [
        "bench",
        "mode",
        "page",
        "n",
        "workers",
        "concurrency",
        "partitions",
        "redis",
    ] {
        if let Some(value) = map.remove(key) {
            fields.push((key.to_owned(), value));
        }
    }
    fields.extend(map);
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}:{value}", serde_json::Value::from(key.as_str())))
        .collect();
    format!("{{{}}}", body.join(","))
}
