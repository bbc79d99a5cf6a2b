//! The TarsPay client against the sandbox over real HTTP on loopback: every endpoint, the
//! documented error codes, and every injected fault.

mod common;

use common::{MCH_NO, client_for, eventually, outcome_rule, spawn_gateway};
use std::collections::BTreeMap;
use std::time::Duration;
use tarspay_sandbox::{ContentEncoding, Endpoint, FaultAction};
use tarspay_worker::gateway::client::{HEADER_API_KEY, HEADER_NONCE, HEADER_SIGNATURE};
use tarspay_worker::gateway::params::Params;
use tarspay_worker::gateway::signing::RequestSigner;
use tarspay_worker::gateway::types::{CreateDeposit, CreatePayout, OrderRef};
use tarspay_worker::gateway::{CodeTable, ErrorClass, GatewayError, OrderState, PrivateKey, paths};
use tarspay_worker::money::Amount;

fn payout(id: &str, amount: &str) -> CreatePayout {
    CreatePayout {
        mch_order_no: id.into(),
        way_code: "UPI".into(),
        amount: Amount::parse(amount).unwrap(),
        currency: "INR".into(),
        notify_url: "http://127.0.0.1:9/notify".into(),
        fields: BTreeMap::from([("customerName".to_string(), "Asha".to_string())]),
    }
}

use common::fault_rule as fault;

fn by_id(id: &str) -> OrderRef {
    OrderRef::MchOrderNo(id.into())
}

#[tokio::test]
async fn payout_lifecycle_and_balance() {
    let gw = spawn_gateway(|c| {
        c.outcomes = vec![outcome_rule("REJ", 8)];
    })
    .await;
    let before = gw.client.balance().await.unwrap();
    assert_eq!(before.available_amount, "1000000");
    assert_eq!(before.mch_no.as_deref(), Some(MCH_NO));

    let accepted = gw
        .client
        .create_payout(&payout("OK-1", "150.25"))
        .await
        .unwrap();
    assert_eq!(accepted.mch_order_no, "OK-1");
    assert!(
        accepted.pay_order_id.starts_with('P') && accepted.pay_order_id.len() == 20,
        "{}",
        accepted.pay_order_id
    );

    let during = gw.client.balance().await.unwrap();
    assert_eq!(during.available_amount, "999849.75");
    assert_eq!(during.frozen_amount.as_deref(), Some("150.25"));
    let first = gw.client.query_payout(&by_id("OK-1")).await.unwrap();
    assert!(
        !first.state.is_final(),
        "fresh order is not final yet: {:?}",
        first.state
    );
    assert_eq!(first.order_amount.as_deref(), Some("150.25"));

    let done = eventually("payout success", || async {
        let info = gw.client.query_payout(&by_id("OK-1")).await.unwrap();
        info.state.is_final().then_some(info)
    })
    .await;
    assert_eq!(done.state, OrderState::Success);
    assert_eq!(done.pay_amount.as_deref(), Some("150.25"));
    let by_pay_id = gw
        .client
        .query_payout(&OrderRef::PayOrderId(accepted.pay_order_id.clone()))
        .await
        .unwrap();
    assert_eq!(by_pay_id.mch_order_no.as_deref(), Some("OK-1"));
    let proof = gw.client.payout_proof(&by_id("OK-1")).await.unwrap();
    assert_eq!(
        proof.pay_order_id.as_deref(),
        Some(accepted.pay_order_id.as_str())
    );
    assert!(proof.other.contains_key("proofUrl"));

    // A rejected payout gives the money back.
    gw.client
        .create_payout(&payout("REJ-1", "100"))
        .await
        .unwrap();
    let rejected = eventually("payout rejected", || async {
        let info = gw.client.query_payout(&by_id("REJ-1")).await.unwrap();
        info.state.is_final().then_some(info)
    })
    .await;
    assert_eq!(rejected.state, OrderState::Rejected);
    let after = gw.client.balance().await.unwrap();
    assert_eq!(after.available_amount, "999849.75");
    assert_eq!(after.frozen_amount.as_deref(), Some("0"));
    let err = gw.client.payout_proof(&by_id("REJ-1")).await.unwrap_err();
    assert_eq!(err.code(), Some(5003010));
}

#[tokio::test]
async fn deposit_lifecycle_with_chosen_final_states() {
    let gw = spawn_gateway(|c| {
        c.outcomes = vec![outcome_rule("EXP", 6), outcome_rule("PART", 9)];
    })
    .await;
    for (id, expected, paid) in [
        ("DEP-1", OrderState::Success, "200"),
        ("EXP-1", OrderState::Expired, "0"),
        ("PART-1", OrderState::Partial, "100"),
    ] {
        let created = gw
            .client
            .create_deposit(&CreateDeposit {
                mch_order_no: id.into(),
                way_code: "CASHIER".into(),
                amount: Amount::parse("200").unwrap(),
                currency: "MYR".into(),
                notify_url: "http://127.0.0.1:9/notify".into(),
                fields: BTreeMap::from([(
                    "returnUrl".to_string(),
                    "https://m.example/return".to_string(),
                )]),
            })
            .await
            .unwrap();
        assert_eq!(created.mch_order_no, id);
        assert!(created.pay_url.is_some() && created.expired_time.is_some());
        let info = eventually("deposit final", || async {
            let info = gw.client.query_deposit(&by_id(id)).await.unwrap();
            info.state.is_final().then_some(info)
        })
        .await;
        assert_eq!(info.state, expected, "{id}");
        assert_eq!(info.pay_amount.as_deref(), Some(paid), "{id}");
    }
    // A deposit is not a payout.
    assert_eq!(
        gw.client
            .query_payout(&by_id("DEP-1"))
            .await
            .unwrap_err()
            .code(),
        Some(5003020)
    );
    // Deposits leave the payout balance alone.
    assert_eq!(
        gw.client.balance().await.unwrap().available_amount,
        "1000000"
    );
}

#[tokio::test]
async fn documented_error_codes() {
    let gw = spawn_gateway(|c| c.merchants[0].balance = 500u64.into()).await;
    let table = CodeTable::default();

    gw.client
        .create_payout(&payout("DUP-1", "100"))
        .await
        .unwrap();
    let duplicate = gw
        .client
        .create_payout(&payout("DUP-1", "100"))
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Some(5003011));
    assert_eq!(duplicate.class(&table), ErrorClass::Reconcile);
    assert_eq!(gw.sandbox.create_attempts("DUP-1"), 2);
    assert_eq!(gw.sandbox.orders().len(), 1);

    let short = gw
        .client
        .create_payout(&payout("BIG-1", "401"))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Some(5004006));
    assert_eq!(short.class(&table), ErrorClass::Terminal);

    let missing = gw.client.query_payout(&by_id("NOPE")).await.unwrap_err();
    assert_eq!(missing.code(), Some(5003020));
    assert_eq!(
        gw.client
            .query_deposit(&by_id("NOPE"))
            .await
            .unwrap_err()
            .code(),
        Some(5003018)
    );

    // Unknown merchant key.
    let stranger = client_for(
        &gw.sandbox.url(),
        &PrivateKey::generate(),
        Duration::from_secs(5),
    );
    let unknown = stranger.balance().await.unwrap_err();
    assert_eq!(unknown.code(), Some(5003002));

    // Missing parameter and bad amount, through a correctly signed call.
    let mut params = Params::new();
    for (k, v) in [
        ("mchNo", MCH_NO),
        ("mchOrderNo", "RAW-1"),
        ("amount", "100"),
        ("currency", "INR"),
        ("notifyUrl", "http://x/n"),
    ] {
        params.insert(k, v);
    }
    let err = gw
        .client
        .call::<serde_json::Value>(paths::CREATE_PAYOUT, params.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(5003001));
    assert!(err.to_string().contains("wayCode"), "{err}");
    params.insert("wayCode", "UPI");
    params.insert("amount", "1e3");
    assert_eq!(
        gw.client
            .call::<serde_json::Value>(paths::CREATE_PAYOUT, params.clone())
            .await
            .unwrap_err()
            .code(),
        Some(500321)
    );
    params.insert("amount", "100");
    params.insert("currency", "KES");
    for fraction in ["100.5", "100.00"] {
        params.insert("amount", fraction);
        assert_eq!(
            gw.client
                .call::<serde_json::Value>(paths::CREATE_PAYOUT, params.clone())
                .await
                .unwrap_err()
                .code(),
            Some(500321),
            "{fraction}"
        );
    }
    params.insert("amount", "100");
    params.insert("notifyUrl", "ftp://x/n");
    assert_eq!(
        gw.client
            .call::<serde_json::Value>(paths::CREATE_PAYOUT, params)
            .await
            .unwrap_err()
            .code(),
        Some(5003012)
    );
    assert_eq!(
        gw.sandbox.orders().len(),
        1,
        "no rejected call created an order"
    );
}

/// Sends a hand-made request so headers and body can be tampered with.
async fn raw_call(
    url: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> serde_json::Value {
    let mut request = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json;charset=utf-8");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn signature_checks_refuse_tampering() {
    let gw = spawn_gateway(|_| {}).await;
    let signer = RequestSigner::new(gw.key.clone());
    let mut params = Params::new();
    params.insert("mchNo", MCH_NO);
    let now = tarspay_worker::wall_clock::now_ms().to_string();
    let signed = signer.sign(paths::BALANCE, &now, &params);
    let headers = |sig: &str, nonce: &str| {
        vec![
            (HEADER_API_KEY, signed.api_key.clone()),
            (HEADER_NONCE, nonce.to_owned()),
            (HEADER_SIGNATURE, sig.to_owned()),
        ]
    };
    let url = gw.sandbox.url();
    let good = raw_call(
        &url,
        paths::BALANCE,
        &headers(&signed.signature, &now),
        params.to_json_body(),
    )
    .await;
    assert_eq!(good["code"], 0, "{good}");

    // The same signature over a different body, path or nonce is refused.
    let mut other = params.clone();
    other.insert("extra", "1");
    let tampered_body = raw_call(
        &url,
        paths::BALANCE,
        &headers(&signed.signature, &now),
        other.to_json_body(),
    )
    .await;
    assert_eq!(tampered_body["code"], 5003008);
    let other_path = raw_call(
        &url,
        paths::QUERY_PAYOUT,
        &headers(&signed.signature, &now),
        params.to_json_body(),
    )
    .await;
    assert_eq!(other_path["code"], 5003008);
    let later = (now.parse::<u64>().unwrap() + 1).to_string();
    let other_nonce = raw_call(
        &url,
        paths::BALANCE,
        &headers(&signed.signature, &later),
        params.to_json_body(),
    )
    .await;
    assert_eq!(other_nonce["code"], 5003008);

    // A stale nonce is refused even when correctly signed.
    let stale = "1704180814988";
    let old = signer.sign(paths::BALANCE, stale, &params);
    let refused = raw_call(
        &url,
        paths::BALANCE,
        &headers(&old.signature, stale),
        params.to_json_body(),
    )
    .await;
    assert_eq!(refused["code"], 5003008);

    // Missing headers.
    let no_sig = raw_call(
        &url,
        paths::BALANCE,
        &[
            (HEADER_API_KEY, signed.api_key.clone()),
            (HEADER_NONCE, now.clone()),
        ],
        params.to_json_body(),
    )
    .await;
    assert_eq!(no_sig["code"], 5003001);
    // mchNo that does not belong to the key.
    let mut wrong = Params::new();
    wrong.insert("mchNo", "M9999999999");
    let wrong_sig = signer.sign(paths::BALANCE, &now, &wrong);
    let mismatch = raw_call(
        &url,
        paths::BALANCE,
        &headers(&wrong_sig.signature, &now),
        wrong.to_json_body(),
    )
    .await;
    assert_eq!(mismatch["code"], 5003002);
}

#[tokio::test]
async fn retryable_codes_apply_per_order_for_the_given_times() {
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "SYS",
                Endpoint::CreatePayout,
                Some(2),
                FaultAction::Code {
                    code: -1,
                    msg: None,
                },
            ),
            fault(
                "RCE",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Code {
                    code: 500323,
                    msg: Some("remote client error".into()),
                },
            ),
            fault(
                "SIG",
                Endpoint::CreatePayout,
                None,
                FaultAction::Code {
                    code: 5003008,
                    msg: None,
                },
            ),
        ];
    })
    .await;
    let table = CodeTable::default();
    for attempt in 0..2 {
        let err = gw
            .client
            .create_payout(&payout("SYS-1", "100"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(-1), "attempt {attempt}");
        assert_eq!(err.class(&table), ErrorClass::Retryable);
        assert!(!err.is_ambiguous());
    }
    gw.client
        .create_payout(&payout("SYS-1", "100"))
        .await
        .unwrap();
    // Counters are per order: another SYS order sees its own two faults.
    assert_eq!(
        gw.client
            .create_payout(&payout("SYS-2", "100"))
            .await
            .unwrap_err()
            .code(),
        Some(-1)
    );

    let rce = gw
        .client
        .create_payout(&payout("RCE-1", "100"))
        .await
        .unwrap_err();
    assert_eq!(
        rce,
        GatewayError::Gateway {
            endpoint: paths::CREATE_PAYOUT,
            code: 500323,
            msg: "remote client error".into()
        }
    );
    gw.client
        .create_payout(&payout("RCE-1", "100"))
        .await
        .unwrap();

    for _ in 0..3 {
        let sig = gw
            .client
            .create_payout(&payout("SIG-1", "100"))
            .await
            .unwrap_err();
        assert_eq!(sig.code(), Some(5003008));
        assert_eq!(sig.class(&table), ErrorClass::Terminal);
    }
    assert!(gw.sandbox.order("SIG-1").is_none());
    assert_eq!(gw.sandbox.create_attempts("SIG-1"), 3);
}

#[tokio::test]
async fn commit_then_drop_is_ambiguous_and_the_order_exists() {
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "CTD",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::CommitThenDrop,
            ),
            fault("DROP", Endpoint::CreatePayout, Some(1), FaultAction::Drop),
        ];
    })
    .await;
    let err = gw
        .client
        .create_payout(&payout("CTD-1", "100"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            GatewayError::Ambiguous {
                timed_out: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_ambiguous());
    assert!(
        gw.sandbox.order("CTD-1").is_some(),
        "the gateway committed before dropping"
    );
    // Reconciling: the query finds it; a re-send of the same create is refused as a duplicate.
    assert_eq!(
        gw.client
            .query_payout(&by_id("CTD-1"))
            .await
            .unwrap()
            .mch_order_no
            .as_deref(),
        Some("CTD-1")
    );
    assert_eq!(
        gw.client
            .create_payout(&payout("CTD-1", "100"))
            .await
            .unwrap_err()
            .code(),
        Some(5003011)
    );
    assert_eq!(gw.sandbox.orders().len(), 1);

    let err = gw
        .client
        .create_payout(&payout("DROP-1", "100"))
        .await
        .unwrap_err();
    assert!(err.is_ambiguous(), "{err:?}");
    assert!(
        gw.sandbox.order("DROP-1").is_none(),
        "dropped before handling: no order"
    );
    assert_eq!(
        gw.client
            .query_payout(&by_id("DROP-1"))
            .await
            .unwrap_err()
            .code(),
        Some(5003020)
    );
    gw.client
        .create_payout(&payout("DROP-1", "100"))
        .await
        .unwrap();
}

#[tokio::test]
async fn slow_answer_beyond_the_client_timeout_after_commit() {
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "SLOW",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Slow { ms: 3_000 },
            ),
            fault(
                "LAT",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Latency { ms: 50 },
            ),
        ];
    })
    .await;
    let impatient = client_for(&gw.sandbox.url(), &gw.key, Duration::from_millis(300));
    let err = impatient
        .create_payout(&payout("SLOW-1", "100"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            GatewayError::Ambiguous {
                timed_out: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), "timeout");
    assert!(gw.sandbox.order("SLOW-1").is_some());
    // Latency within the timeout is just a slower success.
    gw.client
        .create_payout(&payout("LAT-1", "100"))
        .await
        .unwrap();
}

#[tokio::test]
async fn http_errors_bad_envelopes_and_oversized_answers() {
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "B502",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Http {
                    status: 502,
                    commit: false,
                    body: None,
                },
            ),
            fault(
                "C502",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Http {
                    status: 502,
                    commit: true,
                    body: None,
                },
            ),
            fault(
                "E404",
                Endpoint::QueryPayout,
                Some(1),
                FaultAction::Http {
                    status: 404,
                    commit: false,
                    body: Some("not here".into()),
                },
            ),
            fault(
                "HTML",
                Endpoint::QueryPayout,
                None,
                FaultAction::Raw {
                    body: "<html>maintenance</html>".into(),
                },
            ),
            fault(
                "NODATA",
                Endpoint::QueryPayout,
                None,
                FaultAction::Raw {
                    body: r#"{"code":0,"msg":"SUCCESS"}"#.into(),
                },
            ),
            fault(
                "BADDATA",
                Endpoint::QueryPayout,
                None,
                FaultAction::Raw {
                    body: r#"{"code":0,"data":{"state":"x","mchOrderNo":"B"}}"#.into(),
                },
            ),
            fault(
                "BIG",
                Endpoint::QueryPayout,
                None,
                FaultAction::Oversize { bytes: 200_000 },
            ),
        ];
    })
    .await;
    let table = CodeTable::default();
    let bad_gateway = gw
        .client
        .create_payout(&payout("B502-1", "100"))
        .await
        .unwrap_err();
    match &bad_gateway {
        GatewayError::Http {
            status, snippet, ..
        } => {
            assert_eq!(*status, 502);
            assert!(snippet.contains("502 Bad Gateway"), "{snippet}");
        }
        other => panic!("expected Http, got {other:?}"),
    }
    assert!(bad_gateway.is_ambiguous());
    assert_eq!(bad_gateway.class(&table), ErrorClass::Retryable);
    assert!(gw.sandbox.order("B502-1").is_none());
    gw.client
        .create_payout(&payout("C502-1", "100"))
        .await
        .unwrap_err();
    assert!(
        gw.sandbox.order("C502-1").is_some(),
        "a 502 after commit leaves the order"
    );

    let not_found = gw.client.query_payout(&by_id("E404-1")).await.unwrap_err();
    assert!(matches!(not_found, GatewayError::Http { status: 404, .. }));
    assert!(!not_found.is_ambiguous());
    for (id, needle) in [
        ("HTML-1", "not JSON"),
        ("NODATA-1", "without `data`"),
        ("BADDATA-1", "unexpected `data`"),
    ] {
        let err = gw.client.query_payout(&by_id(id)).await.unwrap_err();
        assert!(matches!(err, GatewayError::Decode { .. }), "{id}: {err:?}");
        assert!(err.to_string().contains(needle), "{id}: {err}");
    }
    let big = gw.client.query_payout(&by_id("BIG-1")).await.unwrap_err();
    assert_eq!(
        big,
        GatewayError::TooLarge {
            endpoint: paths::QUERY_PAYOUT,
            limit: 64 * 1024
        }
    );
}

/// A gateway (or a proxy before it) may compress its answers, asked or not: they are decoded,
/// and the response size limit counts decoded bytes.
#[tokio::test]
async fn compressed_answers_are_decoded_and_limited_by_their_decoded_size() {
    let compressed = |encoding, padding| FaultAction::Compressed { encoding, padding };
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "GZ",
                Endpoint::Any,
                None,
                compressed(ContentEncoding::Gzip, None),
            ),
            fault(
                "DF",
                Endpoint::Any,
                None,
                compressed(ContentEncoding::Deflate, None),
            ),
            fault(
                "BOMB",
                Endpoint::QueryPayout,
                None,
                compressed(ContentEncoding::Gzip, Some(5_000_000)),
            ),
        ];
    })
    .await;
    for id in ["GZ-1", "DF-1"] {
        let accepted = gw.client.create_payout(&payout(id, "100")).await.unwrap();
        assert_eq!(accepted.mch_order_no, id);
        let info = gw.client.query_payout(&by_id(id)).await.unwrap();
        assert_eq!(info.mch_order_no.as_deref(), Some(id));
        assert_eq!(info.order_amount.as_deref(), Some("100"));
    }

    // On the wire they are compressed, even to a client that does not take compression.
    let plain = reqwest::Client::builder()
        .no_gzip()
        .no_deflate()
        .build()
        .unwrap();
    let signer = RequestSigner::new(gw.key.clone());
    for (id, encoding, magic) in [("GZ-1", "gzip", 0x1f), ("DF-1", "deflate", 0x78)] {
        let mut params = Params::new();
        params.insert("mchNo", MCH_NO);
        params.insert("mchOrderNo", id);
        let nonce = tarspay_worker::wall_clock::now_ms().to_string();
        let signed = signer.sign(paths::QUERY_PAYOUT, &nonce, &params);
        let response = plain
            .post(format!("{}{}", gw.sandbox.url(), paths::QUERY_PAYOUT))
            .header("content-type", "application/json;charset=utf-8")
            .header(HEADER_API_KEY, signed.api_key)
            .header(HEADER_NONCE, nonce)
            .header(HEADER_SIGNATURE, signed.signature)
            .body(params.to_json_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-encoding"], encoding, "{id}");
        let body = response.bytes().await.unwrap();
        assert_eq!(body.first(), Some(&magic), "{id}: not compressed");
    }

    // 5 MB decoded, a few KiB on the wire: refused at the 64 KiB limit.
    let bomb = gw.client.query_payout(&by_id("BOMB-1")).await.unwrap_err();
    assert_eq!(
        bomb,
        GatewayError::TooLarge {
            endpoint: paths::QUERY_PAYOUT,
            limit: 64 * 1024
        }
    );
}

#[tokio::test]
async fn unreachable_gateway_is_not_ambiguous() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = client_for(&url, &PrivateKey::generate(), Duration::from_secs(2));
    let err = client.balance().await.unwrap_err();
    assert!(matches!(err, GatewayError::Unreachable { .. }), "{err:?}");
    assert!(!err.is_ambiguous());
    assert_eq!(err.class(&CodeTable::default()), ErrorClass::Retryable);
}

#[tokio::test]
async fn connections_are_reused() {
    let gw = spawn_gateway(|_| {}).await;
    for _ in 0..20 {
        gw.client.balance().await.unwrap();
    }
    let clone = gw.client.clone();
    clone.balance().await.unwrap();
    assert_eq!(
        gw.sandbox.connections_accepted(),
        1,
        "sequential calls, clones included, share one pooled connection"
    );
}

#[tokio::test]
async fn codes_on_error_statuses_decide_and_redirects_are_not_followed() {
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "C400",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Http {
                    status: 400,
                    commit: false,
                    body: Some(
                        r#"{"code":5003011,"msg":"merchant order number already exists"}"#.into(),
                    ),
                },
            ),
            fault(
                "R302",
                Endpoint::CreatePayout,
                Some(1),
                FaultAction::Http {
                    status: 302,
                    commit: false,
                    body: Some(String::new()),
                },
            ),
        ];
    })
    .await;
    let coded = gw
        .client
        .create_payout(&payout("C400-1", "100"))
        .await
        .unwrap_err();
    assert_eq!(coded.code(), Some(5003011), "{coded:?}");
    assert_eq!(coded.class(&CodeTable::default()), ErrorClass::Reconcile);
    let redirected = gw
        .client
        .create_payout(&payout("R302-1", "100"))
        .await
        .unwrap_err();
    assert!(
        matches!(redirected, GatewayError::Http { status: 302, .. }),
        "{redirected:?}"
    );
    assert_eq!(
        redirected.class(&CodeTable::default()),
        ErrorClass::Retryable
    );
}

#[tokio::test]
async fn lagging_lookups_miss_a_fresh_order_until_the_lag_is_over() {
    let lag = Duration::from_millis(1_500);
    let gw = spawn_gateway(|c| {
        c.final_after = Duration::from_secs(30);
        c.faults = vec![fault(
            "LAG",
            Endpoint::QueryPayout,
            None,
            FaultAction::LookupLag {
                ms: lag.as_millis() as u64,
            },
        )];
    })
    .await;
    let started = std::time::Instant::now();
    gw.client
        .create_payout(&payout("LAG-1", "100"))
        .await
        .unwrap();
    assert!(gw.sandbox.order("LAG-1").is_some(), "the create committed");
    let missed = gw.client.query_payout(&by_id("LAG-1")).await.unwrap_err();
    assert_eq!(
        missed,
        GatewayError::Gateway {
            endpoint: paths::QUERY_PAYOUT,
            code: 5003020,
            msg: "failed to query pay-out order".into()
        },
        "answered as for an unknown order"
    );
    // Other orders are found at once.
    gw.client
        .create_payout(&payout("NOW-1", "100"))
        .await
        .unwrap();
    assert_eq!(
        gw.client
            .query_payout(&by_id("NOW-1"))
            .await
            .unwrap()
            .mch_order_no
            .as_deref(),
        Some("NOW-1")
    );
    // The lag ends: the order is found, and not before the lag was over.
    let found = eventually("lookup after the lag", || async {
        gw.client.query_payout(&by_id("LAG-1")).await.ok()
    })
    .await;
    assert!(
        started.elapsed() >= lag,
        "found after {:?}",
        started.elapsed()
    );
    assert_eq!(found.mch_order_no.as_deref(), Some("LAG-1"));
    assert_eq!(found.order_amount.as_deref(), Some("100"));
    assert_eq!(gw.sandbox.create_attempts("LAG-1"), 1);
}

#[tokio::test]
async fn a_repeated_create_can_be_refused_before_the_duplicate_check() {
    let refuse = |prefix: &str, code: i64| {
        fault(
            prefix,
            Endpoint::CreatePayout,
            None,
            FaultAction::RefuseRepeat { code, msg: None },
        )
    };
    let gw = spawn_gateway(|c| {
        c.final_after = Duration::from_secs(30);
        c.faults = vec![
            refuse("BAL", 5004006),
            refuse("EXP", 5003006),
            refuse("IP", 5003007),
        ];
    })
    .await;
    let table = CodeTable::default();
    for (id, code, msg) in [
        ("BAL-1", 5004006, "merchant balance insufficient"),
        ("EXP-1", 5003006, "API key expired"),
        ("IP-1", 5003007, "IP error"),
    ] {
        // A first create is handled as usual.
        let accepted = gw.client.create_payout(&payout(id, "100")).await.unwrap();
        let held = gw.sandbox.order(id).unwrap();
        let balance = gw.client.balance().await.unwrap();
        let err = gw
            .client
            .create_payout(&payout(id, "100"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(code), "{id}: {err:?}");
        assert!(err.to_string().contains(msg), "{id}: {err}");
        assert_eq!(err.class(&table), ErrorClass::Terminal, "{id}");
        // The held order is untouched: same order, same money.
        let after = gw.sandbox.order(id).unwrap();
        assert_eq!(after.pay_order_id, accepted.pay_order_id, "{id}");
        assert_eq!(
            (after.amount.as_str(), after.state),
            (held.amount.as_str(), held.state)
        );
        assert_eq!(gw.client.balance().await.unwrap(), balance, "{id}");
        assert_eq!(gw.sandbox.create_attempts(id), 2, "{id}");
        assert_eq!(
            gw.client
                .query_payout(&by_id(id))
                .await
                .unwrap()
                .pay_order_id,
            Some(accepted.pay_order_id)
        );
    }
    // Without the rule a repeat is the documented duplicate.
    gw.client
        .create_payout(&payout("DUP-1", "100"))
        .await
        .unwrap();
    assert_eq!(
        gw.client
            .create_payout(&payout("DUP-1", "100"))
            .await
            .unwrap_err()
            .code(),
        Some(5003011)
    );
    assert_eq!(gw.sandbox.orders().len(), 4);
}

#[tokio::test]
async fn amounts_sent_as_json_numbers_keep_their_exact_text() {
    let gw = spawn_gateway(|c| {
        c.faults = vec![
            fault(
                "NUM",
                Endpoint::QueryPayout,
                None,
                FaultAction::Raw {
                    body: r#"{"code":0,"msg":"SUCCESS","data":{"mchOrderNo":"NUM-1","payOrderId":"P1681112064487976961","orderAmount":100.10,"payAmount":100.10,"fee":1.50,"currency":"INR","state":2}}"#.into(),
                },
            ),
            fault(
                "",
                Endpoint::Balance,
                None,
                FaultAction::Raw {
                    body: r#"{"code":0,"msg":"SUCCESS","data":{"availableAmount":2500.50,"frozenAmount":0.00}}"#.into(),
                },
            ),
        ];
    })
    .await;
    let info = gw.client.query_payout(&by_id("NUM-1")).await.unwrap();
    assert_eq!(info.order_amount.as_deref(), Some("100.10"));
    assert_eq!(info.pay_amount.as_deref(), Some("100.10"));
    assert_eq!(info.fee.as_deref(), Some("1.50"));
    let balance = gw.client.balance().await.unwrap();
    assert_eq!(balance.available_amount, "2500.50");
    assert_eq!(balance.frozen_amount.as_deref(), Some("0.00"));
}

/// A create is sent only if the whole call can finish before the caller's deadline (the end of
/// its submit lease): a worker that stalled past its lease gets `NotSent`, and the gateway sees
/// nothing, so it cannot double a create another worker has taken over.
#[tokio::test]
async fn a_create_past_its_deadline_is_not_sent() {
    let gw = spawn_gateway(|_| {}).await;
    let request_timeout = Duration::from_secs(5);
    let client = client_for(&gw.sandbox.url(), &gw.key, request_timeout);

    // The lease ends sooner than a whole call could take: refused before it leaves.
    let too_late = std::time::Instant::now() + request_timeout - Duration::from_millis(1);
    let err = client
        .create_payout_within(&payout("LEASE-1", "100"), too_late)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::NotSent { .. }), "{err:?}");
    assert!(
        !err.is_ambiguous(),
        "nothing was sent, so nothing may exist"
    );
    assert_eq!(err.kind(), "not_sent");
    assert_eq!(gw.sandbox.create_attempts("LEASE-1"), 0);
    assert!(gw.sandbox.orders().is_empty());

    // With time to spare it is an ordinary create.
    let in_time = std::time::Instant::now() + request_timeout * 3;
    client
        .create_payout_within(&payout("LEASE-1", "100"), in_time)
        .await
        .unwrap();
    assert_eq!(gw.sandbox.create_attempts("LEASE-1"), 1);
}

/// `GET /sandbox/orders` stamps each order (µs since the epoch, the host's wall clock) when
/// it was created and when it turned final, for latency measurements across processes; the
/// callback stamps are there and null when callbacks are off.
#[tokio::test]
async fn orders_report_wall_clock_stamps() {
    let gw = spawn_gateway(|c| c.final_after = Duration::from_millis(50)).await;
    let now_us = || tarspay_worker::wall_clock::since_epoch().as_micros() as u64;
    let before = now_us();
    gw.client
        .create_payout(&payout("STAMP-1", "10"))
        .await
        .unwrap();
    let after = now_us();
    tarspay_worker::gateway::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("{}/sandbox/orders", gw.sandbox.url());
    let stamps = || async {
        let orders: Vec<serde_json::Value> =
            http.get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(orders.len(), 1, "{orders:?}");
        orders[0].clone()
    };
    let fresh = stamps().await;
    let created = fresh["createdAtUs"].as_u64().expect("createdAtUs");
    assert!((before..=after).contains(&created), "{fresh}");
    // Null or a stamp (the machine may be slow enough for the order to be final already).
    assert!(fresh.get("finalAtUs").is_some(), "{fresh}");

    let done = eventually("the order turns final", || async {
        let order = stamps().await;
        order["finalAtUs"].is_u64().then_some(order)
    })
    .await;
    assert!(done["finalAtUs"].as_u64().unwrap() >= created, "{done}");
    assert_eq!(done["createdAtUs"], fresh["createdAtUs"]);
    for field in ["firstCallbackAtUs", "callbackAcknowledgedAtUs"] {
        assert!(
            done.get(field).is_some_and(|v| v.is_null()),
            "{field}: {done}"
        );
    }
    let view = gw.sandbox.order("STAMP-1").unwrap();
    assert_eq!(view.created_at_us, created);
    assert_eq!(view.final_at_us, done["finalAtUs"].as_u64());
}

const MCH_B: &str = "M2222222222";

/// A client signing as `mch_no` with `key`.
fn client_as(url: &str, mch_no: &str, key: &PrivateKey) -> tarspay_worker::gateway::TarsPayClient {
    tarspay_worker::gateway::TarsPayClient::new(tarspay_worker::gateway::ClientSettings {
        base_url: url.to_owned(),
        mch_no: mch_no.into(),
        private_key: key.clone(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        max_response_bytes: 64 * 1024,
    })
    .unwrap()
}

/// A signed request prepared ahead (so a burst of them leaves at once).
struct SignedRequest {
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn sign_request(key: &PrivateKey, path: &'static str, fields: &[(&str, &str)]) -> SignedRequest {
    let mut params = Params::new();
    for (name, value) in fields {
        params.insert(*name, *value);
    }
    let nonce = tarspay_worker::wall_clock::now_ms().to_string();
    let signed = RequestSigner::new(key.clone()).sign(path, &nonce, &params);
    SignedRequest {
        path,
        headers: vec![
            (HEADER_API_KEY, signed.api_key),
            (HEADER_NONCE, nonce),
            (HEADER_SIGNATURE, signed.signature),
        ],
        body: params.to_json_body(),
    }
}

/// Sends a signed request; the status, the `Retry-After` header and the body.
async fn send_signed(
    http: &reqwest::Client,
    url: &str,
    request: SignedRequest,
) -> (u16, Option<String>, serde_json::Value) {
    let mut builder = http
        .post(format!("{url}{}", request.path))
        .header("content-type", "application/json;charset=utf-8");
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let response = builder.body(request.body).send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, response.json().await.unwrap())
}

fn payout_fields<'a>(mch_no: &'a str, id: &'a str, amount: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("mchNo", mch_no),
        ("mchOrderNo", id),
        ("wayCode", "UPI"),
        ("amount", amount),
        ("currency", "INR"),
        ("notifyUrl", "http://127.0.0.1:9/notify"),
    ]
}

/// A sandbox report read over HTTP, as JSON.
async fn get_json(http: &reqwest::Client, url: String) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn merchants_have_their_own_keys_balances_and_orders() {
    let key_b = PrivateKey::generate();
    let gw = spawn_gateway(|c| {
        c.final_after = Duration::from_secs(60);
        c.merchants.push(tarspay_sandbox::SandboxMerchant::new(
            MCH_B,
            key_b.public_key(),
            500u64.into(),
        ));
        c.balances.push(tarspay_sandbox::CurrencyBalance {
            mch_no: MCH_NO.into(),
            currency: "KES".into(),
            available: 150u64.into(),
        });
    })
    .await;
    let url = gw.sandbox.url();
    let a = &gw.client;
    let b = client_as(&url, MCH_B, &key_b);
    assert_eq!(
        gw.sandbox.merchants(),
        vec![MCH_NO.to_owned(), MCH_B.to_owned()]
    );

    // The same mchOrderNo under two merchants is two orders; a duplicate is per merchant.
    a.create_payout(&payout("SAME-1", "100")).await.unwrap();
    b.create_payout(&payout("SAME-1", "200")).await.unwrap();
    a.create_payout(&payout("A-ONLY", "1")).await.unwrap();
    for client in [a, &b] {
        let duplicate = client
            .create_payout(&payout("SAME-1", "1"))
            .await
            .unwrap_err();
        assert_eq!(duplicate.code(), Some(5003011));
    }
    assert_eq!(gw.sandbox.orders().len(), 3);
    assert_eq!(gw.sandbox.orders_of(MCH_B).len(), 1);
    let of_b = gw.sandbox.order_of(MCH_B, "SAME-1").unwrap();
    assert_eq!((of_b.mch_no.as_str(), of_b.amount.as_str()), (MCH_B, "200"));
    assert_eq!(gw.sandbox.order_of(MCH_NO, "SAME-1").unwrap().amount, "100");
    assert_eq!(gw.sandbox.create_attempts_of(MCH_B, "SAME-1"), 2);
    assert_eq!(
        gw.sandbox.create_attempts("SAME-1"),
        4,
        "both merchants' creates"
    );

    // Each sees only its own orders and balance.
    let seen_by_a = a.query_payout(&by_id("SAME-1")).await.unwrap();
    assert_eq!(seen_by_a.order_amount.as_deref(), Some("100"));
    let seen_by_b = b.query_payout(&by_id("SAME-1")).await.unwrap();
    assert_eq!(seen_by_b.order_amount.as_deref(), Some("200"));
    assert_eq!(
        b.query_payout(&by_id("A-ONLY")).await.unwrap_err().code(),
        Some(5003020),
        "B cannot see A's order"
    );
    let a_only_pay_id = gw.sandbox.order_of(MCH_NO, "A-ONLY").unwrap().pay_order_id;
    assert_eq!(
        b.query_payout(&OrderRef::PayOrderId(a_only_pay_id))
            .await
            .unwrap_err()
            .code(),
        Some(5003020),
        "nor by its payOrderId"
    );
    let balance_a = a.balance().await.unwrap();
    assert_eq!(balance_a.mch_no.as_deref(), Some(MCH_NO));
    assert_eq!(balance_a.available_amount, "999899");
    let balance_b = b.balance().await.unwrap();
    assert_eq!(balance_b.mch_no.as_deref(), Some(MCH_B));
    assert_eq!(balance_b.available_amount, "300");
    assert_eq!(balance_b.frozen_amount.as_deref(), Some("200"));
    assert_eq!(
        b.create_payout(&payout("B-BIG", "301"))
            .await
            .unwrap_err()
            .code(),
        Some(5004006),
        "B's own balance decides"
    );

    // A's KES has an account of its own: KES payouts draw on it, not on the shared one.
    let kes = |id: &str| CreatePayout {
        currency: "KES".into(),
        way_code: "EWALLET_MPESA".into(),
        ..payout(id, "100")
    };
    a.create_payout(&kes("KES-1")).await.unwrap();
    assert_eq!(
        a.create_payout(&kes("KES-2")).await.unwrap_err().code(),
        Some(5004006)
    );
    assert_eq!(gw.sandbox.balance_in(MCH_NO, "KES").as_deref(), Some("50"));
    assert_eq!(
        gw.sandbox.balance_in(MCH_NO, "INR").as_deref(),
        Some("999899")
    );
    assert_eq!(gw.sandbox.balance(MCH_NO).as_deref(), Some("999899"));
    let http = reqwest::Client::new();
    let (_, _, kes_balance) = send_signed(
        &http,
        &url,
        sign_request(
            &gw.key,
            paths::BALANCE,
            &[("mchNo", MCH_NO), ("currency", "KES")],
        ),
    )
    .await;
    assert_eq!(
        kes_balance["data"]["availableAmount"], "50",
        "{kes_balance}"
    );
    assert_eq!(kes_balance["data"]["frozenAmount"], "100", "{kes_balance}");
    assert_eq!(kes_balance["data"]["currency"], "KES", "{kes_balance}");

    // A's key with B's mchNo is refused, and changes nothing of B's.
    let (_, _, crossed) = send_signed(
        &http,
        &url,
        sign_request(
            &gw.key,
            paths::CREATE_PAYOUT,
            &payout_fields(MCH_B, "CROSS-1", "1"),
        ),
    )
    .await;
    assert_eq!(crossed["code"], 5003002, "{crossed}");
    // B's key with A's mchNo too.
    let (_, _, crossed) = send_signed(
        &http,
        &url,
        sign_request(&key_b, paths::BALANCE, &[("mchNo", MCH_NO)]),
    )
    .await;
    assert_eq!(crossed["code"], 5003002, "{crossed}");
    assert!(gw.sandbox.order_of(MCH_B, "CROSS-1").is_none());
    assert_eq!(gw.sandbox.balance(MCH_B).as_deref(), Some("300"));

    // A merchant added at run time, with balances of its own, over HTTP.
    let key_c = PrivateKey::generate();
    let mch_c = "M3333333333";
    let added = http
        .post(format!("{url}/sandbox/merchants"))
        .json(&serde_json::json!({
            "mchNo": mch_c,
            "publicKey": key_c.public_key().to_hex(),
            "balance": "10",
            "balances": {"INR": "1000"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 204);
    let c = client_as(&url, mch_c, &key_c);
    c.create_payout(&payout("SAME-1", "999")).await.unwrap();
    assert_eq!(c.balance().await.unwrap().available_amount, "10");
    assert_eq!(gw.sandbox.balance_in(mch_c, "INR").as_deref(), Some("1"));
    let set = http
        .put(format!("{url}/sandbox/merchants/{mch_c}/balance"))
        .json(&serde_json::json!({"currency": "INR", "available": "5000"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 204);
    assert_eq!(gw.sandbox.balance_in(mch_c, "INR").as_deref(), Some("5000"));
    let unknown = http
        .put(format!("{url}/sandbox/merchants/M0000000000/balance"))
        .json(&serde_json::json!({"available": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad_key = http
        .post(format!("{url}/sandbox/merchants"))
        .json(&serde_json::json!({"mchNo": "M4", "publicKey": "02zz"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 422);
    let listed: serde_json::Value =
        get_json(&http, format!("{url}/sandbox/merchants/{mch_c}")).await;
    assert_eq!(listed["balances"][1]["currency"], "INR", "{listed}");
    assert_eq!(listed["balances"][1]["frozen"], "999", "{listed}");
    let orders_of_c: serde_json::Value =
        get_json(&http, format!("{url}/sandbox/orders?mchNo={mch_c}")).await;
    assert_eq!(orders_of_c.as_array().unwrap().len(), 1, "{orders_of_c}");
    assert_eq!(orders_of_c[0]["amount"], "999", "{orders_of_c}");
}

#[tokio::test]
async fn calls_beyond_a_merchants_rate_limit_get_429_and_change_nothing() {
    const CALLS: usize = 20;
    let (rate, burst) = (5.0, 5u32);
    let key_b = PrivateKey::generate();
    let gw = spawn_gateway(|c| {
        c.final_after = Duration::from_secs(60);
        c.merchants.push(tarspay_sandbox::SandboxMerchant::new(
            MCH_B,
            key_b.public_key(),
            1_000u64.into(),
        ));
        c.rate_limits.insert(
            MCH_NO.into(),
            tarspay_sandbox::RateLimit {
                per_second: rate,
                burst,
            },
        );
    })
    .await;
    let url = gw.sandbox.url();
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..CALLS).map(|i| format!("RL-{i:02}")).collect();
    // Signed ahead, then all sent at once.
    let requests: Vec<SignedRequest> = ids
        .iter()
        .map(|id| {
            sign_request(
                &gw.key,
                paths::CREATE_PAYOUT,
                &payout_fields(MCH_NO, id, "10"),
            )
        })
        .collect();
    let mut burst_calls = tokio::task::JoinSet::new();
    for (id, request) in ids.iter().cloned().zip(requests) {
        let (http, url) = (http.clone(), url.clone());
        burst_calls.spawn(async move { (id, send_signed(&http, &url, request).await) });
    }
    let answers = burst_calls.join_all().await;
    let (mut accepted, mut limited) = (Vec::new(), Vec::new());
    for (id, (status, retry_after, body)) in answers {
        if status == 429 {
            let secs: u64 = retry_after
                .as_deref()
                .unwrap_or_else(|| panic!("429 without Retry-After: {body}"))
                .parse()
                .unwrap();
            assert!(secs >= 1, "Retry-After {secs}");
            assert_eq!(body["code"], tarspay_sandbox::RATE_LIMITED_CODE, "{body}");
            assert!(
                body["msg"].as_str().unwrap().contains("too many requests"),
                "{body}"
            );
            limited.push(id);
        } else {
            assert_eq!(
                (status, &body["code"]),
                (200, &serde_json::json!(0)),
                "{body}"
            );
            assert!(retry_after.is_none());
            accepted.push(id);
        }
    }

    // How many must be refused depends only on when the calls arrived (recorded by the
    // sandbox): all within one emission interval (1/rate, 200 ms; the usual case on loopback),
    // exactly CALLS − burst; on a slow machine at most one more admitted per interval.
    let arrivals = gw.sandbox.call_arrivals_us(MCH_NO).unwrap();
    assert_eq!(arrivals.len(), CALLS);
    let span_us = arrivals[CALLS - 1] - arrivals[0];
    eprintln!("{CALLS} calls arrived over {span_us} µs");
    let interval_us = (1e6 / rate) as u64;
    if span_us < interval_us {
        assert_eq!(limited.len(), CALLS - burst as usize, "span {span_us} µs");
    } else {
        let most = burst as usize + (span_us / interval_us) as usize;
        assert!(
            (burst as usize..=most).contains(&accepted.len()),
            "{} admitted over {span_us} µs",
            accepted.len()
        );
    }

    // A 429'd create left nothing behind; the admitted ones are there and paid for.
    for id in &limited {
        assert!(gw.sandbox.order(id).is_none(), "{id} was refused with 429");
        assert_eq!(gw.sandbox.create_attempts(id), 0, "{id}");
    }
    for id in &accepted {
        assert!(gw.sandbox.order(id).is_some(), "{id} was accepted");
    }
    let spent = 10 * accepted.len() as u64;
    assert_eq!(
        gw.sandbox.balance(MCH_NO),
        Some((1_000_000 - spent).to_string())
    );

    // The report: every call, the 429s, and the busiest second from the arrival times.
    let report = gw.sandbox.calls(MCH_NO).unwrap();
    assert_eq!(report.total, CALLS as u64);
    assert_eq!(report.rate_limited, limited.len() as u64);
    assert_eq!(
        report.max_in_any_second,
        tarspay_sandbox::limits::max_in_window(&arrivals, 1_000_000)
    );
    if span_us < 1_000_000 {
        assert_eq!(report.max_in_any_second, CALLS as u64);
    }
    let over_http: serde_json::Value = get_json(
        &http,
        format!("{url}/sandbox/merchants/{MCH_NO}/calls?arrivals=true"),
    )
    .await;
    assert_eq!(over_http["total"], CALLS, "{over_http}");
    assert_eq!(over_http["rateLimited"], limited.len(), "{over_http}");
    assert_eq!(
        over_http["maxInAnySecond"], report.max_in_any_second,
        "{over_http}"
    );
    assert_eq!(over_http["rateLimit"]["burst"], burst, "{over_http}");
    assert_eq!(over_http["arrivalsUs"].as_array().unwrap().len(), CALLS);

    // Another merchant is not limited by A's limit.
    let b = client_as(&url, MCH_B, &key_b);
    for _ in 0..10 {
        b.balance().await.unwrap();
    }
    let report_b = gw.sandbox.calls(MCH_B).unwrap();
    assert_eq!((report_b.total, report_b.rate_limited), (10, 0));

    // After a rest the burst is back; a limit can be changed and lifted over HTTP.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    gw.client
        .create_payout(&payout("RL-AFTER", "10"))
        .await
        .unwrap();
    let tight = http
        .put(format!("{url}/sandbox/merchants/{MCH_B}/rate-limit"))
        .json(&serde_json::json!({"perSecond": 0.5, "burst": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(tight.status(), 204);
    b.balance().await.unwrap();
    let (status, retry_after, body) = send_signed(
        &http,
        &url,
        sign_request(&key_b, paths::BALANCE, &[("mchNo", MCH_B)]),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    let secs: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "Retry-After {secs} for 0.5/s");
    let invalid = http
        .put(format!("{url}/sandbox/merchants/{MCH_B}/rate-limit"))
        .json(&serde_json::json!({"perSecond": 0, "burst": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 422);
    let lifted = http
        .delete(format!("{url}/sandbox/merchants/{MCH_B}/rate-limit"))
        .send()
        .await
        .unwrap();
    assert_eq!(lifted.status(), 204);
    for _ in 0..5 {
        b.balance().await.unwrap();
    }
    assert_eq!(gw.sandbox.calls(MCH_B).unwrap().rate_limited, 1);
}

#[tokio::test]
async fn the_single_merchant_default_has_no_limit_and_counts_calls() {
    let gw = spawn_gateway(|_| {}).await;
    let http = reqwest::Client::new();
    let url = gw.sandbox.url();
    let requests: Vec<SignedRequest> = (0..30)
        .map(|_| sign_request(&gw.key, paths::BALANCE, &[("mchNo", MCH_NO)]))
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for request in requests {
        let (http, url) = (http.clone(), url.clone());
        calls.spawn(async move { send_signed(&http, &url, request).await });
    }
    for (status, _, body) in calls.join_all().await {
        assert_eq!(
            (status, &body["code"]),
            (200, &serde_json::json!(0)),
            "{body}"
        );
    }
    let report = gw.sandbox.calls(MCH_NO).unwrap();
    assert_eq!((report.total, report.rate_limited), (30, 0));
    assert!(report.rate_limit.is_none());
    assert_eq!(gw.sandbox.merchants(), vec![MCH_NO.to_owned()]);
}

/// The flags of `tarspay-dev sandbox` (the same as the `tarspay-sandbox` binary's).
#[tokio::test]
async fn sandbox_flags_register_merchants_balances_and_limits() {
    use std::io::BufRead;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let key_b = PrivateKey::generate();
    let mut child = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_tarspay-dev"))
            .env_remove("TARSPAY_MCH_NO")
            .env_remove("TARSPAY_PRIVATE_KEY")
            .env_remove("TARSPAY_PRIVATE_KEY_FILE")
            .args(["sandbox", "--listen", "127.0.0.1:0"])
            .args([
                "--merchant",
                &format!("{MCH_B}={}:700", key_b.public_key().to_hex()),
            ])
            .args(["--balance", &format!("{MCH_B}=KES:300")])
            .args(["--rate-limit", &format!("{MCH_B}=5:5")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    // The reader lives as long as the process: it prints more lines after the first.
    let (first, _reader) = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).map(|_| (line, reader))
    })
    .await
    .unwrap()
    .unwrap();
    let url = first
        .trim()
        .strip_prefix("sandbox listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    let b = client_as(&url, MCH_B, &key_b);
    assert_eq!(b.balance().await.unwrap().available_amount, "700");
    let merchant: serde_json::Value = reqwest::get(format!("{url}/sandbox/merchants/{MCH_B}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        merchant["publicKey"],
        key_b.public_key().to_hex(),
        "{merchant}"
    );
    assert_eq!(merchant["balances"][1]["currency"], "KES", "{merchant}");
    assert_eq!(merchant["balances"][1]["available"], "300", "{merchant}");
    assert_eq!(merchant["rateLimit"]["perSecond"], 5.0, "{merchant}");
    assert_eq!(merchant["calls"]["total"], 1, "{merchant}");
    drop(child);
}
