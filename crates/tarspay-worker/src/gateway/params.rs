//! The field set of one request: the JSON body and TarsPay's PARAMS string are both derived from
//! it, so they can never disagree. Empty and null fields are dropped at insertion, which
//! settles the open question of whether they belong in PARAMS: they are never sent.

use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("a request body must be a JSON object")]
    NotAnObject,
    #[error("cannot encode request: {0}")]
    Encode(String),
}

/// Top-level request fields, sorted by key in byte order (the order PARAMS requires).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a field unless its value is empty.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let value = value.into();
        if !value.is_empty() {
            self.0.insert(key.into(), value);
        }
    }

    /// Builds the field set from any serializable struct; see [`Params::from_json_object`].
    pub fn from_serialize<T: Serialize>(value: &T) -> Result<Self, ParamsError> {
        match serde_json::to_value(value).map_err(|err| ParamsError::Encode(err.to_string()))? {
            Value::Object(map) => Ok(Self::from_json_object(&map)),
            _ => Err(ParamsError::NotAnObject),
        }
    }

    /// Strings keep their raw text, numbers and booleans their JSON text, nested values their
    /// compact JSON; null and empty strings are dropped.
    pub fn from_json_object(map: &Map<String, Value>) -> Self {
        let mut params = Self::new();
        for (key, value) in map {
            match value {
                Value::Null => {}
                Value::String(text) => params.insert(key.clone(), text.clone()),
                other => params.insert(key.clone(), other.to_string()),
            }
        }
        params
    }

    /// The text of one field of a JSON object as PARAMS would carry it: a non-empty string, or
    /// a number's exact JSON text; `None` for anything else (absent, empty, null, nested).
    pub fn json_field(map: &Map<String, Value>, field: &str) -> Option<String> {
        match map.get(field)? {
            Value::String(text) if !text.is_empty() => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `key=value&…` with raw values: no quotes, no URL-encoding.
    pub fn to_params_string(&self) -> String {
        let mut out =
            String::with_capacity(self.0.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
        for (index, (key, value)) in self.0.iter().enumerate() {
            if index > 0 {
                out.push('&');
            }
            out.push_str(key);
            out.push('=');
            out.push_str(value);
        }
        out
    }

    /// The JSON body: an object of the same fields, every value a string.
    pub fn to_json_body(&self) -> Vec<u8> {
        // A map of strings always serializes.
        serde_json::to_vec(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sorted_raw_and_without_empty_fields() {
        let body = serde_json::json!({
            "mchOrderNo": "A-1", "amount": "100.50", "currency": "INR",
            "notifyUrl": "http://x/y?a=b&c=d", "empty": "", "nothing": null, "count": 3
        });
        let params = Params::from_json_object(body.as_object().unwrap());
        assert_eq!(
            params.to_params_string(),
            "amount=100.50&count=3&currency=INR&mchOrderNo=A-1&notifyUrl=http://x/y?a=b&c=d"
        );
        let sent: Value = serde_json::from_slice(&params.to_json_body()).unwrap();
        assert!(sent.get("empty").is_none() && sent.get("nothing").is_none());
        assert_eq!(sent["count"], "3");
    }

    #[test]
    fn byte_order_puts_uppercase_before_lowercase() {
        let mut params = Params::new();
        params.insert("b", "1");
        params.insert("B", "2");
        params.insert("a", "3");
        assert_eq!(params.to_params_string(), "B=2&a=3&b=1");
    }

    proptest! {
        /// Whatever the fields, the body that is sent and the PARAMS that are signed agree:
        /// re-deriving PARAMS from the sent body gives the signed string back.
        #[test]
        fn body_and_params_always_agree(
            fields in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9_]{0,12}", ".{0,20}", 0..12)
        ) {
            let mut params = Params::new();
            for (key, value) in &fields {
                params.insert(key.clone(), value.clone());
            }
            let body: Value = serde_json::from_slice(&params.to_json_body()).unwrap();
            let reparsed = Params::from_json_object(body.as_object().unwrap());
            prop_assert_eq!(reparsed.to_params_string(), params.to_params_string());
            prop_assert_eq!(body.as_object().unwrap().len(), params.len());
            for (key, value) in params.iter() {
                prop_assert!(!value.is_empty());
                prop_assert_eq!(body[key].as_str(), Some(value));
            }
        }
    }
}
