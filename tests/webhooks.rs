//! Outcome webhooks against a real redis-server and a real HTTP receiver on loopback: every
//! outcome arrives, failures are retried with the same `webhook-id` until a 2xx, signatures
//! verify with an independent HMAC implementation, and a deliverer that is stopped or crashes
//! mid-way leaves nothing behind for the next one.

mod common;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::app::{TestApp, inr, spawn_app};
use common::eventually;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tarspay_worker::ledger::{FinalResult, NewOrder, OrderKind, Outcome, Phase};
use tarspay_worker::secret::Secret;
use tarspay_worker::webhooks::{WebhookError, WebhookOptions, WebhookSigner, run_with};
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
        .and_then(|v| v["mchOrderNo"].as_str().map(str::to_owned))
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
// Deliverers and outcomes.

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: JoinHandle<Result<(), WebhookError>>,
}

fn start(app: &TestApp, url: &str, secret: &str, options: WebhookOptions) -> Running {
    let deployment = app.deployment.clone();
    let url = url.to_owned();
    let secret = Secret::new(secret);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        run_with(&deployment, &url, &secret, options, shutdown).await
    });
    Running { stop, handle }
}

impl Running {
    /// Graceful stop; the hang guard is generous, not a speed assertion.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the deliverer stops")
            .unwrap()
            .unwrap();
    }

    /// A crash: the task is dropped where it stands, nothing is handed back.
    async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// Short timers; `claim_idle` decides how soon a dead consumer's outcomes are taken over.
fn fast(claim_idle: Duration) -> WebhookOptions {
    WebhookOptions {
        max_in_flight: 4,
        block: Duration::from_millis(200),
        claim_idle,
        claim_interval: Duration::from_millis(200),
        retry_min_delay: Duration::from_millis(20),
        retry_max_delay: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        request_timeout: claim_idle.min(Duration::from_secs(10)) / 2,
        ..WebhookOptions::default()
    }
}

async fn finalize(app: &TestApp, id: &str) {
    let ledger = &app.deployment.ledger;
    ledger
        .register(&NewOrder {
            mch_order_no: &id.parse().unwrap(),
            kind: OrderKind::Payout,
            fingerprint: "f",
            amount: "100.00",
            currency: &"INR".parse().unwrap(),
            request: "{}",
            batch_id: Some(&"B-1".parse().unwrap()),
        })
        .await
        .unwrap();
    let result = FinalResult {
        gateway_state: Some(2),
        pay_order_id: Some(format!("P{id}")),
        fee: Some("1.00".into()),
        ..FinalResult::default()
    };
    assert!(
        ledger
            .finalize(
                &ledger.get(id).await.unwrap().unwrap(),
                Phase::Succeeded,
                &result,
            )
            .await
            .unwrap()
    );
}

/// Every outcome in the stream: webhook-id → outcome.
async fn stream(app: &TestApp) -> BTreeMap<String, Outcome> {
    app.deployment
        .ledger
        .outcomes_after("0", 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, outcome)| (format!("msg_{id}"), outcome))
        .collect()
}

/// Entries of the `webhooks` group not acknowledged yet.
async fn pending(app: &TestApp) -> u64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(app.deployment.ledger.keys().outcomes())
        .arg("webhooks")
        .query_async(&mut app.redis.conn().await)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            other => panic!("XPENDING count: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

async fn wait_all_delivered(app: &TestApp, receiver: &Receiver) {
    let expected: BTreeSet<String> = stream(app).await.into_keys().collect();
    eventually("every outcome delivered", || {
        let delivered: BTreeSet<String> = receiver.delivered().into_keys().collect();
        let done = expected.is_subset(&delivered);
        async move { done.then_some(()) }
    })
    .await;
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_delivered_signed_and_retried_with_the_same_id_until_2xx() {
    let app = spawn_app(false, |_| {}).await;
    // Five requests fail whatever they carry, and every webhook-id fails its first two tries.
    let receiver = Receiver::start(5, 2, None).await;

    // Outcomes written before the deliverer ever ran are delivered too …
    for i in 0..5 {
        app.enqueue(inr(&format!("EARLY-{i}"), "150.50")).await;
    }
    let pool = app.pool(4);
    app.wait_outcomes(5).await;
    let deliverer = start(&app, &receiver.url, WHSEC, fast(Duration::from_secs(600)));
    // … and so are those written while it runs.
    for i in 0..5 {
        app.enqueue(inr(&format!("LATE-{i}"), "250")).await;
    }
    app.wait_outcomes(10).await;
    pool.stop().await;
    wait_all_delivered(&app, &receiver).await;
    eventually("all acknowledged", || async {
        (pending(&app).await == 0).then_some(())
    })
    .await;
    deliverer.stop().await;

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
        assert!((timestamp - unix_now()).abs() < 3600, "Unix seconds");
        // The body is the stream's outcome, camelCase, on every attempt.
        let body: Outcome = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(&body, &outcomes[&request.id]);
        let json: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert!(json.get("mchOrderNo").is_some() && json.get("payOrderId").is_some());
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
    let app = spawn_app(false, |_| {}).await;
    let receiver = Receiver::start(0, 0, None).await;
    for id in ["SIG-1", "SIG-2", "SIG-3"] {
        finalize(&app, id).await;
    }
    let deliverer = start(&app, &receiver.url, PLAIN, fast(Duration::from_secs(600)));
    wait_all_delivered(&app, &receiver).await;
    deliverer.stop().await;

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
async fn a_stopped_deliverer_hands_back_what_it_had_not_delivered() {
    let app = spawn_app(false, |_| {}).await;
    // HELD-* outcomes are refused until the receiver "recovers".
    let receiver = Receiver::start(0, 0, Some("HELD")).await;
    for i in 0..5 {
        finalize(&app, &format!("OK-{i}")).await;
        finalize(&app, &format!("HELD-{i}")).await;
    }
    // A long claim_idle: the next deliverer can only get the held outcomes at once because
    // the first one hands them back on shutdown.
    let options = WebhookOptions {
        max_in_flight: 8,
        ..fast(Duration::from_secs(600))
    };
    let first = start(&app, &receiver.url, WHSEC, options.clone());
    eventually("OK delivered, HELD retried", || {
        let ok = (0..5).all(|i| receiver.attempts_of(&format!("OK-{i}")) == 1);
        let retried = (0..5).all(|i| receiver.attempts_of(&format!("HELD-{i}")) >= 2);
        let app = &app;
        async move { (ok && retried && pending(app).await == 5).then_some(()) }
    })
    .await;
    first.stop().await;
    assert_eq!(
        pending(&app).await,
        5,
        "the held outcomes stay unacknowledged"
    );

    // Written while no deliverer runs: never skipped.
    for i in 0..3 {
        finalize(&app, &format!("GAP-{i}")).await;
    }
    receiver.set_fail_prefix(None);
    let second = start(&app, &receiver.url, WHSEC, options);
    wait_all_delivered(&app, &receiver).await;
    eventually("all acknowledged", || async {
        (pending(&app).await == 0).then_some(())
    })
    .await;
    second.stop().await;

    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 13);
    // Acknowledged outcomes were not sent again by the second deliverer.
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
async fn a_crashed_deliverers_outcomes_are_taken_over() {
    let app = spawn_app(false, |_| {}).await;
    let receiver = Receiver::start(0, 0, Some("")).await; // down for everything
    for i in 0..6 {
        finalize(&app, &format!("C-{i}")).await;
    }
    // At most four in flight: four outcomes are taken and retried, two wait unread.
    let options = fast(Duration::from_secs(3));
    assert_eq!(options.max_in_flight, 4);
    let doomed = start(&app, &receiver.url, WHSEC, options.clone());
    eventually("four outcomes retried", || {
        let tried = receiver
            .ids_by_order()
            .keys()
            .filter(|order| receiver.attempts_of(order) >= 2)
            .count();
        async move { (tried >= 4).then_some(()) }
    })
    .await;
    doomed.crash().await;
    assert_eq!(
        receiver.ids_by_order().len(),
        4,
        "never more than four at once"
    );
    assert_eq!(pending(&app).await, 4, "the dead consumer holds them");
    for i in 6..8 {
        finalize(&app, &format!("C-{i}")).await;
    }

    receiver.set_fail_prefix(None);
    let rescuer = start(&app, &receiver.url, WHSEC, options);
    wait_all_delivered(&app, &receiver).await;
    eventually("all acknowledged", || async {
        (pending(&app).await == 0).then_some(())
    })
    .await;
    rescuer.stop().await;

    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 8);
    for (order, ids) in receiver.ids_by_order() {
        assert_eq!(ids.len(), 1, "{order} was sent under {ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_without_echoing_them() {
    let app = spawn_app(false, |_| {}).await;
    let options = fast(Duration::from_secs(600));
    let never = std::future::pending::<()>;
    let bad_secret = run_with(
        &app.deployment,
        "http://127.0.0.1:9/",
        &Secret::new("whsec_%%%hunter2%%%"),
        options.clone(),
        never(),
    )
    .await
    .unwrap_err();
    assert!(matches!(bad_secret, WebhookError::Secret(_)));
    assert!(!bad_secret.to_string().contains("hunter2"));
    for url in ["ftp://example.com/", "not a url", "http://user:hunter2@/"] {
        let err = run_with(
            &app.deployment,
            url,
            &Secret::new(PLAIN),
            options.clone(),
            never(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, WebhookError::Url), "{url}: {err}");
        assert!(!err.to_string().contains("hunter2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_does_not_end_delivery() {
    let mut app = spawn_app(true, |_| {}).await; // append-only: the stream and group survive
    let receiver = Receiver::start(0, 0, Some("HELD")).await;
    for i in 0..3 {
        finalize(&app, &format!("BEFORE-{i}")).await;
    }
    finalize(&app, "HELD-1").await;
    let deliverer = start(&app, &receiver.url, WHSEC, fast(Duration::from_secs(600)));
    eventually("first outcomes delivered", || {
        let done = receiver.delivered().len() == 3 && receiver.attempts_of("HELD-1") >= 2;
        async move { done.then_some(()) }
    })
    .await;

    // Down for a while (the blocking read, renewals and retries all see errors), then back.
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
                    .ledger
                    .register(&NewOrder {
                        mch_order_no: &id.parse().unwrap(),
                        kind: OrderKind::Payout,
                        fingerprint: "f",
                        amount: "100.00",
                        currency: &"INR".parse().unwrap(),
                        request: "{}",
                        batch_id: None,
                    })
                    .await;
                registered.ok()
            }
        })
        .await;
        eventually("finalized", || {
            let (app, id) = (&app, id.clone());
            async move {
                let ledger = &app.deployment.ledger;
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
    eventually("all acknowledged", || async {
        (pending(&app).await == 0).then_some(())
    })
    .await;
    deliverer.stop().await;
    assert_eq!(stream(&app).await.len(), 7);
    for (order, ids) in receiver.ids_by_order() {
        assert_eq!(ids.len(), 1, "{order} was sent under {ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliverers_share_the_stream_without_doubling() {
    let app = spawn_app(false, |_| {}).await;
    let receiver = Receiver::start(6, 0, None).await;
    let options = fast(Duration::from_secs(600));
    let one = start(&app, &receiver.url, WHSEC, options.clone());
    let two = start(&app, &receiver.url, WHSEC, options);
    for i in 0..30 {
        finalize(&app, &format!("PAIR-{i}")).await;
    }
    wait_all_delivered(&app, &receiver).await;
    eventually("all acknowledged", || async {
        (pending(&app).await == 0).then_some(())
    })
    .await;
    one.stop().await;
    two.stop().await;
    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 30);
    assert!(
        delivered.values().all(|&n| n == 1),
        "each outcome answered 2xx once: {delivered:?}"
    );
}
