//! The `tarspay-worker` binary: one command with subcommands (see `tarspay_worker::cli`).
//! Errors become `anyhow` in the CLI and are printed here.

use clap::Parser;
use std::process::ExitCode;
use tarspay_worker::cli;

/// mimalloc instead of glibc's malloc: a payout allocates many small, short-lived buffers
/// (JSON, HTTP, Redis replies), and glibc's allocator took about 15 % of a worker's CPU in a
/// `perf` profile of `bench e2e` (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
