//! The sandbox as its own process: arguments and start-up, shared by the `tarspay-sandbox`
//! binary and the workspace's `tarspay-dev sandbox`.

use crate::{FaultRule, OutcomeRule, Sandbox, SandboxConfig, SandboxMerchant};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tarspay_worker::config::Settings;
use tarspay_worker::gateway::{PrivateKey, PublicKey};

#[derive(Args)]
pub struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Register a merchant: MCH_NO=PUBLIC_KEY_HEX[:BALANCE]. The merchant from the settings
    /// (TARSPAY_MCH_NO and its key) is registered too when set.
    #[arg(long = "merchant", value_name = "MCH_NO=KEY[:BALANCE]")]
    merchants: Vec<String>,
    /// Time from create to final state, e.g. 500ms.
    #[arg(long, default_value = "500ms", value_parser = tarspay_worker::config::parse_duration)]
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

pub async fn run(settings: &Settings, args: SandboxArgs) -> Result<ExitCode> {
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
    // Every merchant profile of the settings that has a number and a key.
    for profile in settings.gateway.profiles() {
        if let (Some(mch_no), Ok(key)) = (&profile.mch_no, profile.private_key()) {
            config.merchants.push(SandboxMerchant {
                mch_no: mch_no.clone(),
                public_key: key.public_key(),
                balance: 1_000_000_000u64.into(),
            });
        }
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
    tarspay_worker::shutdown::signal().await;
    Ok(ExitCode::SUCCESS)
}
