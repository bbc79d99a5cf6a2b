//! Several merchant accounts in one deployment: routing by currency or by name, each order
//! created with its own merchant's key and number, callbacks checked against the order's
//! merchant, and one merchant's bad key holding only that merchant's payouts.

mod common;

use common::app::{MCH_NO, spawn_app_with};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tarspay_sandbox::SandboxMerchant;
use tarspay_sandbox::rules::SANDBOX_SYSTEM_PRIVATE_KEY;
use tarspay_worker::gateway::PrivateKey;
use tarspay_worker::ledger::Phase;

const KENYA_MCH_NO: &str = "M2000000002";
const BANGLA_MCH_NO: &str = "M3000000003";

fn payout(id: &str, currency: &str) -> Value {
    match currency {
        "INR" => common::app::inr(id, "150.50"),
        "MYR" => {
            json!({"mchOrderNo": id, "amount": "75.25", "currency": "MYR", "wayCode": "MAYBANK"})
        }
        "PHP" => json!({"mchOrderNo": id, "amount": "500", "currency": "PHP", "wayCode": "GCASH"}),
        "KES" => json!({
            "mchOrderNo": id, "amount": "300", "currency": "KES", "wayCode": "EWALLET_MPESA",
            "customerContact": "254712345678", "customerName": "Wanjiru",
            "customerEmail": "w@example.com",
        }),
        "BDT" => json!({
            "mchOrderNo": id, "amount": "200", "currency": "BDT", "wayCode": "EWALLET_BKASH",
            "walletId": "01712345678",
        }),
        "PKR" => {
            json!({"mchOrderNo": id, "amount": "400", "currency": "PKR", "wayCode": "jazzcash"})
        }
        other => panic!("no test payout for {other}"),
    }
}

/// Three merchants: `default` (INR, MYR and whatever no one lists), `kenya` (KES, PHP) and
/// `bangla` (BDT, PKR), whose settings hold a key the gateway does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_merchants_pay_with_their_own_keys_and_a_bad_key_holds_only_its_own() {
    let kenya_key = PrivateKey::generate();
    let bangla_registered = PrivateKey::generate();
    let bangla_configured = PrivateKey::generate();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let notify = format!("http://{}/tarspay/notify", listener.local_addr().unwrap());
    let system = PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY).unwrap();
    let (kenya_hex, bangla_hex) = (kenya_key.expose_hex(), bangla_configured.expose_hex());
    let system_public = system.public_key().to_hex();
    let (kenya_pub, bangla_pub) = (kenya_key.public_key(), bangla_registered.public_key());
    let app = spawn_app_with(
        false,
        |c| {
            c.callbacks = true;
            c.merchants.push(SandboxMerchant {
                mch_no: KENYA_MCH_NO.into(),
                public_key: kenya_pub,
                balance: 1_000_000u64.into(),
            });
            c.merchants.push(SandboxMerchant {
                mch_no: BANGLA_MCH_NO.into(),
                public_key: bangla_pub,
                balance: 1_000_000u64.into(),
            });
        },
        &[
            ("TARSPAY_NOTIFY_URL", &notify),
            ("TARSPAY_SYSTEM_PUBLIC_KEY", &system_public),
            ("TARSPAY_API_TOKEN", "merchants-test-token"),
            // Outcomes come from callbacks: the first poll is far away.
            ("TARSPAY_POLL_FIRST_DELAY", "120s"),
            ("TARSPAY_MERCHANTS__KENYA__MCH_NO", KENYA_MCH_NO),
            ("TARSPAY_MERCHANTS__KENYA__PRIVATE_KEY", &kenya_hex),
            ("TARSPAY_MERCHANTS__KENYA__CURRENCIES", "KES, PHP"),
            ("TARSPAY_MERCHANTS__KENYA__NOTIFY_URL", &notify),
            ("TARSPAY_MERCHANTS__BANGLA__MCH_NO", BANGLA_MCH_NO),
            ("TARSPAY_MERCHANTS__BANGLA__PRIVATE_KEY", &bangla_hex),
            ("TARSPAY_MERCHANTS__BANGLA__CURRENCIES", "BDT,PKR"),
            ("TARSPAY_MERCHANTS__BANGLA__NOTIFY_URL", &notify),
        ],
    )
    .await;
    let _server = app.serve_on(listener);

    // Routing: by currency; a named merchant that does not pay the currency is refused,
    // naming the field, and nothing is queued.
    let mut named = payout("NAMED-1", "INR");
    named["merchant"] = json!("kenya");
    let refused = app.producer.enqueue_json(&named, None).await.unwrap_err();
    assert!(
        refused.to_string().contains("merchant") && refused.to_string().contains("INR"),
        "{refused}"
    );
    let mut unknown = payout("NAMED-2", "KES");
    unknown["merchant"] = json!("nowhere");
    let refused = app.producer.enqueue_json(&unknown, None).await.unwrap_err();
    assert!(refused.to_string().contains("nowhere"), "{refused}");
    assert!(app.deployment.order("NAMED-1").await.unwrap().is_none());
    assert!(app.deployment.order("NAMED-2").await.unwrap().is_none());
    // A merchant named explicitly for a currency it pays.
    let mut explicit = payout("EXPLICIT-1", "PHP");
    explicit["merchant"] = json!("kenya");
    app.enqueue(explicit).await;

    let mut expected: HashMap<String, (&str, &str)> = HashMap::new();
    expected.insert("EXPLICIT-1".into(), ("kenya", KENYA_MCH_NO));
    for (merchant, mch_no, currencies) in [
        ("default", MCH_NO, ["INR", "MYR"]),
        ("kenya", KENYA_MCH_NO, ["KES", "PHP"]),
        ("bangla", BANGLA_MCH_NO, ["BDT", "PKR"]),
    ] {
        for currency in currencies {
            for n in 0..6 {
                let id = format!("{merchant}-{currency}-{n}");
                app.enqueue(payout(&id, currency)).await;
                expected.insert(id, (merchant, mch_no));
            }
        }
    }
    let pool = app.pool(16);

    // The two good merchants' 24 + 1 payouts end, each by its verified callback.
    let good = expected.values().filter(|(m, _)| *m != "bangla").count();
    common::eventually("every good merchant's outcome", || async {
        let ended = app.outcomes().await;
        let good_ended = ended.iter().filter(|o| o.merchant != "bangla").count();
        (good_ended >= good).then_some(())
    })
    .await;
    let mut outcomes = app.wait_outcomes(good).await;
    // An order's first auth-class refusal is held for a recheck, and by then the guard has
    // seen enough different orders refused (`guard_auth_failures`, 3) and holds them all:
    // none fails.
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|(id, _)| expected[id.as_str()].0 == "bangla")
        .map(|(id, o)| (id.clone(), o.clone()))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    for (id, outcome) in &refused {
        assert_eq!(outcome.status.phase(), Phase::Failed, "{id}");
        assert_eq!(outcome.code, Some(5003002), "{id}: unknown key");
        outcomes.remove(id);
    }
    assert_eq!(outcomes.len(), good, "every good merchant's payout ends");
    for (id, outcome) in &outcomes {
        let (merchant, mch_no) = expected[id.as_str()];
        assert_eq!(outcome.status.phase(), Phase::Succeeded, "{id}");
        assert_eq!(
            outcome.merchant, merchant,
            "{id}: the outcome names its merchant"
        );
        // The gateway holds it under the right merchant number: the sandbox checked the
        // signature against that merchant's registered key.
        let at_gateway = app
            .sandbox
            .order_of(mch_no, id)
            .unwrap_or_else(|| panic!("{id} not created under {mch_no}"));
        assert_eq!(at_gateway.create_attempts, 1, "{id}");
        assert!(
            at_gateway.callbacks_sent >= 1,
            "{id}: decided by a callback"
        );
        for other in [MCH_NO, KENYA_MCH_NO, BANGLA_MCH_NO] {
            if other != mch_no {
                assert!(
                    app.sandbox.order_of(other, id).is_none(),
                    "{id} under {other}"
                );
            }
        }
        let record = app.deployment.order(id).await.unwrap().unwrap();
        assert_eq!(record.merchant, merchant, "{id}");
    }

    // The bad merchant: its guard paused only its own lanes, and its payouts wait for a
    // resume (none failed, none created at the gateway).
    common::eventually("bangla's guard to hold its lanes", || async {
        let paused = app.deployment.paused_merchants().await.unwrap();
        (paused.iter().map(|m| m.as_str()).collect::<Vec<_>>() == ["bangla"]).then_some(())
    })
    .await;
    for (id, (merchant, _)) in &expected {
        if *merchant == "bangla" && !refused.iter().any(|(r, _)| r == id) {
            let record = app.deployment.order(id).await.unwrap().unwrap();
            assert!(!record.phase.is_final(), "{id}: held, not failed");
            assert!(app.sandbox.order_of(BANGLA_MCH_NO, id).is_none(), "{id}");
        }
    }
    // A forged callback for a good merchant's order changes nothing.
    let (id, _) = expected.iter().find(|(_, (m, _))| *m == "kenya").unwrap();
    let forged = json!({
        "bizType": 2, "mchNo": KENYA_MCH_NO, "mchOrderNo": id, "state": 3,
        "orderAmount": "300", "currency": "KES",
    });
    let response = reqwest::Client::new()
        .post(&notify)
        .header("X-RESP-SIGNATURE", "3006020101020101")
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = app.deployment.order(id).await.unwrap().unwrap();
    assert_eq!(record.phase.to_string(), "succeeded", "{id}");
    pool.stop().await;
}
