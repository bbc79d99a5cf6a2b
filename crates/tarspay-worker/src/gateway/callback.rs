//! TarsPay's callbacks (POSTs to the merchant's `notifyUrl`): signature verification with the
//! system public key, and parsing of the notification body.
//!
//! The exact bytes TarsPay signs are not proven by its docs, so verification tries, in order,
//! the raw body, the body re-encoded as compact JSON with sorted keys, and the request-style
//! PARAMS string of its top-level fields. Each is checked against the same system key. The
//! first two say what the body means exactly; PARAMS does not always, since `&` and `=` are
//! not escaped in it, so it is tried only for bodies with neither in any key or value: their
//! PARAMS string reads back into the same fields, and a genuine signature over one body never
//! verifies a different one (a value carrying `&mchOrderNo=…`, say).

use super::codes::OrderState;
use super::keys::{PrivateKey, PublicKey};
use super::params::Params;
use super::signing::{sign_message, verify_message_lenient};
use serde_json::Value;

pub const HEADER_SIGNATURE: &str = "X-RESP-SIGNATURE";

/// Which encoding of the body the signature matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedForm {
    RawBody,
    SortedJson,
    Params,
}

/// `Some(form)` when the signature is valid for the body under one of the candidate forms.
pub fn verify_callback(key: &PublicKey, body: &[u8], signature_hex: &str) -> Option<SignedForm> {
    if verify_message_lenient(key, body, signature_hex) {
        return Some(SignedForm::RawBody);
    }
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let value = Value::Object(map);
    if verify_message_lenient(key, sorted_compact_json(&value).as_bytes(), signature_hex) {
        return Some(SignedForm::SortedJson);
    }
    let params = value
        .as_object()
        .map(Params::from_json_object)
        .unwrap_or_default();
    let readable_back = params
        .iter()
        .all(|(key, value)| !key.contains(['&', '=']) && !value.contains(['&', '=']));
    (readable_back
        && verify_message_lenient(key, params.to_params_string().as_bytes(), signature_hex))
    .then_some(SignedForm::Params)
}

/// Signs a callback body as the sandbox sends it: the raw bytes, which are themselves compact
/// JSON with sorted keys, so both of the likely verifier forms accept it.
pub fn sign_callback(key: &PrivateKey, body: &[u8]) -> String {
    sign_message(key, body)
}

/// Compact JSON with object keys sorted by byte order at every level.
pub fn sorted_compact_json(value: &Value) -> String {
    let mut out = String::new();
    write_sorted(value, &mut out);
    out
}

fn write_sorted(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_sorted(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_sorted(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `bizType` 1 is a deposit, 2 a withdraw (payout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BizType {
    Deposit,
    Payout,
}

/// A parsed callback. Amounts stay text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    pub biz_type: BizType,
    pub pay_order_id: Option<String>,
    pub mch_no: Option<String>,
    pub mch_order_no: String,
    pub order_amount: Option<String>,
    pub pay_amount: Option<String>,
    pub currency: Option<String>,
    pub state: OrderState,
    pub fee: Option<String>,
    pub fail_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("callback body is not a JSON object")]
    NotAnObject,
    #[error("callback field `{0}` is missing")]
    Missing(&'static str),
    #[error("callback field `{field}` {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

fn field_int(
    map: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<i64, CallbackError> {
    let text = Params::json_field(map, field).ok_or(CallbackError::Missing(field))?;
    text.trim().parse().map_err(|_| CallbackError::Invalid {
        field,
        reason: "must be an integer",
    })
}

pub fn parse_callback(body: &[u8]) -> Result<Callback, CallbackError> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Err(CallbackError::NotAnObject);
    };
    let biz_type = match field_int(&map, "bizType")? {
        1 => BizType::Deposit,
        2 => BizType::Payout,
        _ => {
            return Err(CallbackError::Invalid {
                field: "bizType",
                reason: "must be 1 (deposit) or 2 (withdraw)",
            });
        }
    };
    Ok(Callback {
        biz_type,
        pay_order_id: Params::json_field(&map, "payOrderId"),
        mch_no: Params::json_field(&map, "mchNo"),
        mch_order_no: Params::json_field(&map, "mchOrderNo")
            .ok_or(CallbackError::Missing("mchOrderNo"))?,
        order_amount: Params::json_field(&map, "orderAmount"),
        pay_amount: Params::json_field(&map, "payAmount"),
        currency: Params::json_field(&map, "currency"),
        state: OrderState::from(field_int(&map, "state")?),
        fee: Params::json_field(&map, "fee"),
        fail_reason: Params::json_field(&map, "failReason"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str =
        r#"{"state":2,"mchOrderNo":"ORD-1","bizType":2,"payOrderId":"P1","amount":"1"}"#;

    #[test]
    fn each_signed_form_verifies_and_forgeries_do_not() {
        let system = PrivateKey::generate();
        let public = system.public_key();
        let raw_sig = sign_message(&system, BODY.as_bytes());
        assert_eq!(
            verify_callback(&public, BODY.as_bytes(), &raw_sig),
            Some(SignedForm::RawBody)
        );

        let value: Value = serde_json::from_str(BODY).unwrap();
        let sorted = sorted_compact_json(&value);
        assert_eq!(
            sorted,
            r#"{"amount":"1","bizType":2,"mchOrderNo":"ORD-1","payOrderId":"P1","state":2}"#
        );
        let sorted_sig = sign_message(&system, sorted.as_bytes());
        assert_eq!(
            verify_callback(&public, BODY.as_bytes(), &sorted_sig),
            Some(SignedForm::SortedJson)
        );

        let params = Params::from_json_object(value.as_object().unwrap()).to_params_string();
        let params_sig = sign_message(&system, params.as_bytes());
        assert_eq!(
            verify_callback(&public, BODY.as_bytes(), &params_sig),
            Some(SignedForm::Params)
        );

        // PARAMS does not escape `&` or `=`: a body hiding fields in a value must not take
        // another body's PARAMS signature (a rival merchant's genuine callback, here).
        let params_of = |body: &str| {
            let value: Value = serde_json::from_str(body).unwrap();
            Params::from_json_object(value.as_object().unwrap()).to_params_string()
        };
        let theirs = r#"{"bizType":2,"mchNo":"M2","mchOrderNo":"Z&mchNo=M1&mchOrderNo=VICTIM&state=2&zz=q","state":3}"#;
        let their_params = params_of(theirs);
        let their_sig = sign_message(&system, their_params.as_bytes());
        let smuggled = r#"{"bizType":"2&mchNo=M2&mchOrderNo=Z","mchNo":"M1","mchOrderNo":"VICTIM","state":"2","zz":"q&state=3"}"#;
        assert_eq!(params_of(smuggled), their_params, "the same PARAMS string");
        assert_eq!(
            verify_callback(&public, smuggled.as_bytes(), &their_sig),
            None
        );

        let forged_body = BODY.replace("\"state\":2", "\"state\":3");
        assert_eq!(
            verify_callback(&public, forged_body.as_bytes(), &raw_sig),
            None
        );
        let stranger = PrivateKey::generate();
        let stranger_sig = sign_message(&stranger, BODY.as_bytes());
        assert_eq!(
            verify_callback(&public, BODY.as_bytes(), &stranger_sig),
            None
        );
        assert_eq!(verify_callback(&public, BODY.as_bytes(), ""), None);
    }

    #[test]
    fn numeric_amounts_keep_their_text_in_fields_and_in_the_signed_form() {
        let body = br#"{"bizType":2,"fee":1.50,"mchOrderNo":"A","orderAmount":100.10,"state":2}"#;
        let callback = parse_callback(body).unwrap();
        assert_eq!(callback.order_amount.as_deref(), Some("100.10"));
        assert_eq!(callback.fee.as_deref(), Some("1.50"));
        let value: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(sorted_compact_json(&value).as_bytes(), &body[..]);
    }

    #[test]
    fn parse_reports_missing_and_bad_fields() {
        let callback = parse_callback(BODY.as_bytes()).unwrap();
        assert_eq!(callback.biz_type, BizType::Payout);
        assert_eq!(callback.state, OrderState::Success);
        assert_eq!(parse_callback(b"not json"), Err(CallbackError::NotAnObject));
        assert_eq!(
            parse_callback(br#"{"bizType":2,"state":2}"#),
            Err(CallbackError::Missing("mchOrderNo"))
        );
        assert_eq!(
            parse_callback(br#"{"bizType":2,"mchOrderNo":"A"}"#),
            Err(CallbackError::Missing("state"))
        );
        assert!(matches!(
            parse_callback(br#"{"bizType":7,"mchOrderNo":"A","state":2}"#),
            Err(CallbackError::Invalid {
                field: "bizType",
                ..
            })
        ));
    }
}
