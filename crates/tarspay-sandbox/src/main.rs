//! `tarspay-sandbox`: the simulated TarsPay as its own process.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tarspay_sandbox::cli::{self, SandboxArgs};
use tarspay_worker::config::Settings;

#[derive(Parser)]
#[command(
    name = "tarspay-sandbox",
    version,
    about = "A simulated TarsPay gateway"
)]
struct Cli {
    /// Settings file (TOML): the merchant in it (number and key) is registered too.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let run = || -> anyhow::Result<ExitCode> {
        let settings = Settings::load(args.config.as_deref())?;
        // Declared before the runtime so it is dropped (flushing spans) after it.
        let _telemetry = tarspay_worker::telemetry::init(&settings.log)?;
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(cli::run(&settings, args.sandbox))
    };
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
