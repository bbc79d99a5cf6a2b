//! Subcommands. Each module holds one family; this one parses arguments, loads settings and
//! dispatches.

mod audit;
mod payouts;
mod payroll;
mod serve;
mod tools;

use crate::config::Settings;
use crate::telemetry;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tarspay-worker",
    version,
    about = "Payouts through TarsPay that are never lost or doubled"
)]
pub struct Cli {
    /// Settings file (TOML) layered over the built-in defaults; TARSPAY_* variables win over it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the string to sign and the signature for a request body.
    Sign(tools::SignArgs),
    /// Check a TarsPay signature: prints `valid` (exit 0) or `invalid` (exit 1).
    Verify(tools::VerifyArgs),
    /// Query the merchant balance at the gateway.
    Balance,
    /// Run the payout worker pool (SIGTERM/SIGINT: stop fetching, finish in-flight work).
    Worker(payouts::WorkerArgs),
    /// Queue payouts from a JSON-lines file (or - for stdin).
    Enqueue(payouts::EnqueueArgs),
    /// Follow a deposit you created at TarsPay until its outcome.
    FollowDeposit(payouts::FollowDepositArgs),
    /// Show one payout's ledger record.
    Status(payouts::StatusArgs),
    /// Print outcomes from the start of the outcome stream.
    Outcomes(payouts::OutcomesArgs),
    /// Show the payout and webhook queues' numbers (waiting, pending, delayed, dead, workers).
    Queue,
    /// Stop every worker from sending creates (`--queue webhooks`: from delivering webhooks).
    Pause(payouts::QueueArgs),
    /// Let workers continue after a pause (an operator's or the systemic guard's).
    Resume(payouts::QueueArgs),
    /// Serve the callback receiver and the HTTP API (TARSPAY_LISTEN).
    Serve,
    /// Pay a payroll CSV as one batch and follow it to the end.
    Payroll(payroll::PayrollArgs),
    /// Check the deployment's invariants (every open order has one job, every final one
    /// outcome): exit 0 when they hold, 1 with the violations listed.
    Audit(audit::AuditArgs),
    /// Jobs that were given up.
    #[command(subcommand)]
    Dead(payouts::DeadCommand),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    end_quietly_on_closed_stdout(&cli.command);
    let settings = Settings::load(cli.config.as_deref())?;
    let telemetry = telemetry::init(&settings.log)?;
    let runtime = runtime_for(&settings, &cli.command)?;
    let result = runtime.block_on(run_command(&settings, cli.command));
    // Spans still batched are sent now, outside the runtime (the exporter blocks).
    drop(runtime);
    telemetry.shutdown();
    result
}

/// A command that only reads and prints ends quietly when its reader goes (`tarspay-worker
/// queue | head`), with exit code 141 as a shell reports a process ended by SIGPIPE, instead
/// of `println!`'s panic. SIGPIPE itself stays ignored (as Rust sets it): its default action
/// would also end the process on a write to a reset Redis or HTTP connection, which tokio
/// writes with `writev`, without `MSG_NOSIGNAL`. Not for commands that change state midway
/// (enqueues, payroll) or run services (`worker`, `serve`).
pub fn end_quietly_on_closed_stdout(command: &Command) {
    let reads_only = matches!(
        command,
        Command::Sign(_)
            | Command::Verify(_)
            | Command::Balance
            | Command::Status(_)
            | Command::Outcomes(_)
            | Command::Queue
            | Command::Audit(_)
    );
    if !reads_only {
        return;
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = crate::worker::panic_text(info.payload()).unwrap_or_default();
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(CLOSED_STDOUT_EXIT);
        }
        default(info);
    }));
}

/// The exit code of a printing command whose reader went away (128 + SIGPIPE).
pub const CLOSED_STDOUT_EXIT: i32 = 141;

/// The async runtime `command` runs on. A `worker` gets `worker_threads` threads: with one
/// (the default) it is a single event loop, where a job's Redis reply and HTTP answer wake it
/// on the thread it runs on instead of waking a parked thread (a `perf` profile of a busy
/// worker put a quarter of its CPU in parking and waking threads; docs/performance.md). The
/// other commands run on a thread per core.
pub fn runtime_for(settings: &Settings, command: &Command) -> Result<tokio::runtime::Runtime> {
    let threads = match command {
        Command::Worker(_) => settings.worker.threads,
        _ => 0,
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs one command with loaded settings (and logging set up): the `tarspay-worker` binary's
/// dispatch, shared with the developer's binary, which adds the demo, sandbox and benches.
pub async fn run_command(settings: &Settings, command: Command) -> Result<ExitCode> {
    match command {
        Command::Sign(args) => tools::sign(settings, args),
        Command::Verify(args) => tools::verify(args),
        Command::Balance => tools::balance(settings).await,
        Command::Worker(args) => payouts::run_worker(settings, args).await,
        Command::Enqueue(args) => payouts::enqueue(settings, args).await,
        Command::Status(args) => payouts::status(settings, args).await,
        Command::FollowDeposit(args) => payouts::follow_deposit(settings, args).await,
        Command::Outcomes(args) => payouts::outcomes(settings, args).await,
        Command::Queue => payouts::queue_stats(settings).await,
        Command::Pause(args) => payouts::pause(settings, true, args).await,
        Command::Resume(args) => payouts::pause(settings, false, args).await,
        Command::Dead(command) => payouts::dead(settings, command).await,
        Command::Audit(args) => audit::run(settings, args).await,
        Command::Serve => serve::run(settings).await,
        Command::Payroll(args) => payroll::run(settings, args).await,
    }
}

/// clap's value parser for durations (`500ms`, `2s`, `5m`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text)
}
