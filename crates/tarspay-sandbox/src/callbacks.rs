//! Signed callbacks to the merchant's `notifyUrl`, resent until the reply is `OK`, as TarsPay
//! does (up to 16 sends).

use super::Shared;
use serde_json::{Value, json};
use std::sync::Arc;
use tarspay_worker::gateway::callback::{HEADER_SIGNATURE, sign_callback, sorted_compact_json};

/// The callback body for an order: compact JSON, keys sorted.
pub(crate) fn body_for(shared: &Shared, mch_no: &str, mch_order_no: &str) -> Option<String> {
    let view = shared.book().view(mch_no, mch_order_no)?;
    let mut body = json!({
        "bizType": match view.kind { super::OrderKind::Deposit => 1, super::OrderKind::Payout => 2 },
        "payOrderId": view.pay_order_id,
        "mchNo": view.mch_no,
        "mchOrderNo": view.mch_order_no,
        "orderAmount": view.amount,
        "payAmount": view.pay_amount,
        "currency": view.currency,
        "state": view.state,
        "fee": view.fee,
    });
    if matches!(view.state, 3 | 8)
        && let Value::Object(map) = &mut body
    {
        map.insert(
            "failReason".into(),
            Value::String("sandbox: declined by outcome rule".into()),
        );
    }
    Some(sorted_compact_json(&body))
}

pub(crate) async fn deliver(shared: &Arc<Shared>, mch_no: &str, mch_order_no: &str, url: &str) {
    let Some(body) = body_for(shared, mch_no, mch_order_no) else {
        return;
    };
    let (attempts, base_delay, key) = {
        let config = shared.config();
        (
            config.callback_attempts,
            config.callback_retry_delay,
            config.system_key.clone(),
        )
    };
    let signature = sign_callback(&key, body.as_bytes());
    for attempt in 0..attempts {
        shared.book().record_callback_start(mch_no, mch_order_no);
        let reply = shared
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json;charset=utf-8",
            )
            .header(HEADER_SIGNATURE, &signature)
            .body(body.clone())
            .send()
            .await;
        let acknowledged = match reply {
            Ok(response) if response.status().is_success() => {
                response.text().await.is_ok_and(|text| text.trim() == "OK")
            }
            _ => false,
        };
        shared
            .book()
            .record_callback(mch_no, mch_order_no, acknowledged);
        if acknowledged {
            return;
        }
        let delay = base_delay.saturating_mul(1 << attempt.min(6));
        tokio::time::sleep(delay).await;
    }
    tracing::debug!(mch_order_no, "sandbox gave up on a callback");
}
