//! The sandbox as its own process: arguments and start-up, shared by the `tarspay-sandbox`
//! binary and the workspace's `tarspay-dev sandbox`.

use crate::{
    CurrencyBalance, FaultRule, OutcomeRule, RateLimit, Sandbox, SandboxConfig, SandboxMerchant,
};
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
    /// Register a merchant (repeatable): MCH_NO=PUBLIC_KEY_HEX[:BALANCE], the key as sent in
    /// X-API-KEY (33-byte compressed secp256k1, hex), BALANCE the available balance of every
    /// currency without one of its own (default 1000000000). Each merchant has its own key,
    /// balances, orders (mchOrderNo is per merchant) and rate limit. The merchant from the
    /// settings (TARSPAY_MCH_NO and its key) is registered too when set. More at run time:
    /// POST /sandbox/merchants.
    #[arg(long = "merchant", value_name = "MCH_NO=KEY[:BALANCE]")]
    merchants: Vec<String>,
    /// Give a merchant a balance of its own in one currency (repeatable):
    /// MCH_NO=CURRENCY:AMOUNT, e.g. M1234567890=INR:5000. That currency's payouts draw on it;
    /// other currencies keep drawing on the merchant's BALANCE. At run time:
    /// PUT /sandbox/merchants/{mchNo}/balance.
    #[arg(long = "balance", value_name = "MCH_NO=CURRENCY:AMOUNT")]
    balances: Vec<String>,
    /// Limit a merchant's calls (repeatable): MCH_NO=PER_SECOND[:BURST], e.g.
    /// M1234567890=5:5 (GCRA; BURST defaults to PER_SECOND rounded up). Calls beyond it get
    /// HTTP 429 with Retry-After and change nothing. At run time:
    /// PUT /sandbox/merchants/{mchNo}/rate-limit; report: GET /sandbox/merchants/{mchNo}/calls.
    #[arg(long = "rate-limit", value_name = "MCH_NO=PER_SECOND[:BURST]")]
    rate_limits: Vec<String>,
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
    /// Refuse a balance query that names a currency (this sandbox's extension, which
    /// `payroll` tries first) with this gateway code, e.g. 5003001, as a gateway without the
    /// field may answer.
    #[arg(long, value_name = "CODE", value_parser = parse_refusal_code, allow_negative_numbers = true)]
    refuse_balance_currency: Option<i64>,
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

fn parse_balance(spec: &str) -> Result<CurrencyBalance> {
    let usage = "--balance must look like MCH_NO=CURRENCY:AMOUNT";
    let (mch_no, rest) = spec.split_once('=').context(usage)?;
    let (currency, amount) = rest.split_once(':').context(usage)?;
    anyhow::ensure!(
        !mch_no.is_empty() && !currency.is_empty(),
        "{usage}, not {spec}"
    );
    Ok(CurrencyBalance {
        mch_no: mch_no.to_owned(),
        currency: currency.to_owned(),
        available: amount
            .parse()
            .with_context(|| format!("--balance {spec}: amount"))?,
    })
}

fn parse_rate_limit(spec: &str) -> Result<(String, RateLimit)> {
    let usage = "--rate-limit must look like MCH_NO=PER_SECOND[:BURST]";
    let (mch_no, rest) = spec.split_once('=').context(usage)?;
    let (rate, burst) = match rest.split_once(':') {
        Some((rate, burst)) => (rate, Some(burst)),
        None => (rest, None),
    };
    let per_second: f64 = rate
        .parse()
        .with_context(|| format!("--rate-limit {spec}: PER_SECOND"))?;
    let burst = match burst {
        Some(burst) => burst
            .parse()
            .with_context(|| format!("--rate-limit {spec}: BURST"))?,
        None => per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
    };
    let limit = RateLimit { per_second, burst };
    anyhow::ensure!(
        !mch_no.is_empty() && limit.is_valid(),
        "--rate-limit {spec}: needs a merchant, PER_SECOND > 0 and BURST >= 1"
    );
    Ok((mch_no.to_owned(), limit))
}

/// A gateway error code: any number but 0, which is TarsPay's success.
fn parse_refusal_code(text: &str) -> Result<i64, String> {
    match text.trim().parse::<i64>() {
        Ok(0) => Err("0 is the gateway's success code, not a refusal".into()),
        Ok(code) => Ok(code),
        Err(_) => Err(format!("{text:?} is not a gateway error code")),
    }
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid", path.display()))
}

pub async fn run(settings: &Settings, args: SandboxArgs) -> Result<ExitCode> {
    let mut config = SandboxConfig {
        final_after: args.final_after,
        callbacks: !args.no_callbacks,
        refuse_balance_currency: args.refuse_balance_currency,
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
    for spec in &args.balances {
        config.balances.push(parse_balance(spec)?);
    }
    for spec in &args.rate_limits {
        let (mch_no, limit) = parse_rate_limit(spec)?;
        config.rate_limits.insert(mch_no, limit);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_and_rate_limit_flags() {
        let balance = parse_balance("M1=INR:5000.50").unwrap();
        assert_eq!(
            (balance.mch_no.as_str(), balance.currency.as_str()),
            ("M1", "INR")
        );
        assert_eq!(balance.available.to_string(), "5000.50");
        assert!(parse_balance("M1=INR").is_err());
        assert!(parse_balance("M1=INR:lots").is_err());
        assert_eq!(parse_refusal_code("5003001"), Ok(5003001));
        assert_eq!(parse_refusal_code("-1"), Ok(-1));
        assert!(parse_refusal_code("0").is_err());
        assert!(parse_refusal_code("none").is_err());

        let (mch_no, limit) = parse_rate_limit("M2=5:10").unwrap();
        assert_eq!(mch_no, "M2");
        assert_eq!(
            limit,
            RateLimit {
                per_second: 5.0,
                burst: 10
            }
        );
        assert_eq!(parse_rate_limit("M2=2.5").unwrap().1.burst, 3);
        assert!(parse_rate_limit("M2=0:5").is_err());
        assert!(parse_rate_limit("M2=5:0").is_err());
        assert!(parse_rate_limit("=5:5").is_err());
    }
}
