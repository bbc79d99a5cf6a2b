//! `payroll FILE.csv`: validate every row, check the balance, enqueue as one batch, follow it
//! to the end with a progress bar, print a summary and write a results CSV.

use crate::batch::{self, BatchError};
use crate::config::{MerchantProfile, Settings};
use crate::deployment::Deployment;
use crate::gateway::TarsPayClient;
use crate::gateway::codes::{CodeTable, ErrorClass};
use crate::gateway::error::GatewayError;
use crate::gateway::types::Balance;
use crate::ids::{BatchId, MerchantName};
use crate::ledger::{BatchProgress, BatchSummary, Phase};
use crate::payout::PayoutRequest;
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct PayrollArgs {
    /// CSV with a header row: mchOrderNo,amount,currency,wayCode and beneficiary columns.
    file: PathBuf,
    /// Enqueue even if the merchant balance does not cover the batch (or cannot be read).
    #[arg(long)]
    force: bool,
    /// Enqueue and return without following the batch.
    #[arg(long)]
    detach: bool,
    /// Where to write one result row per payout (default: FILE.results.csv).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Batch id, by the HTTP API's rule: 1-64 of A-Z, a-z, 0-9, '-', '_' (default: derived
    /// from the file's content, so a re-run is the same batch).
    #[arg(long)]
    batch_id: Option<BatchId>,
}

pub async fn run(settings: &Settings, args: PayrollArgs) -> Result<ExitCode> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let rules = settings.payout_rules.clone();
    let requests = match batch::parse_csv(&rules, &bytes) {
        Ok(requests) => requests,
        Err(BatchError::BadRows { rows }) => {
            for row in &rows {
                let problems: Vec<String> = row
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.rule))
                    .collect();
                println!("line {}: {}", row.line, problems.join("; "));
            }
            println!("{} bad row(s): nothing was queued", rows.len());
            return Ok(ExitCode::from(1));
        }
        Err(other) => bail!("{}: {other}", args.file.display()),
    };
    let batch_id = args
        .batch_id
        .clone()
        .unwrap_or_else(|| BatchId::of_content("payroll", &bytes));
    let deployment = Deployment::connect(settings).await?;

    // Only payouts not queued before need money now (a re-run needs none); each merchant
    // pays from its own account.
    let mut new_totals: BTreeMap<MerchantName, BTreeMap<String, Decimal>> = BTreeMap::new();
    for request in &requests {
        if deployment.order(&request.mch_order_no).await?.is_none() {
            *new_totals
                .entry(request.merchant.clone())
                .or_default()
                .entry(request.currency.to_string())
                .or_default() += request.amount.value();
        }
    }
    for (merchant, new_total) in &new_totals {
        let checked = match settings.gateway.profile(merchant) {
            Some(profile) => check_balance(settings, profile, new_total).await,
            None => Err(format!("merchant {merchant} has no profile")),
        };
        let prefix = if new_totals.len() > 1 || !merchant.is_default() {
            format!("merchant {merchant}: ")
        } else {
            String::new()
        };
        match checked {
            Ok(report) => println!("{prefix}{report}"),
            Err(reason) if !args.force => {
                println!(
                    "refused: {prefix}{reason}; nothing was queued (use --force to enqueue anyway)"
                );
                return Ok(ExitCode::from(1));
            }
            Err(reason) => println!("warning: {prefix}{reason}; enqueuing anyway (--force)"),
        }
    }
    print_limit_eta(settings, &requests);

    let producer = deployment.producer(settings)?;
    let result = producer.enqueue_batch(&requests, &batch_id).await?;
    println!(
        "batch {}: {} queued, {} already queued (not paid again), {} conflicting",
        result.batch_id,
        result.queued,
        result.existing,
        result.conflicting.len()
    );
    for id in &result.conflicting {
        println!("  conflicting: {id} exists with a different body; not queued");
    }
    if args.detach {
        println!("follow it with: tarspay-worker status ID, or GET /v1/batches/{batch_id}");
        return Ok(ExitCode::SUCCESS);
    }
    let summary = follow(&deployment, &batch_id).await?;
    print_summary(&summary);
    let results_path = args.results.clone().unwrap_or_else(|| {
        let mut path = args.file.clone().into_os_string();
        path.push(".results.csv");
        PathBuf::from(path)
    });
    write_results(&deployment, &requests, &results_path).await?;
    println!("results: {}", results_path.display());
    Ok(ExitCode::SUCCESS)
}

/// Each currency's new total is compared with the account its payouts draw on: the balance
/// query names the currency (for a gateway with an account per currency); when that query
/// is refused ([`refuses_the_field`]), or its answer names another currency, with the
/// merchant's one account from the plain query. Amounts of
/// different currencies are never added. Ok is the per-currency report.
async fn check_balance(
    settings: &Settings,
    profile: &MerchantProfile,
    totals: &BTreeMap<String, Decimal>,
) -> Result<String, String> {
    let client = TarsPayClient::new(
        settings
            .gateway
            .client_settings_for(profile)
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut shared: Option<Decimal> = None;
    let mut available = BTreeMap::new();
    for currency in totals.keys() {
        let own = match client.balance_in(currency).await {
            Ok(balance) if balance.currency.as_deref().is_none_or(|c| c == currency) => {
                Some(parse_available(&balance)?)
            }
            Ok(_) => None,
            // Refused (TarsPay's docs name no `currency` here: a code that is not a transient
            // one, an HTTP 4xx but 408, an answer that does not decode): the plain query
            // decides, or fails.
            Err(err) if refuses_the_field(&err, &settings.gateway.codes) => {
                tracing::debug!(error = %err, currency, "balance query with a currency refused");
                None
            }
            // Not an answer about the field (a timeout, a 5xx, a 429, a busy code): the check
            // cannot be made, as with the plain query.
            Err(err) => return Err(format!("cannot read the balance ({err})")),
        };
        let value = match own {
            Some(value) => value,
            None => match shared {
                Some(value) => value,
                None => {
                    let balance = client
                        .balance()
                        .await
                        .map_err(|err| format!("cannot read the balance ({err})"))?;
                    *shared.insert(parse_available(&balance)?)
                }
            },
        };
        available.insert(currency.clone(), value);
    }
    balance_verdict(&available, totals)
}

/// Whether a balance query's failure is the gateway refusing what it was asked (so the
/// plain query may answer), not a failure to answer at all.
fn refuses_the_field(err: &GatewayError, codes: &CodeTable) -> bool {
    // A terminal class is a refusal (a code, a 4xx); an answer that does not decode is one
    // here too, though a create retries it.
    matches!(err, GatewayError::Decode { .. }) || err.class(codes) != ErrorClass::Retryable
}

fn parse_available(balance: &Balance) -> Result<Decimal, String> {
    balance
        .available_amount
        .parse()
        .map_err(|_| format!("unreadable balance {:?}", balance.available_amount))
}

/// The least time a merchant's call limit allows for its rows: every payout makes at least
/// two calls (the create and a status query), or one when callbacks settle it first.
fn print_limit_eta(settings: &Settings, requests: &[PayoutRequest]) {
    let mut rows: BTreeMap<&MerchantName, u64> = BTreeMap::new();
    for request in requests {
        *rows.entry(&request.merchant).or_default() += 1;
    }
    for (merchant, count) in rows {
        let Some(profile) = settings.gateway.profile(merchant) else {
            continue;
        };
        let limits = profile.limits;
        if limits.per_second == 0 {
            continue;
        }
        let calls = count
            .saturating_mul(2)
            .saturating_sub(u64::from(limits.burst));
        let seconds = calls / u64::from(limits.per_second);
        println!(
            "merchant {merchant}: limited to {}/s at the gateway, so its {count} payouts take at least {} (two calls each)",
            limits.per_second,
            humantime::format_duration(Duration::from_secs(seconds))
        );
    }
}

fn balance_verdict(
    available: &BTreeMap<String, Decimal>,
    totals: &BTreeMap<String, Decimal>,
) -> Result<String, String> {
    let describe = |currency: &String, total: &Decimal| {
        let has = available.get(currency).copied().unwrap_or_default();
        format!("{total} {currency} (available {has})")
    };
    let short: Vec<String> = totals
        .iter()
        .filter(|(currency, total)| **total > available.get(*currency).copied().unwrap_or_default())
        .map(|(currency, total)| describe(currency, total))
        .collect();
    if !short.is_empty() {
        return Err(format!(
            "the available balance does not cover the batch total of {} (each currency compared on its own)",
            short.join(", ")
        ));
    }
    let all: Vec<String> = totals.iter().map(|(c, t)| describe(c, t)).collect();
    Ok(format!(
        "balance covers each currency's new total: {}",
        all.join(", ")
    ))
}

fn final_count(summary: &BatchSummary) -> usize {
    summary
        .phases
        .iter()
        .filter(|(phase, _)| phase.parse::<Phase>().is_ok_and(Phase::is_final))
        .map(|(_, totals)| totals.count)
        .sum()
}

/// How often [`follow`] reads every row while the counters say rows are in progress.
const FULL_READ_EVERY: Duration = Duration::from_secs(5);
/// How often [`follow`] reads the batch's counters.
const COUNTERS_EVERY: Duration = Duration::from_millis(250);

/// Whether the follow loop reads every row now, given how long ago it last did and how many
/// rows the counters called final then: the first time; when the counters say every row is
/// final and have moved since (they can be wrong: a row re-registered after its record
/// expired stays counted as final, and rows finalised before the counters existed are not
/// counted, so only a read of the rows ends the loop, and counters that said "done" wrongly
/// wait for the backstop); and every [`FULL_READ_EVERY`] as that backstop.
fn full_read_due(last_full_read: Option<(Duration, u64)>, counters: &BatchProgress) -> bool {
    match last_full_read {
        None => true,
        Some((ago, finished_then)) => {
            ago >= FULL_READ_EVERY
                || (counters.total > 0
                    && counters.in_progress() == 0
                    && counters.finished() != finished_then)
        }
    }
}

/// Follows every member of the batch (a reused `--batch-id` may hold more orders than this
/// file, and they are all in the summary). The bar moves on the batch's counters, four reads
/// a second that cost the same for 10 rows or 100,000; the rows themselves are read at most
/// every [`FULL_READ_EVERY`], and the loop ends only on such a read.
async fn follow(deployment: &Deployment, batch_id: &str) -> Result<BatchSummary> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} final  {msg}  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let ids = [batch_id.to_owned()];
    // When the rows were last read, and how many the counters called final then.
    let mut last_full_read: Option<(Instant, u64)> = None;
    loop {
        let counters = deployment
            .batch_progress(&ids)
            .await?
            .pop()
            .unwrap_or_default();
        let since = last_full_read.map(|(at, finished)| (at.elapsed(), finished));
        if full_read_due(since, &counters) {
            let summary = deployment.batch_summary(batch_id).await?;
            last_full_read = Some((Instant::now(), counters.finished()));
            let count = |phase: &str| summary.phases.get(phase).map_or(0, |t| t.count as u64);
            let done = final_count(&summary) as u64;
            show(&bar, summary.total as u64, done, &count);
            if done >= summary.total as u64 {
                bar.finish();
                return Ok(summary);
            }
        } else {
            let count = |phase: &str| counters.finals.get(phase).copied().unwrap_or(0);
            show(&bar, counters.total, counters.finished(), &count);
        }
        tokio::time::sleep(COUNTERS_EVERY).await;
    }
}

/// `count` gives the rows of one status.
fn show(bar: &ProgressBar, total: u64, done: u64, count: &dyn Fn(&str) -> u64) {
    let failed = count("failed") + count("rejected") + count("conflict");
    bar.set_length(total);
    bar.set_position(done.min(total));
    bar.set_message(format!(
        "succeeded {}  failed {failed}  in flight {}",
        count("succeeded"),
        total.saturating_sub(done)
    ));
}

fn print_summary(summary: &BatchSummary) {
    println!("{:<12} {:>7}  amounts", "status", "count");
    for (phase, totals) in &summary.phases {
        let amounts: Vec<String> = totals
            .amounts
            .iter()
            .map(|(c, v)| format!("{v} {c}"))
            .collect();
        println!("{phase:<12} {:>7}  {}", totals.count, amounts.join(", "));
    }
    println!("{:<12} {:>7}", "total", summary.total);
}

async fn write_results(
    deployment: &Deployment,
    requests: &[PayoutRequest],
    path: &PathBuf,
) -> Result<()> {
    let mut writer =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    writer.write_record(crate::batch::RESULT_COLUMNS)?;
    for request in requests {
        let record = deployment.order(&request.mch_order_no).await?;
        writer.write_record(crate::batch::result_row(
            &request.mch_order_no,
            request.amount.as_str(),
            &request.currency,
            record.as_ref(),
        ))?;
    }
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(entries: &[(&str, u64)]) -> BTreeMap<String, Decimal> {
        entries
            .iter()
            .map(|(c, v)| ((*c).to_owned(), Decimal::from(*v)))
            .collect()
    }

    #[test]
    fn the_rows_are_read_first_when_the_counters_say_done_and_every_five_seconds() {
        let progress = |total: u64, finals: &[(&str, u64)]| BatchProgress {
            total,
            finals: finals.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect(),
            ..BatchProgress::default()
        };
        let halfway = progress(10, &[("succeeded", 4), ("failed", 1)]);
        let done = progress(10, &[("succeeded", 9), ("failed", 1)]);
        let soon = |finished_then: u64| Some((Duration::from_millis(250), finished_then));
        let later = |finished_then: u64| Some((FULL_READ_EVERY, finished_then));
        assert!(
            full_read_due(None, &halfway),
            "the first look reads the rows"
        );
        assert!(
            !full_read_due(soon(5), &halfway),
            "in progress: counters only"
        );
        assert!(full_read_due(later(5), &halfway), "the backstop");
        assert!(
            full_read_due(soon(5), &done),
            "counters say done: the rows decide"
        );
        // Counters that said done when the rows were last read, and have not moved since,
        // were wrong (a re-run row): they wait for the backstop.
        assert!(!full_read_due(soon(10), &done));
        assert!(full_read_due(later(10), &done));
        // Counters that know nothing (a batch from before them) never end the loop early,
        // and the backstop still reads the rows.
        let unknown = progress(0, &[]);
        assert!(!full_read_due(soon(0), &unknown));
        assert!(full_read_due(later(0), &unknown));
    }

    #[test]
    fn currencies_are_compared_one_by_one_never_added() {
        let available = totals(&[("BDT", 1000), ("INR", 1000)]);
        // 600 BDT + 500 INR is not 1100 of anything.
        let report = balance_verdict(&available, &totals(&[("BDT", 600), ("INR", 500)])).unwrap();
        assert!(
            report.contains("600 BDT (available 1000), 500 INR (available 1000)"),
            "{report}"
        );
        let refused =
            balance_verdict(&available, &totals(&[("BDT", 1500), ("INR", 500)])).unwrap_err();
        assert!(
            refused.contains("batch total of 1500 BDT (available 1000)"),
            "{refused}"
        );
        assert!(!refused.contains("INR"), "INR is covered: {refused}");
    }

    #[test]
    fn only_a_refusal_of_the_currency_query_falls_back_to_the_plain_one() {
        let codes = CodeTable::default();
        let gateway = |code| GatewayError::Gateway {
            endpoint: "balance",
            code,
            msg: String::new(),
        };
        let http = |status| GatewayError::Http {
            endpoint: "balance",
            status,
            snippet: String::new(),
        };
        let decode = GatewayError::Decode {
            endpoint: "balance",
            reason: String::new(),
            snippet: String::new(),
        };
        assert!(
            refuses_the_field(&gateway(5003001), &codes),
            "missing parameter"
        );
        assert!(refuses_the_field(&http(400), &codes));
        assert!(refuses_the_field(&decode, &codes));
        // Failures to answer, not answers: the check fails as with the plain query.
        assert!(
            !refuses_the_field(&gateway(-1), &codes),
            "system error, retryable"
        );
        assert!(!refuses_the_field(&http(408), &codes));
        assert!(!refuses_the_field(&http(503), &codes));
        let timeout = GatewayError::Ambiguous {
            endpoint: "balance",
            reason: String::new(),
            timed_out: true,
        };
        assert!(!refuses_the_field(&timeout, &codes));
    }

    #[test]
    fn each_currency_is_compared_with_its_own_account() {
        let available = totals(&[("KES", 5000), ("INR", 1_000_000)]);
        let refused =
            balance_verdict(&available, &totals(&[("KES", 6000), ("INR", 500)])).unwrap_err();
        assert!(
            refused.contains("batch total of 6000 KES (available 5000)"),
            "{refused}"
        );
        assert!(!refused.contains("INR"), "{refused}");
    }
}
