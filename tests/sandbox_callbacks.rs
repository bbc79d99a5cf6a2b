//! The sandbox's callbacks: signed with its system key, verifiable by the callback module,
//! resent until the merchant answers `OK`.

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::{eventually, outcome_rule, spawn_gateway};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarspay_worker::gateway::callback::{
    BizType, HEADER_SIGNATURE, parse_callback, verify_callback,
};
use tarspay_worker::gateway::types::CreatePayout;
use tarspay_worker::gateway::{OrderState, PrivateKey};
use tarspay_worker::money::Amount;

#[derive(Default)]
struct Received {
    calls: Vec<(String, Vec<u8>)>,
}

/// A merchant endpoint that answers "busy" to the first `refuse` calls, then "OK".
async fn spawn_receiver(refuse: usize) -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    async fn notify(
        State((seen, refuse)): State<(Arc<Mutex<Received>>, usize)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> &'static str {
        let signature = headers
            .get(HEADER_SIGNATURE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut seen = seen.lock().unwrap();
        seen.calls.push((signature, body.to_vec()));
        if seen.calls.len() <= refuse {
            "busy"
        } else {
            "OK"
        }
    }
    let app = Router::new()
        .route("/notify", post(notify))
        .with_state((received.clone(), refuse));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/notify", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn callbacks_are_signed_and_resent_until_ok() {
    let (url, received) = spawn_receiver(2).await;
    let gw = spawn_gateway(|c| {
        c.callbacks = true;
        c.callback_retry_delay = Duration::from_millis(20);
        c.final_after = Duration::from_millis(50);
        c.outcomes = vec![outcome_rule("FAIL", 3)];
    })
    .await;
    let system_key = gw.sandbox.system_public_key();
    gw.client
        .create_payout(&CreatePayout {
            mch_order_no: "FAIL-7".into(),
            way_code: "EWALLET_MPESA".into(),
            amount: Amount::parse("250").unwrap(),
            currency: "KES".into(),
            notify_url: url,
            fields: BTreeMap::new(),
        })
        .await
        .unwrap();
    let view = eventually("callback acknowledged", || async {
        gw.sandbox
            .order("FAIL-7")
            .filter(|v| v.callback_acknowledged)
    })
    .await;
    assert_eq!(view.callbacks_sent, 3, "two refusals, then OK");
    // The stamps keep the first send and the first OK, in order after the final state.
    let (first, acknowledged) = (
        view.first_callback_at_us.expect("a callback was sent"),
        view.callback_acknowledged_at_us.expect("and acknowledged"),
    );
    assert!(view.final_at_us.is_some_and(|at| at <= first) && first <= acknowledged);

    let calls = &received.lock().unwrap().calls;
    assert_eq!(calls.len(), 3);
    for (signature, body) in calls {
        assert!(
            verify_callback(&system_key, body, signature).is_some(),
            "callback verifies with the system key"
        );
        let forged = String::from_utf8(body.clone())
            .unwrap()
            .replace("\"state\":3", "\"state\":2");
        assert!(verify_callback(&system_key, forged.as_bytes(), signature).is_none());
        let other = PrivateKey::generate().public_key();
        assert!(verify_callback(&other, body, signature).is_none());
        let callback = parse_callback(body).unwrap();
        assert_eq!(callback.biz_type, BizType::Payout);
        assert_eq!(callback.state, OrderState::Failure);
        assert_eq!(callback.mch_order_no, "FAIL-7");
        assert_eq!(callback.order_amount.as_deref(), Some("250"));
        assert!(callback.fail_reason.is_some());
    }
    assert_eq!(calls[0].1, calls[2].1, "every resend carries the same body");
}

#[tokio::test]
async fn callbacks_stop_after_the_attempt_limit() {
    let (url, received) = spawn_receiver(usize::MAX).await;
    let gw = spawn_gateway(|c| {
        c.callbacks = true;
        c.callback_attempts = 4;
        c.callback_retry_delay = Duration::from_millis(5);
        c.final_after = Duration::from_millis(20);
    })
    .await;
    gw.client
        .create_payout(&CreatePayout {
            mch_order_no: "NEVER-OK".into(),
            way_code: "UPI".into(),
            amount: Amount::parse("100").unwrap(),
            currency: "INR".into(),
            notify_url: url,
            fields: BTreeMap::new(),
        })
        .await
        .unwrap();
    eventually("all sends made", || async {
        gw.sandbox
            .order("NEVER-OK")
            .filter(|v| v.callbacks_sent == 4)
    })
    .await;
    // Give a fifth send the chance to happen if the limit were broken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.lock().unwrap().calls.len(), 4);
    assert!(!gw.sandbox.order("NEVER-OK").unwrap().callback_acknowledged);
}

#[tokio::test]
async fn each_merchants_order_calls_back_its_own_notify_url() {
    let (url_a, received_a) = spawn_receiver(0).await;
    let (url_b, received_b) = spawn_receiver(0).await;
    let key_b = PrivateKey::generate();
    let mch_b = "M2222222222";
    let gw = spawn_gateway(|c| {
        c.callbacks = true;
        c.final_after = Duration::from_millis(50);
        c.merchants.push(tarspay_sandbox::SandboxMerchant::new(
            mch_b,
            key_b.public_key(),
            1_000u64.into(),
        ));
    })
    .await;
    let client_b =
        tarspay_worker::gateway::TarsPayClient::new(tarspay_worker::gateway::ClientSettings {
            base_url: gw.sandbox.url(),
            mch_no: mch_b.into(),
            private_key: key_b,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024,
        })
        .unwrap();
    let payout = |amount: &str, notify_url: &str| CreatePayout {
        mch_order_no: "SAME-1".into(),
        way_code: "UPI".into(),
        amount: Amount::parse(amount).unwrap(),
        currency: "INR".into(),
        notify_url: notify_url.to_owned(),
        fields: BTreeMap::new(),
    };
    gw.client
        .create_payout(&payout("100", &url_a))
        .await
        .unwrap();
    client_b
        .create_payout(&payout("200", &url_b))
        .await
        .unwrap();
    for mch_no in [common::MCH_NO, mch_b] {
        eventually("callback acknowledged", || async {
            gw.sandbox
                .order_of(mch_no, "SAME-1")
                .filter(|v| v.callback_acknowledged)
        })
        .await;
    }
    let system_key = gw.sandbox.system_public_key();
    for (received, mch_no, amount) in [
        (&received_a, common::MCH_NO, "100"),
        (&received_b, mch_b, "200"),
    ] {
        let calls = &received.lock().unwrap().calls;
        assert_eq!(calls.len(), 1, "{mch_no}");
        let (signature, body) = &calls[0];
        assert!(verify_callback(&system_key, body, signature).is_some());
        let callback = parse_callback(body).unwrap();
        assert_eq!(callback.mch_no.as_deref(), Some(mch_no));
        assert_eq!(callback.mch_order_no, "SAME-1");
        assert_eq!(callback.order_amount.as_deref(), Some(amount));
        assert_eq!(callback.state, OrderState::Success);
    }
}
