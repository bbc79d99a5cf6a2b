//! `tarspay-dev`: the `tarspay-worker` binary's commands plus the developer's own — the demo,
//! the sandbox and the benchmarks. `cargo run --release -- demo` runs this.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tarspay_worker::config::Settings;
use tarspay_worker::telemetry;

/// mimalloc instead of glibc's malloc: a payout allocates many small, short-lived buffers
/// (JSON, HTTP, Redis replies), and glibc's allocator took about 15 % of a worker's CPU in a
/// `perf` profile of `bench e2e` (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tarspay-dev",
    version,
    about = "tarspay-worker with its demo, sandbox and benchmarks"
)]
struct DevCli {
    /// Settings file (TOML) layered over the built-in defaults; TARSPAY_* variables win over it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: DevCommand,
}

#[derive(Subcommand)]
enum DevCommand {
    /// Run a demo payroll against an in-process sandbox (no settings needed).
    Demo(cli::demo::DemoArgs),
    /// Run the simulated TarsPay gateway.
    Sandbox(tarspay_sandbox::cli::SandboxArgs),
    /// Benchmarks: queue, e2e, cost, backlog, delay, latency, fairness or console; one JSON line per result.
    Bench(cli::bench::BenchArgs),
    #[command(flatten)]
    Product(tarspay_worker::cli::Command),
}

fn main() -> ExitCode {
    match run(DevCli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: DevCli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(args.config.as_deref())?;
    let mut log = settings.log.clone();
    if matches!(args.command, DevCommand::Demo(_)) {
        // The demo's own output is the summary; per-payout logs would drown it.
        log.filter = "warn".to_owned();
    }
    let telemetry = telemetry::init(&log)?;
    let runtime = match &args.command {
        DevCommand::Product(command) => {
            tarspay_worker::cli::end_quietly_on_closed_stdout(command);
            tarspay_worker::cli::runtime_for(&settings, command)?
        }
        _ => tokio::runtime::Runtime::new().context("cannot start the async runtime")?,
    };
    let result = runtime.block_on(async move {
        match args.command {
            DevCommand::Demo(args) => cli::demo::run(args).await,
            DevCommand::Sandbox(args) => tarspay_sandbox::cli::run(&settings, args).await,
            DevCommand::Bench(args) => cli::bench::run(args).await,
            DevCommand::Product(command) => {
                tarspay_worker::cli::run_command(&settings, command).await
            }
        }
    });
    // Spans still batched are sent now, outside the runtime (the exporter blocks).
    drop(runtime);
    telemetry.shutdown();
    result
}
