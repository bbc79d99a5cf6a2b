//! The `tarspay-worker` binary: one command with subcommands. Errors become `anyhow` here and
//! nowhere else.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tarspay_worker::config::Settings;
use tarspay_worker::gateway::callback::verify_callback;
use tarspay_worker::gateway::params::Params;
use tarspay_worker::gateway::signing::{sign_message, string_to_sign, verify_message};
use tarspay_worker::gateway::{PrivateKey, PublicKey, TarsPayClient};
use tarspay_worker::sandbox::{FaultRule, OutcomeRule, Sandbox, SandboxConfig, SandboxMerchant};
use tarspay_worker::{demo, telemetry};

#[derive(Parser)]
#[command(
    name = "tarspay-worker",
    version,
    about = "Payouts through TarsPay that are never lost or doubled"
)]
struct Cli {
    /// Settings file (TOML) layered over the built-in defaults; TARSPAY_* variables win over it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a demo payroll against an in-process sandbox (no settings needed).
    Demo(DemoArgs),
    /// Run the simulated TarsPay gateway.
    Sandbox(SandboxArgs),
    /// Print the string to sign and the signature for a request body.
    Sign(SignArgs),
    /// Check a TarsPay signature: prints `valid` (exit 0) or `invalid` (exit 1).
    Verify(VerifyArgs),
    /// Query the merchant balance at the gateway.
    Balance,
}

#[derive(Args)]
struct DemoArgs {
    /// How many payouts the sample payroll holds.
    #[arg(long, default_value_t = 1000)]
    payouts: usize,
    /// Payouts in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Args)]
struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Register a merchant: MCH_NO=PUBLIC_KEY_HEX[:BALANCE]. The merchant from the settings
    /// (TARSPAY_MCH_NO and its key) is registered too when set.
    #[arg(long = "merchant", value_name = "MCH_NO=KEY[:BALANCE]")]
    merchants: Vec<String>,
    /// Time from create to final state, e.g. 500ms.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    final_after: std::time::Duration,
    /// JSON file with an array of fault rules.
    #[arg(long, value_name = "FILE")]
    faults: Option<PathBuf>,
    /// JSON file with an array of outcome rules ({"prefix","state"}).
    #[arg(long, value_name = "FILE")]
    outcomes: Option<PathBuf>,
    /// Do not send callbacks.
    #[arg(long)]
    no_callbacks: bool,
    /// File with the sandbox's own system private key (hex) that signs its callbacks; the
    /// default is a published development key.
    #[arg(long, value_name = "FILE")]
    system_key_file: Option<PathBuf>,
}

#[derive(Args)]
struct SignArgs {
    /// Request path, e.g. /api/payOut/unifiedOrder.
    #[arg(long)]
    path: String,
    /// X-API-NONCE in milliseconds; defaults to now.
    #[arg(long)]
    nonce: Option<u64>,
    /// JSON body file, or - for stdin.
    #[arg(long)]
    body: PathBuf,
}

#[derive(Args)]
struct VerifyArgs {
    /// Signer's public key (hex, compressed or uncompressed).
    #[arg(long)]
    public_key: String,
    /// DER signature, hex.
    #[arg(long)]
    signature: String,
    /// Request path (with --nonce) for a request signature.
    #[arg(
        long,
        required_unless_present = "callback",
        conflicts_with = "callback"
    )]
    path: Option<String>,
    #[arg(
        long,
        required_unless_present = "callback",
        conflicts_with = "callback"
    )]
    nonce: Option<String>,
    /// Verify a callback body (X-RESP-SIGNATURE) instead of a request.
    #[arg(long)]
    callback: bool,
    /// Body file, or - for stdin.
    #[arg(long)]
    body: PathBuf,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    tarspay_worker::config::parse_duration(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => run_demo(args).await,
            Command::Sandbox(args) => run_sandbox(&settings, args).await,
            Command::Sign(args) => run_sign(&settings, args),
            Command::Verify(args) => run_verify(args),
            Command::Balance => run_balance(&settings).await,
        }
    })
}

fn read_body(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .context("cannot read the body from stdin")?;
        Ok(body)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read body file {}", path.display()))
    }
}

fn body_params(body: &[u8]) -> Result<Params> {
    let value: serde_json::Value =
        serde_json::from_slice(body).context("the body is not valid JSON")?;
    let Some(map) = value.as_object() else {
        bail!("the body must be a JSON object");
    };
    let dropped: Vec<&str> = map
        .iter()
        .filter(|(_, v)| v.is_null() || v.as_str() == Some(""))
        .map(|(k, _)| k.as_str())
        .collect();
    if !dropped.is_empty() {
        eprintln!(
            "warning: empty or null fields are left out of PARAMS and must not be sent: {}",
            dropped.join(", ")
        );
    }
    Ok(Params::from_json_object(map))
}

fn run_sign(settings: &Settings, args: SignArgs) -> Result<ExitCode> {
    let key = settings.private_key()?;
    let params = body_params(&read_body(&args.body)?)?;
    let nonce = args
        .nonce
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default()
        })
        .to_string();
    let message = string_to_sign(&args.path, &nonce, &params);
    println!("{message}");
    println!("{}", sign_message(&key, message.as_bytes()));
    Ok(ExitCode::SUCCESS)
}

fn run_verify(args: VerifyArgs) -> Result<ExitCode> {
    let key = PublicKey::from_hex(&args.public_key).context("--public-key")?;
    let body = read_body(&args.body)?;
    let valid = if args.callback {
        verify_callback(&key, &body, &args.signature).is_some()
    } else {
        let (Some(path), Some(nonce)) = (args.path, args.nonce) else {
            bail!("--path and --nonce are required without --callback");
        };
        let message = string_to_sign(&path, &nonce, &body_params(&body)?);
        verify_message(&key, message.as_bytes(), &args.signature)
    };
    println!("{}", if valid { "valid" } else { "invalid" });
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn parse_merchant(spec: &str) -> Result<SandboxMerchant> {
    let (mch_no, rest) = spec
        .split_once('=')
        .context("--merchant must look like MCH_NO=PUBLIC_KEY_HEX[:BALANCE]")?;
    let (key, balance) = rest.split_once(':').unwrap_or((rest, "1000000000"));
    Ok(SandboxMerchant {
        mch_no: mch_no.to_owned(),
        public_key: PublicKey::from_hex(key).with_context(|| format!("--merchant {mch_no}"))?,
        balance: balance
            .parse()
            .with_context(|| format!("--merchant {mch_no}: balance"))?,
    })
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid", path.display()))
}

async fn run_sandbox(settings: &Settings, args: SandboxArgs) -> Result<ExitCode> {
    let mut config = SandboxConfig {
        final_after: args.final_after,
        callbacks: !args.no_callbacks,
        ..SandboxConfig::default()
    };
    if let Some(path) = &args.system_key_file {
        config.system_key = PrivateKey::from_file(path).context("--system-key-file")?;
    }
    for spec in &args.merchants {
        config.merchants.push(parse_merchant(spec)?);
    }
    if let (Some(mch_no), Ok(key)) = (&settings.mch_no, settings.private_key()) {
        config.merchants.push(SandboxMerchant {
            mch_no: mch_no.clone(),
            public_key: key.public_key(),
            balance: 1_000_000_000u64.into(),
        });
    }
    if let Some(path) = &args.faults {
        config.faults = read_json_file::<Vec<FaultRule>>(path)?;
    }
    if let Some(path) = &args.outcomes {
        config.outcomes = read_json_file::<Vec<OutcomeRule>>(path)?;
    }
    let merchants = config.merchants.len();
    let sandbox = Sandbox::start(config, &args.listen).await?;
    println!("sandbox listening on {}", sandbox.url());
    println!(
        "sandbox system public key (TARSPAY_SYSTEM_PUBLIC_KEY): {}",
        sandbox.system_public_key()
    );
    println!("{merchants} merchant(s) registered; add more with POST /sandbox/merchants");
    shutdown_signal().await;
    Ok(ExitCode::SUCCESS)
}

async fn run_balance(settings: &Settings) -> Result<ExitCode> {
    let client = TarsPayClient::new(settings.client_settings()?)?;
    let balance = client.balance().await?;
    println!(
        "available {}  frozen {}",
        balance.available_amount,
        balance.frozen_amount.as_deref().unwrap_or("0")
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_demo(args: DemoArgs) -> Result<ExitCode> {
    let summary = demo::run(demo::DemoOptions {
        payouts: args.payouts,
        concurrency: args.concurrency,
        progress: true,
    })
    .await?;
    print!("{summary}");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
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
