//! The `tarspay-worker` binary: one command with subcommands (see `tarspay_worker::cli`).
//! Errors become `anyhow` in the CLI and are printed here.

use clap::Parser;
use std::process::ExitCode;
use tarspay_worker::cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
