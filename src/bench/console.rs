//! `bench console`: how long the operator console's pages take to render with a large history
//! in Redis (issue 15: under 200 ms with 1,000,000 finished orders).
//!
//! 1. **Seeding**, through the library's own code paths: each order is validated by the payout
//!    rules, registered (`Ledger::register`), leased (`begin_submit_with_record`), accepted
//!    with a gateway order id (`accept`) and finalised with the state the gateway reported
//!    (`apply_gateway_final`, as a callback does), with the history lines a worker and the
//!    callback receiver note on the way (the create's answer, the callback): 97 % succeeded, 2 % failed, 1 % rejected,
//!    across INR, BDT, KES and MYR, in batches of [`BATCH_SIZE`]. Many callers run at once, so
//!    the ledger's group commit batches their script calls. Whatever the ledger writes besides
//!    the record (its time and batch index, per-minute counters, event history) is written the
//!    way a deployment writes it. Then a few hundred orders are left open: queued (with their
//!    create job, through the producer), unknown (a create that may have landed) and accepted
//!    but stuck; and a few dead jobs (creates whose stored request is unreadable, given up by
//!    an in-process worker pool against an in-process sandbox), so the dead page has rows.
//!    The line reports the seeding rate and Redis `used_memory` per order (private server).
//! 2. **Pages**: `serve` in this process on loopback with an admin and a viewer token; the
//!    bench logs in through `POST /console/login` (the viewer too, once) and times full
//!    `GET`s (headers and body) of each page, [`WARM_UP`] untimed first, then `--requests`
//!    timed, one after another. One JSON line per page: p50/p99/max ms, the body's size and
//!    its rows (the page's stable `data-…` row attributes).
//!
//! The run fails (non-zero exit) when a page answers anything but 200, after printing every
//! line.

use super::shared::{RedisChoice, RedisTarget, http_client, latency_summary, round};
use super::{BenchError, BenchOptions, Report};
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tarspay_sandbox::{Sandbox, SandboxConfig, SandboxMerchant};
use tarspay_worker::config::Settings;
use tarspay_worker::deployment::Deployment;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::ids::BatchId;
use tarspay_worker::ledger::history::{EventKind, OrderEvent};
use tarspay_worker::ledger::{FinalResult, Ledger, NewOrder, OrderKind, Phase, SubmitTicket};
use tarspay_worker::payout::{PayoutRequest, PayoutRules};
use tarspay_worker::producer::{PayoutOrder, Producer};

/// Finished orders when `--orders` is not given.
pub const DEFAULT_ORDERS: u64 = 1_000_000;
/// Timed requests per page when `--requests` is not given.
pub const DEFAULT_REQUESTS: usize = 50;
/// Seeding callers in flight at once when `--concurrency` is not given.
pub const DEFAULT_CONCURRENCY: usize = 512;
/// Orders per batch (a payroll file).
pub const BATCH_SIZE: u64 = 1_000;
/// Untimed requests of each page before its timed ones.
pub const WARM_UP: usize = 3;
/// Dead jobs left for the dead page.
pub const DEAD_JOBS: u64 = 20;
/// Most orders left open (queued, unknown, stuck).
pub const MAX_OPEN: u64 = 300;
/// Tasks the seeding callers are spread over (the runtime's threads share them).
const SEED_TASKS: u64 = 4;
const MCH_NO: &str = "M1234567890";
const OPERATOR: &str = "bench";
const SEED_LEASE: Duration = Duration::from_secs(60);

/// What `bench console` runs.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// Finished orders to seed.
    pub orders: u64,
    /// Timed requests per page.
    pub requests: usize,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            orders: DEFAULT_ORDERS,
            requests: DEFAULT_REQUESTS,
        }
    }
}

/// How a seeded order ends (by its number: the same run seeds the same orders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Succeeded,
    Failed,
    Rejected,
}

impl Ending {
    /// 97 % succeeded, 2 % failed, 1 % rejected, spread over the run by a hash.
    fn of(i: u64) -> Self {
        match mix(i) % 100 {
            0..97 => Self::Succeeded,
            97..99 => Self::Failed,
            _ => Self::Rejected,
        }
    }

    fn phase(self) -> Phase {
        match self {
            Self::Succeeded => Phase::Succeeded,
            Self::Failed => Phase::Failed,
            Self::Rejected => Phase::Rejected,
        }
    }

    /// What the gateway reports for it.
    fn result(self, i: u64) -> FinalResult {
        let pay_order_id = Some(pay_order_id(i));
        match self {
            Self::Succeeded => FinalResult {
                gateway_state: Some(2),
                pay_order_id,
                fee: Some(format!("{}.{:02}", 1 + mix(i) % 9, mix(i + 1) % 100)),
                code: None,
                msg: None,
            },
            Self::Failed => FinalResult {
                gateway_state: Some(3),
                pay_order_id,
                fee: None,
                code: Some(0),
                msg: Some("beneficiary account closed".into()),
            },
            Self::Rejected => FinalResult {
                gateway_state: Some(8),
                pay_order_id,
                fee: None,
                code: Some(0),
                msg: Some("rejected by the beneficiary's bank".into()),
            },
        }
    }
}

/// splitmix64: a well-spread hash of the order's index.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn order_no(i: u64) -> String {
    format!("PO{i:010}")
}

fn pay_order_id(i: u64) -> String {
    format!("P2026{:012}", mix(i) % 1_000_000_000_000)
}

fn batch_of(i: u64) -> String {
    format!("payroll-{:05}", i / BATCH_SIZE)
}

/// The currency filter the bench times: the rarest of the four (10 %).
const RARE_CURRENCY: &str = "MYR";

/// A payout request as a merchant sends it: INR 50 %, BDT 20 %, KES 20 %, MYR 10 %.
fn payout_row(id: &str, i: u64) -> Value {
    let h = mix(i ^ 0x5eed);
    let whole = 100 + h % 40_000;
    let cents = h % 100;
    match i % 10 {
        0..5 => {
            json!({"mchOrderNo": id, "amount": format!("{whole}.{cents:02}"), "currency": "INR",
            "wayCode": "UPI", "customerName": "Asha Rao", "customerEmail": "asha@example.in",
            "customerContact": format!("98{:08}", h % 100_000_000)})
        }
        5..7 => json!({"mchOrderNo": id, "amount": whole.to_string(), "currency": "BDT",
            "wayCode": "EWALLET_BKASH", "walletId": format!("017{:08}", h % 100_000_000)}),
        7..9 => json!({"mchOrderNo": id, "amount": whole.to_string(), "currency": "KES",
            "wayCode": "EWALLET_MPESA", "customerContact": format!("2547{:08}", h % 100_000_000),
            "customerName": "Wanjiru K", "customerEmail": "w@example.ke"}),
        _ => {
            json!({"mchOrderNo": id, "amount": format!("{}.{cents:02}", 50 + h % 3_000), "currency": "MYR",
            "wayCode": "MAYBANK", "customerName": "Aminah",
            "customerAccountNumber": format!("{:012}", h % 1_000_000_000_000)})
        }
    }
}

fn validate(rules: &PayoutRules, id: &str, i: u64) -> Result<PayoutRequest, BenchError> {
    rules
        .validate_json(&payout_row(id, i))
        .map_err(|err| BenchError::Setup(format!("sample payout {id} is invalid: {err}")))
}

fn batch_id(text: &str) -> Result<BatchId, BenchError> {
    BatchId::parse(text).map_err(|err| BenchError::Setup(format!("batch id {text}: {err}")))
}

pub async fn run(
    options: &BenchOptions,
    console: &ConsoleOptions,
    report: Report<'_>,
) -> Result<(), BenchError> {
    if console.orders == 0 || console.requests == 0 {
        return Err(BenchError::Setup(
            "--orders and --requests must be at least 1".into(),
        ));
    }
    let target = RedisTarget::new(RedisChoice::of(options)?, "console").await?;
    let result = run_on(&target, options, console, report).await;
    target.cleanup().await?;
    result
}

/// The settings of the run: the bench's Redis and prefix, an in-process sandbox as the
/// gateway, and the console's two tokens.
struct Setup {
    settings: Settings,
    deployment: Deployment,
    admin_token: String,
    viewer_token: String,
    _sandbox: Sandbox,
}

async fn setup(target: &RedisTarget, partitions: usize) -> Result<Setup, BenchError> {
    let key = PrivateKey::generate();
    let sandbox = Sandbox::start(
        SandboxConfig {
            merchants: vec![SandboxMerchant {
                mch_no: MCH_NO.into(),
                public_key: key.public_key(),
                balance: 1_000_000_000u64.into(),
            }],
            callbacks: false,
            ..SandboxConfig::default()
        },
        "127.0.0.1:0",
    )
    .await
    .map_err(|err| BenchError::Sandbox(err.to_string()))?;
    let admin_token = random_token();
    let viewer_token = random_token();
    let env: Vec<(String, String)> = [
        ("TARSPAY_REDIS_URL", target.url.clone()),
        ("TARSPAY_QUEUE_PREFIX", target.prefix.clone()),
        ("TARSPAY_PARTITIONS", partitions.to_string()),
        ("TARSPAY_GATEWAY_URL", sandbox.url()),
        ("TARSPAY_MCH_NO", MCH_NO.to_owned()),
        ("TARSPAY_PRIVATE_KEY", key.expose_hex()),
        (
            "TARSPAY_NOTIFY_URL",
            "http://127.0.0.1:9/tarspay/notify".to_owned(),
        ),
        ("TARSPAY_API_TOKEN", admin_token.clone()),
        ("TARSPAY_VIEWER_TOKEN", viewer_token.clone()),
        // A private server without AOF, or the caller's Redis under a throwaway prefix.
        ("TARSPAY_REDIS_UNSAFE", "true".to_owned()),
        ("TARSPAY_SHUTDOWN_GRACE", "2s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = Settings::load_with_env(None, env)?;
    let deployment = Deployment::connect(&settings)
        .await
        .map_err(|err| BenchError::Setup(format!("deployment: {err}")))?;
    Ok(Setup {
        settings,
        deployment,
        admin_token,
        viewer_token,
        _sandbox: sandbox,
    })
}

fn random_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

async fn run_on(
    target: &RedisTarget,
    options: &BenchOptions,
    console: &ConsoleOptions,
    report: Report<'_>,
) -> Result<(), BenchError> {
    let partitions = options.partitions()?;
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let setup = setup(target, partitions).await?;
    let producer = setup.deployment.producer(&setup.settings)?;
    let mut nodes = target.nodes().await?;
    let memory_before = nodes.used_memory().await?;

    let started = Instant::now();
    seed_finished(&producer, console.orders, concurrency).await?;
    let finished_s = started.elapsed().as_secs_f64();
    let dead = seed_dead(&setup).await?;
    let open = seed_open(&producer, console.orders).await?;
    // The chart counters this process tallied (a worker adds its own every 2 s).
    for partition in setup.deployment.partitions() {
        for lane in &partition.lanes {
            lane.ledger.flush_counters().await;
        }
    }
    let seeded_s = started.elapsed().as_secs_f64();
    let memory_after = nodes.used_memory().await?;
    let total = console.orders + open.total() + dead;

    let mut line = serde_json::Map::new();
    line.extend([
        ("bench".to_owned(), json!("console")),
        ("mode".to_owned(), json!("seed")),
        ("n".to_owned(), json!(console.orders)),
        ("concurrency".to_owned(), json!(concurrency)),
        ("partitions".to_owned(), json!(partitions)),
        ("redis".to_owned(), json!(target.describe())),
        ("orders_total".to_owned(), json!(total)),
        ("open_queued".to_owned(), json!(open.queued)),
        ("open_unknown".to_owned(), json!(open.unknown)),
        ("open_stuck".to_owned(), json!(open.stuck)),
        ("dead_jobs".to_owned(), json!(dead)),
        (
            "batches".to_owned(),
            json!(console.orders.div_ceil(BATCH_SIZE)),
        ),
        ("finished_seconds".to_owned(), json!(round(finished_s, 2))),
        (
            "finished_per_s".to_owned(),
            json!((console.orders as f64 / finished_s.max(1e-9)).round() as u64),
        ),
        ("seed_seconds".to_owned(), json!(round(seeded_s, 2))),
    ]);
    if target.is_private() {
        let added = memory_after.saturating_sub(memory_before);
        line.insert("redis_used_memory_bytes".into(), json!(memory_after));
        line.insert(
            "redis_bytes_per_order".into(),
            json!((added as f64 / total as f64).round() as u64),
        );
    } else {
        line.insert("redis_used_memory_bytes".into(), Value::Null);
        line.insert("redis_bytes_per_order".into(), Value::Null);
    }
    line.insert(
        "note".into(),
        json!("orders registered, leased, accepted and finalised through the ledger (group commit); used_memory is the private server's, whole keyspace included"),
    );
    report(Value::Object(line));

    measure_pages(&setup, console, total, report).await
}

/// Seeds `orders` finished orders, `concurrency` callers at once over [`SEED_TASKS`] tasks.
async fn seed_finished(
    producer: &Producer,
    orders: u64,
    concurrency: usize,
) -> Result<(), BenchError> {
    let done = Arc::new(AtomicU64::new(0));
    let per_task = (concurrency as u64).div_ceil(SEED_TASKS).max(1) as usize;
    let tasks: Vec<_> = (0..SEED_TASKS)
        .map(|task| {
            let producer = producer.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let indexes = (task..orders).step_by(SEED_TASKS as usize);
                let mut seeded = futures::stream::iter(indexes)
                    .map(|i| seed_one(&producer, i))
                    .buffer_unordered(per_task);
                while let Some(result) = seeded.next().await {
                    result?;
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_multiple_of(100_000) {
                        eprintln!("bench console: {n} of {orders} orders seeded");
                    }
                }
                Ok::<(), BenchError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|err| BenchError::Setup(format!("seeding task: {err}")))??;
    }
    Ok(())
}

/// One finished order: registered, leased, accepted, finalised.
async fn seed_one(producer: &Producer, i: u64) -> Result<(), BenchError> {
    let id = order_no(i);
    let request = validate(producer.rules(), &id, i)?;
    let batch = batch_id(&batch_of(i))?;
    let ledger = producer.deployment().ledger_of(&id);
    register_row(ledger, &request, &batch).await?;
    let (ticket, record) = ledger
        .begin_submit_with_record(&id, "bench-seed", SEED_LEASE)
        .await?;
    let record = match (ticket, record) {
        (SubmitTicket::Go { .. }, Some(record)) => record,
        (ticket, _) => {
            return Err(BenchError::Check(format!(
                "{id}: no lease to seed it ({ticket:?})"
            )));
        }
    };
    // The history lines a worker and the callback receiver note, carried by the acceptance
    // and the finalisation as theirs are.
    let pay_order_id = pay_order_id(i);
    let mut create = OrderEvent::now(EventKind::Create);
    create.attempt = Some(1);
    create.latency_ms = Some(40 + mix(i) % 160);
    create.code = Some(0);
    create.msg = Some(format!("accepted as {pay_order_id}"));
    ledger.note_soon(&id, create);
    ledger.accept(&id, Some(&pay_order_id), None).await?;
    let ending = Ending::of(i);
    let result = ending.result(i);
    let mut callback = OrderEvent::now(EventKind::Callback);
    callback.verified = Some(true);
    callback.state = result.gateway_state;
    ledger.note_soon(&id, callback);
    ledger
        .apply_gateway_final(&record, ending.phase(), &result)
        .await?;
    Ok(())
}

/// Registers a payroll row without its job (the seeding drives the order itself).
async fn register_row(
    ledger: &Ledger,
    request: &PayoutRequest,
    batch: &BatchId,
) -> Result<(), BenchError> {
    let registered = PayoutOrder::new(request);
    ledger
        .register(&registered.order(request, Some(batch)))
        .await?;
    Ok(())
}

/// Orders left open for the pages that show them.
#[derive(Debug, Default)]
struct Open {
    queued: u64,
    unknown: u64,
    stuck: u64,
}

impl Open {
    fn total(&self) -> u64 {
        self.queued + self.unknown + self.stuck
    }
}

/// A tenth of the finished orders, at most [`MAX_OPEN`]: a third queued with their create job
/// (the producer's path), a third unknown (a create that may have reached the gateway, given
/// back without an answer), a third accepted and flagged stuck.
async fn seed_open(producer: &Producer, finished: u64) -> Result<Open, BenchError> {
    let count = (finished / 10).clamp(3, MAX_OPEN);
    let batch = batch_id("payroll-open")?;
    let mut open = Open::default();
    for k in 0..count {
        let i = finished + k;
        let id = format!("PO-OPEN-{k:05}");
        let request = validate(producer.rules(), &id, i)?;
        let ledger = producer.deployment().ledger_of(&id);
        match k % 3 {
            0 => {
                producer.enqueue(&request, Some(&batch)).await?;
                open.queued += 1;
            }
            kind => {
                register_row(ledger, &request, &batch).await?;
                ledger.begin_submit(&id, "bench-open", SEED_LEASE).await?;
                if kind == 1 {
                    ledger
                        .release(&id, "bench-open", Phase::Unknown, true, None, "timeout")
                        .await?;
                    open.unknown += 1;
                } else {
                    ledger.accept(&id, Some(&pay_order_id(i)), None).await?;
                    ledger.mark_stuck(&id).await?;
                    open.stuck += 1;
                }
            }
        }
    }
    Ok(open)
}

/// [`DEAD_JOBS`] creates whose stored request is unreadable, given up by a worker pool (in
/// this process, against the in-process sandbox) into the dead stream. Runs before any open
/// order exists, so the pool has nothing else to do.
async fn seed_dead(setup: &Setup) -> Result<u64, BenchError> {
    use tarspay_worker::jobs::PayoutJob;
    for k in 0..DEAD_JOBS {
        let id = format!("PO-DEAD-{k:05}");
        let partition = setup.deployment.partition_of(&id);
        partition
            .ledger
            .register(&NewOrder {
                mch_order_no: &id
                    .parse()
                    .map_err(|err| BenchError::Setup(format!("{id}: {err}")))?,
                kind: OrderKind::Payout,
                fingerprint: "unreadable",
                amount: "1",
                currency: &"INR"
                    .parse()
                    .map_err(|err| BenchError::Setup(format!("INR: {err}")))?,
                request: "not json",
                batch_id: None,
                merchant: &Default::default(),
            })
            .await?;
        partition
            .queue
            .enqueue(&PayoutJob::CreatePayout {
                mch_order_no: id
                    .parse()
                    .map_err(|err| BenchError::Setup(format!("{id}: {err}")))?,
                merchant: Default::default(),
            })
            .await?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = setup.settings.clone();
    let pool = tokio::spawn(async move {
        tarspay_worker::worker::run(&settings, 4, async move {
            let _ = stopped.await;
        })
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        match setup.deployment.dead_count().await {
            Ok(n) if n >= DEAD_JOBS => break Ok(n),
            Ok(n) if Instant::now() > deadline => {
                break Err(BenchError::Timeout(format!(
                    "{n} of {DEAD_JOBS} dead jobs after 60 s"
                )));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(err) => break Err(err.into()),
        }
    };
    let _ = stop.send(());
    match pool.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(BenchError::Setup(format!("worker pool: {err}"))),
        Err(err) => return Err(BenchError::Setup(format!("worker pool: {err}"))),
    }
    result
}

/// One page the bench times.
struct Page {
    name: &'static str,
    path: String,
    /// The attribute each row of the page's main table carries.
    row: &'static str,
}

fn pages(orders: u64) -> Vec<Page> {
    let middle = orders / 2;
    let exact = order_no(orders / 3);
    let batch = batch_of(middle);
    let page = |name, path: String, row| Page { name, path, row };
    vec![
        page("overview", "/console/".into(), "data-queue-state=\""),
        page("payouts", "/console/payouts".into(), "data-order=\""),
        page(
            "payouts_status_failed",
            "/console/payouts?status=failed".into(),
            "data-order=\"",
        ),
        page(
            "payouts_currency",
            format!("/console/payouts?currency={RARE_CURRENCY}"),
            "data-order=\"",
        ),
        page(
            "payouts_batch",
            format!("/console/payouts?batch={batch}"),
            "data-order=\"",
        ),
        page(
            "payouts_mch_order_no",
            format!("/console/payouts?mch_order_no={exact}"),
            "data-order=\"",
        ),
        page(
            "payout_detail",
            format!("/console/payouts/{}", order_no(middle)),
            "data-kind=\"",
        ),
        page("batches", "/console/batches".into(), "data-batch=\""),
        page(
            "batch",
            format!("/console/batches/{batch}"),
            "data-status=\"",
        ),
        page("dead", "/console/dead".into(), "data-dead-id=\""),
    ]
}

async fn measure_pages(
    setup: &Setup,
    console: &ConsoleOptions,
    total: u64,
    report: Report<'_>,
) -> Result<(), BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|err| BenchError::Serve(format!("cannot bind: {err}")))?;
    let addr = listener
        .local_addr()
        .map_err(|err| BenchError::Serve(err.to_string()))?;
    let base = format!("http://{addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let settings = setup.settings.clone();
        let deployment = setup.deployment.clone();
        async move {
            tarspay_worker::server::serve(&settings, deployment, listener, async move {
                let _ = stopped.await;
            })
            .await
        }
    });
    let measured = measure_with(setup, console, total, &base, report).await;
    let _ = stop.send(());
    let _ = server.await;
    measured
}

async fn measure_with(
    setup: &Setup,
    console: &ConsoleOptions,
    total: u64,
    base: &str,
    report: Report<'_>,
) -> Result<(), BenchError> {
    let client = console_client()?;
    // The viewer may log in and look too (once; the pages are timed as the admin).
    let viewer = login(&client, base, &setup.viewer_token).await?;
    let (status, _) = get(&client, base, "/console/", &viewer).await?;
    if status != 200 {
        return Err(BenchError::Check(format!(
            "the viewer's overview answered {status}"
        )));
    }
    let cookie = login(&client, base, &setup.admin_token).await?;
    let mut failed = Vec::new();
    for page in pages(console.orders) {
        let mut status = 200;
        for _ in 0..WARM_UP {
            status = get(&client, base, &page.path, &cookie).await?.0;
        }
        let mut times = Vec::with_capacity(console.requests);
        let mut bytes = 0;
        let mut rows = 0;
        for _ in 0..console.requests {
            let started = Instant::now();
            let (answered, body) = get(&client, base, &page.path, &cookie).await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            if answered != 200 {
                status = answered;
            }
            bytes = body.len();
            rows = body.matches(page.row).count();
        }
        if status != 200 {
            failed.push(format!("{} ({}) answered {status}", page.name, page.path));
        }
        let (p50, p99, max) = latency_summary(&mut times);
        report(json!({
            "bench": "console",
            "mode": "page",
            "n": console.orders,
            "orders_total": total,
            "page": page.name,
            "path": page.path,
            "requests": console.requests,
            "status": status,
            "ok": status == 200,
            "ms": {"p50": round(p50, 2), "p99": round(p99, 2), "max": round(max, 2)},
            "bytes": bytes,
            "rows": rows,
        }));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BenchError::Check(failed.join("; ")))
    }
}

/// A client that does not follow redirects (the login's answer carries the cookie).
fn console_client() -> Result<reqwest::Client, BenchError> {
    http_client().map_err(BenchError::Serve)?;
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|err| BenchError::Serve(err.to_string()))
}

/// Logs in with `token`; the session cookie (`tarspay_console=…`) to send back.
async fn login(client: &reqwest::Client, base: &str, token: &str) -> Result<String, BenchError> {
    let response = client
        .post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", base)
        .body(format!("operator={OPERATOR}&token={token}"))
        .send()
        .await
        .map_err(|err| BenchError::Serve(format!("login: {err}")))?;
    let status = response.status();
    let cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| value.split(';').next())
        .find(|pair| pair.starts_with("tarspay_console=") && pair.len() > "tarspay_console=".len())
        .map(str::to_owned);
    match cookie {
        Some(cookie) if status.is_redirection() || status.is_success() => Ok(cookie),
        _ => {
            let body = response.text().await.unwrap_or_default();
            Err(BenchError::Check(format!(
                "login answered {status} without a session cookie: {}",
                body.chars().take(300).collect::<String>()
            )))
        }
    }
}

/// `GET base+path` with the session cookie: the status and the whole body.
async fn get(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    cookie: &str,
) -> Result<(u16, String), BenchError> {
    let response = client
        .get(format!("{base}{path}"))
        .header("cookie", cookie)
        .send()
        .await
        .map_err(|err| BenchError::Serve(format!("GET {path}: {err}")))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|err| BenchError::Serve(format!("GET {path}: {err}")))?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_follow_the_mix() {
        let n = 100_000;
        let count = |ending| (0..n).filter(|&i| Ending::of(i) == ending).count() as f64;
        let share = |ending| count(ending) / n as f64;
        assert!((share(Ending::Succeeded) - 0.97).abs() < 0.005);
        assert!((share(Ending::Failed) - 0.02).abs() < 0.003);
        assert!((share(Ending::Rejected) - 0.01).abs() < 0.003);
    }

    #[test]
    fn batches_hold_a_thousand_orders() {
        assert_eq!(batch_of(0), "payroll-00000");
        assert_eq!(batch_of(1_999), "payroll-00001");
        batch_id(&batch_of(999_999)).unwrap();
    }
}
