//! Call limits shared by every worker process: a merchant's calls stay within its rate and
//! in-flight limits across processes, a killed worker's slots come back, and a gateway's 429
//! slows the merchant down without failing a payout or spending an attempt.

mod common;

use common::app::{MCH_NO, inr, spawn_app_with};
use std::time::{Duration, Instant};
use tarspay_sandbox::RateLimit;
use tarspay_worker::ledger::Phase;
use tarspay_worker::ledger::history::EventKind;

const PAYOUTS: usize = 150;
const RATE: u32 = 50;
const BURST: u32 = 5;
/// The gateway's own limit: the same rate, with room for the network's jitter.
const GATEWAY_BURST: u32 = 10;

/// An app whose gateway answers the default merchant's calls beyond `per_second` (with
/// `burst`) with 429.
async fn app_behind_gateway_limit(
    per_second: f64,
    burst: u32,
    env: &[(&str, &str)],
) -> common::app::TestApp {
    spawn_app_with(
        false,
        |c| {
            c.rate_limits
                .insert(MCH_NO.into(), RateLimit { per_second, burst });
        },
        env,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_share_one_merchants_limit() {
    let app = app_behind_gateway_limit(
        f64::from(RATE),
        GATEWAY_BURST,
        &[
            ("TARSPAY_RATE_LIMIT", &RATE.to_string()),
            ("TARSPAY_RATE_BURST", &BURST.to_string()),
            ("TARSPAY_MAX_IN_FLIGHT", "8"),
            // A slot lapses after connect + request timeout + 5 s.
            ("TARSPAY_GATEWAY__CONNECT_TIMEOUT", "1s"),
        ],
    )
    .await;
    for n in 0..PAYOUTS {
        app.enqueue(inr(&format!("RL-{n}"), "150.50")).await;
    }
    let started = Instant::now();
    let mut workers: Vec<_> = (0..3).map(|_| app.worker_process(16)).collect();
    // One worker dies mid-run (SIGKILL), possibly holding slots.
    common::eventually("some payouts created", || async {
        (app.sandbox.calls(MCH_NO).unwrap().total >= 40).then_some(())
    })
    .await;
    workers[0].kill();
    let outcomes = app.wait_outcomes(PAYOUTS).await;
    let elapsed = started.elapsed();
    assert!(
        outcomes
            .values()
            .all(|o| o.status.phase() == Phase::Succeeded),
        "no payout fails for the limit"
    );
    let calls = app.sandbox.calls(MCH_NO).unwrap();
    eprintln!(
        "{} calls in {elapsed:?}: at most {} in any second, {} answered 429",
        calls.total, calls.max_in_any_second, calls.rate_limited
    );
    // The limiter decides on Redis' clock (at most RATE + BURST grants in any second); the
    // gateway sees arrival times, which add each call's own delay between its grant and its
    // arrival (scheduling, signing, a busy 2-core machine). The gateway allows one burst of
    // its own for that.
    assert!(
        calls.max_in_any_second <= u64::from(RATE + GATEWAY_BURST),
        "the gateway saw {} calls within a second (limit {RATE}, burst {BURST})",
        calls.max_in_any_second
    );
    // Every payout made at least a create and a status query: the limit sets the pace.
    assert!(calls.total >= 2 * PAYOUTS as u64, "{}", calls.total);
    let floor = Duration::from_secs_f64((calls.total - u64::from(BURST)) as f64 / f64::from(RATE));
    assert!(
        elapsed >= floor,
        "{} calls in {elapsed:?}: faster than {RATE}/s allows",
        calls.total
    );
    // The killed worker's in-flight slots lapse with their leases: none is left.
    let mut conn = app.redis.conn().await;
    common::poll(
        "in-flight slots to drain",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let mut conn = conn.clone();
            async move {
                let held: u64 = redis::cmd("ZCARD")
                    .arg("{apptest:ratelimit:default}:inflight")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (held == 0).then_some(()).ok_or(format!("{held} held"))
            }
        },
    )
    .await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("{apptest:ratelimit:default}:tat")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl != -1, "limiter state must expire when idle");
    for worker in &mut workers {
        worker.kill();
    }
}

/// No limit of our own, and a gateway that allows 20 calls per second: its 429s slow the
/// merchant down, every payout still succeeds, and no 429 counts as an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_429_slows_the_merchant_down_and_costs_no_attempt() {
    let app = app_behind_gateway_limit(
        20.0,
        5,
        // A limit far above the gateway's: only the 429s slow it down.
        &[
            ("TARSPAY_RATE_LIMIT", "10000"),
            ("TARSPAY_RATE_BURST", "100"),
        ],
    )
    .await;
    let n = 40;
    for k in 0..n {
        app.enqueue(inr(&format!("TOO-MANY-{k}"), "150.50")).await;
    }
    let pool = app.pool(32);
    let outcomes = app.wait_outcomes(n).await;
    pool.stop().await;
    let calls = app.sandbox.calls(MCH_NO).unwrap();
    assert!(calls.rate_limited > 0, "the test must meet 429s");
    for (id, outcome) in &outcomes {
        assert_eq!(outcome.status.phase(), Phase::Succeeded, "{id}");
        let record = app.deployment.order(id).await.unwrap().unwrap();
        assert_eq!(record.attempts, 1, "{id}: a 429 is not an attempt");
        let at_gateway = app.sandbox.order_of(MCH_NO, id).unwrap();
        assert_eq!(at_gateway.create_attempts, 1, "{id}");
        // Nor is it a create in the order's history: one create line, for the one create.
        let history = app.deployment.order_events(id).await.unwrap();
        let creates = history
            .iter()
            .filter(|e| e.kind == EventKind::Create)
            .count();
        assert_eq!(creates, 1, "{id}: {history:?}");
    }
}

const OTHER: &str = "M2000000002";

/// An app with a second merchant, `other` (M2000000002, PHP), beside the default one (INR).
async fn app_with_other_merchant(
    change: impl FnOnce(&mut tarspay_sandbox::SandboxConfig),
    env: &[(&str, &str)],
) -> common::app::TestApp {
    let other_key = tarspay_worker::gateway::PrivateKey::generate();
    let other_hex = other_key.expose_hex();
    let other_pub = other_key.public_key();
    let mut all_env = vec![
        ("TARSPAY_MERCHANTS__OTHER__MCH_NO", OTHER),
        ("TARSPAY_MERCHANTS__OTHER__PRIVATE_KEY", other_hex.as_str()),
        ("TARSPAY_MERCHANTS__OTHER__CURRENCIES", "PHP"),
        (
            "TARSPAY_MERCHANTS__OTHER__NOTIFY_URL",
            "http://127.0.0.1:9/notify",
        ),
    ];
    all_env.extend_from_slice(env);
    spawn_app_with(
        false,
        |c| {
            c.merchants.push(tarspay_sandbox::SandboxMerchant {
                mch_no: OTHER.into(),
                public_key: other_pub,
                balance: 1_000_000u64.into(),
            });
            change(c);
        },
        &all_env,
    )
    .await
}

fn php(id: &str) -> serde_json::Value {
    serde_json::json!({
        "mchOrderNo": id, "amount": "500", "currency": "PHP", "wayCode": "GCASH",
    })
}

/// A merchant held back by its limit takes nothing from another merchant's payouts: the
/// unlimited merchant's payouts all end while the limited one's backlog still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_merchant_does_not_hold_up_another() {
    let app = app_with_other_merchant(
        |_| {},
        &[
            // The default merchant (INR): 5 calls per second, so its 40 payouts (two calls
            // each) need at least 15 s.
            ("TARSPAY_RATE_LIMIT", "5"),
            ("TARSPAY_RATE_BURST", "1"),
        ],
    )
    .await;
    for k in 0..40 {
        app.enqueue(inr(&format!("SLOW-{k}"), "150.50")).await;
    }
    for k in 0..20 {
        app.enqueue(php(&format!("FAST-{k}"))).await;
    }
    // Fewer slots than the limited backlog: a limited job that held one would starve the rest.
    let pool = app.pool(8);
    common::eventually("the unlimited merchant's payouts", || async {
        let ended = app.outcomes().await;
        (ended.iter().filter(|o| o.merchant == "other").count() == 20).then_some(ended)
    })
    .await;
    let ended = app.outcomes().await;
    let slow = ended.iter().filter(|o| o.merchant == "default").count();
    assert!(
        slow < 40,
        "the limited merchant finished first ({slow} of 40)"
    );
    assert!(ended.iter().all(|o| o.status.phase() == Phase::Succeeded));
    pool.stop().await;
}

/// At a slow gateway a worker's call slot goes to the merchants waiting in turn: another
/// merchant's payout does not wait behind the payroll's jobs that were waiting first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_slot_goes_to_the_next_merchant_in_turn_at_a_slow_gateway() {
    // The payroll's creates take 1 s each; the pool has one call slot and holds 3 jobs.
    let app = app_with_other_merchant(
        |c| {
            c.faults = vec![common::fault_rule(
                "PAY-",
                tarspay_sandbox::Endpoint::CreatePayout,
                None,
                tarspay_sandbox::FaultAction::Latency { ms: 1_000 },
            )]
        },
        // One partition: two lanes, taken in turn, so the other merchant's job is the next
        // one the pool takes in hand.
        &[("TARSPAY_PARTITIONS", "1")],
    )
    .await;
    for k in 0..6 {
        app.enqueue(inr(&format!("PAY-{k}"), "100")).await;
    }
    let pool = app.pool(1);
    // The first payroll create is in flight, two more payroll jobs wait for the slot.
    common::eventually("the payroll's first create", || async {
        let sent: u32 = (0..6)
            .map(|k| app.sandbox.create_attempts(&format!("PAY-{k}")))
            .sum();
        (sent > 0).then_some(())
    })
    .await;
    // Well inside the first create's second, so the pool has taken its other two jobs in
    // hand (the check holds either way; it only tells turns from arrival order once it has).
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.enqueue(php("URGENT-1")).await;
    common::eventually("the other merchant's payout created", || async {
        app.sandbox.order("URGENT-1")
    })
    .await;
    pool.stop().await;
    // Served in arrival order it would come after the two payroll jobs that were already
    // waiting when it arrived, behind three payroll orders; in turn, after at most two.
    let urgent = app.sandbox.order("URGENT-1").expect("created");
    let payroll_before = app
        .sandbox
        .orders()
        .iter()
        .filter(|o| o.mch_order_no.starts_with("PAY-") && o.created_at_us < urgent.created_at_us)
        .count();
    assert!(
        payroll_before <= 2,
        "{payroll_before} payroll orders were created before the other merchant's payout"
    );
}

/// A run that waits in hand for its merchant's limit lets the process's call slot go
/// meanwhile, so a merchant at its limit does not hold calls other merchants could make: the
/// worker's `/metrics`, sampled while the limited merchant's jobs are in hand, mostly shows
/// its one call slot free. (Held through the wait, it showed it in use in nearly every
/// sample: a call takes milliseconds, a wait up to 200.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_its_merchants_limit_lets_the_call_slot_go() {
    let app = spawn_app_with(
        false,
        |_| {},
        // 5 calls per second: a run waits up to 200 ms in hand for its turn.
        &[("TARSPAY_RATE_LIMIT", "5"), ("TARSPAY_RATE_BURST", "1")],
    )
    .await;
    let ids: Vec<String> = (0..12).map(|k| format!("LIMITED-{k}")).collect();
    for id in &ids {
        app.enqueue(inr(id, "100")).await;
    }
    // One call slot (and three jobs in hand).
    let (worker, addr) = app.worker_process_with_metrics(1);
    common::worker_metrics(&addr, "the worker's metrics", |text| {
        common::gauge(text, "tarspay_jobs_in_flight").is_some_and(|n| n >= 1.0)
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (mut in_hand, mut slot_free) = (0, 0);
    // Sampled until every payout ended (about 5 s at the limit).
    for _ in 0..500 {
        if app.outcomes().await.len() >= ids.len() {
            break;
        }
        let text = common::scrape_metrics(&http, &addr).await;
        let jobs = common::gauge(&text, "tarspay_jobs_in_flight").unwrap_or(0.0);
        let slots = common::gauge(&text, "tarspay_call_slots_in_use");
        if jobs >= 1.0 {
            in_hand += 1;
            if slots == Some(0.0) {
                slot_free += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes = app.wait_outcomes(ids.len()).await;
    drop(worker);
    assert!(in_hand >= 10, "jobs were in hand in only {in_hand} samples");
    assert!(
        slot_free * 2 >= in_hand,
        "the call slot was in use in {} of {in_hand} samples with jobs in hand",
        in_hand - slot_free
    );
    assert!(
        outcomes.values().all(|o| o.status == "succeeded"),
        "{outcomes:?}"
    );
}
