//! `serve`: the HTTP API (auth, idempotency, batches, pause/resume, health, metrics, OpenAPI)
//! and the callback receiver (verified, forged, unsigned, replayed, duplicate, malformed,
//! oversized callbacks; Redis down), over real HTTP against a real redis-server.

mod common;

use common::app::{TestApp, inr, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::gateway::callback::{HEADER_SIGNATURE, sign_callback, sorted_compact_json};
use tarspay_worker::ledger::Phase;
use tarspay_worker::sandbox::rules::SANDBOX_SYSTEM_PRIVATE_KEY;

const TOKEN: &str = "test-token-0123456789";

struct Served {
    app: TestApp,
    url: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn system_key() -> PrivateKey {
    PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY).unwrap()
}

async fn served(
    change: impl FnOnce(&mut tarspay_worker::sandbox::SandboxConfig),
    extra: &[(&str, &str)],
) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let notify = format!("{url}/tarspay/notify");
    let public = system_key().public_key().to_hex();
    let mut env: Vec<(&str, &str)> = vec![
        ("TARSPAY_API_TOKEN", TOKEN),
        ("TARSPAY_NOTIFY_URL", notify.as_str()),
        ("TARSPAY_SYSTEM_PUBLIC_KEY", public.as_str()),
    ];
    env.extend_from_slice(extra);
    let app = spawn_app_with(false, change, &env).await;
    let stop = app.serve_on(listener);
    Served {
        app,
        url,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        _stop: stop,
    }
}

impl Served {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
    }

    async fn callback(&self, body: &str, signature: Option<&str>) -> (StatusCode, String) {
        let mut request = self
            .http
            .post(format!("{}/tarspay/notify", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header(HEADER_SIGNATURE, signature);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_requires_the_bearer_token() {
    let s = served(|_| {}, &[]).await;
    let url = format!("{}/v1/payouts/X", s.url);
    assert_eq!(
        s.http.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let wrong = s
        .http
        .get(&url)
        .bearer_auth("test-token-012345678")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        s.get("/v1/payouts/X").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // Health, metrics, the document and callbacks need no token.
    assert_eq!(
        s.http
            .get(format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        s.http
            .get(format!("{}/openapi.json", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // Without a token the server refuses to start, unless auth is explicitly disabled.
    let no_token = tarspay_worker::config::Settings::load_with_env(
        None,
        [("TARSPAY_REDIS_URL", s.app.redis.url())],
    )
    .unwrap();
    assert!(tarspay_worker::server::AppState::new(&no_token, s.app.deployment.clone()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_payout_is_idempotent_201_200_409_422() {
    let s = served(|_| {}, &[]).await;
    let first = s
        .post("/v1/payouts")
        .json(&inr("API-1", "100"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let body: Value = first.json().await.unwrap();
    assert_eq!(
        (body["mchOrderNo"].as_str(), body["phase"].as_str()),
        (Some("API-1"), Some("queued"))
    );

    let again = s
        .post("/v1/payouts")
        .json(&inr("API-1", "100"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let clash = s
        .post("/v1/payouts")
        .json(&inr("API-1", "200"))
        .send()
        .await
        .unwrap();
    assert_eq!(clash.status(), StatusCode::CONFLICT);
    let clash: Value = clash.json().await.unwrap();
    assert_eq!(clash["current"]["amount"], "100");

    let invalid = s
        .post("/v1/payouts")
        .json(&json!({"mchOrderNo": "API 2", "amount": 100, "currency": "XXX"}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let invalid: Value = invalid.json().await.unwrap();
    let fields: Vec<&str> = invalid["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["amount", "currency", "mchOrderNo", "wayCode"]);
    assert!(
        s.app
            .deployment
            .ledger
            .get("API 2")
            .await
            .unwrap()
            .is_none()
    );

    let malformed = s
        .post("/v1/payouts")
        .header("content-type", "application/json")
        .body("{\"mchOrderNo\":")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let huge = json!({"mchOrderNo": "BIG", "amount": "100", "currency": "INR", "wayCode": "UPI", "note": "x".repeat(100_000)});
    assert_eq!(
        s.post("/v1/payouts")
            .json(&huge)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        s.app.deployment.queue.stats().await.unwrap().depth(),
        1,
        "only API-1 was queued"
    );

    let status: Value = s
        .get("/v1/payouts/API-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["amount"], "100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_number_currency_refuses_a_decimal_point_and_queues_nothing() {
    let s = served(|_| {}, &[]).await;
    let response = s
        .post("/v1/payouts")
        .json(
            &json!({"mchOrderNo": "BD-1", "amount": "100.00", "currency": "BDT",
                      "wayCode": "EWALLET_BKASH", "walletId": "01712345678"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["errors"],
        json!([{"field": "amount", "rule": "BDT takes whole numbers: no decimal point"}])
    );
    assert!(s.app.deployment.ledger.get("BD-1").await.unwrap().is_none());
    assert_eq!(s.app.deployment.queue.stats().await.unwrap().depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_bad_rows_queues_nothing_and_names_every_bad_line() {
    let s = served(|_| {}, &[]).await;
    let csv = "mchOrderNo,amount,currency,wayCode,walletId\nB-1,500,BDT,EWALLET_BKASH,01712345678\nB-2,500.5,BDT,EWALLET_BKASH,01712345678\nB-3,500,BDT,EWALLET_BKASH,01712345678\nB-4,500,BDT,PAYPAL,01712345678\n";
    let response = s
        .post("/v1/batches")
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    let lines: Vec<u64> = body["detail"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![3, 5]);
    for id in ["B-1", "B-3"] {
        assert!(
            s.app.deployment.ledger.get(id).await.unwrap().is_none(),
            "{id} must not be queued"
        );
    }
    assert_eq!(s.app.deployment.queue.stats().await.unwrap().depth(), 0);

    let good = "mchOrderNo,amount,currency,wayCode,walletId\nB-1,500,BDT,EWALLET_BKASH,01712345678\nB-3,700,BDT,EWALLET_NAGAD,01712345678\n";
    let created = s
        .post("/v1/batches?batchId=payroll-nov")
        .header("content-type", "text/csv")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(
        (created["batchId"].as_str(), created["queued"].as_u64()),
        (Some("payroll-nov"), Some(2))
    );
    // Posting the same payroll again pays no one twice.
    let again: Value = s
        .post("/v1/batches?batchId=payroll-nov")
        .header("content-type", "text/csv")
        .body(good)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["queued"].as_u64(), again["existing"].as_u64()),
        (Some(0), Some(2))
    );

    let summary: Value = s
        .get("/v1/batches/payroll-nov")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["total"], 2);
    assert_eq!(summary["phases"]["queued"]["count"], 2);
    assert_eq!(summary["phases"]["queued"]["amounts"]["BDT"], "1200");
    assert_eq!(
        s.get("/v1/batches/nope").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let json_batch = json!([inr("J-1", "100"), {"mchOrderNo": "J-2", "amount": "1"}]);
    let response = s
        .post("/v1/batches")
        .json(&json_batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(s.app.deployment.ledger.get("J-1").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_health_metrics_and_the_document() {
    let s = served(|_| {}, &[]).await;
    let paused: Value = s
        .post("/v1/queue/pause")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(paused["paused"], true);
    assert!(s.app.deployment.queue.is_paused().await.unwrap());
    s.post("/v1/queue/resume").send().await.unwrap();
    assert!(!s.app.deployment.queue.is_paused().await.unwrap());

    let health: Value = s
        .http
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["redis"], "ok");
    let metrics = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tarspay_queue_waiting",
        "tarspay_queue_paused",
        "tarspay_workers_alive",
        "tarspay_orders_stuck",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let document: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        document,
        serde_json::from_str::<Value>(tarspay_worker::server::OPENAPI_JSON).unwrap()
    );
    // Every documented route is served (none answers 404/405).
    for (method, path) in tarspay_worker::server::ROUTES {
        let path = path.replace("{mchOrderNo}", "X").replace("{batchId}", "X");
        let request = match *method {
            "get" => s.get(&path),
            _ => s
                .post(&path)
                .header("content-type", "application/json")
                .body("{}"),
        };
        let status = request.send().await.unwrap().status();
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {status}"
        );
        assert!(
            status != StatusCode::NOT_FOUND || path.contains("/X"),
            "{method} {path}: {status}"
        );
    }
    // With Redis gone, health says so.
    let mut s = s;
    s.app.redis.stop();
    let down = s
        .http
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// A callback body for an order, as TarsPay would send it for our merchant.
fn callback_body(id: &str, amount: &str, state: i64) -> String {
    callback_body_for("M1234567890", id, amount, state)
}

fn callback_body_for(mch_no: &str, id: &str, amount: &str, state: i64) -> String {
    sorted_compact_json(
        &json!({"bizType": 2, "mchNo": mch_no, "mchOrderNo": id, "orderAmount": amount,
        "payAmount": amount, "currency": "INR", "state": state, "fee": "0"}),
    )
}

async fn accepted_order(s: &Served, id: &str) {
    s.app.enqueue(inr(id, "100")).await;
    let ctx = s.app.deployment.job_context(&s.app.settings).unwrap();
    tarspay_worker::jobs::run_create_payout(&ctx, id)
        .await
        .unwrap();
    assert_eq!(
        s.app
            .deployment
            .ledger
            .get(id)
            .await
            .unwrap()
            .unwrap()
            .phase,
        Phase::Accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_callbacks_finalise_once_and_replays_change_nothing() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    accepted_order(&s, "CB-1").await;
    let body = callback_body("CB-1", "100", 2);
    let signature = sign_callback(&system_key(), body.as_bytes());
    let (status, text) = s.callback(&body, Some(&signature)).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    assert_eq!(
        s.app
            .deployment
            .ledger
            .get("CB-1")
            .await
            .unwrap()
            .unwrap()
            .phase,
        Phase::Succeeded
    );
    // Replays and concurrent duplicates: still one outcome.
    let mut sends = Vec::new();
    for _ in 0..8 {
        sends.push(s.callback(&body, Some(&signature)));
    }
    for (status, text) in futures::future::join_all(sends).await {
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    }
    assert_eq!(s.app.deployment.ledger.outcome_count().await.unwrap(), 1);
    let outcome = &s.app.outcomes().await[0];
    assert_eq!(
        (
            outcome.event.as_str(),
            outcome.status.as_str(),
            outcome.gateway_state
        ),
        ("final", "succeeded", Some(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_later_refunded_is_one_correction_however_often_it_is_told() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    accepted_order(&s, "RF-1").await;
    let paid = callback_body("RF-1", "100", 2);
    let paid_sig = sign_callback(&system_key(), paid.as_bytes());
    s.callback(&paid, Some(&paid_sig)).await;
    // The gateway refunds it (2 -> 5) and tells us again and again, concurrently, and
    // replays the old success in between.
    let refunded = callback_body("RF-1", "100", 5);
    let refund_sig = sign_callback(&system_key(), refunded.as_bytes());
    let mut sends = Vec::new();
    for i in 0..10 {
        if i % 3 == 0 {
            sends.push(s.callback(&paid, Some(&paid_sig)));
        }
        sends.push(s.callback(&refunded, Some(&refund_sig)));
    }
    for (status, text) in futures::future::join_all(sends).await {
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    }
    let outcomes = s.app.outcomes().await;
    let events: Vec<_> = outcomes
        .iter()
        .map(|o| {
            (
                o.event.as_str(),
                o.status.as_str(),
                o.previous_status.map(|s| s.as_str()),
                o.gateway_state,
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("final", "succeeded", None, Some(2)),
            ("correction", "refunded", Some("succeeded"), Some(5)),
        ]
    );
    // The record keeps its final status and shows the correction, in the API too.
    let record = s.app.deployment.ledger.get("RF-1").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Succeeded);
    assert_eq!(record.corrections.len(), 1);
    let shown: serde_json::Value = s
        .get("/v1/payouts/RF-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["corrections"][0]["status"], "refunded");
    assert_eq!(shown["corrections"][0]["previousStatus"], "succeeded");
    assert_eq!(shown["corrections"][0]["event"], "correction");
    // An unsigned claim of yet another state is only a reason to look (which finds the
    // sandbox's state): no further entry.
    let forged = callback_body("RF-1", "100", 3);
    s.callback(&forged, None).await;
    assert_eq!(s.app.deployment.ledger.outcome_count().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unsigned_callbacks_only_schedule_a_query() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    accepted_order(&s, "CB-2").await;
    let body = callback_body("CB-2", "100", 2);
    let forged = sign_callback(&PrivateKey::generate(), body.as_bytes());
    let waiting_before = s.app.deployment.queue.stats().await.unwrap().waiting;
    for signature in [Some(forged.as_str()), None, Some("3045zz")] {
        let (status, text) = s.callback(&body, signature).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    }
    let record = s.app.deployment.ledger.get("CB-2").await.unwrap().unwrap();
    assert_eq!(
        record.phase,
        Phase::Accepted,
        "an untrusted callback changes nothing"
    );
    assert_eq!(s.app.deployment.ledger.outcome_count().await.unwrap(), 0);
    let waiting_after = s.app.deployment.queue.stats().await.unwrap().waiting;
    assert_eq!(
        waiting_after,
        waiting_before + 1,
        "one status query scheduled (repeats share it)"
    );

    // A correctly signed callback whose amount differs from ours is not trusted either.
    let other_amount = callback_body("CB-2", "999", 2);
    s.callback(
        &other_amount,
        Some(&sign_callback(&system_key(), other_amount.as_bytes())),
    )
    .await;
    assert_eq!(
        s.app
            .deployment
            .ledger
            .get("CB-2")
            .await
            .unwrap()
            .unwrap()
            .phase,
        Phase::Accepted
    );

    // Signed by TarsPay but about another merchant's order under the same number.
    let other_merchant = callback_body_for("M9999999999", "CB-2", "100", 3);
    s.callback(
        &other_merchant,
        Some(&sign_callback(&system_key(), other_merchant.as_bytes())),
    )
    .await;
    // Signed, ours, but naming a different payOrderId than the one the gateway gave us.
    let other_order = sorted_compact_json(
        &json!({"bizType": 2, "mchNo": "M1234567890", "mchOrderNo": "CB-2",
        "payOrderId": "P9999999999999999999", "orderAmount": "100", "currency": "INR", "state": 3}),
    );
    s.callback(
        &other_order,
        Some(&sign_callback(&system_key(), other_order.as_bytes())),
    )
    .await;
    assert_eq!(
        s.app
            .deployment
            .ledger
            .get("CB-2")
            .await
            .unwrap()
            .unwrap()
            .phase,
        Phase::Accepted
    );

    // Unknown orders: acknowledged, nothing recorded.
    let unknown = callback_body("NOT-OURS", "100", 2);
    let (status, _) = s
        .callback(
            &unknown,
            Some(&sign_callback(&system_key(), unknown.as_bytes())),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        s.app
            .deployment
            .ledger
            .get("NOT-OURS")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_redis_down_callbacks_are_refused() {
    let s = served(|_| {}, &[]).await;
    let (status, text) = s.callback("not json", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("not a JSON object"), "{text}");
    let (status, text) = s.callback(r#"{"bizType":2,"state":2}"#, None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(text.contains("mchOrderNo"), "{text}");
    let huge = format!(
        r#"{{"bizType":2,"mchOrderNo":"A","state":2,"pad":"{}"}}"#,
        "x".repeat(100_000)
    );
    assert_eq!(
        s.callback(&huge, None).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // Redis down: not recorded, so not OK: TarsPay will resend.
    let mut s = s;
    s.app.redis.stop();
    let body = callback_body("CB-3", "100", 2);
    let (status, text) = s
        .callback(&body, Some(&sign_callback(&system_key(), body.as_bytes())))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_ne!(text, "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_callbacks_finalise_payouts_before_any_poll() {
    // Polls are an hour away: only the callback can finish these payouts.
    let s = served(
        |c| {
            c.callbacks = true;
            c.final_after = Duration::from_millis(100);
            c.callback_retry_delay = Duration::from_millis(50);
        },
        &[
            ("TARSPAY_POLL_FIRST_DELAY", "1h"),
            ("TARSPAY_POLL_MAX_INTERVAL", "1h"),
        ],
    )
    .await;
    for i in 0..10 {
        s.app.enqueue(inr(&format!("SCB-{i}"), "100")).await;
    }
    let pool = s.app.pool(4);
    let outcomes = s.app.wait_outcomes(10).await;
    pool.stop().await;
    assert!(outcomes.values().all(|o| o.status == "succeeded"));
    for i in 0..10 {
        let view = s.app.sandbox.order(&format!("SCB-{i}")).unwrap();
        assert!(view.callback_acknowledged, "the sandbox read OK");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_posts_each_outcome_as_a_signed_webhook() {
    use std::sync::{Arc, Mutex};
    type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;
    let seen: Seen = Arc::default();
    let receiver = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    seen.lock().unwrap().push((
                        header("webhook-id"),
                        header("webhook-timestamp"),
                        header("webhook-signature"),
                        body,
                    ));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let s = served(
        |_| {},
        &[
            ("TARSPAY_WEBHOOK_URL", hook.as_str()),
            ("TARSPAY_WEBHOOK_SECRET", secret),
        ],
    )
    .await;
    for i in 0..5 {
        s.app.enqueue(inr(&format!("WH-{i}"), "100")).await;
    }
    let pool = s.app.pool(4);
    s.app.wait_outcomes(5).await;
    pool.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhooks not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    for (id, timestamp, signature, body) in seen.lock().unwrap().iter() {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(signature, &expected, "independent HMAC check");
        let outcome: Value = serde_json::from_str(body).unwrap();
        assert_eq!(outcome["status"], "succeeded");
        assert!(id.starts_with("msg_"));
    }
}
