//! Money as decimal text, never floating point. An [`Amount`] keeps the exact string the
//! merchant gave (TarsPay accepts `"100"` and `"100.00"` alike) next to its decimal value.

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// No currency TarsPay serves has minor units finer than this.
pub const MAX_DECIMALS: u32 = 2;
/// Far above any single payout; keeps values well inside `Decimal`'s range.
const MAX_INTEGER_DIGITS: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("is empty")]
    Empty,
    #[error("must not be negative")]
    Negative,
    #[error("must be greater than zero")]
    Zero,
    #[error(
        "must be a plain decimal number such as \"100\" or \"100.50\" (digits and at most one '.', no sign, exponent, spaces or thousands separators)"
    )]
    Format,
    #[error("has {found} decimal places; at most {max} are allowed")]
    TooManyDecimals { found: u32, max: u32 },
    #[error("has more than {MAX_INTEGER_DIGITS} digits before the decimal point")]
    TooLarge,
    #[error("must be a JSON string such as \"100.50\", not a number (money is never a float)")]
    NotAString,
}

/// A positive amount in major currency units.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Amount {
    text: String,
    value: Decimal,
}

impl Amount {
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        if let Some(rest) = text.strip_prefix('-')
            && Self::parse(rest).is_ok()
        {
            return Err(AmountError::Negative);
        }
        let (integer, fraction) = match text.split_once('.') {
            Some((integer, fraction)) => (integer, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(integer) || fraction.is_some_and(|f| !all_digits(f)) {
            return Err(AmountError::Format);
        }
        // "007" is almost certainly a typo or a padded field; refuse rather than guess.
        if integer.len() > 1 && integer.starts_with('0') {
            return Err(AmountError::Format);
        }
        if integer.len() > MAX_INTEGER_DIGITS {
            return Err(AmountError::TooLarge);
        }
        let decimals = fraction.map_or(0, |f| f.len() as u32);
        if decimals > MAX_DECIMALS {
            return Err(AmountError::TooManyDecimals {
                found: decimals,
                max: MAX_DECIMALS,
            });
        }
        let value = Decimal::from_str(text).map_err(|_| AmountError::Format)?;
        if value.is_zero() {
            return Err(AmountError::Zero);
        }
        Ok(Self {
            text: text.to_owned(),
            value,
        })
    }

    /// The exact text to send to the gateway.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn value(&self) -> Decimal {
        self.value
    }

    /// Digits after the decimal point as written (`"100.00"` has 2).
    pub fn decimals(&self) -> u32 {
        self.text.split_once('.').map_or(0, |(_, f)| f.len() as u32)
    }

    /// True when the value has no fractional part (`"100.00"` is whole).
    pub fn is_whole(&self) -> bool {
        self.value.fract().is_zero()
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Amount({})", self.text)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Amount {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match value {
            serde_json::Value::String(text) => Self::parse(&text).map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(AmountError::NotAString)),
        }
    }
}

/// What [`Amount::parse`] accepts, as a JSON Schema pattern: a positive decimal (`"0"` and
/// `"0.00"` are refused), no leading zero, at most 15 digits before the point and 2 after.
pub const AMOUNT_PATTERN: &str = r"^([1-9][0-9]{0,14}(\.[0-9]{1,2})?|0\.(0[1-9]|[1-9][0-9]?))$";

impl utoipa::PartialSchema for Amount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(AMOUNT_PATTERN))
            .description(Some(
                "A positive amount in major units, as a decimal string (never a JSON number). \
                 Whole-number currencies (BDT, PKR, KES) take no decimal point, not even .00.",
            ))
            .examples(["100", "150.50"])
            .into()
    }
}

impl utoipa::ToSchema for Amount {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_schema_pattern_accepts_exactly_what_parse_accepts(text in "-?[0-9]{0,17}(\\.[0-9]{0,3})?") {
            let pattern = regex::Regex::new(AMOUNT_PATTERN).unwrap();
            prop_assert_eq!(pattern.is_match(&text), Amount::parse(&text).is_ok(), "{}", text);
        }
    }

    #[test]
    fn the_schema_pattern_refuses_zero() {
        let pattern = regex::Regex::new(AMOUNT_PATTERN).unwrap();
        for zero in ["0", "0.0", "0.00", "00"] {
            assert!(!pattern.is_match(zero), "{zero}");
        }
        for positive in ["0.01", "0.5", "1", "100.00"] {
            assert!(pattern.is_match(positive), "{positive}");
        }
    }

    #[test]
    fn accepts_plain_decimals_and_keeps_the_text() {
        for text in ["1", "100", "100.5", "100.50", "0.01", "49999.99"] {
            let amount = Amount::parse(text).unwrap();
            assert_eq!(amount.as_str(), text);
        }
        assert!(Amount::parse("100.00").unwrap().is_whole());
        assert!(!Amount::parse("100.01").unwrap().is_whole());
        assert_eq!(Amount::parse("100.50").unwrap().decimals(), 2);
    }

    #[test]
    fn rejects_each_bad_form_with_its_own_reason() {
        use AmountError::*;
        for (text, expected) in [
            ("", Empty),
            ("-5", Negative),
            ("-0.5", Negative),
            ("0", Zero),
            ("0.00", Zero),
            ("1e3", Format),
            ("+5", Format),
            (" 5", Format),
            ("5 ", Format),
            ("1,000", Format),
            ("1.2.3", Format),
            (".5", Format),
            ("5.", Format),
            ("007", Format),
            ("NaN", Format),
            ("١٠٠", Format),
            ("1.234", TooManyDecimals { found: 3, max: 2 }),
            ("1234567890123456", TooLarge),
        ] {
            assert_eq!(Amount::parse(text), Err(expected.clone()), "input {text:?}");
        }
    }

    #[test]
    fn json_numbers_are_refused() {
        let err = serde_json::from_str::<Amount>("100.5").unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
        let ok: Amount = serde_json::from_str("\"100.5\"").unwrap();
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"100.5\"");
    }

    proptest! {
        #[test]
        fn valid_text_round_trips_exactly(integer in 1u64..999_999_999_999, cents in proptest::option::of(0u32..100)) {
            let text = match cents {
                Some(c) => format!("{integer}.{c:02}"),
                None => integer.to_string(),
            };
            let amount = Amount::parse(&text).unwrap();
            prop_assert_eq!(amount.as_str(), text.as_str());
            prop_assert_eq!(amount.value().to_string(), text);
        }

        #[test]
        fn never_panics(text in ".{0,30}") {
            let _ = Amount::parse(&text);
        }
    }
}
