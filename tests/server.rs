//! `serve`: the HTTP API (auth, idempotency, batches, pause/resume, health, metrics, OpenAPI)
//! and the callback receiver (verified, forged, unsigned, replayed, duplicate, malformed,
//! oversized callbacks; Redis down), over real HTTP against a real redis-server.

mod common;

use common::app::{MCH_NO, TestApp, inr, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tarspay_sandbox::rules::SANDBOX_SYSTEM_PRIVATE_KEY;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::gateway::callback::{HEADER_SIGNATURE, sign_callback, sorted_compact_json};
use tarspay_worker::ledger::Phase;

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
    change: impl FnOnce(&mut tarspay_sandbox::SandboxConfig),
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

    /// The text of a route that needs no token.
    async fn public_text(&self, path: &str) -> String {
        let response = self.http.get(format!("{}{path}", self.url)).send().await;
        response.unwrap().text().await.unwrap()
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

    /// `body` signed with TarsPay's (the sandbox's) system key, as the gateway sends it.
    async fn signed_callback(&self, body: &str) -> (StatusCode, String) {
        let signature = sign_callback(&system_key(), body.as_bytes());
        self.callback(body, Some(&signature)).await
    }

    /// The ledger's phase of an order that exists.
    async fn phase(&self, id: &str) -> Phase {
        let record = self.app.deployment.order(id).await.unwrap();
        record.expect("the order exists").phase
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
    assert!(s.app.deployment.order("API 2").await.unwrap().is_none());

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
        s.app.deployment.queue_stats().await.unwrap().depth(),
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
    assert!(s.app.deployment.order("BD-1").await.unwrap().is_none());
    assert_eq!(s.app.deployment.queue_stats().await.unwrap().depth(), 0);
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
            s.app.deployment.order(id).await.unwrap().is_none(),
            "{id} must not be queued"
        );
    }
    assert_eq!(s.app.deployment.queue_stats().await.unwrap().depth(), 0);

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
    assert!(s.app.deployment.order("J-1").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_without_an_id_is_the_same_batch() {
    let s = served(|_| {}, &[]).await;
    let csv = "mchOrderNo,amount,currency,wayCode,walletId\nR-1,500,BDT,EWALLET_BKASH,01712345678\nR-2,700,BDT,EWALLET_NAGAD,01712345678\n";
    let (status, first) = post_csv(&s, "/v1/batches", csv).await;
    assert_eq!(status, StatusCode::CREATED);
    // Resent (its answer lost, say): the same batch, whose rows are counted in it.
    let (status, again) = post_csv(&s, "/v1/batches", csv).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again["batchId"], first["batchId"]);
    assert_eq!(
        (again["queued"].as_u64(), again["existing"].as_u64()),
        (Some(0), Some(2))
    );
    let id = first["batchId"].as_str().unwrap();
    let summary: Value = s
        .get(&format!("/v1/batches/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["total"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_other_methods_and_bad_queries_answer_with_a_json_error() {
    let s = served(|_| {}, &[]).await;
    for (method, path, status) in [
        ("GET", "/v1/payouts", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/v1/payouts/", StatusCode::NOT_FOUND),
        ("GET", "/v1/batches/", StatusCode::NOT_FOUND),
        ("GET", "/v2/payouts", StatusCode::NOT_FOUND),
        ("DELETE", "/v1/payouts/X-1", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let url = format!("{}{path}", s.url);
        let request = match method {
            "GET" => s.http.get(&url),
            "POST" => s.http.post(&url),
            _ => s.http.delete(&url),
        };
        let response = request.bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(response.headers().contains_key("allow"), "{method} {path}");
        }
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    let csv =
        "mchOrderNo,amount,currency,wayCode,walletId\nQ-1,500,BDT,EWALLET_BKASH,01712345678\n";
    for query in ["batch_id=nov", "batchId=a&batchId=b"] {
        let (status, body) = post_csv(&s, &format!("/v1/batches?{query}"), csv).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert!(
            body["error"].as_str().unwrap().contains("batchId"),
            "{body}"
        );
    }
    assert!(s.app.deployment.order("Q-1").await.unwrap().is_none());
    // The callback path keeps its plain-text answers.
    let (status, text) = s.callback("not json", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("not a JSON object"), "{text}");
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
    assert!(s.app.deployment.is_paused().await.unwrap());
    s.post("/v1/queue/resume").send().await.unwrap();
    assert!(!s.app.deployment.is_paused().await.unwrap());

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
    let metrics = s.public_text("/metrics").await;
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
    let derived = tarspay_worker::server::openapi("/tarspay/notify");
    assert_eq!(document, serde_json::to_value(&derived).unwrap());
    assert_routes_are_exactly_the_documented_ones(&s, &document).await;
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
    // A fixed message: Redis' own error text (addresses, OS errors) stays in the log.
    let down: Value = down.json().await.unwrap();
    assert_eq!(
        down,
        json!({"redis": "down", "error": "Redis unavailable; details are in the server log"})
    );
}

/// Every documented (method, path) is served (never 404 for a route, never 405), and every
/// other method on a documented path is 405: the router has exactly the document's routes.
async fn assert_routes_are_exactly_the_documented_ones(s: &Served, document: &Value) {
    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];
    let paths = document["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 10, "{:?}", paths.keys().collect::<Vec<_>>());
    for (path, item) in paths {
        let url = format!(
            "{}{}",
            s.url,
            path.replace("{mchOrderNo}", "X").replace("{batchId}", "X")
        );
        for method in METHODS {
            let documented = item.get(method).is_some();
            let status = s
                .http
                .request(method.to_uppercase().parse().unwrap(), &url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap()
                .status();
            if documented {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                let operation = item[method]["operationId"].as_str().unwrap();
                assert!(
                    status != StatusCode::NOT_FOUND
                        || ["getPayout", "getBatch"].contains(&operation),
                    "{method} {path}: {status}"
                );
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            }
        }
    }
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
    let ctx = s
        .app
        .deployment
        .job_context_for(&s.app.settings, id)
        .unwrap();
    tarspay_worker::jobs::run_create_payout(&ctx, id, None)
        .await
        .unwrap();
    assert_eq!(s.phase(id).await, Phase::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_callbacks_finalise_once_and_replays_change_nothing() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    accepted_order(&s, "CB-1").await;
    let body = callback_body("CB-1", "100", 2);
    let signature = sign_callback(&system_key(), body.as_bytes());
    let (status, text) = s.callback(&body, Some(&signature)).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    assert_eq!(s.phase("CB-1").await, Phase::Succeeded);
    // Replays and concurrent duplicates: still one outcome.
    let mut sends = Vec::new();
    for _ in 0..8 {
        sends.push(s.callback(&body, Some(&signature)));
    }
    for (status, text) in futures::future::join_all(sends).await {
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    }
    assert_eq!(s.app.deployment.outcome_count().await.unwrap(), 1);
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
    let record = s.app.deployment.order("RF-1").await.unwrap().unwrap();
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
    assert_eq!(s.app.deployment.outcome_count().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unsigned_callbacks_only_schedule_a_query() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    accepted_order(&s, "CB-2").await;
    let body = callback_body("CB-2", "100", 2);
    let forged = sign_callback(&PrivateKey::generate(), body.as_bytes());
    let waiting_before = s.app.deployment.queue_stats().await.unwrap().waiting;
    for signature in [Some(forged.as_str()), None, Some("3045zz")] {
        let (status, text) = s.callback(&body, signature).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    }
    let record = s.app.deployment.order("CB-2").await.unwrap().unwrap();
    assert_eq!(
        record.phase,
        Phase::Accepted,
        "an untrusted callback changes nothing"
    );
    assert_eq!(s.app.deployment.outcome_count().await.unwrap(), 0);
    let waiting_after = s.app.deployment.queue_stats().await.unwrap().waiting;
    assert_eq!(
        waiting_after,
        waiting_before + 1,
        "one status query scheduled (repeats share it)"
    );

    // A correctly signed callback whose amount differs from ours is not trusted either.
    let other_amount = callback_body("CB-2", "999", 2);
    s.signed_callback(&other_amount).await;
    assert_eq!(s.phase("CB-2").await, Phase::Accepted);

    // Signed by TarsPay but about another merchant's order under the same number.
    let other_merchant = callback_body_for("M9999999999", "CB-2", "100", 3);
    s.signed_callback(&other_merchant).await;
    // Signed, ours, but naming a different payOrderId than the one the gateway gave us.
    let other_order = sorted_compact_json(
        &json!({"bizType": 2, "mchNo": "M1234567890", "mchOrderNo": "CB-2",
        "payOrderId": "P9999999999999999999", "orderAmount": "100", "currency": "INR", "state": 3}),
    );
    s.signed_callback(&other_order).await;
    assert_eq!(s.phase("CB-2").await, Phase::Accepted);

    // Unknown orders: acknowledged, nothing recorded.
    let unknown = callback_body("NOT-OURS", "100", 2);
    let (status, _) = s
        .callback(
            &unknown,
            Some(&sign_callback(&system_key(), unknown.as_bytes())),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(s.app.deployment.order("NOT-OURS").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_callbacks_query_the_gateway_once_a_minute_per_order() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    accepted_order(&s, "CB-6").await;
    let body = callback_body("CB-6", "100", 2);
    let waiting_before = s.app.deployment.queue_stats().await.unwrap().waiting;
    let (status, _) = s.callback(&body, None).await;
    assert_eq!(status, StatusCode::OK);
    let waiting = s.app.deployment.queue_stats().await.unwrap().waiting;
    assert_eq!(waiting, waiting_before + 1, "a status query queued");
    // The query runs (the gateway says "processing"), so a new one would no longer be
    // shared with it.
    let pool = s.app.pool(2);
    let started = std::time::Instant::now();
    loop {
        let stats = s.app.deployment.queue_stats().await.unwrap();
        if stats.waiting == 0 && stats.pending == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "hang guard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.stop().await;
    // A flood of unsigned callbacks for the order within the minute queues nothing more.
    for _ in 0..5 {
        let (status, text) = s.callback(&body, None).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    }
    let stats = s.app.deployment.queue_stats().await.unwrap();
    assert_eq!(stats.waiting, 0, "no second query within the window");
    assert_eq!(s.phase("CB-6").await, Phase::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_for_a_number_the_gateway_holds_for_another_payout_change_nothing() {
    let s = served(|c| c.final_after = Duration::from_secs(3600), &[]).await;
    // The gateway already holds this number for 999 INR: our 100 INR payout is a conflict.
    assert!(s.app.sandbox.insert_payout(MCH_NO, "CF-1", "999", "INR"));
    s.app.enqueue(inr("CF-1", "100")).await;
    let ctx = s
        .app
        .deployment
        .job_context_for(&s.app.settings, "CF-1")
        .unwrap();
    tarspay_worker::jobs::run_create_payout(&ctx, "CF-1", None)
        .await
        .unwrap();
    assert_eq!(s.phase("CF-1").await, Phase::Conflict);
    let outcomes = s.app.deployment.outcome_count().await.unwrap();
    // TarsPay's signed word on its own order, which names no amount: not about ours.
    let body = sorted_compact_json(
        &json!({"bizType": 2, "mchNo": "M1234567890", "mchOrderNo": "CF-1", "state": 2}),
    );
    let (status, text) = s.signed_callback(&body).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    let record = s.app.deployment.order("CF-1").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Conflict);
    assert!(record.corrections.is_empty(), "{:?}", record.corrections);
    assert_eq!(s.app.deployment.outcome_count().await.unwrap(), outcomes);
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
async fn outcomes_of_a_served_deployment_are_posted_as_signed_webhooks_by_workers() {
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
    // Deliveries are jobs the workers run (not `serve`).
    let pool = s.app.pool(4);
    s.app.wait_outcomes(5).await;
    common::eventually("five webhooks delivered", || async {
        (seen.lock().unwrap().len() >= 5).then_some(())
    })
    .await;
    pool.stop().await;
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
        let message: Value = serde_json::from_str(body).unwrap();
        assert_eq!(message["type"], "payout.succeeded");
        assert_eq!(message["data"]["status"], "succeeded");
        assert!(id.starts_with("msg_"));
    }
}

/// Posts `body` as `content_type` to `path` with the token; the status and the parsed answer.
async fn post_as(s: &Served, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
    let response = s
        .post(path)
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post_csv(s: &Served, path: &str, body: &str) -> (StatusCode, Value) {
    post_as(s, path, "text/csv", body).await
}

async fn post_json(s: &Served, path: &str, body: &str) -> (StatusCode, Value) {
    post_as(s, path, "application/json", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_json_key_is_refused_everywhere_naming_it_and_nothing_is_queued() {
    let s = served(|_| {}, &[]).await;
    let amount_twice = r#"{"mchOrderNo":"DUP-1","amount":"100","amount":"45000","currency":"INR","wayCode":"UPI","customerName":"Asha","customerEmail":"asha@example.in","customerContact":"9876543210"}"#;
    let number_twice = r#"{"mchOrderNo":"DUP-2","mchOrderNo":"DUP-3","amount":"100","currency":"INR","wayCode":"UPI","customerName":"Asha","customerEmail":"asha@example.in","customerContact":"9876543210"}"#;
    for (body, key) in [(amount_twice, "amount"), (number_twice, "mchOrderNo")] {
        let (status, answer) = post_json(&s, "/v1/payouts", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(
            message.contains(&format!("duplicate key \"{key}\"")),
            "{message}"
        );
    }
    let (status, answer) = post_json(&s, "/v1/batches", &format!("[{amount_twice}]")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("duplicate key \"amount\" in the object at $[0]"),
        "{answer}"
    );
    // A signed callback repeating `state` is refused too, not read as whichever copy wins.
    let callback = r#"{"bizType":2,"currency":"INR","mchNo":"M1234567890","mchOrderNo":"DUP-1","orderAmount":"100","state":3,"state":2}"#;
    let signature = sign_callback(&system_key(), callback.as_bytes());
    let (status, text) = s.callback(callback, Some(&signature)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("duplicate key \"state\""), "{text}");
    for id in ["DUP-1", "DUP-2", "DUP-3"] {
        assert!(s.app.deployment.order(id).await.unwrap().is_none(), "{id}");
    }
    assert_eq!(s.app.deployment.queue_stats().await.unwrap().depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_routes_require_a_json_content_type() {
    let s = served(|_| {}, &[]).await;
    let body = inr("CT-1", "100").to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        for path in ["/v1/payouts", "/v1/batches"] {
            let mut request = s.post(path).body(body.clone());
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{path} with {content_type:?}"
            );
            let answer: Value = response.json().await.unwrap();
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("content-type: must be")
            );
        }
    }
    assert!(s.app.deployment.order("CT-1").await.unwrap().is_none());
    // Parameters and case do not matter.
    let json = s
        .post("/v1/payouts")
        .header("content-type", "Application/JSON; charset=utf-8");
    let status = json.body(body).send().await.unwrap().status();
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_amount_written_differently_is_the_same_payout() {
    let s = served(|_| {}, &[]).await;
    let (status, _) = post_json(&s, "/v1/payouts", &inr("NUM-1", "100").to_string()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, answer) = post_json(&s, "/v1/payouts", &inr("NUM-1", "100.00").to_string()).await;
    assert_eq!((status, &answer["amount"]), (StatusCode::OK, &json!("100")));
    let (status, answer) = post_json(&s, "/v1/payouts", &inr("NUM-1", "100.01").to_string()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["current"]["amount"], "100");
    assert_eq!(s.app.deployment.queue_stats().await.unwrap().depth(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_row_that_conflicts_answers_409_naming_it_like_the_single_route() {
    let s = served(|_| {}, &[]).await;
    let (status, _) = post_json(&s, "/v1/payouts", &inr("BC-1", "100").to_string()).await;
    assert_eq!(status, StatusCode::CREATED);
    // Only row conflicts: 409, as POST /v1/payouts would answer for it.
    let only = json!([inr("BC-1", "200")]).to_string();
    let (status, answer) = post_json(&s, "/v1/batches?batchId=conflict-1", &only).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["conflicting"], json!(["BC-1"]));
    assert_eq!(
        (answer["queued"].as_u64(), answer["existing"].as_u64()),
        (Some(0), Some(0))
    );
    let (status, _) = post_json(&s, "/v1/payouts", &inr("BC-1", "200").to_string()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A conflicting row among new ones: the others are queued, the conflict is named.
    let mixed = json!([inr("BC-1", "200"), inr("BC-2", "100")]).to_string();
    let (status, answer) = post_json(&s, "/v1/batches?batchId=conflict-2", &mixed).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(
        (answer["queued"].as_u64(), &answer["conflicting"]),
        (Some(1), &json!(["BC-1"]))
    );
    let record = s.app.deployment.order("BC-1").await.unwrap().unwrap();
    assert_eq!(record.amount, "100", "the conflicting row changed nothing");
    // The same rows again (the same payouts) are not a conflict: 201, nothing new.
    let same = json!([inr("BC-1", "100.00"), inr("BC-2", "100")]).to_string();
    let (status, answer) = post_json(&s, "/v1/batches?batchId=conflict-2", &same).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        (answer["queued"].as_u64(), answer["existing"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(s.app.deployment.queue_stats().await.unwrap().depth(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_callback_for_an_order_never_sent_only_schedules_a_query() {
    let s = served(|_| {}, &[]).await;
    s.app.enqueue(inr("NS-1", "100")).await;
    let waiting_before = s.app.deployment.queue_stats().await.unwrap().waiting;
    let body = callback_body("NS-1", "100", 3);
    let signature = sign_callback(&system_key(), body.as_bytes());
    let (status, text) = s.callback(&body, Some(&signature)).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "OK"));
    let record = s.app.deployment.order("NS-1").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Queued, "not applied as the outcome");
    assert_eq!(s.app.deployment.outcome_count().await.unwrap(), 0);
    assert_eq!(
        s.app.deployment.queue_stats().await.unwrap().waiting,
        waiting_before + 1,
        "a one-off status query is queued instead"
    );
}

/// A raw connection: writes `request`, then reads until the server answers and closes, or
/// `within` passes (then `None`).
async fn raw_exchange(url: &str, request: &[u8], within: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_requests_are_cut_off_over_raw_tcp() {
    let s = served(
        |_| {},
        &[
            ("TARSPAY_HEADER_READ_TIMEOUT", "1s"),
            ("TARSPAY_BODY_READ_TIMEOUT", "1s"),
        ],
    )
    .await;
    let within = Duration::from_secs(10);
    // Half a request head: the connection is closed once the header timeout passes.
    let started = std::time::Instant::now();
    let half = raw_exchange(
        &s.url,
        b"POST /tarspay/notify HTTP/1.1\r\nHost: x\r\n",
        within,
    )
    .await;
    assert!(
        half.is_some(),
        "a half-sent head must not hold the connection"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // A connection that sends nothing, or only HTTP/2's preface (`serve` speaks HTTP/1 only):
    // closed once the header timeout passes too.
    for (what, sent) in [
        ("nothing", &b""[..]),
        (
            "an HTTP/2 preface",
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        ),
    ] {
        let started = std::time::Instant::now();
        let answer = raw_exchange(&s.url, sent, within).await;
        assert!(answer.is_some(), "{what}: the connection was held");
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
    }
    // 10 MB announced, 2 bytes sent: 413 at once, on the public callback path and the API.
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for (path, auth) in [("/tarspay/notify", ""), ("/v1/payouts", auth.as_str())] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{}}"
        );
        let started = std::time::Instant::now();
        let answer = raw_exchange(&s.url, request.as_bytes(), within)
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path}: not refused before reading"
        );
    }
    // A body that stops short of its Content-Length: 408 after the body timeout.
    let request = "POST /tarspay/notify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"bizType\"";
    let answer = raw_exchange(&s.url, request.as_bytes(), within)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("x-request-id"), "{answer}");
    // The same on the console's login form, which anyone may post to, with the console's
    // headers.
    let request = "POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken=";
    let answer = raw_exchange(&s.url, request.as_bytes(), within)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-frame-options: deny"),
        "{answer}"
    );
    // The server still serves.
    let health = s.http.get(format!("{}/healthz", s.url)).send().await;
    assert_eq!(health.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id_the_callers_when_sane() {
    let s = served(|_| {}, &[]).await;
    let id_of = |response: &reqwest::Response| {
        response.headers()[tarspay_worker::server::REQUEST_ID_HEADER]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let url = format!("{}/healthz", s.url);
    let mine = s
        .http
        .get(&url)
        .header("x-request-id", "order-run-42")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&mine), "order-run-42");
    let generated = s.http.get(&url).send().await.unwrap();
    let other = s.http.get(&url).send().await.unwrap();
    assert_eq!(id_of(&generated).len(), 32);
    assert_ne!(id_of(&generated), id_of(&other));
    for insane in ["has space", &"x".repeat(65)] {
        let replaced = s
            .http
            .get(&url)
            .header("x-request-id", insane)
            .send()
            .await
            .unwrap();
        assert_ne!(id_of(&replaced), insane);
        assert_eq!(id_of(&replaced).len(), 32);
    }
    // Refusals carry one too (the token check runs inside the request's span).
    let refused = s
        .http
        .get(format!("{}/v1/payouts/X", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(id_of(&refused).len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrapes_send_redis_nothing() {
    let s = served(|_| {}, &[]).await;
    let mut redis = s.app.redis.conn().await;
    // A large stuck set (of orders that finished meanwhile) costs a scrape nothing more, and
    // is not pruned by one: the scrape reads nothing.
    let stuck: Vec<String> = (0..5_000).map(|i| format!("S-{i}")).collect();
    let _: () = redis::cmd("SADD")
        .arg(s.app.partition("S-0").ledger.keys().stuck())
        .arg(&stuck)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await
        .unwrap();
    let scrapes = 50;
    for _ in 0..scrapes {
        let text = s.public_text("/metrics").await;
        assert!(text.contains("tarspay_queue_waiting"));
    }
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .unwrap();
    let calls = |line: &str| -> u64 {
        line.split("calls=")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let total: u64 = info
        .lines()
        .filter(|line| line.starts_with("cmdstat_") && !line.starts_with("cmdstat_info"))
        .map(calls)
        .sum();
    // At most a background refresh or two (one pipeline each) ran meanwhile; not one per scrape.
    assert!(
        total < scrapes,
        "{total} commands for {scrapes} scrapes:\n{info}"
    );
    for write in [
        "cmdstat_srem",
        "cmdstat_hset",
        "cmdstat_del",
        "cmdstat_evalsha",
    ] {
        assert!(!info.contains(write), "a scrape wrote to Redis:\n{info}");
    }
}
