//! `demo`: the README's main command.

use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::process::ExitCode;
use tarspay_dev::demo;

#[derive(Args)]
pub struct DemoArgs {
    /// How many payouts the sample payroll holds.
    #[arg(long, default_value_t = 1000)]
    payouts: usize,
    /// Gateway calls in flight at once (the worker holds 3 jobs per call).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// After the payroll, keep the workers and the server running with the operator console
    /// (prints its URL and an admin and a viewer login token: TARSPAY_API_TOKEN and
    /// TARSPAY_VIEWER_TOKEN if set, else random ones) until Ctrl-C.
    #[arg(long)]
    console: bool,
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let redis_url = env("TARSPAY_REDIS_URL");
    let console = args.console.then(|| {
        demo::ConsoleTokens::or_random(env("TARSPAY_API_TOKEN"), env("TARSPAY_VIEWER_TOKEN"))
    });
    let demo = demo::Demo::start(demo::DemoOptions {
        payouts: args.payouts,
        concurrency: args.concurrency,
        progress: true,
        redis_url,
        console,
    })
    .await?;
    print!("{}", demo.summary);
    if let Some(console) = &demo.console {
        let mut out = std::io::stdout().lock();
        writeln!(out, "console: {}", console.url)?;
        writeln!(out, "  admin token:  {}", console.tokens.admin)?;
        writeln!(out, "  viewer token: {}", console.tokens.viewer)?;
        writeln!(
            out,
            "serving the console, the API and the workers until Ctrl-C (the demo's keys are deleted then)"
        )?;
        out.flush()?;
        drop(out);
        tarspay_worker::shutdown::signal().await;
    }
    demo.finish().await;
    Ok(ExitCode::SUCCESS)
}
