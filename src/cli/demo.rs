//! `demo`: the README's main command.

use anyhow::Result;
use clap::Args;
use std::process::ExitCode;
use tarspay_dev::demo;

#[derive(Args)]
pub struct DemoArgs {
    /// How many payouts the sample payroll holds.
    #[arg(long, default_value_t = 1000)]
    payouts: usize,
    /// Payouts in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let redis_url = std::env::var("TARSPAY_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let summary = demo::run(demo::DemoOptions {
        payouts: args.payouts,
        concurrency: args.concurrency,
        progress: true,
        redis_url,
    })
    .await?;
    print!("{summary}");
    Ok(ExitCode::SUCCESS)
}
