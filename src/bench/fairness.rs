//! `bench fairness`: issue 14's "with one merchant's 20,000-row payroll queued, another
//! merchant's payout created in under a second (p99 over 100 tries)".
//!
//! Two merchants on one deployment and one sandbox process: `default` ([`MCH_NO`], paying
//! INR) and `urgent` ([`URGENT`], paying MYR), each with its own key and its own payout lane
//! in every partition. The bench queues the default merchant's payroll of `rows` rows first
//! (the producer's `enqueue_batch`, no worker running), then starts the worker processes and,
//! `tries` times `interval` apart, enqueues one MYR payout for `urgent`. Per try it records
//! the wall clock just before the enqueue call and how many of the payroll's orders the
//! sandbox had created by then; afterwards the sandbox's `createdAtUs` of each urgent order
//! gives enqueue → created at the gateway, and the payroll's own `createdAtUs` how many of
//! its rows the gateway created while each urgent payout waited (a lane served strictly
//! after the backlog would let thousands through; a fair one about what is already in
//! flight).
//!
//! Timers are `bench e2e`'s (poll mode, sandbox final after 100 ms, first poll 150 ms), so the
//! payroll's poll jobs share its lane too.

use super::e2e::{DEFAULT_CONCURRENCY, ExtraMerchant, MCH_NO, Pipeline, PipelineTimers, payout};
use super::latency::summarise;
use super::shared::{HostCpu, RedisChoice, http_client, load_average, now_us, round};
use super::{BenchError, BenchOptions, Report};
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};
use tarspay_worker::ids::BatchId;
use tarspay_worker::producer::{Enqueued, ProducerError};

/// Rows of the default merchant's payroll when `--rows` is not given.
pub const DEFAULT_ROWS: u64 = 20_000;
/// Urgent payouts measured when `--tries` is not given.
pub const DEFAULT_TRIES: u64 = 100;
/// Between two tries when `--interval` is not given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Worker processes when `--workers` is not given.
pub const DEFAULT_WORKERS: usize = 2;
/// Issue 14's bound on an urgent payout's enqueue → created, p99.
const TARGET_P99_MS: f64 = 1_000.0;
/// The second merchant: its payouts are the ones measured.
pub const URGENT: ExtraMerchant = ExtraMerchant {
    name: "urgent",
    mch_no: "M2000000002",
    currencies: "MYR",
};
const PAYROLL_PREFIX: &str = "PAYROLL";
const URGENT_PREFIX: &str = "URGENT";
/// How long the bench waits for the last urgent order after the last try (a hang guard, not
/// a speed check: a starved lane still gets there once the payroll is done).
const WAIT_FOR_URGENT: Duration = Duration::from_secs(180);

/// What `bench fairness` runs.
#[derive(Debug, Clone)]
pub struct FairnessOptions {
    pub rows: u64,
    pub tries: u64,
    pub interval: Duration,
    pub workers: usize,
}

impl Default for FairnessOptions {
    fn default() -> Self {
        Self {
            rows: DEFAULT_ROWS,
            tries: DEFAULT_TRIES,
            interval: DEFAULT_INTERVAL,
            workers: DEFAULT_WORKERS,
        }
    }
}

/// A Malaysian payout of 75.25 MYR: routed to [`URGENT`] by its currency.
pub fn urgent_payout(id: &str) -> Value {
    json!({"mchOrderNo": id, "amount": "75.25", "currency": "MYR", "wayCode": "MAYBANK"})
}

pub async fn run(
    options: &BenchOptions,
    fairness: &FairnessOptions,
    report: Report<'_>,
) -> Result<(), BenchError> {
    if fairness.rows == 0 || fairness.tries == 0 || fairness.workers == 0 {
        return Err(BenchError::Setup(
            "--rows, --tries and --workers must be at least 1".into(),
        ));
    }
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let partitions = options.partitions()?;
    let timers = PipelineTimers::default();
    // No worker yet: the payroll is queued before any runs.
    let mut pipeline = Pipeline::start_with_merchants(
        RedisChoice::of(options)?,
        partitions,
        "fairness",
        0,
        concurrency,
        &timers,
        &[],
        &[URGENT],
    )
    .await?;
    let measured = measure(&mut pipeline, fairness).await;
    let redis = pipeline.target.describe();
    pipeline.finish().await?;
    let mut line = measured?;
    let summary = line["summary"].as_str().unwrap_or_default().to_owned();
    line.extend([
        ("bench".to_owned(), json!("fairness")),
        ("workers".to_owned(), json!(fairness.workers)),
        ("concurrency".to_owned(), json!(concurrency)),
        ("partitions".to_owned(), json!(partitions)),
        ("redis".to_owned(), json!(redis)),
        ("rows".to_owned(), json!(fairness.rows)),
        ("tries".to_owned(), json!(fairness.tries)),
        (
            "interval_ms".to_owned(),
            json!(fairness.interval.as_millis() as u64),
        ),
        ("sandbox_final_after".to_owned(), json!(timers.final_after)),
        (
            "poll_first_delay".to_owned(),
            json!(timers.poll_first_delay),
        ),
    ]);
    report(Value::Object(line));
    // For a reader of the terminal; stdout carries only the JSON line.
    eprintln!("{summary}");
    Ok(())
}

/// One urgent payout: when its enqueue started, and how far the payroll was then.
#[derive(Debug, Clone, PartialEq)]
struct Try {
    id: String,
    enqueued_at_us: u64,
    /// Payroll orders the sandbox had created just before this try's enqueue.
    payroll_created: u64,
}

/// Queues the payroll, starts the workers, runs the tries and reads the sandbox's stamps;
/// the measured fields of the line.
async fn measure(
    pipeline: &mut Pipeline,
    fairness: &FairnessOptions,
) -> Result<Map<String, Value>, BenchError> {
    let client = http_client().map_err(BenchError::Sandbox)?;
    let sandbox = pipeline.sandbox.url.clone();

    // The default merchant's payroll, queued while no worker runs.
    let rules = pipeline.producer.rules();
    let rows = (0..fairness.rows)
        .map(|i| rules.validate_json(&payout(&format!("{PAYROLL_PREFIX}-{i:07}"))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ProducerError::from)?;
    let started = Instant::now();
    let batch = pipeline
        .producer
        .enqueue_batch(&rows, &BatchId::random())
        .await?;
    let payroll_enqueue = started.elapsed();
    if batch.queued as u64 != fairness.rows {
        return Err(BenchError::Check(format!(
            "the payroll queued {} of {} rows",
            batch.queued, fairness.rows
        )));
    }
    drop(rows);

    for _ in 0..fairness.workers {
        pipeline.spawn_worker()?;
    }
    pipeline.wait_workers_alive(fairness.workers as u64).await?;

    // The tries, `interval` apart (a slow one does not push the later ones back).
    let host_before = HostCpu::read();
    let load_before = load_average();
    let mut tries = Vec::with_capacity(fairness.tries as usize);
    let first = Instant::now();
    for index in 0..fairness.tries {
        tokio::time::sleep_until((first + fairness.interval * index as u32).into()).await;
        let payroll_created = order_count(&client, &sandbox, MCH_NO).await?;
        let id = format!("{URGENT_PREFIX}-{index:04}");
        let enqueued_at_us = now_us();
        match pipeline
            .producer
            .enqueue_json(&urgent_payout(&id), None)
            .await?
        {
            Enqueued::Queued => {}
            other => {
                return Err(BenchError::Check(format!("{id} not queued: {other:?}")));
            }
        }
        tries.push(Try {
            id,
            enqueued_at_us,
            payroll_created,
        });
    }
    let tries_elapsed = first.elapsed();
    let payroll_created_after = order_count(&client, &sandbox, MCH_NO).await?;

    // Every urgent order at the gateway, under the urgent merchant.
    let deadline = Instant::now() + WAIT_FOR_URGENT;
    let urgent = loop {
        let orders = merchant_orders(&client, &sandbox, URGENT.mch_no).await?;
        if orders.len() as u64 >= fairness.tries {
            break orders;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "{} of {} urgent orders created",
                orders.len(),
                fairness.tries
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let host_after = HostCpu::read();
    let urgent_created = created_at_by_id(&urgent)?;
    // The payroll's orders created so far include every one created before the last urgent
    // order (all of which are in by now).
    let mut payroll_created_at: Vec<u64> =
        created_at_by_id(&merchant_orders(&client, &sandbox, MCH_NO).await?)?
            .into_values()
            .collect();
    payroll_created_at.sort_unstable();

    let joined = join(&tries, fairness.rows, &urgent_created, &payroll_created_at)?;
    let remaining = |t: &Try| fairness.rows.saturating_sub(t.payroll_created);
    let (first_try, last_try) = (&tries[0], &tries[tries.len() - 1]);
    let backlogged: Vec<&Measured> = joined.iter().filter(|m| m.backlog > 0).collect();
    let latencies = summarise(joined.iter().map(|m| m.enqueue_to_create_ms).collect());
    let p99 = latencies["p99"].as_f64().unwrap_or(f64::INFINITY);
    let drained = remaining(last_try) == 0;
    let shares = host_before
        .zip(host_after)
        .and_then(|(before, after)| before.shares_until(&after));
    let summary = format!(
        "fairness: {} urgent payouts, enqueue → created at the gateway p50 {} ms, p99 {} ms, max {} ms ({} under 1 s; {} tries under 1 s); payroll of {} rows, {} still to create at the first try, {} at the last{}; {} worker process(es), {} core(s)",
        fairness.tries,
        latencies["p50"],
        latencies["p99"],
        latencies["max"],
        if p99 < TARGET_P99_MS {
            "p99"
        } else {
            "p99 NOT"
        },
        joined
            .iter()
            .filter(|m| m.enqueue_to_create_ms < TARGET_P99_MS)
            .count(),
        fairness.rows,
        remaining(first_try),
        remaining(last_try),
        if drained {
            " (the payroll's backlog DRAINED before the last try: the later tries waited behind no backlog; see enqueue_to_create_ms_while_backlogged, or use more --rows or a shorter --interval)"
        } else {
            ""
        },
        fairness.workers,
        cpus().map_or("?".to_owned(), |n| n.to_string()),
    );
    let mut line = Map::new();
    line.extend([
        ("enqueue_to_create_ms".to_owned(), latencies),
        (
            "enqueue_to_create_ms_while_backlogged".to_owned(),
            summarise(backlogged.iter().map(|m| m.enqueue_to_create_ms).collect()),
        ),
        ("p99_under_1s".to_owned(), json!(p99 < TARGET_P99_MS)),
        (
            "tries_under_1s".to_owned(),
            json!(
                joined
                    .iter()
                    .filter(|m| m.enqueue_to_create_ms < TARGET_P99_MS)
                    .count()
            ),
        ),
        ("tries_measured".to_owned(), json!(joined.len())),
        ("tries_while_backlogged".to_owned(), json!(backlogged.len())),
        (
            "payroll_created_during_wait".to_owned(),
            summarise(
                joined
                    .iter()
                    .map(|m| m.payroll_created_during_wait as f64)
                    .collect(),
            ),
        ),
        (
            "payroll_remaining_first_try".to_owned(),
            json!(remaining(first_try)),
        ),
        (
            "payroll_remaining_last_try".to_owned(),
            json!(remaining(last_try)),
        ),
        (
            "payroll_remaining_after_tries".to_owned(),
            json!(fairness.rows.saturating_sub(payroll_created_after)),
        ),
        ("payroll_drained_during_tries".to_owned(), json!(drained)),
        (
            "payroll_enqueue_s".to_owned(),
            json!(round(payroll_enqueue.as_secs_f64(), 3)),
        ),
        (
            "tries_elapsed_s".to_owned(),
            json!(round(tries_elapsed.as_secs_f64(), 3)),
        ),
        ("cpus".to_owned(), json!(cpus())),
        (
            "host_steal_pct".to_owned(),
            json!(shares.map(|(steal, _)| round(steal, 1))),
        ),
        (
            "host_busy_pct".to_owned(),
            json!(shares.map(|(_, busy)| round(busy, 1))),
        ),
        ("loadavg_1m_before".to_owned(), json!(load_before)),
        ("loadavg_1m".to_owned(), json!(load_average())),
        ("summary".to_owned(), json!(summary)),
        ("note".to_owned(), json!(NOTE)),
    ]);
    Ok(line)
}

const NOTE: &str = "one host's wall clock, µs: enqueue = just before the bench's enqueue call of the urgent payout; created = the sandbox's createdAtUs of its order. payroll_remaining_* = payroll rows the sandbox had not created yet, read just before a try (first, last) or after the last; payroll_created_during_wait = payroll orders the sandbox created between an urgent payout's enqueue and its creation; *_while_backlogged: only the tries made while payroll rows were still to create";

/// Logical CPUs this process may use.
fn cpus() -> Option<usize> {
    std::thread::available_parallelism().ok().map(usize::from)
}

/// One try, joined with the sandbox's stamps.
#[derive(Debug, Clone, PartialEq)]
struct Measured {
    enqueue_to_create_ms: f64,
    /// Payroll rows not created yet just before the try.
    backlog: u64,
    /// Payroll orders created after the try's enqueue started and before its own order.
    payroll_created_during_wait: u64,
}

/// Every try with its urgent order's `createdAtUs` and the payroll's creations in between
/// (`payroll_created_at` sorted); the payroll has `rows` rows.
fn join(
    tries: &[Try],
    rows: u64,
    urgent_created: &std::collections::HashMap<String, u64>,
    payroll_created_at: &[u64],
) -> Result<Vec<Measured>, BenchError> {
    tries
        .iter()
        .map(|t| {
            let created = *urgent_created.get(&t.id).ok_or_else(|| {
                BenchError::Check(format!("the sandbox has no urgent order {}", t.id))
            })?;
            let before = |at: u64| payroll_created_at.partition_point(|&p| p < at);
            Ok(Measured {
                enqueue_to_create_ms: (created as f64 - t.enqueued_at_us as f64) / 1000.0,
                backlog: rows.saturating_sub(t.payroll_created),
                payroll_created_during_wait: before(created)
                    .saturating_sub(before(t.enqueued_at_us))
                    as u64,
            })
        })
        .collect()
}

/// `mchOrderNo` → `createdAtUs` of the sandbox's order views.
fn created_at_by_id(
    orders: &[Value],
) -> Result<std::collections::HashMap<String, u64>, BenchError> {
    orders
        .iter()
        .map(|order| {
            let id = order["mchOrderNo"].as_str();
            let created = order["createdAtUs"].as_u64();
            id.zip(created)
                .map(|(id, created)| (id.to_owned(), created))
                .ok_or_else(|| {
                    BenchError::Sandbox(format!(
                        "an order without mchOrderNo or createdAtUs: {order}"
                    ))
                })
        })
        .collect()
}

/// `GET {sandbox}{path}` as JSON.
async fn get_json(
    client: &reqwest::Client,
    sandbox: &str,
    path: &str,
) -> Result<Value, BenchError> {
    client
        .get(format!("{sandbox}{path}"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|err| BenchError::Sandbox(format!("{path}: {err}")))?
        .json()
        .await
        .map_err(|err| BenchError::Sandbox(format!("{path}: {err}")))
}

/// How many orders the sandbox holds for the merchant (`orders` of its merchant report).
async fn order_count(
    client: &reqwest::Client,
    sandbox: &str,
    mch_no: &str,
) -> Result<u64, BenchError> {
    let merchant = get_json(client, sandbox, &format!("/sandbox/merchants/{mch_no}")).await?;
    merchant["orders"]
        .as_u64()
        .ok_or_else(|| BenchError::Sandbox(format!("merchant report without orders: {merchant}")))
}

/// Every order the sandbox holds for the merchant.
async fn merchant_orders(
    client: &reqwest::Client,
    sandbox: &str,
    mch_no: &str,
) -> Result<Vec<Value>, BenchError> {
    match get_json(
        client,
        sandbox,
        &format!("/sandbox/merchants/{mch_no}/orders"),
    )
    .await?
    {
        Value::Array(orders) => Ok(orders),
        other => Err(BenchError::Sandbox(format!(
            "orders of {mch_no}: not a list: {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_join_the_urgent_stamps_and_count_the_payroll_in_between() {
        let tries = vec![
            Try {
                id: "URGENT-0000".into(),
                enqueued_at_us: 1_000,
                payroll_created: 1,
            },
            Try {
                id: "URGENT-0001".into(),
                enqueued_at_us: 5_000,
                payroll_created: 4,
            },
        ];
        let urgent = [
            ("URGENT-0000".to_owned(), 3_500),
            ("URGENT-0001".to_owned(), 5_250),
        ]
        .into_iter()
        .collect();
        // Four rows: two created before the first try, one during its wait, one later.
        let payroll = [10, 900, 2_000, 4_000];
        let joined = join(&tries, 4, &urgent, &payroll).unwrap();
        assert_eq!(
            joined,
            vec![
                Measured {
                    enqueue_to_create_ms: 2.5,
                    backlog: 3,
                    payroll_created_during_wait: 1,
                },
                Measured {
                    enqueue_to_create_ms: 0.25,
                    backlog: 0,
                    payroll_created_during_wait: 0,
                },
            ]
        );
        let missing = [("URGENT-0000".to_owned(), 3_500)].into_iter().collect();
        assert!(join(&tries, 4, &missing, &payroll).is_err());
    }

    #[test]
    fn created_stamps_are_read_by_order_number() {
        let orders = [json!({"mchOrderNo": "A", "createdAtUs": 7u64})];
        assert_eq!(created_at_by_id(&orders).unwrap()["A"], 7);
        assert!(created_at_by_id(&[json!({"mchOrderNo": "A"})]).is_err());
    }
}
