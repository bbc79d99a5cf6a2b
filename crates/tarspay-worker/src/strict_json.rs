//! JSON from outside (API bodies, batches, callbacks), read strictly: a key repeated in one
//! object is refused instead of letting the last one win, because `{"amount":"100",
//! "amount":"45000"}` would otherwise pay whatever the last copy says.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// `path` is where the object holding the key sits (`$` is the top level).
    #[error("duplicate key {key:?} in the object at {path}: every key may appear once")]
    DuplicateKey { key: String, path: String },
}

/// Parses `bytes` as JSON, refusing any object (at any depth) that repeats a key.
pub fn parse(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|err| StrictJsonError::Malformed(err.to_string()))?;
    let mut found = None;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let checked = Check {
        path: "$".to_owned(),
        found: &mut found,
    }
    .deserialize(&mut deserializer);
    match (checked, found) {
        (_, Some(duplicate)) => Err(duplicate),
        (Err(err), None) => Err(StrictJsonError::Malformed(err.to_string())),
        (Ok(()), None) => Ok(value),
    }
}

/// Walks one value, recording the first repeated key it meets.
struct Check<'a> {
    path: String,
    found: &'a mut Option<StrictJsonError>,
}

impl<'de> DeserializeSeed<'de> for Check<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let element = Check {
                path: format!("{}[{index}]", self.path),
                found: &mut *self.found,
            };
            if seq.next_element_seed(element)?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    // (With serde_json's arbitrary_precision a number arrives here as a one-key map.)
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                *self.found = Some(StrictJsonError::DuplicateKey {
                    key: key.clone(),
                    path: self.path.clone(),
                });
                return Err(de::Error::custom("duplicate key"));
            }
            map.next_value_seed(Check {
                path: format!("{}.{key}", self.path),
                found: &mut *self.found,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(text: &str) -> (String, String) {
        match parse(text.as_bytes()) {
            Err(StrictJsonError::DuplicateKey { key, path }) => (key, path),
            other => panic!("expected a duplicate key in {text}, got {other:?}"),
        }
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert_eq!(
            duplicate(r#"{"amount":"100","amount":"45000"}"#),
            ("amount".into(), "$".into())
        );
        assert_eq!(
            duplicate(r#"[{"a":1},{"mchOrderNo":"X","b":{"c":1},"mchOrderNo":"Y"}]"#),
            ("mchOrderNo".into(), "$[1]".into())
        );
        assert_eq!(
            duplicate(r#"{"x":{"y":[1,{"z":2.50,"z":3}]}}"#),
            ("z".into(), "$.x.y[1]".into())
        );
    }

    #[test]
    fn clean_documents_parse_with_numbers_kept_exact() {
        let value = parse(br#"{"a":[1,{"b":"c"}],"n":12345678901234567890.123,"m":null}"#).unwrap();
        assert_eq!(value["n"].to_string(), "12345678901234567890.123");
        assert!(matches!(
            parse(b"{\"a\":"),
            Err(StrictJsonError::Malformed(_))
        ));
        assert_eq!(parse(b"\"text\"").unwrap(), Value::String("text".into()));
    }
}
