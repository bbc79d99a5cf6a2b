//! Outcome webhooks against a real redis-server and a real HTTP receiver on loopback. Deliveries
//! are jobs of the `webhooks` queue, queued with each outcome and run by worker pools: every
//! outcome arrives in Standard Webhooks' envelope, failures are retried with the same
//! `webhook-id` until a 2xx or the retry bound (then dead, and retried from the CLI), signatures
//! verify with an independent HMAC implementation, and a worker that is stopped or killed
//! mid-way leaves nothing behind for the next one.

mod common;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::app::{TestApp, inr, spawn_app, spawn_app_with};
use common::eventually;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarspay_worker::ids::{BatchId, Currency, MchOrderNo};
use tarspay_worker::ledger::{FinalResult, NewOrder, OrderKind, Outcome, Phase};
use tarspay_worker::secret::Secret;
use tarspay_worker::wall_clock;
use tarspay_worker::webhooks::WebhookSigner;
use tokio::task::JoinHandle;

/// `whsec_` + base64 of 24 random-looking bytes, as Standard Webhooks tools issue them.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Any string without the prefix is used as its UTF-8 bytes (non-ASCII on purpose).
const PLAIN: &str = "plain secret: not base64, naïve ✓";

// ---------------------------------------------------------------------------------------------
// The receiver: answers 500 as told, records every request.

#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
    mch_order_no: String,
    status: u16,
}

#[derive(Default)]
struct ReceiverState {
    requests: Mutex<Vec<Received>>,
    /// The next this many requests get 500, whatever they carry.
    fail_first: AtomicUsize,
    /// Each webhook-id's first this many requests get 500.
    fail_per_id: usize,
    /// Outcomes whose mchOrderNo starts with this get 503 ("" = all of them).
    fail_prefix: Mutex<Option<String>>,
}

struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    server: JoinHandle<()>,
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("webhook-id");
    let mch_order_no = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["mchOrderNo"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut requests = state.requests.lock().unwrap();
    let earlier = requests.iter().filter(|r| r.id == id).count();
    let held = state
        .fail_prefix
        .lock()
        .unwrap()
        .as_deref()
        .is_some_and(|prefix| mch_order_no.starts_with(prefix));
    let status = if held {
        StatusCode::SERVICE_UNAVAILABLE
    } else if state
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
        || earlier < state.fail_per_id
    {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    requests.push(Received {
        id,
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        content_type: header("content-type"),
        body: body.to_vec(),
        mch_order_no,
        status: status.as_u16(),
    });
    status
}

impl Receiver {
    async fn start(fail_first: usize, fail_per_id: usize, fail_prefix: Option<&str>) -> Self {
        let state = Arc::new(ReceiverState {
            fail_first: AtomicUsize::new(fail_first),
            fail_per_id,
            fail_prefix: Mutex::new(fail_prefix.map(str::to_owned)),
            ..ReceiverState::default()
        });
        let app = Router::new()
            .route("/hooks/outcomes", post(receive))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/outcomes", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, state, server }
    }

    fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    /// 2xx answers for this order.
    fn delivered_to(&self, mch_order_no: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.mch_order_no == mch_order_no && r.status == 200)
            .count()
    }

    fn set_fail_prefix(&self, prefix: Option<&str>) {
        *self.state.fail_prefix.lock().unwrap() = prefix.map(str::to_owned);
    }

    /// webhook-id → number of 2xx answers given for it.
    fn delivered(&self) -> BTreeMap<String, usize> {
        let mut delivered = BTreeMap::new();
        for request in self.requests().iter().filter(|r| r.status == 200) {
            *delivered.entry(request.id.clone()).or_default() += 1;
        }
        delivered
    }

    /// mchOrderNo → every webhook-id its requests carried.
    fn ids_by_order(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for request in self.requests() {
            ids.entry(request.mch_order_no.clone())
                .or_default()
                .insert(request.id.clone());
        }
        ids
    }

    fn attempts_of(&self, mch_order_no: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.mch_order_no == mch_order_no)
            .count()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// An independent Standard Webhooks verifier: the hmac crate on the documented secret format.

fn key_of(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => STANDARD.decode(encoded).unwrap(),
        None => secret.as_bytes().to_vec(),
    }
}

fn expected_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key_of(secret)).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

fn verifies(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let expected = expected_signature(secret, id, timestamp, body);
    header.split(' ').any(|candidate| candidate == expected)
}

fn verifies_request(secret: &str, request: &Received) -> bool {
    verifies(
        secret,
        &request.id,
        &request.timestamp,
        &request.body,
        &request.signature,
    )
}

// ---------------------------------------------------------------------------------------------
// Apps with webhooks, outcomes and the webhook queue.

/// An app whose settings send webhooks to `receiver`: every outcome its ledger appends gets a
/// delivery job, and its worker pools deliver them. Retries are quick (at most 200 ms apart)
/// and, unless `extra` says otherwise, practically unbounded.
async fn app_with_webhooks(
    receiver: &Receiver,
    secret: &str,
    appendonly: bool,
    extra: &[(&str, &str)],
) -> TestApp {
    let mut env = vec![
        ("TARSPAY_WEBHOOK_URL", receiver.url.as_str()),
        ("TARSPAY_WEBHOOK_SECRET", secret),
        ("TARSPAY_WEBHOOK_RETRY_MAX_DELAY", "200ms"),
        ("TARSPAY_WEBHOOK_MAX_ATTEMPTS", "1000"),
    ];
    env.extend_from_slice(extra);
    spawn_app_with(appendonly, |_| {}, &env).await
}

/// The typed values a registration borrows.
struct Registration {
    mch_order_no: MchOrderNo,
    currency: Currency,
    batch_id: BatchId,
    merchant: tarspay_worker::ids::MerchantName,
}

fn registration(id: &str) -> Registration {
    Registration {
        mch_order_no: id.parse().unwrap(),
        currency: "INR".parse().unwrap(),
        batch_id: "B-1".parse().unwrap(),
        merchant: Default::default(),
    }
}

impl Registration {
    fn order(&self) -> NewOrder<'_> {
        NewOrder {
            mch_order_no: &self.mch_order_no,
            kind: OrderKind::Payout,
            fingerprint: "f",
            amount: "100.00",
            currency: &self.currency,
            request: "{}",
            batch_id: Some(&self.batch_id),
            merchant: &self.merchant,
        }
    }
}

fn succeeded(id: &str) -> FinalResult {
    FinalResult {
        gateway_state: Some(2),
        pay_order_id: Some(format!("P{id}")),
        fee: Some("1.00".into()),
        ..FinalResult::default()
    }
}

async fn finalize(app: &TestApp, id: &str) {
    let ledger = app.deployment.ledger_of(id);
    ledger.register(&registration(id).order()).await.unwrap();
    let record = ledger.get(id).await.unwrap().unwrap();
    assert!(
        ledger
            .finalize(&record, Phase::Succeeded, &succeeded(id))
            .await
            .unwrap()
    );
}

/// Every outcome in the stream: webhook-id → outcome. (Read again until a connection that
/// saw a Redis restart has reconnected.)
async fn stream(app: &TestApp) -> BTreeMap<String, Outcome> {
    let mut all = BTreeMap::new();
    for partition in app.deployment.partitions() {
        let page = eventually("outcomes read", || async {
            partition.ledger.outcomes_after("0", 10_000).await.ok()
        })
        .await;
        all.extend(page.into_iter().map(|(id, outcome)| {
            let webhook_id = tarspay_worker::webhooks::webhook_id(partition.index, &id);
            (webhook_id, outcome)
        }));
    }
    all
}

/// Delivery jobs not settled yet (waiting, running or waiting for a retry).
async fn undelivered(app: &TestApp) -> u64 {
    let stats = eventually("webhook queue stats read", || async {
        app.deployment.webhook_stats().await.ok()
    })
    .await;
    stats.depth() + stats.delayed
}

async fn wait_all_delivered(app: &TestApp, receiver: &Receiver) {
    let expected: BTreeSet<String> = stream(app).await.into_keys().collect();
    eventually("every outcome delivered", || {
        let delivered: BTreeSet<String> = receiver.delivered().into_keys().collect();
        let done = expected.is_subset(&delivered);
        async move { done.then_some(()) }
    })
    .await;
    eventually("every delivery job settled", || async {
        (undelivered(app).await == 0).then_some(())
    })
    .await;
}

/// The Standard Webhooks envelope as a receiver reads it.
#[derive(Debug, serde::Deserialize)]
struct Message {
    #[serde(rename = "type")]
    event: String,
    timestamp: String,
    data: Outcome,
}

use common::run;

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_delivered_signed_and_retried_with_the_same_id_until_2xx() {
    // Five requests fail whatever they carry, and every webhook-id fails its first two tries.
    let receiver = Receiver::start(5, 2, None).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    for partition in app.deployment.partitions() {
        assert_eq!(
            partition.webhooks.keys(),
            &partition.ledger.keys().webhooks(),
            "the ledger queues where the workers read"
        );
    }
    for i in 0..10 {
        app.enqueue(inr(&format!("PAY-{i}"), "150.50")).await;
    }
    let pool = app.pool(4);
    app.wait_outcomes(10).await;
    wait_all_delivered(&app, &receiver).await;
    pool.stop().await;

    let outcomes = stream(&app).await;
    assert_eq!(outcomes.len(), 10);
    let delivered = receiver.delivered();
    let requests = receiver.requests();
    assert_eq!(
        delivered.keys().collect::<Vec<_>>(),
        outcomes.keys().collect::<Vec<_>>(),
        "exactly the stream's outcomes, under msg_<entry id>"
    );
    assert!(
        delivered.values().all(|&n| n == 1),
        "one 2xx per outcome: {delivered:?}"
    );
    for request in &requests {
        assert_eq!(request.content_type, "application/json");
        assert!(verifies_request(WHSEC, request), "{request:?}");
        let timestamp: i64 = request.timestamp.parse().unwrap();
        assert!(
            (timestamp - wall_clock::since_epoch().as_secs() as i64).abs() < 3600,
            "Unix seconds"
        );
        // The body is Standard Webhooks' envelope around the stream's outcome.
        let message: Message = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(message.event, "payout.succeeded");
        assert_eq!(&message.data, &outcomes[&request.id]);
        assert_eq!(
            message.timestamp, message.data.at,
            "RFC 3339, when recorded"
        );
        let json: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(json["data"]["amount"], "150.50", "money stays text");
    }
    // Retried until 2xx, the same webhook-id and body on every retry.
    for (id, outcome) in &outcomes {
        let tries: Vec<&Received> = requests.iter().filter(|r| &r.id == id).collect();
        assert!(tries.len() >= 3, "{id}: {} tries", tries.len());
        assert_eq!(tries.last().unwrap().status, 200);
        assert!(tries[..tries.len() - 1].iter().all(|r| r.status == 500));
        assert!(tries.iter().all(|r| r.body == tries[0].body));
        assert_eq!(outcome.status, "succeeded");
    }
    for (order, ids) in receiver.ids_by_order() {
        assert_eq!(ids.len(), 1, "{order} was sent under {ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_independently_and_tampering_does_not() {
    let receiver = Receiver::start(0, 0, None).await;
    let app = app_with_webhooks(&receiver, PLAIN, false, &[]).await;
    for id in ["SIG-1", "SIG-2", "SIG-3"] {
        finalize(&app, id).await;
    }
    let pool = app.pool(2);
    wait_all_delivered(&app, &receiver).await;
    pool.stop().await;

    let library = WebhookSigner::new(&Secret::new(PLAIN)).unwrap();
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        // A plain secret signs with its UTF-8 bytes: our own HMAC agrees, and so does the
        // crate's verifier.
        assert!(verifies(PLAIN, &r.id, &r.timestamp, &r.body, &r.signature));
        assert!(library.verify(&r.id, &r.timestamp, &r.body, &r.signature));

        let tampered_body = String::from_utf8(r.body.clone())
            .unwrap()
            .replace("100.00", "900.00");
        assert_ne!(tampered_body.as_bytes(), &r.body[..]);
        let later = (r.timestamp.parse::<u64>().unwrap() + 1).to_string();
        let forged = [
            verifies(
                PLAIN,
                &r.id,
                &r.timestamp,
                tampered_body.as_bytes(),
                &r.signature,
            ),
            verifies(
                &format!("{PLAIN}x"),
                &r.id,
                &r.timestamp,
                &r.body,
                &r.signature,
            ),
            verifies(WHSEC, &r.id, &r.timestamp, &r.body, &r.signature),
            verifies(PLAIN, "msg_other", &r.timestamp, &r.body, &r.signature),
            verifies(PLAIN, &r.id, &later, &r.body, &r.signature),
            library.verify(&r.id, &r.timestamp, tampered_body.as_bytes(), &r.signature),
            library.verify(&r.id, &later, &r.body, &r.signature),
        ];
        assert_eq!(forged, [false; 7], "{r:?}");
    }

    // The same outcomes signed with a whsec_ secret: the key is the decoded base64, not the
    // text, and the independent verifier agrees with the crate's signer.
    let whsec = WebhookSigner::new(&Secret::new(WHSEC)).unwrap();
    for r in &requests {
        let signature = whsec.sign(&r.id, 1_700_000_000, &r.body);
        assert!(verifies(WHSEC, &r.id, "1700000000", &r.body, &signature));
        assert!(!verifies(PLAIN, &r.id, "1700000000", &r.body, &signature));
        let mut as_text = Hmac::<Sha256>::new_from_slice(WHSEC.as_bytes()).unwrap();
        as_text.update(format!("{}.1700000000.", r.id).as_bytes());
        as_text.update(&r.body);
        let wrong = format!("v1,{}", STANDARD.encode(as_text.finalize().into_bytes()));
        assert_ne!(
            signature, wrong,
            "whsec_ secrets are decoded, not used as text"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pool_leaves_undelivered_outcomes_to_the_next() {
    // HELD-* outcomes are refused until the receiver "recovers".
    let receiver = Receiver::start(0, 0, Some("HELD")).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    for i in 0..5 {
        finalize(&app, &format!("OK-{i}")).await;
        finalize(&app, &format!("HELD-{i}")).await;
    }
    let first = app.pool(2);
    eventually("OK delivered, HELD retried", || {
        let ok = (0..5).all(|i| receiver.attempts_of(&format!("OK-{i}")) == 1);
        let retried = (0..5).all(|i| receiver.attempts_of(&format!("HELD-{i}")) >= 2);
        async move { (ok && retried).then_some(()) }
    })
    .await;
    first.stop().await;
    assert_eq!(undelivered(&app).await, 5, "the held outcomes stay queued");

    // Written while no worker runs: queued all the same.
    for i in 0..3 {
        finalize(&app, &format!("GAP-{i}")).await;
    }
    receiver.set_fail_prefix(None);
    let second = app.pool(2);
    wait_all_delivered(&app, &receiver).await;
    second.stop().await;

    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 13);
    // Delivered outcomes were not sent again by the second pool.
    for i in 0..5 {
        assert_eq!(receiver.attempts_of(&format!("OK-{i}")), 1);
    }
    // The held ones went out under the same webhook-id before and after the restart.
    for (order, ids) in receiver.ids_by_order() {
        assert_eq!(ids.len(), 1, "{order} was sent under {ids:?}");
    }
    for request in receiver.requests() {
        assert!(verifies_request(WHSEC, &request));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_deliveries_are_taken_over() {
    let receiver = Receiver::start(0, 0, Some("")).await; // down for everything
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    for i in 0..6 {
        finalize(&app, &format!("C-{i}")).await;
    }
    let mut doomed = app.worker_process(2);
    eventually("every outcome tried twice", || {
        let tried = (0..6)
            .filter(|i| receiver.attempts_of(&format!("C-{i}")) >= 2)
            .count();
        async move { (tried == 6).then_some(()) }
    })
    .await;
    doomed.kill();
    for i in 6..8 {
        finalize(&app, &format!("C-{i}")).await;
    }

    receiver.set_fail_prefix(None);
    let rescuer = app.pool(2);
    wait_all_delivered(&app, &receiver).await;
    rescuer.stop().await;

    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 8);
    assert!(delivered.values().all(|&n| n == 1), "{delivered:?}");
    for (order, ids) in receiver.ids_by_order() {
        assert_eq!(ids.len(), 1, "{order} was sent under {ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_webhook_settings_stop_worker_and_serve_at_start_naming_the_setting() {
    let app = spawn_app(false, |_| {}).await;
    let cases = [
        (
            "http://127.0.0.1:9/hook",
            "whsec_%%%hunter2%%%",
            "TARSPAY_WEBHOOK_SECRET",
        ),
        ("ftp://hunter2.example/", "plain", "TARSPAY_WEBHOOK_URL"),
        ("http://user:hunter2@/", "plain", "TARSPAY_WEBHOOK_URL"),
    ];
    for (url, secret, named) in cases {
        for args in [&["worker"][..], &["serve"][..]] {
            let mut command = app.command();
            command
                .env("TARSPAY_WEBHOOK_URL", url)
                .env("TARSPAY_WEBHOOK_SECRET", secret)
                .env("TARSPAY_API_AUTH_DISABLED", "true")
                .env("TARSPAY_LISTEN", "127.0.0.1:0")
                .args(args);
            let (code, out, err) = run(&mut command);
            assert_ne!(code, 0, "{args:?} {url}: started anyway: {out}{err}");
            assert!(err.contains(named), "{args:?} {url}: {err}");
            assert!(!err.contains("hunter2"), "{args:?} {url}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_does_not_end_delivery() {
    let receiver = Receiver::start(0, 0, Some("HELD")).await;
    // Append-only: the queue's stream and group survive.
    let mut app = app_with_webhooks(&receiver, WHSEC, true, &[]).await;
    for i in 0..3 {
        finalize(&app, &format!("BEFORE-{i}")).await;
    }
    finalize(&app, "HELD-1").await;
    let pool = app.pool(2);
    eventually("first outcomes delivered", || {
        let done = receiver.delivered().len() == 3 && receiver.attempts_of("HELD-1") >= 2;
        async move { done.then_some(()) }
    })
    .await;

    // Down for a while (fetches, renewals and settlements all see errors), then back.
    app.redis.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.redis.restart();
    receiver.set_fail_prefix(None);
    for i in 0..3 {
        let id = format!("AFTER-{i}");
        // The test's own connection reconnects too; retry until it has.
        eventually("ledger reachable again", || {
            let (app, id) = (&app, id.clone());
            async move {
                let registered = app
                    .deployment
                    .ledger_of(&id)
                    .register(&registration(&id).order())
                    .await;
                registered.ok()
            }
        })
        .await;
        eventually("finalized", || {
            let (app, id) = (&app, id.clone());
            async move {
                let ledger = app.deployment.ledger_of(&id);
                let record = ledger.get(&id).await.ok()??;
                ledger
                    .finalize(&record, Phase::Failed, &FinalResult::default())
                    .await
                    .ok()
            }
        })
        .await;
    }
    wait_all_delivered(&app, &receiver).await;
    pool.stop().await;
    assert_eq!(stream(&app).await.len(), 7);
    for (order, ids) in receiver.ids_by_order() {
        assert_eq!(ids.len(), 1, "{order} was sent under {ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_share_the_deliveries_without_doubling() {
    let receiver = Receiver::start(6, 0, None).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    let one = app.pool(2);
    let two = app.pool(2);
    for i in 0..30 {
        finalize(&app, &format!("PAIR-{i}")).await;
    }
    wait_all_delivered(&app, &receiver).await;
    one.stop().await;
    two.stop().await;
    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 30);
    assert!(
        delivered.values().all(|&n| n == 1),
        "each outcome answered 2xx once: {delivered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_always_fails_sends_deliveries_to_the_dead_stream_and_the_cli_retries_them()
{
    let receiver = Receiver::start(0, 0, Some("")).await; // 503 for everything
    let app = app_with_webhooks(
        &receiver,
        WHSEC,
        false,
        &[("TARSPAY_WEBHOOK_MAX_ATTEMPTS", "3")],
    )
    .await;
    finalize(&app, "DEAD-1").await;
    finalize(&app, "DEAD-2").await;
    let pool = app.pool(2);
    eventually("both deliveries dead", || async {
        (app.deployment.webhook_dead_count().await.unwrap() == 2).then_some(())
    })
    .await;
    assert_eq!(receiver.attempts_of("DEAD-1"), 3, "the retry bound");
    assert_eq!(receiver.attempts_of("DEAD-2"), 3, "the retry bound");
    assert_eq!(receiver.delivered().len(), 0);
    assert_eq!(undelivered(&app).await, 0, "nothing left to retry");
    // The payout queue's dead stream is not where they went.
    assert_eq!(app.deployment.dead_count().await.unwrap(), 0);

    let (code, out, err) = run(app.command().arg("queue"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("webhooks dead     2"), "{out}");
    let (code, out, err) = run(app.command().args(["dead", "list", "--queue", "webhooks"]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.contains("attempts=3")), "{out}");
    assert!(lines.iter().all(|l| l.contains("HTTP 503")), "{out}");
    let (_, payouts_dead, _) = run(app.command().args(["dead", "list"]));
    assert!(payouts_dead.trim().is_empty(), "{payouts_dead}");

    // The receiver is fixed; one delivery is retried by hand and delivered exactly once.
    receiver.set_fail_prefix(None);
    let first_id = receiver
        .ids_by_order()
        .remove("DEAD-1")
        .and_then(|ids| ids.into_iter().next())
        .unwrap();
    // msg_<entry id>, or msg_p<partition>_<entry id> beyond the first partition.
    let outcome_id = first_id.trim_start_matches("msg_");
    let outcome_id = outcome_id
        .split_once('_')
        .map_or(outcome_id, |(_, entry)| entry);
    let dead_id = lines
        .iter()
        .find(|l| l.contains(outcome_id))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (code, _, err) = run(app
        .command()
        .args(["dead", "retry", "--queue", "webhooks", "0-1"]));
    assert_ne!(code, 0);
    assert!(err.contains("no dead job 0-1"), "{err}");
    let (code, out, err) = run(app
        .command()
        .args(["dead", "retry", "--queue", "webhooks", &dead_id]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued"), "{out}");
    eventually("the retried delivery arrives", || {
        let done = receiver.delivered_to("DEAD-1") == 1;
        async move { done.then_some(()) }
    })
    .await;
    eventually("settled", || async {
        (undelivered(&app).await == 0).then_some(())
    })
    .await;
    pool.stop().await;
    assert_eq!(receiver.delivered_to("DEAD-1"), 1, "exactly once");
    assert_eq!(receiver.delivered_to("DEAD-2"), 0, "still dead");
    assert_eq!(app.deployment.webhook_dead_count().await.unwrap(), 1);
    let ids = receiver.ids_by_order();
    assert_eq!(
        ids["DEAD-1"].len(),
        1,
        "the same webhook-id after the dead retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_is_delivered_with_a_type_of_its_own() {
    let receiver = Receiver::start(0, 0, None).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    finalize(&app, "CORR-1").await;
    let ledger = app.deployment.ledger_of("CORR-1");
    let record = ledger.get("CORR-1").await.unwrap().unwrap();
    ledger
        .apply_gateway_final(&record, Phase::Refunded, &succeeded("CORR-1"))
        .await
        .unwrap();
    let pool = app.pool(2);
    wait_all_delivered(&app, &receiver).await;
    pool.stop().await;
    let mut messages: Vec<Message> = receiver
        .requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    messages.sort_by_key(|m| m.data.is_correction());
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].event, "payout.succeeded");
    assert_eq!(messages[1].event, "payout.corrected");
    assert_eq!(messages[1].data.status, "refunded");
    assert_eq!(
        messages[1].data.previous_status.map(|s| s.as_str()),
        Some("succeeded")
    );
    assert_eq!(
        receiver.delivered().len(),
        2,
        "two outcomes, two webhook-ids"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_gone_from_the_stream_is_a_dead_delivery_not_a_retry_loop() {
    let receiver = Receiver::start(0, 0, None).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    finalize(&app, "GONE-1").await;
    let partition = app.partition("GONE-1");
    let (entry, _) = partition
        .ledger
        .outcomes_after("0", 10)
        .await
        .unwrap()
        .remove(0);
    let _: u64 = redis::cmd("XDEL")
        .arg(partition.ledger.keys().outcomes())
        .arg(&entry)
        .query_async(&mut app.redis.conn().await)
        .await
        .unwrap();
    let pool = app.pool(1);
    eventually("dead", || async {
        (app.deployment.webhook_dead_count().await.unwrap() == 1).then_some(())
    })
    .await;
    pool.stop().await;
    let dead = partition.webhooks.list_dead(None, 10).await.unwrap();
    assert!(
        dead[0].reason.contains("no longer in the outcome stream"),
        "{dead:?}"
    );
    assert_eq!(dead[0].attempts, Some(1), "given up at once");
    assert!(receiver.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_and_its_delivery_are_written_together_or_not_at_all() {
    let receiver = Receiver::start(0, 0, None).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    let partition = app.partition("ATOM-1");
    let ledger = &partition.ledger;
    ledger
        .register(&registration("ATOM-1").order())
        .await
        .unwrap();
    let record = ledger.get("ATOM-1").await.unwrap().unwrap();
    // The delivery cannot be written (its stream key holds a string): nothing is.
    let webhook_stream = partition.webhooks.keys().stream.clone();
    let mut conn = app.redis.conn().await;
    let _: () = redis::cmd("RENAME")
        .arg(&webhook_stream)
        .arg("parked")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&webhook_stream)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = ledger
        .finalize(&record, Phase::Succeeded, &succeeded("ATOM-1"))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        ledger.outcome_count().await.unwrap(),
        0,
        "no outcome without its delivery"
    );
    let record = ledger.get("ATOM-1").await.unwrap().unwrap();
    assert!(!record.phase.is_final(), "{:?}", record.phase);

    // Repaired: the same finalize now writes both.
    let _: () = redis::cmd("RENAME")
        .arg("parked")
        .arg(&webhook_stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ledger
            .finalize(&record, Phase::Succeeded, &succeeded("ATOM-1"))
            .await
            .unwrap()
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);
    assert_eq!(undelivered(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_appended_while_webhooks_are_off_get_no_delivery() {
    let app = spawn_app(false, |_| {}).await;
    finalize(&app, "OFF-1").await;
    assert_eq!(app.deployment.outcome_count().await.unwrap(), 1);
    assert_eq!(undelivered(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_pause_and_resume_on_their_own_from_the_cli() {
    let receiver = Receiver::start(0, 0, None).await;
    let app = app_with_webhooks(&receiver, WHSEC, false, &[]).await;
    let (code, _, err) = run(app.command().args(["pause", "--queue", "webhooks"]));
    assert_eq!(code, 0, "{err}");
    for partition in app.deployment.partitions() {
        assert!(partition.webhooks.is_paused().await.unwrap());
    }
    assert!(!app.deployment.is_paused().await.unwrap(), "payouts go on");
    let (_, out, _) = run(app.command().arg("queue"));
    assert!(out.contains("webhooks paused   true"), "{out}");

    finalize(&app, "PAUSED-1").await;
    let pool = app.pool(2);
    // Past several fetch blocks (a paused queue's group delivers nothing): nothing was sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver.requests().is_empty());
    assert_eq!(undelivered(&app).await, 1);

    let (code, _, err) = run(app.command().args(["resume", "--queue", "webhooks"]));
    assert_eq!(code, 0, "{err}");
    wait_all_delivered(&app, &receiver).await;
    pool.stop().await;
    assert_eq!(receiver.delivered_to("PAUSED-1"), 1);
}
