//! The domain's identifiers and codes, each checked once where it enters (payout validation,
//! batch parsing, the CLI, the HTTP API) and carried typed from there. On the wire they are
//! plain strings: serde, `FromStr` and `Display` round-trip the exact text.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// Longest accepted `mchOrderNo` (and batch id); TarsPay does not publish a limit, 64 is
/// generous for ids.
pub const MAX_ORDER_NO_LEN: usize = 64;

/// A value that breaks its type's rule; `Display` is the rule ("must be …"), so a caller can
/// prefix the field's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}")]
pub struct IdError {
    pub field: &'static str,
    pub rule: &'static str,
}

/// 1-64 characters of A-Z, a-z, 0-9, '-' or '_': safe in Redis keys, URLs and CSV cells.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_ORDER_NO_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const TOKEN_RULE: &str = "must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'";

/// Three capital letters, as TarsPay spells currencies (ISO 4217, and "BRA" for Brazil).
fn is_currency(text: &str) -> bool {
    text.len() == 3 && text.bytes().all(|b| b.is_ascii_uppercase())
}

const CURRENCY_RULE: &str = "must be three capital letters such as \"INR\"";

/// A string newtype whose only constructor checks `$check`; reads as `&str` everywhere.
macro_rules! checked_text {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check:ident, $rule:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, utoipa::ToSchema)]
        pub struct $name(String);

        impl $name {
            pub const FIELD: &'static str = $field;

            pub fn parse(text: &str) -> Result<Self, IdError> {
                if $check(text) {
                    Ok(Self(text.to_owned()))
                } else {
                    Err(IdError {
                        field: $field,
                        rule: $rule,
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                if $check(&text) {
                    Ok(Self(text))
                } else {
                    Err(serde::de::Error::custom(format!("{} {}", $field, $rule)))
                }
            }
        }
    };
}

checked_text!(
    /// The merchant's order number: the payout's idempotency key at the gateway, for life.
    MchOrderNo,
    "mchOrderNo",
    is_token,
    TOKEN_RULE
);

checked_text!(
    /// A batch of payouts (a payroll file, `POST /v1/batches`); the same rule as order
    /// numbers, as it is part of Redis keys and URLs too.
    BatchId,
    "batchId",
    is_token,
    TOKEN_RULE
);

impl BatchId {
    /// A fresh id for a batch that came without one: `b-` and 16 random hex digits.
    pub fn random() -> Self {
        Self(format!("b-{:016x}", rand::random::<u64>()))
    }

    /// An id derived from a batch's content (`prefix-` and the first 16 hex digits of its
    /// SHA-256), so a re-run of the same file is the same batch. `prefix` is a literal of
    /// letters, so the id always keeps the rule.
    pub fn of_content(prefix: &'static str, content: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(content));
        Self(format!("{prefix}-{}", &digest[..16]))
    }
}

checked_text!(
    /// A currency code as TarsPay spells it.
    Currency,
    "currency",
    is_currency,
    CURRENCY_RULE
);

/// A merchant profile's name: 1-32 of a-z, 0-9, '-' or '_', starting with a letter. Lower case
/// only, because `TARSPAY_MERCHANTS__<NAME>__…` variables are read in lower case, and it is
/// part of Redis keys (the merchant's lane and rate limit).
fn is_merchant_name(text: &str) -> bool {
    (1..=32).contains(&text.len())
        && text.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

const MERCHANT_RULE: &str =
    "must be 1-32 characters of a-z, 0-9, '-' or '_', starting with a letter";

checked_text!(
    /// A merchant profile of the settings (`[merchants.<name>]`, or `default` for the
    /// top-level merchant settings): whose key signs an order's calls.
    MerchantName,
    "merchant",
    is_merchant_name,
    MERCHANT_RULE
);

impl MerchantName {
    /// The profile of the top-level merchant settings (`mch_no`, `private_key`, …).
    pub const DEFAULT: &'static str = "default";

    pub fn default_profile() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }
}

impl Default for MerchantName {
    fn default() -> Self {
        Self::default_profile()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules_refuse_and_name_the_field() {
        for bad in ["", "a b", "x{y}", "ü", &"x".repeat(65)] {
            let err = MchOrderNo::parse(bad).unwrap_err();
            assert_eq!(err.field, "mchOrderNo");
            assert!(err.to_string().starts_with("must be 1-64"), "{err}");
            assert_eq!(BatchId::parse(bad).unwrap_err().field, "batchId");
        }
        for bad in ["", "inr", "INRR", "IN", "I1R"] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
        assert!(Currency::parse("BRA").is_ok());
        for bad in ["", "Kenya", "1st", "a b", "-x", &"x".repeat(33)] {
            assert_eq!(
                MerchantName::parse(bad).unwrap_err().field,
                "merchant",
                "{bad}"
            );
        }
        for good in ["default", "kenya", "in-2", "my_shop9"] {
            assert!(MerchantName::parse(good).is_ok(), "{good}");
        }
        let err = serde_json::from_str::<MchOrderNo>("\"a b\"").unwrap_err();
        assert!(err.to_string().contains("mchOrderNo must be"), "{err}");
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip_byte_for_byte(text in "[A-Za-z0-9_-]{1,64}") {
            let id: MchOrderNo = text.parse().unwrap();
            prop_assert_eq!(id.to_string(), text.clone());
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&text).unwrap());
            prop_assert_eq!(serde_json::from_str::<MchOrderNo>(&json).unwrap(), id);
            let batch: BatchId = text.parse().unwrap();
            prop_assert_eq!(batch.as_str(), text.as_str());
        }

        #[test]
        fn other_text_is_refused(text in ".{0,70}") {
            let valid = is_token(&text);
            prop_assert_eq!(MchOrderNo::parse(&text).is_ok(), valid);
            prop_assert_eq!(serde_json::from_value::<BatchId>(text.clone().into()).is_ok(), valid);
        }

        #[test]
        fn made_batch_ids_keep_the_rule(content in proptest::collection::vec(any::<u8>(), 0..64)) {
            let made = BatchId::of_content("payroll", &content);
            prop_assert!(BatchId::parse(made.as_str()).is_ok());
            prop_assert_eq!(made, BatchId::of_content("payroll", &content));
            prop_assert!(BatchId::parse(BatchId::random().as_str()).is_ok());
        }

        #[test]
        fn currencies_round_trip(text in "[A-Z]{3}") {
            let currency: Currency = text.parse().unwrap();
            prop_assert_eq!(serde_json::to_value(&currency).unwrap(), serde_json::Value::String(text.clone()));
            prop_assert_eq!(currency.to_string(), text);
        }
    }
}
