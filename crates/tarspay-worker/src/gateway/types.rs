//! Typed requests and responses for every TarsPay endpoint. Requests turn into [`Params`] (so
//! the body and the signature agree); responses are read leniently where TarsPay's docs are
//! loose (numbers sent as strings or as numbers), but money is never parsed as a float.

use super::codes::OrderState;
use super::params::Params;
use crate::money::Amount;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
// Every `Option` field of a response is left out when absent (never sent as `null`).
use serde_with::skip_serializing_none;
use std::collections::BTreeMap;

/// Create a withdraw (payout) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePayout {
    pub mch_order_no: String,
    pub way_code: String,
    pub amount: Amount,
    pub currency: String,
    pub notify_url: String,
    /// Beneficiary fields (`customerName`, `ifsc`, `walletId`, …) and any merchant-supplied
    /// extras, passed through unchanged.
    pub fields: BTreeMap<String, String>,
}

/// Create a deposit (pay-in) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateDeposit {
    pub mch_order_no: String,
    pub way_code: String,
    pub amount: Amount,
    pub currency: String,
    pub notify_url: String,
    /// `returnUrl`, `customerName`, `customerEmail`, `subject`, … passed through unchanged.
    pub fields: BTreeMap<String, String>,
}

fn order_params(
    mch_no: &str,
    mch_order_no: &str,
    way_code: &str,
    amount: &Amount,
    currency: &str,
    notify_url: &str,
    fields: &BTreeMap<String, String>,
) -> Params {
    let mut params = Params::new();
    // Extras first, so the fixed fields below always win on a name clash.
    for (key, value) in fields {
        params.insert(key.clone(), value.clone());
    }
    params.insert("mchNo", mch_no);
    params.insert("mchOrderNo", mch_order_no);
    params.insert("wayCode", way_code);
    params.insert("amount", amount.as_str());
    params.insert("currency", currency);
    params.insert("notifyUrl", notify_url);
    params
}

impl CreatePayout {
    pub fn params(&self, mch_no: &str) -> Params {
        order_params(
            mch_no,
            &self.mch_order_no,
            &self.way_code,
            &self.amount,
            &self.currency,
            &self.notify_url,
            &self.fields,
        )
    }
}

impl CreateDeposit {
    pub fn params(&self, mch_no: &str) -> Params {
        order_params(
            mch_no,
            &self.mch_order_no,
            &self.way_code,
            &self.amount,
            &self.currency,
            &self.notify_url,
            &self.fields,
        )
    }
}

/// Which order a query or proof request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderRef {
    MchOrderNo(String),
    PayOrderId(String),
}

impl OrderRef {
    pub fn params(&self, mch_no: &str) -> Params {
        let mut params = Params::new();
        params.insert("mchNo", mch_no);
        match self {
            Self::MchOrderNo(id) => params.insert("mchOrderNo", id.as_str()),
            Self::PayOrderId(id) => params.insert("payOrderId", id.as_str()),
        }
        params
    }
}

/// `code 0` on create payout: accepted, not paid. The outcome comes later.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PayoutAccepted {
    #[serde(deserialize_with = "text")]
    pub pay_order_id: String,
    #[serde(deserialize_with = "text")]
    pub mch_order_no: String,
    #[serde(default, deserialize_with = "optional_state")]
    pub order_state: Option<OrderState>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepositCreated {
    #[serde(deserialize_with = "text")]
    pub pay_order_id: String,
    #[serde(deserialize_with = "text")]
    pub mch_order_no: String,
    #[serde(default, deserialize_with = "optional_state")]
    pub order_state: Option<OrderState>,
    #[serde(default)]
    pub pay_url: Option<String>,
    /// VA number, QR content or wallet deep link; its shape varies by channel.
    #[serde(default)]
    pub pay_data: Option<Value>,
    #[serde(default, deserialize_with = "optional_i64")]
    pub expired_time: Option<i64>,
}

/// Query payout / query deposit answer. Amounts stay strings exactly as the gateway sent them.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderInfo {
    #[serde(default, deserialize_with = "optional_text")]
    pub pay_order_id: Option<String>,
    #[serde(default, deserialize_with = "optional_text")]
    pub mch_no: Option<String>,
    /// Not every gateway repeats the number it was asked about; when one does, the caller
    /// checks it is the one asked about.
    #[serde(default, deserialize_with = "optional_text")]
    pub mch_order_no: Option<String>,
    #[serde(default, deserialize_with = "optional_text")]
    pub order_amount: Option<String>,
    #[serde(default, deserialize_with = "optional_text")]
    pub pay_amount: Option<String>,
    #[serde(default, deserialize_with = "optional_text")]
    pub fee: Option<String>,
    #[serde(default, deserialize_with = "optional_text")]
    pub currency: Option<String>,
    #[serde(deserialize_with = "state")]
    pub state: OrderState,
    #[serde(default, deserialize_with = "optional_text")]
    pub fail_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    #[serde(default, deserialize_with = "optional_text")]
    pub mch_no: Option<String>,
    #[serde(deserialize_with = "text")]
    pub available_amount: String,
    #[serde(default, deserialize_with = "optional_text")]
    pub frozen_amount: Option<String>,
    /// The account's currency, where the gateway names one (an answer to a query that named
    /// a currency, see `TarsPayClient::balance_in`).
    #[serde(default, deserialize_with = "optional_text")]
    pub currency: Option<String>,
}

/// Payout proof (Brazil). Only the order ids are documented; everything else is kept as sent.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PayoutProof {
    #[serde(default, deserialize_with = "optional_text")]
    pub pay_order_id: Option<String>,
    #[serde(default, deserialize_with = "optional_text")]
    pub mch_order_no: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A string, or a number kept as its exact JSON text: serde_json's `arbitrary_precision`
/// (Cargo.toml) stores a number's digits as written, so `100.10` stays `"100.10"`.
fn value_text(value: Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    value_text(Value::deserialize(deserializer)?)
        .ok_or_else(|| serde::de::Error::custom("expected a string or a number"))
}

fn optional_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        other => value_text(other)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("expected a string or a number")),
    }
}

fn optional_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    match optional_text(deserializer)? {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("expected an integer, got {text:?}"))),
    }
}

fn state<'de, D: Deserializer<'de>>(deserializer: D) -> Result<OrderState, D::Error> {
    optional_state(deserializer)?.ok_or_else(|| serde::de::Error::custom("missing order state"))
}

fn optional_state<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<OrderState>, D::Error> {
    Ok(optional_i64(deserializer)?.map(OrderState::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_answer_from_the_docs_parses() {
        let data = serde_json::json!({"currency":"KES","fee":"0","mchNo":"M1688443982","mchOrderNo":"YN7220230300929","orderAmount":"100","payAmount":"0","payOrderId":"P1681112064487976961","state":1});
        let info: OrderInfo = serde_json::from_value(data).unwrap();
        assert_eq!(info.state, OrderState::Processing);
        assert_eq!(info.order_amount.as_deref(), Some("100"));
        assert_eq!(info.pay_order_id.as_deref(), Some("P1681112064487976961"));
    }

    #[test]
    fn numbers_are_kept_as_exact_text() {
        let data = serde_json::json!({"mchOrderNo":"A","orderAmount":100.25,"state":"2"});
        let info: OrderInfo = serde_json::from_value(data).unwrap();
        assert_eq!(info.order_amount.as_deref(), Some("100.25"));
        assert_eq!(info.state, OrderState::Success);
    }

    #[test]
    fn numbers_from_the_wire_keep_trailing_zeros() {
        let info: OrderInfo = serde_json::from_str(
            r#"{"mchOrderNo":"A","orderAmount":100.10,"payAmount":0.00,"fee":1.50,"state":1}"#,
        )
        .unwrap();
        assert_eq!(info.order_amount.as_deref(), Some("100.10"));
        assert_eq!(info.pay_amount.as_deref(), Some("0.00"));
        assert_eq!(info.fee.as_deref(), Some("1.50"));
    }

    #[test]
    fn absent_fields_are_left_out_not_sent_as_null() {
        let info: OrderInfo = serde_json::from_str(r#"{"mchOrderNo":"A","state":2}"#).unwrap();
        let sent = serde_json::to_value(&info).unwrap();
        assert_eq!(sent, serde_json::json!({"mchOrderNo": "A", "state": 2}));
        let accepted: PayoutAccepted =
            serde_json::from_str(r#"{"payOrderId":"P1","mchOrderNo":"A"}"#).unwrap();
        let sent = serde_json::to_value(&accepted).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"payOrderId": "P1", "mchOrderNo": "A"})
        );
    }

    #[test]
    fn missing_state_is_an_error() {
        let data = serde_json::json!({"mchOrderNo":"A"});
        assert!(serde_json::from_value::<OrderInfo>(data).is_err());
    }

    #[test]
    fn create_payout_params_cannot_be_overridden_by_extras() {
        let request = CreatePayout {
            mch_order_no: "ORD-1".into(),
            way_code: "UPI".into(),
            amount: Amount::parse("150.00").unwrap(),
            currency: "INR".into(),
            notify_url: "https://merchant.example/notify".into(),
            fields: BTreeMap::from([
                ("amount".to_string(), "999999".to_string()),
                ("customerName".to_string(), "Asha".to_string()),
                ("bankName".to_string(), String::new()),
            ]),
        };
        let params = request.params("M0000000001");
        assert_eq!(params.get("amount"), Some("150.00"));
        assert_eq!(params.get("customerName"), Some("Asha"));
        assert_eq!(params.get("bankName"), None, "empty fields are never sent");
        assert_eq!(params.get("mchNo"), Some("M0000000001"));
    }
}
