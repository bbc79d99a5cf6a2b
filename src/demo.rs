//! The demo: a sample payroll paid through an in-process sandbox with a realistic mix of
//! faults and final states, then a summary. Needs no settings, no Redis and no merchant
//! account.
//!
//! This is the gateway-level demo: each payout is created, reconciled and polled inline by
//! the code below, which follows the same rules the queued jobs will (same mchOrderNo on every
//! retry; ambiguous creates are resolved by a query, never by a new number).

use crate::config::{ConfigError, Settings};
use crate::gateway::codes::ErrorClass;
use crate::gateway::types::OrderRef;
use crate::gateway::{
    ClientSettings, CodeTable, GatewayError, OrderState, PrivateKey, TarsPayClient,
};
use crate::payout::PayoutRequest;
use crate::sandbox::{
    Endpoint, FaultAction, FaultRule, OutcomeRule, Sandbox, SandboxConfig, SandboxMerchant,
};
use backon::BackoffBuilder;
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

pub const DEMO_MCH_NO: &str = "M0000000001";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub payouts: usize,
    pub concurrency: usize,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Client(#[from] crate::gateway::client::ClientBuildError),
    #[error("sample payout {0} is invalid: {1}")]
    Sample(String, crate::payout::ValidationErrors),
}

/// What the demo measured.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub payouts: usize,
    /// Final status → count ("succeeded", "failed", "rejected", …).
    pub by_status: BTreeMap<String, usize>,
    /// Gateway code or transport kind → retries it caused.
    pub retries_by_code: BTreeMap<String, usize>,
    /// Ambiguous creates (timeout, dropped connection, 5xx) settled by a query that found the
    /// order, so it was not sent again.
    pub reconciled: usize,
    /// Orders the sandbox holds at the end (at most one per `mchOrderNo`).
    pub gateway_orders: usize,
    /// Create calls that reached the sandbox, retries and re-sends included.
    pub create_calls: u32,
    pub elapsed: Duration,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
}

impl DemoSummary {
    pub fn payouts_per_second(&self) -> f64 {
        self.payouts as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "payouts: {}", self.payouts)?;
        writeln!(f, "outcomes by status:")?;
        for (status, count) in &self.by_status {
            writeln!(f, "  {status:<12} {count}")?;
        }
        writeln!(f, "retries by code:")?;
        if self.retries_by_code.is_empty() {
            writeln!(f, "  none")?;
        }
        for (code, count) in &self.retries_by_code {
            writeln!(f, "  {code:<16} {count}")?;
        }
        writeln!(
            f,
            "ambiguous creates settled by a query: {}",
            self.reconciled
        )?;
        writeln!(
            f,
            "gateway orders: {} from {} create calls (one order per mchOrderNo, never a new number)",
            self.gateway_orders, self.create_calls
        )?;
        writeln!(
            f,
            "throughput: {:.1} payouts/s over {:.2}s",
            self.payouts_per_second(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "latency create->final: p50 {} ms, p99 {} ms",
            self.latency_p50.as_millis(),
            self.latency_p99.as_millis()
        )
    }
}

/// The sample payroll: four countries, and prefixes that steer the sandbox into faults and
/// final states (see [`demo_sandbox_config`]).
pub fn sample_payroll(count: usize) -> Vec<serde_json::Value> {
    (0..count)
        .map(|i| {
            // About 1 in 20 of each kind of trouble; the rest are plain.
            let prefix = match i % 20 {
                3 => "SYS",
                7 => "RCE",
                11 => "DROP",
                13 => "BAD",
                17 => "REJ",
                19 => "FAIL",
                _ => "PAY",
            };
            let id = format!("{prefix}-{i:06}");
            match i % 4 {
                0 => json!({"mchOrderNo": id, "amount": format!("{}.50", 100 + i % 900), "currency": "INR", "wayCode": "UPI",
                            "customerName": "Asha Rao", "customerEmail": "asha@example.in", "customerContact": "9876543210"}),
                1 => json!({"mchOrderNo": id, "amount": format!("{}", 100 + i % 5000), "currency": "BDT", "wayCode": "EWALLET_BKASH",
                            "walletId": "01712345678"}),
                2 => json!({"mchOrderNo": id, "amount": format!("{}", 100 + i % 7000), "currency": "KES", "wayCode": "EWALLET_MPESA",
                            "customerContact": "254712345678", "customerName": "Wanjiru K", "customerEmail": "w@example.ke"}),
                _ => json!({"mchOrderNo": id, "amount": format!("{}.20", 50 + i % 3000), "currency": "MYR", "wayCode": "MAYBANK",
                            "customerName": "Aminah", "customerAccountNumber": "1234567890"}),
            }
        })
        .collect()
}

/// Faults and final states keyed by the prefixes [`sample_payroll`] uses.
pub fn demo_sandbox_config(merchant_key: &PrivateKey) -> SandboxConfig {
    let fault = |prefix: &str, times: u32, action: FaultAction| FaultRule {
        prefix: prefix.into(),
        endpoint: Endpoint::CreatePayout,
        times: Some(times),
        action,
    };
    SandboxConfig {
        merchants: vec![SandboxMerchant {
            mch_no: DEMO_MCH_NO.into(),
            public_key: merchant_key.public_key(),
            balance: 1_000_000_000u64.into(),
        }],
        final_after: Duration::from_millis(200),
        callbacks: false,
        faults: vec![
            fault(
                "SYS-",
                1,
                FaultAction::Code {
                    code: -1,
                    msg: None,
                },
            ),
            fault(
                "RCE-",
                2,
                FaultAction::Code {
                    code: 500323,
                    msg: None,
                },
            ),
            fault("DROP-", 1, FaultAction::CommitThenDrop),
            fault(
                "BAD-",
                1,
                FaultAction::Http {
                    status: 502,
                    commit: false,
                    body: None,
                },
            ),
        ],
        outcomes: vec![
            OutcomeRule {
                prefix: "REJ-".into(),
                state: 8,
                final_after_ms: None,
            },
            OutcomeRule {
                prefix: "FAIL-".into(),
                state: 3,
                final_after_ms: None,
            },
        ],
        ..SandboxConfig::default()
    }
}

/// Runs the demo end to end and returns its summary.
pub async fn run(options: DemoOptions) -> Result<DemoSummary, DemoError> {
    let settings = Settings::load_with_env(None, [("", ""); 0])?;
    let rules = settings.payout_rules()?;
    let table = settings.code_table()?;
    let key = PrivateKey::generate();
    let sandbox = Sandbox::start(demo_sandbox_config(&key), "127.0.0.1:0").await?;
    let client = TarsPayClient::new(ClientSettings {
        base_url: sandbox.url(),
        mch_no: DEMO_MCH_NO.into(),
        private_key: key,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
    })?;
    let mut payroll = Vec::new();
    for row in sample_payroll(options.payouts) {
        let id = row["mchOrderNo"].as_str().unwrap_or_default().to_owned();
        payroll.push(
            rules
                .validate_json(&row)
                .map_err(|errors| DemoError::Sample(id, errors))?,
        );
    }

    let started = Instant::now();
    let notify_url = format!("{}/demo/notify", sandbox.url());
    let mut results = futures::stream::iter(payroll)
        .map(|request| pay_one(&client, &table, request, &notify_url))
        .buffer_unordered(options.concurrency.max(1));
    let mut summary = DemoSummary {
        payouts: options.payouts,
        ..DemoSummary::default()
    };
    let mut latencies = Vec::with_capacity(options.payouts);
    let mut last_report = Instant::now();
    while let Some(result) = results.next().await {
        *summary
            .by_status
            .entry(result.status.to_owned())
            .or_default() += 1;
        for code in result.retries {
            *summary.retries_by_code.entry(code).or_default() += 1;
        }
        summary.reconciled += usize::from(result.reconciled);
        latencies.push(result.latency);
        if options.progress && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!("  {}/{} final", latencies.len(), options.payouts);
        }
    }
    summary.elapsed = started.elapsed();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    summary.latency_p50 = percentile(0.50);
    summary.latency_p99 = percentile(0.99);
    let orders = sandbox.orders();
    summary.gateway_orders = orders.len();
    summary.create_calls = orders.iter().map(|order| order.create_attempts).sum();
    Ok(summary)
}

struct PayoutResult {
    status: &'static str,
    retries: Vec<String>,
    reconciled: bool,
    latency: Duration,
}

fn status_of(state: OrderState) -> &'static str {
    match state {
        OrderState::Success => "succeeded",
        OrderState::Failure => "failed",
        OrderState::Rejected => "rejected",
        OrderState::Refund => "refunded",
        _ => "unknown",
    }
}

/// Create (same mchOrderNo on every try), reconcile ambiguity by a query, then poll to final.
async fn pay_one(
    client: &TarsPayClient,
    table: &CodeTable,
    request: PayoutRequest,
    notify_url: &str,
) -> PayoutResult {
    let started = Instant::now();
    let create = request.to_create(notify_url);
    let order = OrderRef::MchOrderNo(request.mch_order_no.clone());
    let mut retries = Vec::new();
    let mut backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(6)
        .with_jitter()
        .build();
    let mut reconciled = false;
    let finish = |status, retries, reconciled| PayoutResult {
        status,
        retries,
        reconciled,
        latency: started.elapsed(),
    };
    loop {
        let error = match client.create_payout(&create).await {
            Ok(_) => break,
            Err(err) => err,
        };
        let class = error.class(table);
        if error.is_ambiguous() || class == ErrorClass::Reconcile {
            // The order may exist: ask before creating again.
            if client.query_payout(&order).await.is_ok() {
                reconciled = true;
                break;
            }
        } else if class == ErrorClass::Terminal {
            return finish("failed", retries, reconciled);
        }
        retries.push(retry_label(&error));
        match backoff.next() {
            Some(delay) => tokio::time::sleep(delay).await,
            None => return finish("failed", retries, reconciled),
        }
    }
    loop {
        if let Ok(info) = client.query_payout(&order).await
            && info.state.is_final()
        {
            return finish(status_of(info.state), retries, reconciled);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn retry_label(error: &GatewayError) -> String {
    match error.code() {
        Some(code) => code.to_string(),
        None => error.kind().to_owned(),
    }
}
