//! Beneficiary data on console pages: only the last characters of any field that may
//! identify a person or an account (4 of a value of 8 or more, 2 of a shorter one, none of
//! 4 or fewer), so a short name or id is never mostly shown.

use serde_json::{Map, Value};

/// Request keys shown as they are: what the payout is, not whom it pays.
const PLAIN: [&str; 5] = ["mchOrderNo", "amount", "currency", "wayCode", "merchant"];

/// Words that mark a key as sensitive wherever it appears (nested objects too).
const SENSITIVE: [&str; 4] = ["account", "card", "phone", "email"];

/// `••••` and the value's last 4 characters (8 or more), last 2 (5 to 7); a value of 4
/// characters or fewer is hidden whole. At most half of any value shows.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let shown = match chars.len() {
        0..=4 => 0,
        5..=7 => 2,
        _ => 4,
    };
    let tail: String = chars[chars.len() - shown..].iter().collect();
    format!("••••{tail}")
}

fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SENSITIVE.iter().any(|word| key.contains(word))
}

/// A value's text, for masking (a number's digits, an object's JSON).
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Masks a sensitive key's value (every string inside it), and walks into the others.
fn mask_value(value: &Value, sensitive: bool) -> Value {
    match value {
        Value::Object(map) => Value::Object(mask_map(map, sensitive)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| mask_value(v, sensitive)).collect())
        }
        Value::Null | Value::Bool(_) if !sensitive => value.clone(),
        other if sensitive => Value::String(mask(&text_of(other))),
        other => other.clone(),
    }
}

fn mask_map(map: &Map<String, Value>, sensitive: bool) -> Map<String, Value> {
    map.iter()
        .map(|(key, value)| {
            (
                key.clone(),
                mask_value(value, sensitive || is_sensitive(key)),
            )
        })
        .collect()
}

/// A stored payout request as pretty JSON for the detail page: every beneficiary field
/// (every key of `PayoutRequest.fields`, i.e. all but [`PLAIN`]) and every key naming an
/// account, card, phone or email masked to its last 4 characters. Text that is not a JSON
/// object is not shown at all.
pub fn masked_request(stored: &str) -> String {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(stored) else {
        return "(the stored request is not readable)".to_owned();
    };
    let masked: Map<String, Value> = map
        .iter()
        .map(|(key, value)| {
            let plain = PLAIN.contains(&key.as_str()) && !is_sensitive(key);
            (key.clone(), mask_value(value, !plain))
        })
        .collect();
    serde_json::to_string_pretty(&Value::Object(masked)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_four_characters_are_shown() {
        assert_eq!(mask("1234567890123456"), "••••3456");
        assert_eq!(mask("ab"), "••••");
        assert_eq!(mask("abcd"), "••••");
        assert_eq!(
            mask("Rajesh"),
            "••••sh",
            "a short value shows less than half"
        );
        assert_eq!(mask("abcde"), "••••de");
        assert_eq!(mask("12345678"), "••••5678");
        assert_eq!(mask("ñañañaña"), "••••ñaña");
    }

    #[test]
    fn beneficiary_fields_and_sensitive_keys_are_masked() {
        let stored = r#"{"mchOrderNo":"po-1","amount":"10.00","currency":"INR","wayCode":"UPI",
            "accountNo":"123456789012","accountName":"Anil Kumar","ifsc":"HDFC0001234",
            "bankCode":"HDFC","extra":{"cardNumber":4111111111111111,"note":"hi there"},
            "payerEmail":"anil@example.com"}"#;
        let shown = masked_request(stored);
        for secret in [
            "123456789012",
            "Anil Kumar",
            "HDFC0001234",
            "4111111111111111",
            "anil@example.com",
            "hi there",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        for kept in [
            "po-1",
            "10.00",
            "INR",
            "UPI",
            "••••9012",
            "••••1111",
            "••••.com",
        ] {
            assert!(shown.contains(kept), "{kept} missing from {shown}");
        }
        assert_eq!(
            masked_request("not json"),
            "(the stored request is not readable)"
        );
    }
}
