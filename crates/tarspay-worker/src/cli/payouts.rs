//! The payout commands: `worker`, `enqueue`, `status`, `outcomes`, `queue` (stats), `pause`,
//! `resume`, `dead list|retry`.

use crate::config::Settings;
use crate::console::data::{dead_job_id, parse_dead_job_id};
use crate::deployment::Deployment;
use crate::ids::{BatchId, Currency, MchOrderNo, MerchantName};
use crate::ledger::Outcome;
use crate::ledger::OutcomeStatus;
use crate::money::Amount;
use crate::producer::{Enqueued, ProducerError};
use crate::queue::{QueueStats, RedisQueue};
use crate::strict_json::StrictJsonError;
use crate::worker;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct WorkerArgs {
    /// Gateway calls in flight at once in this process, which holds 3 jobs per call
    /// (default: the `concurrency` setting, TARSPAY_CONCURRENCY).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Serve this process' Prometheus metrics (jobs, gateway calls, retries, outcomes,
    /// corrections, lifeline repairs, stale settlements) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", env = "TARSPAY_WORKER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub struct EnqueueArgs {
    /// JSON lines, one payout per line (without mchNo and notifyUrl, which come from the
    /// settings); `-` reads stdin.
    #[arg(long)]
    file: PathBuf,
    /// Tag every payout with this batch id (1-64 of A-Z, a-z, 0-9, '-', '_').
    #[arg(long)]
    batch: Option<BatchId>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The payout's mchOrderNo.
    id: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct OutcomesArgs {
    /// One JSON object per line with the outcome fields.
    #[arg(long)]
    json: bool,
    /// Keep waiting for new outcomes.
    #[arg(long)]
    follow: bool,
}

#[derive(Args)]
pub struct FollowDepositArgs {
    /// The deposit's mchOrderNo (created by you at TarsPay).
    id: MchOrderNo,
    /// Its amount, as created (decimal string).
    #[arg(long)]
    amount: Amount,
    #[arg(long)]
    currency: Currency,
}

#[derive(Subcommand)]
pub enum DeadCommand {
    /// List jobs that were given up (oldest first).
    List {
        #[arg(long, value_enum, default_value_t = QueueName::Payouts)]
        queue: QueueName,
    },
    /// Put a dead job back on the queue.
    Retry {
        id: String,
        #[arg(long, value_enum, default_value_t = QueueName::Payouts)]
        queue: QueueName,
    },
}

#[derive(Args)]
pub struct QueueArgs {
    /// The queue to pause or resume.
    #[arg(long, value_enum, default_value_t = QueueName::Payouts)]
    queue: QueueName,
}

/// Which queue a `pause`, `resume` or `dead` command works on.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum QueueName {
    /// Create-payout and poll-status jobs.
    Payouts,
    /// Outcome webhook deliveries.
    Webhooks,
}

pub async fn run_worker(settings: &Settings, args: WorkerArgs) -> Result<ExitCode> {
    // From now on a stop signal means a graceful stop, even while starting.
    let shutdown = crate::shutdown::signal();
    let concurrency = args
        .concurrency
        .unwrap_or(settings.worker.concurrency)
        .max(1);
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr).await?;
    }
    worker::run(settings, concurrency, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// A worker's own `/metrics`: what happens inside worker processes is counted there, not in
/// `serve`.
async fn serve_metrics(addr: std::net::SocketAddr) -> Result<()> {
    let handle = crate::metrics::install();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    tracing::info!(%addr, "worker metrics at /metrics");
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::error!(error = %err, "worker metrics server stopped");
        }
    });
    Ok(())
}

pub async fn enqueue(settings: &Settings, args: EnqueueArgs) -> Result<ExitCode> {
    // Fail before reading anything if the worker could not use these payouts.
    settings.gateway.notify_url()?;
    let deployment = Deployment::connect(settings).await?;
    let producer = deployment.producer(settings)?;
    let reader: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut bad_lines = 0;
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("cannot read line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        // Strict: a line repeating a key ("amount" twice) must not pay the last copy.
        let value = match crate::strict_json::parse(line.as_bytes()) {
            Ok(value) => value,
            Err(err) => {
                let reason = match err {
                    StrictJsonError::Malformed(reason) => reason,
                    duplicate => duplicate.to_string(),
                };
                println!("line {number}: invalid JSON: {reason}");
                bad_lines += 1;
                continue;
            }
        };
        match producer.enqueue_json(&value, args.batch.as_ref()).await {
            Ok(Enqueued::Queued) => println!(
                "queued {}",
                value["mchOrderNo"].as_str().unwrap_or_default()
            ),
            Ok(Enqueued::Exists {
                record,
                same_request: true,
            }) => println!("exists {}", record.mch_order_no),
            // The number is taken by a different payout: this line was not queued, which a
            // script must see in the exit code, as for a bad line.
            Ok(Enqueued::Exists { record, .. }) => {
                println!(
                    "line {number}: conflict {}: it exists with a different payout; this line was not queued",
                    record.mch_order_no
                );
                bad_lines += 1;
            }
            Err(ProducerError::Invalid(errors)) => {
                println!("line {number}: {errors}");
                bad_lines += 1;
            }
            Err(other) => return Err(other.into()),
        }
    }
    Ok(if bad_lines == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Follows a deposit created outside this worker: polled (`/api/payInInfo`) to its outcome.
pub async fn follow_deposit(settings: &Settings, args: FollowDepositArgs) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    let producer = deployment.producer(settings)?;
    match producer
        .track_deposit(&args.id, &args.amount, &args.currency)
        .await?
    {
        Enqueued::Queued => println!("following {}", args.id),
        Enqueued::Exists { record, .. } => {
            println!("exists {} {}", record.mch_order_no, record.phase)
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(settings: &Settings, args: StatusArgs) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    let Some(record) = deployment.order(&args.id).await? else {
        eprintln!("no order {}", args.id);
        return Ok(ExitCode::from(1));
    };
    if args.json {
        println!("{}", serde_json::to_string(&record)?);
    } else {
        println!("mchOrderNo   {}", record.mch_order_no);
        println!(
            "phase        {}{}",
            record.phase,
            if record.stuck {
                " (stuck past the polling deadline)"
            } else {
                ""
            }
        );
        println!("amount       {} {}", record.amount, record.currency);
        println!("attempts     {}", record.attempts);
        if let Some(id) = &record.pay_order_id {
            println!("payOrderId   {id}");
        }
        if let Some(code) = record.last_code {
            println!(
                "last code    {code} {}",
                record.last_msg.as_deref().unwrap_or_default()
            );
        } else if let Some(msg) = &record.last_msg {
            println!("last error   {msg}");
        }
        if let Some(batch) = &record.batch_id {
            println!("batch        {batch}");
        }
        if record.ambiguous && !record.phase.is_final() {
            println!("ambiguous    a create may have reached the gateway: only it settles this");
        }
        for correction in &record.corrections {
            println!(
                "CORRECTION   the gateway now says {} (was {}) at {}",
                correction.status,
                correction
                    .previous_status
                    .map_or("?", OutcomeStatus::as_str),
                correction.at
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_outcome(outcome: &Outcome, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(outcome)?);
    } else {
        let code = outcome
            .code
            .map(|c| format!(" code={c}"))
            .unwrap_or_default();
        let event = if outcome.is_correction() {
            format!(
                " CORRECTION (was {})",
                outcome.previous_status.map_or("?", OutcomeStatus::as_str)
            )
        } else {
            String::new()
        };
        println!(
            "{} {}{event} {} {} attempts={}{code} at={}",
            outcome.mch_order_no,
            outcome.status,
            outcome.amount,
            outcome.currency,
            outcome.attempts,
            outcome.at
        );
    }
    Ok(())
}

pub async fn outcomes(settings: &Settings, args: OutcomesArgs) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    // One cursor per partition: a payout's outcomes are all in its partition's stream, so
    // each payout's come out in order whatever the number of partitions.
    let mut last = vec!["0".to_owned(); deployment.partitions().len()];
    loop {
        let mut read = 0;
        for (partition, last) in deployment.partitions().iter().zip(&mut last) {
            let page = partition.ledger.outcomes_after(last, 500).await?;
            for (id, outcome) in &page {
                print_outcome(outcome, args.json)?;
                last.clone_from(id);
            }
            read += page.len();
        }
        if read == 0 {
            if !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

pub async fn queue_stats(settings: &Settings) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    print_stats("", &deployment.queue_stats().await?);
    if settings.gateway.profiles().len() > 1 {
        // Held by a merchant's guard (or an operator's pause): `resume` lets them go.
        let held = deployment.paused_merchants().await?;
        let held: Vec<&str> = held.iter().map(|m| m.as_str()).collect();
        println!(
            "held     {}",
            if held.is_empty() {
                "-".to_owned()
            } else {
                held.join(", ")
            }
        );
    }
    println!();
    print_stats("webhooks ", &deployment.webhook_stats().await?);
    Ok(ExitCode::SUCCESS)
}

fn print_stats(label: &str, stats: &QueueStats) {
    let oldest = stats
        .oldest_job_age
        .map(|a| format!("{}s", a.as_secs()))
        .unwrap_or_else(|| "-".into());
    let lines = [
        ("waiting", stats.waiting.to_string()),
        ("pending", stats.pending.to_string()),
        ("delayed", stats.delayed.to_string()),
        ("dead", stats.dead.to_string()),
        ("oldest", oldest),
        ("workers", stats.workers_alive.to_string()),
        ("paused", stats.paused.to_string()),
    ];
    for (name, value) in lines {
        println!("{label}{name:<8} {value}");
    }
}

pub async fn pause(settings: &Settings, paused: bool, args: QueueArgs) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    match (args.queue, paused) {
        // Every merchant's lanes, a guard's hold included.
        (QueueName::Payouts, true) => deployment.pause().await?,
        (QueueName::Payouts, false) => deployment.resume().await?,
        (QueueName::Webhooks, _) => {
            for partition in deployment.partitions() {
                set_paused(&partition.webhooks, paused).await?;
            }
        }
    }
    if paused {
        println!("paused: workers stop fetching within a second; running jobs finish");
    } else {
        println!("resumed");
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_paused<T>(queue: &RedisQueue<T>, paused: bool) -> Result<()> {
    if paused {
        queue.pause().await?;
    } else {
        queue.resume().await?;
    }
    Ok(())
}

pub async fn dead(settings: &Settings, command: DeadCommand) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    match command {
        DeadCommand::List { queue } => {
            let count = deployment.partitions().len();
            for partition in deployment.partitions() {
                match queue {
                    QueueName::Payouts => {
                        for lane in &partition.lanes {
                            let ids = |entry: &str| {
                                dead_job_id(count, partition.index, &lane.merchant, entry)
                            };
                            list_dead(&lane.queue, ids).await?;
                        }
                    }
                    QueueName::Webhooks => {
                        let ids = |entry: &str| {
                            dead_job_id(count, partition.index, MerchantName::DEFAULT, entry)
                        };
                        list_dead(&partition.webhooks, ids).await?;
                    }
                }
            }
        }
        DeadCommand::Retry { id, queue } => {
            let (merchant, candidates, entry) =
                parse_dead_job_id(deployment.partitions().len(), &id)
                    .map_err(anyhow::Error::msg)?;
            let mut requeued = false;
            for partition in &deployment.partitions()[candidates] {
                requeued = match queue {
                    QueueName::Payouts => match partition.lane(merchant) {
                        Some(lane) => lane.queue.requeue_dead(entry).await?,
                        None => bail!("no merchant {merchant:?} in the settings"),
                    },
                    QueueName::Webhooks => partition.webhooks.requeue_dead(entry).await?,
                };
                if requeued {
                    break;
                }
            }
            if !requeued {
                bail!("no dead job {id}");
            }
            println!("requeued {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_dead<T>(queue: &RedisQueue<T>, ids: impl Fn(&str) -> String) -> Result<()> {
    let mut after: Option<String> = None;
    loop {
        let page = queue.list_dead(after.as_deref(), 200).await?;
        for job in &page {
            println!(
                "{} attempts={} reason={} job={}",
                ids(&job.dead_id),
                job.attempts.unwrap_or(0),
                job.reason,
                job.payload
            );
        }
        match page.last() {
            Some(job) => after = Some(job.dead_id.clone()),
            None => return Ok(()),
        }
    }
}
