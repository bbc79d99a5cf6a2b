//! Gateway tools: `sign`, `verify` and `balance`.

use crate::config::Settings;
use crate::gateway::callback::verify_callback;
use crate::gateway::params::Params;
use crate::gateway::signing::{sign_message, string_to_sign, verify_message};
use crate::gateway::{PublicKey, TarsPayClient};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct SignArgs {
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
pub struct VerifyArgs {
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

pub(crate) fn read_body(path: &Path) -> Result<Vec<u8>> {
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

pub fn sign(settings: &Settings, args: SignArgs) -> Result<ExitCode> {
    let key = settings.gateway.private_key()?;
    let params = body_params(&read_body(&args.body)?)?;
    let nonce = args
        .nonce
        .unwrap_or_else(crate::wall_clock::now_ms)
        .to_string();
    let message = string_to_sign(&args.path, &nonce, &params);
    println!("{message}");
    println!("{}", sign_message(&key, message.as_bytes()));
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> Result<ExitCode> {
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

/// Each merchant's balance, one line per profile that can call the gateway.
pub async fn balance(settings: &Settings) -> Result<ExitCode> {
    let profiles = settings.gateway.active_profiles();
    for profile in &profiles {
        let client = TarsPayClient::new(settings.gateway.client_settings_for(profile)?)?;
        let balance = client
            .balance()
            .await
            .with_context(|| format!("merchant {}", profile.name))?;
        let mch_no = profile.mch_no.as_deref().unwrap_or_default();
        let line = format!(
            "available {}  frozen {}",
            balance.available_amount,
            balance.frozen_amount.as_deref().unwrap_or("0")
        );
        if profiles.len() == 1 {
            println!("{line}");
        } else {
            println!("{} ({mch_no})  {line}", profile.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
