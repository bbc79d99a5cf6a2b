//! The fault-injection soak: payouts through 3 worker processes (one with its wall clock ten
//! minutes fast, through libfaketime) while, at seeded random moments, workers are SIGKILLed and
//! restarted, stopped gracefully (SIGTERM, as a deploy does) and restarted, frozen (SIGSTOP) past
//! the orphan timeout and resumed, and Redis (AOF on) is SIGKILLed and restarted, or frozen
//! (SIGSTOP: every call waits, some past the clients' 5 s response timeout, and the commands sent
//! meanwhile run when it resumes); the sandbox injects `-1`, `500323`, commit-then-drop, 502s (with
//! and without commit), timeouts after commit, slow answers, failing queries, lookups that lag the
//! create and repeated creates refused for balance before the duplicate check on a share of the
//! orders; and the callbacks it sends reach the receiver (`tarspay_worker::server`) through a relay
//! that also replays them duplicated, shuffled and preceded by stale "processing" callbacks.
//! `tarspay-worker audit` must pass after every round.
//!
//! At the end it asserts the one rule: the sandbox holds at most one order per payout and none
//! under any other number, each accepted create made exactly one order, every payout has exactly
//! one outcome that matches the sandbox's final state (and the merchant's balance matches the
//! succeeded payouts), and nothing is left in flight.
//!
//! Default tier (plain `cargo test`): 1,200 payouts, 3 worker kills, 1 graceful restart, 1 freeze,
//! 1 Redis restart and 1 Redis freeze. Long tier (`TARSPAY_TEST_TIER=long`, `.ci/long`): rounds of
//! 5,000 for 10 minutes. `SOAK_PAYOUTS=5000` sets the payouts per round, `SOAK_SECONDS=600` keeps
//! running rounds (each with its own faults) until that much time has passed, `SOAK_KILLS`,
//! `SOAK_RESTARTS`, `SOAK_FREEZES`, `SOAK_REDIS_RESTARTS` and `SOAK_REDIS_FREEZES` set the faults
//! per round, `SOAK_SEED` replays a run (the seed is printed first). All timing checks are hang
//! guards, never speed assertions.

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::app::{MCH_NO, TestApp, WorkerProcess, inr, spawn_app_with};
use common::faketime::libfaketime;
use common::outcome_rule;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarspay_sandbox::rules::SANDBOX_SYSTEM_PRIVATE_KEY;
use tarspay_sandbox::{Endpoint, FaultAction, FaultRule, OutcomeRule};
use tarspay_worker::gateway::callback::{HEADER_SIGNATURE, sign_callback, sorted_compact_json};
use tarspay_worker::gateway::{OrderState, PrivateKey};
use tarspay_worker::ledger::Outcome;

const WORKERS: usize = 3;
const WORKER_CONCURRENCY: usize = 16;
const AMOUNT: &str = "100";
const START_BALANCE: u64 = 1_000_000_000;

/// A share of the orders (by weight) gets each treatment, chosen by mchOrderNo prefix.
/// `refusals`: creates the sandbox refuses without creating anything (so `create_attempts`
/// is exactly this plus one); every other category must see exactly one create.
struct Category {
    prefix: &'static str,
    weight: u32,
    refusals: u32,
    /// Repeated creates of an order the gateway already holds are refused (5003011, or a
    /// balance refusal before the duplicate check), so any number of creates may arrive.
    repeats: bool,
}

const CATEGORIES: &[Category] = &[
    // No fault of their own (they still live through the kills and restarts).
    Category {
        prefix: "OK",
        weight: 55,
        refusals: 0,
        repeats: false,
    },
    // -1 twice, then accepted.
    Category {
        prefix: "SYS",
        weight: 5,
        refusals: 2,
        repeats: false,
    },
    // 500323 (gateway busy) once.
    Category {
        prefix: "RCE",
        weight: 5,
        refusals: 1,
        repeats: false,
    },
    // The gateway commits, then closes the connection without answering.
    Category {
        prefix: "CTD",
        weight: 5,
        refusals: 0,
        repeats: false,
    },
    // A 502 page, nothing created.
    Category {
        prefix: "B502",
        weight: 4,
        refusals: 1,
        repeats: false,
    },
    // A 502 page after the order was created.
    Category {
        prefix: "C502",
        weight: 4,
        refusals: 0,
        repeats: false,
    },
    // Commits, then answers after the client's 1 s timeout.
    Category {
        prefix: "SLOW",
        weight: 3,
        refusals: 0,
        repeats: false,
    },
    // Every call to the gateway answered 150 ms late.
    Category {
        prefix: "LAT",
        weight: 5,
        refusals: 0,
        repeats: false,
    },
    // The first two status queries get a 502.
    Category {
        prefix: "QX",
        weight: 4,
        refusals: 0,
        repeats: false,
    },
    // Commit-then-drop, then lookups answer "no such order" for 1.5 s: the create is sent
    // again and refused as a duplicate.
    Category {
        prefix: "LAG",
        weight: 4,
        refusals: 0,
        repeats: true,
    },
    // The same, at a gateway that refuses the repeated create for balance (5004006) before
    // it checks for duplicates.
    Category {
        prefix: "BAL",
        weight: 4,
        refusals: 0,
        repeats: true,
    },
    // Final states other than success.
    Category {
        prefix: "REJ",
        weight: 5,
        refusals: 0,
        repeats: false,
    },
    Category {
        prefix: "FAIL",
        weight: 5,
        refusals: 0,
        repeats: false,
    },
];

fn category_of(id: &str) -> &'static Category {
    let prefix = id.split('-').next().unwrap_or_default();
    CATEGORIES
        .iter()
        .find(|c| c.prefix == prefix)
        .expect("every soak id starts with a category prefix")
}

fn fault(prefix: &str, endpoint: Endpoint, times: Option<u32>, action: FaultAction) -> FaultRule {
    common::fault_rule(&format!("{prefix}-"), endpoint, times, action)
}

fn fault_rules() -> Vec<FaultRule> {
    use Endpoint::{Any, CreatePayout, QueryPayout};
    vec![
        fault(
            "SYS",
            CreatePayout,
            Some(2),
            FaultAction::Code {
                code: -1,
                msg: Some("system busy".into()),
            },
        ),
        fault(
            "RCE",
            CreatePayout,
            Some(1),
            FaultAction::Code {
                code: 500323,
                msg: None,
            },
        ),
        fault("CTD", CreatePayout, Some(1), FaultAction::CommitThenDrop),
        fault(
            "B502",
            CreatePayout,
            Some(1),
            FaultAction::Http {
                status: 502,
                commit: false,
                body: None,
            },
        ),
        fault(
            "C502",
            CreatePayout,
            Some(1),
            FaultAction::Http {
                status: 502,
                commit: true,
                body: None,
            },
        ),
        fault(
            "SLOW",
            CreatePayout,
            Some(1),
            FaultAction::Slow { ms: 1_500 },
        ),
        fault("LAT", Any, None, FaultAction::Latency { ms: 150 }),
        fault("LAG", CreatePayout, Some(1), FaultAction::CommitThenDrop),
        fault(
            "LAG",
            QueryPayout,
            None,
            FaultAction::LookupLag { ms: 1_500 },
        ),
        fault("BAL", CreatePayout, Some(1), FaultAction::CommitThenDrop),
        fault(
            "BAL",
            QueryPayout,
            None,
            FaultAction::LookupLag { ms: 1_500 },
        ),
        fault(
            "BAL",
            CreatePayout,
            None,
            FaultAction::RefuseRepeat {
                code: 5004006,
                msg: Some("merchant balance insufficient".into()),
            },
        ),
        fault(
            "QX",
            QueryPayout,
            Some(2),
            FaultAction::Http {
                status: 502,
                commit: false,
                body: None,
            },
        ),
    ]
}

fn outcome_rules() -> Vec<OutcomeRule> {
    vec![outcome_rule("REJ-", 8), outcome_rule("FAIL-", 3)]
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

struct SoakPlan {
    seed: u64,
    payouts_per_round: usize,
    /// Keep running rounds until this much time has passed (one round when absent).
    seconds: Option<u64>,
    kills_per_round: usize,
    graceful_restarts_per_round: usize,
    freezes_per_round: usize,
    redis_restarts_per_round: usize,
    redis_freezes_per_round: usize,
}

impl SoakPlan {
    fn from_env() -> Self {
        let seed = env_u64("SOAK_SEED")
            .unwrap_or_else(|| tarspay_worker::wall_clock::since_epoch().as_nanos() as u64);
        Self {
            seed,
            payouts_per_round: common::tiered("SOAK_PAYOUTS", 1_200, 5_000) as usize,
            seconds: Some(common::tiered("SOAK_SECONDS", 0, 600)).filter(|s| *s > 0),
            kills_per_round: env_u64("SOAK_KILLS").unwrap_or(3) as usize,
            graceful_restarts_per_round: env_u64("SOAK_RESTARTS").unwrap_or(1) as usize,
            freezes_per_round: env_u64("SOAK_FREEZES").unwrap_or(1) as usize,
            redis_restarts_per_round: env_u64("SOAK_REDIS_RESTARTS").unwrap_or(1) as usize,
            redis_freezes_per_round: env_u64("SOAK_REDIS_FREEZES").unwrap_or(1) as usize,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Chaos {
    /// SIGKILL worker `index`, start a new one after `down`.
    KillWorker { index: usize, down: Duration },
    /// SIGTERM worker `index` (a deploy: it stops fetching, hands its jobs, promoter lease
    /// and due times over, and exits 0 after at most its grace), start a new one after
    /// `down`.
    RestartWorker { index: usize, down: Duration },
    /// SIGSTOP worker `index` (longer than the orphan timeout, sometimes than the submit
    /// lease too), then SIGCONT: it wakes up and carries on with its stale runs.
    FreezeWorker { index: usize, frozen: Duration },
    /// SIGKILL Redis (every acknowledged write is in the AOF), start it again after `down`.
    RestartRedis { down: Duration },
    /// SIGSTOP Redis (a stalled server, as in a long fork or fsync), SIGCONT after `frozen`.
    FreezeRedis { frozen: Duration },
}

/// Chaos events of one round, each at a seeded fraction of the round's orders created.
fn plan_round(rng: &mut StdRng, plan: &SoakPlan) -> Vec<(f64, Chaos)> {
    let mut events: Vec<(f64, Chaos)> = Vec::new();
    let mut schedule =
        |count: usize, during: std::ops::Range<f64>, make: fn(&mut StdRng) -> Chaos| {
            for _ in 0..count {
                let at = rng.random_range(during.clone());
                events.push((at, make(rng)));
            }
        };
    schedule(plan.kills_per_round, 0.05..0.85, |rng| Chaos::KillWorker {
        index: rng.random_range(0..WORKERS),
        down: Duration::from_millis(rng.random_range(100..1_500)),
    });
    schedule(plan.graceful_restarts_per_round, 0.05..0.85, |rng| {
        Chaos::RestartWorker {
            index: rng.random_range(0..WORKERS),
            down: Duration::from_millis(rng.random_range(100..1_500)),
        }
    });
    schedule(plan.freezes_per_round, 0.05..0.8, |rng| {
        Chaos::FreezeWorker {
            index: rng.random_range(0..WORKERS),
            // Orphan timeout 3 s; submit lease 13 s.
            frozen: Duration::from_millis(rng.random_range(3_500..15_000)),
        }
    });
    schedule(plan.redis_restarts_per_round, 0.1..0.8, |rng| {
        Chaos::RestartRedis {
            down: Duration::from_millis(rng.random_range(300..2_000)),
        }
    });
    schedule(plan.redis_freezes_per_round, 0.1..0.8, |rng| {
        Chaos::FreezeRedis {
            // Around the clients' 5 s response timeout, on both sides of it.
            frozen: Duration::from_millis(rng.random_range(1_000..8_000)),
        }
    });
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    events
}

/// One recorded callback as the sandbox sent it.
#[derive(Clone)]
struct SeenCallback {
    signature: String,
    body: Bytes,
}

/// Sits between the sandbox and the callback receiver: forwards every callback (and the
/// receiver's answer), keeps a copy, and can replay copies later.
struct Relay {
    receiver: String,
    http: reqwest::Client,
    seen: Mutex<Vec<SeenCallback>>,
    forwarded: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
}

async fn relay_callback(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let signature = headers
        .get(HEADER_SIGNATURE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    relay.seen.lock().unwrap().push(SeenCallback {
        signature: signature.clone(),
        body: body.clone(),
    });
    relay.forwarded.fetch_add(1, Ordering::Relaxed);
    match relay.post(&signature, body).await {
        Some((status, text)) => (status, text),
        None => (StatusCode::BAD_GATEWAY, "receiver unreachable".into()),
    }
}

impl Relay {
    async fn post(&self, signature: &str, body: Bytes) -> Option<(StatusCode, String)> {
        let response = self
            .http
            .post(&self.receiver)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json;charset=utf-8",
            )
            .header(HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await
            .ok()?;
        let status = StatusCode::from_u16(response.status().as_u16()).ok()?;
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// Replays `count` recorded callbacks picked at random (so out of order), each either as
    /// an exact duplicate or as a correctly signed but stale "processing" callback for the
    /// same order, arriving after its final one.
    async fn replay(&self, rng: &mut StdRng, count: usize, system_key: &PrivateKey) {
        let picked: Vec<SeenCallback> = {
            let seen = self.seen.lock().unwrap();
            if seen.is_empty() {
                return;
            }
            (0..count)
                .map(|_| seen[rng.random_range(0..seen.len())].clone())
                .collect()
        };
        for callback in picked {
            if rng.random_bool(0.6) {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                let _ = self.post(&callback.signature, callback.body).await;
            } else if let Some((signature, body)) = stale_version(&callback.body, system_key) {
                self.stale.fetch_add(1, Ordering::Relaxed);
                let _ = self.post(&signature, body).await;
            }
        }
    }
}

/// The same callback with state 1 (processing), re-signed with the sandbox's system key.
fn stale_version(body: &[u8], system_key: &PrivateKey) -> Option<(String, Bytes)> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let map = value.as_object_mut()?;
    map.insert("state".into(), serde_json::json!(1));
    map.remove("failReason");
    map.insert("payAmount".into(), serde_json::json!("0"));
    let text = sorted_compact_json(&value);
    let signature = sign_callback(system_key, text.as_bytes());
    Some((signature, Bytes::from(text)))
}

struct Soak {
    app: TestApp,
    relay: Arc<Relay>,
    workers: Vec<WorkerProcess>,
    /// Where each worker serves its `/metrics`: it answers once the process listens for
    /// stop signals.
    metrics: Vec<String>,
    /// libfaketime's variables for worker 0 (its wall clock ten minutes fast), if available.
    skewed: Vec<(String, String)>,
    events_done: Vec<String>,
}

impl Soak {
    async fn outcome_count(&self) -> Option<u64> {
        self.app.deployment.outcome_count().await.ok()
    }

    /// Starts worker `index` (in its place, if it had one).
    fn start_worker(&mut self, index: usize) {
        let metrics = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let worker = self.spawn_worker(index, &metrics);
        if index < self.workers.len() {
            self.workers[index] = worker;
            self.metrics[index] = metrics;
        } else {
            self.workers.push(worker);
            self.metrics.push(metrics);
        }
    }

    /// Waits until worker `index` serves `/metrics` (hang guard 60 s).
    async fn wait_started(&self, index: usize) {
        let url = format!("http://{}/metrics", self.metrics[index]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                Instant::now() < deadline,
                "hang guard: worker {index} never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn_worker(&self, index: usize, metrics: &str) -> WorkerProcess {
        let mut env: Vec<(&str, &str)> = if index == 0 {
            self.skewed
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        } else {
            Vec::new()
        };
        env.push(("TARSPAY_WORKER_METRICS_LISTEN", metrics));
        self.app.worker_process_with(WORKER_CONCURRENCY, &env)
    }

    async fn run_chaos(&mut self, event: Chaos) {
        match event {
            Chaos::KillWorker { index, down } => {
                self.workers[index].kill();
                tokio::time::sleep(down).await;
                self.start_worker(index);
            }
            Chaos::RestartWorker { index, down } => {
                // A process signalled before it listens for signals (a few milliseconds
                // after its start) ends by the signal's default action: only one that has
                // started must stop gracefully.
                self.wait_started(index).await;
                // Grace 2 s (TestApp): the wait is only a hang guard.
                let limit = Duration::from_secs(60);
                let code =
                    tokio::task::block_in_place(|| self.workers[index].terminate_within(limit));
                assert_eq!(code, Some(0), "worker {index} after SIGTERM");
                tokio::time::sleep(down).await;
                self.start_worker(index);
            }
            Chaos::FreezeWorker { index, frozen } => {
                self.workers[index].signal("STOP");
                tokio::time::sleep(frozen).await;
                self.workers[index].signal("CONT");
            }
            Chaos::FreezeRedis { frozen } => {
                let pid = self.app.redis.server().pid();
                // 0 would be the whole process group, this test included.
                assert_ne!(pid, 0, "redis-server is not running");
                let pid = pid.to_string();
                let signal = |name: &str| {
                    let sent = std::process::Command::new("kill")
                        .args([&format!("-{name}"), &pid])
                        .status()
                        .expect("run kill");
                    assert!(sent.success(), "kill -{name} redis-server");
                };
                signal("STOP");
                tokio::time::sleep(frozen).await;
                signal("CONT");
            }
            Chaos::RestartRedis { down } => {
                // A crash, not a clean shutdown: AOF with fsync on every write must suffice.
                self.app.redis.crash();
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| self.app.redis.restart());
            }
        }
        self.events_done.push(format!("{event:?}"));
    }

    /// Enqueues one round of payouts and drives its chaos until every payout has an outcome.
    async fn round(
        &mut self,
        round: usize,
        plan: &SoakPlan,
        rng: &mut StdRng,
        ids: &mut Vec<String>,
    ) {
        let total_weight: u32 = CATEGORIES.iter().map(|c| c.weight).sum();
        let mut round_ids = Vec::with_capacity(plan.payouts_per_round);
        for i in 0..plan.payouts_per_round {
            let mut pick = rng.random_range(0..total_weight);
            let category = CATEGORIES
                .iter()
                .find(|c| {
                    if pick < c.weight {
                        true
                    } else {
                        pick -= c.weight;
                        false
                    }
                })
                .expect("weights cover the range");
            round_ids.push(format!("{}-{round}-{i}", category.prefix));
        }
        let events = plan_round(rng, plan);
        println!(
            "round {round}: {} payouts, chaos {events:?}",
            round_ids.len()
        );
        let before_orders = self.app.sandbox.orders().len();
        let expected_outcomes = (ids.len() + round_ids.len()) as u64;
        for id in &round_ids {
            self.app.enqueue(inr(id, AMOUNT)).await;
        }
        ids.extend(round_ids.iter().cloned());
        let mut pending = events.into_iter().peekable();
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut last_report = Instant::now();
        loop {
            let created = self.app.sandbox.orders().len() - before_orders;
            let progress = created as f64 / round_ids.len() as f64;
            while let Some((_, event)) = pending.next_if(|(at, _)| *at <= progress) {
                self.run_chaos(event).await;
            }
            if pending.peek().is_none()
                && self.outcome_count().await.unwrap_or(0) >= expected_outcomes
            {
                // The invariants hold between rounds, with workers still running.
                let (code, report) = tokio::task::block_in_place(|| self.app.audit());
                assert_eq!(
                    code, 0,
                    "audit after round {round} (seed {}): {report}",
                    plan.seed
                );
                println!(
                    "round {round}: audit clean: {}, {} first polls held in hand so far",
                    report["phases"], report["polledInHand"]
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hang guard: round {round} not finished (seed {}): {created} orders created, {:?} outcomes of {expected_outcomes}, chaos left {:?}",
                plan.seed,
                self.outcome_count().await,
                pending.collect::<Vec<_>>()
            );
            if last_report.elapsed() > Duration::from_secs(10) {
                last_report = Instant::now();
                println!(
                    "round {round}: {created} orders created, {:?} of {expected_outcomes} outcomes, {:?}",
                    self.outcome_count().await,
                    self.app.deployment.queue_stats().await.ok()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The gateway state an outcome status reports.
fn status_for(state: i64) -> &'static str {
    match OrderState::from(state) {
        OrderState::Success => "succeeded",
        OrderState::Failure => "failed",
        OrderState::Rejected => "rejected",
        _ => "not final",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_faults_keeps_the_one_rule() {
    let plan = SoakPlan::from_env();
    println!(
        "soak seed {} (replay with SOAK_SEED={}), {} payouts per round, {:?} s",
        plan.seed, plan.seed, plan.payouts_per_round, plan.seconds
    );
    let mut rng = StdRng::seed_from_u64(plan.seed);
    tarspay_worker::gateway::install_crypto_provider();
    let system_key =
        PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY).expect("the sandbox's published key");

    // The relay listens first: its URL is the notifyUrl every create carries.
    let relay_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let relay_url = format!(
        "http://{}/notify",
        relay_listener.local_addr().expect("relay addr")
    );
    let system_public = system_key.public_key().to_hex();
    let app = spawn_app_with(
        true,
        |config| {
            config.final_after = Duration::from_millis(300);
            config.faults = fault_rules();
            config.outcomes = outcome_rules();
            config.callbacks = true;
            config.callback_retry_delay = Duration::from_millis(200);
            config.callback_timeout = Duration::from_secs(5);
        },
        &[
            ("TARSPAY_NOTIFY_URL", relay_url.as_str()),
            ("TARSPAY_SYSTEM_PUBLIC_KEY", system_public.as_str()),
            ("TARSPAY_API_AUTH_DISABLED", "true"),
            ("TARSPAY_RETRY_MAX_ATTEMPTS", "8"),
            // Longer than the sandbox's lookup lag (1.5 s) by a margin.
            ("TARSPAY_SETTLE_WINDOW", "10s"),
        ],
    )
    .await;

    // The real callback receiver, in this process.
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let receiver_url = format!(
        "http://{}{}",
        receiver_listener.local_addr().expect("receiver addr"),
        app.settings.server.callback_path
    );
    let (stop_receiver, receiver_stopped) = tokio::sync::oneshot::channel::<()>();
    let receiver = {
        let settings = app.settings.clone();
        let deployment = app.deployment.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = receiver_stopped.await;
            };
            tarspay_worker::server::serve(&settings, deployment, receiver_listener, shutdown)
                .await
                .expect("callback receiver");
        })
    };
    let relay = Arc::new(Relay {
        receiver: receiver_url,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client"),
        seen: Mutex::new(Vec::new()),
        forwarded: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        stale: AtomicU64::new(0),
    });
    tokio::spawn({
        let router = Router::new()
            .route("/notify", post(relay_callback))
            .with_state(relay.clone());
        async move {
            let _ = axum::serve(relay_listener, router).await;
        }
    });
    // Replays while payouts are in flight, at seeded moments.
    let replaying = Arc::new(AtomicBool::new(true));
    let replayer = {
        let (relay, replaying, key) = (relay.clone(), replaying.clone(), system_key.clone());
        let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x5eed_ca11_bacc);
        tokio::spawn(async move {
            while replaying.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
                let count = rng.random_range(1..6);
                relay.replay(&mut rng, count, &key).await;
            }
            rng
        })
    };

    // Worker 0's wall clock runs ten minutes fast: due times are on Redis' clock.
    let skewed = match libfaketime() {
        Some(lib) => vec![
            ("LD_PRELOAD".to_owned(), lib.display().to_string()),
            ("FAKETIME".to_owned(), "+10m".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ],
        None => {
            println!("faketime is not installed: no skewed worker in this run");
            Vec::new()
        }
    };
    let mut soak = Soak {
        app,
        relay,
        workers: Vec::new(),
        metrics: Vec::new(),
        skewed,
        events_done: Vec::new(),
    };
    for index in 0..WORKERS {
        soak.start_worker(index);
    }
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut round = 0;
    loop {
        soak.round(round, &plan, &mut rng, &mut ids).await;
        round += 1;
        match plan.seconds {
            Some(seconds) if started.elapsed() < Duration::from_secs(seconds) => continue,
            _ => break,
        }
    }

    // Every payout has its outcome. Replay every callback once more, shuffled, as duplicates
    // and stale ones: nothing may change after this.
    replaying.store(false, Ordering::Relaxed);
    let mut replay_rng = replayer.await.expect("replayer");
    let all_seen = soak.relay.seen.lock().unwrap().len();
    soak.relay
        .replay(&mut replay_rng, all_seen.max(1), &system_key)
        .await;
    let app = &soak.app;

    // Nothing left in flight: the queue drains (hang guard only).
    let what = format!("the queue to drain (seed {})", plan.seed);
    let every = Duration::from_millis(50);
    let stats = common::poll(&what, Duration::from_secs(120), every, || async {
        let stats = app.deployment.queue_stats().await.expect("queue stats");
        let drained = stats.depth() == 0 && stats.delayed == 0;
        if drained {
            Ok(stats)
        } else {
            Err(format!("{stats:?}"))
        }
    })
    .await;
    assert_eq!(stats.dead, 0, "no job was given up (seed {})", plan.seed);
    assert!(!stats.paused, "the guard never paused the queue");

    // Exactly one outcome per payout, and none for anything else.
    let outcomes: Vec<Outcome> = app.outcomes().await;
    let ours: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut by_id: HashMap<&str, &Outcome> = HashMap::new();
    for outcome in &outcomes {
        assert!(
            ours.contains(outcome.mch_order_no.as_str()),
            "outcome for an unknown payout {} (seed {})",
            outcome.mch_order_no,
            plan.seed
        );
        assert!(
            by_id
                .insert(outcome.mch_order_no.as_str(), outcome)
                .is_none(),
            "two outcomes for {} (seed {})",
            outcome.mch_order_no,
            plan.seed
        );
    }
    assert_eq!(
        by_id.len(),
        ids.len(),
        "every payout has an outcome (seed {})",
        plan.seed
    );

    // The sandbox holds orders only under our numbers, at most one each (its book is keyed by
    // mchOrderNo), all final, and each payout's outcome is what the sandbox says.
    let orders = app.sandbox.orders();
    let mut pay_order_ids = HashSet::new();
    for order in &orders {
        assert!(
            ours.contains(order.mch_order_no.as_str()),
            "an order under a number no payout has: {} (seed {})",
            order.mch_order_no,
            plan.seed
        );
        assert!(
            pay_order_ids.insert(order.pay_order_id.clone()),
            "payOrderId {} twice",
            order.pay_order_id
        );
        assert_eq!(
            order.state, order.final_state,
            "{} is final",
            order.mch_order_no
        );
    }
    let mut succeeded = 0u64;
    let mut with_order = 0usize;
    for id in &ids {
        let outcome = by_id[id.as_str()];
        let category = category_of(id);
        let attempts = app.sandbox.create_attempts(id);
        match app.sandbox.order(id) {
            Some(order) => {
                with_order += 1;
                assert_eq!(
                    outcome.status,
                    status_for(order.state),
                    "{id}: outcome vs sandbox state {} (seed {})",
                    order.state,
                    plan.seed
                );
                assert_eq!(outcome.gateway_state, Some(order.state), "{id}");
                assert_eq!(
                    outcome.pay_order_id.as_deref(),
                    Some(order.pay_order_id.as_str()),
                    "{id}"
                );
                assert_eq!(outcome.amount, AMOUNT, "{id}");
                // Every create the sandbox accepted made this one order; any other create was
                // refused without creating anything.
                if category.repeats {
                    assert!(attempts >= 1, "{id}");
                } else {
                    assert_eq!(
                        attempts,
                        category.refusals + 1,
                        "{id}: creates seen by the sandbox (seed {})",
                        plan.seed
                    );
                }
                if outcome.status == "succeeded" {
                    succeeded += 1;
                }
            }
            None => {
                // Never created: only a failure the worker decided after the gateway refused.
                assert_eq!(
                    outcome.status, "failed",
                    "{id} has no order but {outcome:?} (seed {})",
                    plan.seed
                );
                assert_eq!(outcome.gateway_state, None, "{id}");
                assert!(attempts <= category.refusals, "{id}: {attempts} creates");
            }
        }
        let expected = match category.prefix {
            "REJ" => "rejected",
            "FAIL" => "failed",
            _ => "succeeded",
        };
        assert_eq!(
            outcome.status, expected,
            "{id}: {outcome:?} (seed {})",
            plan.seed
        );
    }
    assert_eq!(orders.len(), with_order, "no order outside our payouts");
    // Money: only succeeded payouts left the merchant's balance.
    let balance = app.sandbox.balance(MCH_NO).expect("merchant balance");
    assert_eq!(
        balance.parse::<rust_decimal::Decimal>().expect("decimal"),
        rust_decimal::Decimal::from(START_BALANCE - succeeded * 100),
        "balance after {succeeded} succeeded payouts (seed {})",
        plan.seed
    );

    // Every ledger record is final.
    for id in &ids {
        let record = app
            .deployment
            .order(id)
            .await
            .expect("ledger")
            .expect("record");
        assert!(
            record.phase.is_final(),
            "{id} is {} (seed {})",
            record.phase,
            plan.seed
        );
    }

    // And the auditor agrees, after the last replays.
    let (code, report) = tokio::task::block_in_place(|| app.audit());
    assert_eq!(code, 0, "final audit (seed {}): {report}", plan.seed);

    // The chaos happened, and callbacks were exercised.
    let planned = round
        * (plan.kills_per_round
            + plan.graceful_restarts_per_round
            + plan.freezes_per_round
            + plan.redis_restarts_per_round
            + plan.redis_freezes_per_round);
    assert_eq!(soak.events_done.len(), planned, "{:?}", soak.events_done);
    let (forwarded, duplicates, stale) = (
        soak.relay.forwarded.load(Ordering::Relaxed),
        soak.relay.duplicates.load(Ordering::Relaxed),
        soak.relay.stale.load(Ordering::Relaxed),
    );
    assert!(forwarded > 0 && duplicates > 0 && stale > 0);
    println!(
        "soak seed {}: {} payouts in {round} round(s), {:?}; callbacks forwarded {forwarded}, duplicated {duplicates}, stale {stale}; {} orders, {succeeded} succeeded; chaos {:?}",
        plan.seed,
        ids.len(),
        started.elapsed(),
        orders.len(),
        soak.events_done
    );
    let _ = stop_receiver.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), receiver).await;
}
