//! No-op throughput of the queue under an apalis worker, now a thin front for the library's
//! benches (`tarspay-dev bench queue` and `tarspay-dev bench backlog` run the same code).
//!
//! `cargo run --release --example queue_bench -- [--n 100000] [--mode backlog|empty|both] [--redis URL]`
//!
//! Without `--redis` the bench starts a private redis-server on a free port (never the shared
//! one); with it, keys go under a unique prefix that is removed afterwards. Prints one JSON line
//! per result.

use tarspay_dev::bench::{BenchOptions, backlog, queue};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = BenchOptions::default();
    let mut mode = "both".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("missing value for {flag}"))?;
        match flag.as_str() {
            "--n" => options.n = Some(value.parse()?),
            "--mode" => mode = value,
            "--redis" => options.redis_url = Some(value),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let mut print = |line: serde_json::Value| println!("{line}");
    if mode == "empty" || mode == "both" {
        queue::run(&options, &mut print).await?;
    }
    if mode == "backlog" || mode == "both" {
        backlog::run(&options, &mut print).await?;
    }
    Ok(())
}
