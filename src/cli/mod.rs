//! Subcommands. Each module holds one family; this one parses arguments, loads settings and
//! dispatches.

mod demo;
mod sandbox;
mod tools;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tarspay_worker::config::Settings;
use tarspay_worker::telemetry;

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
    /// Run a demo payroll against an in-process sandbox (no settings needed).
    Demo(demo::DemoArgs),
    /// Run the simulated TarsPay gateway.
    Sandbox(sandbox::SandboxArgs),
    /// Print the string to sign and the signature for a request body.
    Sign(tools::SignArgs),
    /// Check a TarsPay signature: prints `valid` (exit 0) or `invalid` (exit 1).
    Verify(tools::VerifyArgs),
    /// Query the merchant balance at the gateway.
    Balance,
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Sandbox(args) => sandbox::run(&settings, args).await,
            Command::Sign(args) => tools::sign(&settings, args),
            Command::Verify(args) => tools::verify(args),
            Command::Balance => tools::balance(&settings).await,
        }
    })
}

pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    tarspay_worker::config::parse_duration(text)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
