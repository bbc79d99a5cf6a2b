//! What a producer may ask to pay out, and the per-currency rules that check it before anything
//! is queued. Every problem is reported with the field it concerns and the rule it broke.

use crate::gateway::types::CreatePayout;
use crate::ids::{Currency, MchOrderNo, MerchantName};
use crate::money::{Amount, AmountError};
use regex::Regex;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Longest accepted beneficiary field value.
pub const MAX_FIELD_LEN: usize = 256;
/// Fields a producer must not set: they come from the worker's settings.
pub const RESERVED_FIELDS: &[&str] = &["mchNo", "notifyUrl"];
/// The fields this module reads itself, and the reserved ones: no other field may differ
/// from one of them only in case or `_`.
const CORE_FIELDS: &[&str] = &[
    "mchOrderNo",
    "amount",
    "currency",
    "wayCode",
    "merchant",
    "mchNo",
    "notifyUrl",
];

/// The core field `name` differs from only in case or `_`, if any (not `name` itself).
fn lookalike_of_core_field(name: &str) -> Option<&'static str> {
    let folded = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let key = folded(name);
    CORE_FIELDS
        .iter()
        .copied()
        .find(|core| *core != name && folded(core) == key)
}

/// Why a field may not go to the gateway unchanged, if it may not: reserved or core (a
/// validated payout has taken its core fields out), named like a core field, not a field
/// name, or too long.
fn pass_through_problem(key: &str, value: &str) -> Option<String> {
    if RESERVED_FIELDS.contains(&key) {
        return Some("is set from the worker's settings; do not send it".into());
    }
    if CORE_FIELDS.contains(&key) {
        return Some("is a core field, not a pass-through one".into());
    }
    if let Some(like) = lookalike_of_core_field(key) {
        // A gateway whose JSON binding matches names loosely (case, '_') could read it as
        // the core field: a second amount, or another callback address.
        return Some(format!(
            "differs from the field {like:?} only in case or '_'"
        ));
    }
    let valid_name = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Some("is not a valid field name (a letter, then letters, digits or '_')".into());
    }
    if value.len() > MAX_FIELD_LEN {
        return Some(format!("is longer than {MAX_FIELD_LEN} bytes"));
    }
    None
}

/// A wayCode is passed through to the gateway when its currency publishes no closed list:
/// at most `MAX_FIELD_LEN` bytes, no control characters, no surrounding whitespace.
fn check_way_code(way_code: &str) -> Result<(), String> {
    if way_code.len() > MAX_FIELD_LEN {
        return Err(format!("is longer than {MAX_FIELD_LEN} bytes"));
    }
    if way_code.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    if way_code.trim() != way_code {
        return Err("must not start or end with whitespace".into());
    }
    Ok(())
}

/// One currency's payout rules, as written in settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CurrencyRule {
    pub country: String,
    /// Accepted wayCodes; empty when TarsPay publishes no closed list.
    #[serde(default)]
    pub way_codes: Vec<String>,
    #[serde(default)]
    pub min: Option<String>,
    #[serde(default)]
    pub max: Option<String>,
    #[serde(default)]
    pub whole_numbers: bool,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    #[serde(default)]
    pub required: bool,
    /// A regular expression the whole value must match.
    #[serde(default)]
    pub pattern: Option<String>,
    /// The rule in words, for error messages.
    #[serde(default)]
    pub rule: Option<String>,
}

struct CompiledField {
    required: bool,
    pattern: Option<Regex>,
    rule: String,
}

struct CompiledRule {
    way_codes: Vec<String>,
    min: Option<Decimal>,
    max: Option<Decimal>,
    whole_numbers: bool,
    fields: BTreeMap<String, CompiledField>,
}

/// Which merchant profile carries a payout: the one it names (`merchant`), else the one that
/// lists its currency, else `default` when that one may carry payouts.
#[derive(Debug, Clone)]
pub struct MerchantRouting {
    /// Every profile with the currencies it lists, `default` first.
    merchants: Vec<(MerchantName, Vec<Currency>)>,
    /// `default` carries payouts: it is the only profile, or it has a merchant number.
    default_carries: bool,
}

impl Default for MerchantRouting {
    /// One merchant, `default`, for every currency (a deployment without profiles).
    fn default() -> Self {
        Self {
            merchants: vec![(MerchantName::default_profile(), Vec::new())],
            default_carries: true,
        }
    }
}

impl MerchantRouting {
    pub fn new(merchants: Vec<(MerchantName, Vec<Currency>)>, default_carries: bool) -> Self {
        Self {
            merchants,
            default_carries,
        }
    }

    fn names(&self) -> String {
        let names: Vec<&str> = self.merchants.iter().map(|(n, _)| n.as_str()).collect();
        names.join(", ")
    }

    /// The payout's merchant, or the field error that says why none can carry it.
    pub fn route(
        &self,
        explicit: Option<&str>,
        currency: &Currency,
    ) -> Result<MerchantName, FieldError> {
        if let Some(text) = explicit {
            let name = MerchantName::parse(text)
                .map_err(|err| FieldError::new("merchant", err.to_string()))?;
            let Some((_, listed)) = self.merchants.iter().find(|(n, _)| *n == name) else {
                return Err(FieldError::new(
                    "merchant",
                    format!(
                        "{text:?} is not a configured merchant (configured: {})",
                        self.names()
                    ),
                ));
            };
            if name.is_default() && !self.default_carries {
                return Err(FieldError::new(
                    "merchant",
                    "\"default\" has no merchant number configured (mch_no): name another merchant",
                ));
            }
            if !listed.is_empty() && !listed.contains(currency) {
                let listed: Vec<&str> = listed.iter().map(Currency::as_str).collect();
                return Err(FieldError::new(
                    "merchant",
                    format!(
                        "{name} does not pay {currency} (it pays {})",
                        listed.join(", ")
                    ),
                ));
            }
            return Ok(name);
        }
        if let Some((name, _)) = self.merchants.iter().find(|(_, c)| c.contains(currency)) {
            return Ok(name.clone());
        }
        if self.default_carries {
            return Ok(MerchantName::default_profile());
        }
        Err(FieldError::new(
            "currency",
            format!(
                "no merchant profile pays {currency}: list it in a merchant's currencies, or name the merchant (configured: {})",
                self.names()
            ),
        ))
    }
}

/// All currency rules, compiled once, and how payouts find their merchant.
pub struct PayoutRules {
    currencies: BTreeMap<Currency, CompiledRule>,
    routing: MerchantRouting,
}

impl fmt::Debug for PayoutRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayoutRules")
            .field("currencies", &self.currencies.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn parse_limit(text: &Option<String>, which: &str) -> Result<Option<Decimal>, String> {
    text.as_deref()
        .map(|t| Decimal::from_str(t).map_err(|_| format!("{which} {t:?} is not a decimal number")))
        .transpose()
}

impl PayoutRules {
    /// Compiles settings; the error names the currency and what is wrong with its rule.
    pub fn compile(rules: &BTreeMap<String, CurrencyRule>) -> Result<Self, (String, String)> {
        let mut currencies = BTreeMap::new();
        for (currency, rule) in rules {
            let fail = |reason: String| (currency.clone(), reason);
            let code = Currency::parse(currency).map_err(|err| fail(format!("the key {err}")))?;
            let mut fields = BTreeMap::new();
            for (name, field) in &rule.fields {
                let pattern = field
                    .pattern
                    .as_deref()
                    .map(|p| {
                        // The whole value must match, whether or not the pattern says so.
                        Regex::new(&format!("^(?:{p})$"))
                            .map_err(|err| fail(format!("field {name}: bad pattern: {err}")))
                    })
                    .transpose()?;
                let rule_text = field
                    .rule
                    .clone()
                    .or_else(|| field.pattern.as_ref().map(|p| format!("must match {p}")))
                    .unwrap_or_default();
                fields.insert(
                    name.clone(),
                    CompiledField {
                        required: field.required,
                        pattern,
                        rule: rule_text,
                    },
                );
            }
            currencies.insert(
                code,
                CompiledRule {
                    way_codes: rule.way_codes.clone(),
                    min: parse_limit(&rule.min, "min").map_err(fail)?,
                    max: parse_limit(&rule.max, "max").map_err(fail)?,
                    whole_numbers: rule.whole_numbers,
                    fields,
                },
            );
        }
        Ok(Self {
            currencies,
            routing: MerchantRouting::default(),
        })
    }

    /// The same rules with merchant profiles to route to.
    pub fn with_routing(self, routing: MerchantRouting) -> Self {
        Self { routing, ..self }
    }

    pub fn currencies(&self) -> impl Iterator<Item = &str> {
        self.currencies.keys().map(Currency::as_str)
    }

    /// Checks a payout given as a JSON object (an API body, a line of a JSON-lines file).
    pub fn validate_json(&self, value: &Value) -> Result<PayoutRequest, ValidationErrors> {
        match value {
            Value::Object(map) => self.validate_object(map),
            _ => Err(ValidationErrors(vec![FieldError::new(
                "(body)",
                "must be a JSON object",
            )])),
        }
    }

    pub fn validate_object(
        &self,
        map: &Map<String, Value>,
    ) -> Result<PayoutRequest, ValidationErrors> {
        let mut errors: Vec<FieldError> = Vec::new();
        let mut text_fields = BTreeMap::new();
        for (key, value) in map {
            match value {
                Value::String(text) => {
                    text_fields.insert(key.clone(), text.clone());
                }
                Value::Null => {}
                _ if key == "amount" => {
                    errors.push(FieldError::new(key, AmountError::NotAString.to_string()))
                }
                _ => errors.push(FieldError::new(key, "must be a JSON string")),
            }
        }
        match self.validate_fields(text_fields) {
            Ok(request) if errors.is_empty() => Ok(request),
            Ok(_) => Err(ValidationErrors(errors)),
            Err(ValidationErrors(more)) => {
                // A field with the wrong JSON type is already reported; "is required" would
                // only repeat it.
                let wrong_type: Vec<String> = errors.iter().map(|e| e.field.clone()).collect();
                errors.extend(more.into_iter().filter(|e| !wrong_type.contains(&e.field)));
                errors.sort_by(|a, b| a.field.cmp(&b.field));
                Err(ValidationErrors(errors))
            }
        }
    }

    /// Checks a payout given as text fields (a CSV row, parsed JSON). Reports every problem.
    pub fn validate_fields(
        &self,
        mut fields: BTreeMap<String, String>,
    ) -> Result<PayoutRequest, ValidationErrors> {
        let mut errors = Vec::new();
        let mut take = |name: &str, errors: &mut Vec<FieldError>| match fields.remove(name) {
            Some(value) if !value.trim().is_empty() => Some(value),
            _ => {
                errors.push(FieldError::new(name, "is required"));
                None
            }
        };
        let mch_order_no = take("mchOrderNo", &mut errors);
        let amount_text = take("amount", &mut errors);
        let currency = take("currency", &mut errors);
        let way_code = take("wayCode", &mut errors);
        // Optional: which merchant profile pays it (routing by currency otherwise).
        let merchant = fields.remove("merchant").filter(|m| !m.trim().is_empty());

        let mch_order_no = mch_order_no.and_then(|id| match MchOrderNo::parse(&id) {
            Ok(id) => Some(id),
            Err(err) => {
                errors.push(FieldError::new(err.field, err.to_string()));
                None
            }
        });
        let amount = amount_text.and_then(|text| match Amount::parse(&text) {
            Ok(amount) => Some(amount),
            Err(err) => {
                errors.push(FieldError::new("amount", err.to_string()));
                None
            }
        });
        // A supported currency is a key of the rules, so it is a checked `Currency` already.
        let known =
            currency
                .as_ref()
                .and_then(|code| match self.currencies.get_key_value(code.as_str()) {
                    Some(found) => Some(found),
                    None => {
                        let known: Vec<&str> = self.currencies().collect();
                        errors.push(FieldError::new(
                            "currency",
                            format!(
                                "{code:?} is not a supported currency (supported: {})",
                                known.join(", ")
                            ),
                        ));
                        None
                    }
                });

        if let Some(way_code) = &way_code
            && let Err(rule) = check_way_code(way_code)
        {
            errors.push(FieldError::new("wayCode", rule));
        }

        let mut extras = BTreeMap::new();
        // Fields present but refused: not reported as missing too.
        let mut refused = Vec::new();
        for (key, value) in fields {
            if let Some(rule) = pass_through_problem(&key, &value) {
                errors.push(FieldError::new(&key, rule));
                refused.push(key);
                continue;
            }
            // Empty optional fields are dropped: empty fields are never sent.
            if !value.trim().is_empty() {
                extras.insert(key, value);
            }
        }

        let currency = known.map(|(code, _)| code.clone());
        let merchant = match &currency {
            Some(currency) => match self.routing.route(merchant.as_deref(), currency) {
                Ok(merchant) => Some(merchant),
                Err(err) => {
                    errors.push(err);
                    None
                }
            },
            None => None,
        };
        if let (Some((_, rule)), Some(currency)) = (known, &currency) {
            if let Some(way_code) = &way_code
                && !rule.way_codes.is_empty()
                && !rule.way_codes.contains(way_code)
            {
                errors.push(FieldError::new(
                    "wayCode",
                    format!(
                        "{way_code:?} is not a payout wayCode for {currency} (allowed: {})",
                        rule.way_codes.join(", ")
                    ),
                ));
            }
            if let Some(amount) = &amount {
                // Any decimal point, even "100.00": the gateway's rule is whole numbers, and
                // whether it reads "100.00" as one is not documented, so it is never sent.
                if rule.whole_numbers && amount.as_str().contains('.') {
                    errors.push(FieldError::new(
                        "amount",
                        format!("{currency} takes whole numbers: no decimal point"),
                    ));
                }
                if let Some(min) = rule.min
                    && amount.value() < min
                {
                    errors.push(FieldError::new(
                        "amount",
                        format!("must be at least {min} {currency}"),
                    ));
                }
                if let Some(max) = rule.max
                    && amount.value() > max
                {
                    errors.push(FieldError::new(
                        "amount",
                        format!("must be at most {max} {currency}"),
                    ));
                }
            }
            for (name, field) in &rule.fields {
                match extras.get(name) {
                    None if field.required && !refused.contains(name) => errors.push(
                        FieldError::new(name, format!("is required for {currency} payouts")),
                    ),
                    Some(value) if field.pattern.as_ref().is_some_and(|p| !p.is_match(value)) => {
                        errors.push(FieldError::new(name, format!("must be {}", field.rule)))
                    }
                    _ => {}
                }
            }
        }

        match (mch_order_no, amount, currency, way_code, merchant) {
            (Some(mch_order_no), Some(amount), Some(currency), Some(way_code), Some(merchant))
                if errors.is_empty() =>
            {
                Ok(PayoutRequest {
                    mch_order_no,
                    amount,
                    currency,
                    way_code,
                    merchant,
                    fields: extras,
                })
            }
            _ => {
                errors.sort_by(|a, b| a.field.cmp(&b.field));
                Err(ValidationErrors(errors))
            }
        }
    }
}

/// A payout that passed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Payout)]
pub struct PayoutRequest {
    /// Your order id: the payout's idempotency key for life.
    #[schema(value_type = String, pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub mch_order_no: MchOrderNo,
    pub amount: Amount,
    /// A currency of the worker's payout rules (`[currencies.*]` in settings).
    #[schema(value_type = String, examples("INR", "BDT", "KES", "MYR", "PHP", "PKR"))]
    pub currency: Currency,
    #[schema(examples("UPI", "EWALLET_BKASH", "EWALLET_MPESA"))]
    pub way_code: String,
    /// The merchant profile that pays it: optional on input (else the profile listing the
    /// currency, else `default`); never sent to the gateway. Stored only when not `default`,
    /// so payouts registered before profiles compare equal.
    #[serde(default, skip_serializing_if = "MerchantName::is_default")]
    #[schema(value_type = Option<String>, example = "kenya")]
    pub merchant: MerchantName,
    /// Beneficiary fields and merchant extras, passed through unchanged.
    #[serde(flatten)]
    pub fields: BTreeMap<String, String>,
}

impl PayoutRequest {
    /// The checks on what goes to the gateway unchanged (`wayCode`, the pass-through fields),
    /// for a payout built in code rather than by [`PayoutRules::validate_fields`], whose
    /// checks these repeat: a producer enqueues nothing that fails them.
    pub fn check_pass_through(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if let Err(rule) = check_way_code(&self.way_code) {
            errors.push(FieldError::new("wayCode", rule));
        }
        for (key, value) in &self.fields {
            if let Some(rule) = pass_through_problem(key, value) {
                errors.push(FieldError::new(key, rule));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }

    pub fn to_create(&self, notify_url: &str) -> CreatePayout {
        CreatePayout {
            mch_order_no: self.mch_order_no.to_string(),
            way_code: self.way_code.clone(),
            amount: self.amount.clone(),
            currency: self.currency.to_string(),
            notify_url: notify_url.to_owned(),
            fields: self.fields.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub rule: String,
}

impl FieldError {
    pub fn new(field: &str, rule: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            rule: rule.into(),
        }
    }
}

/// Every problem found in one payout, sorted by field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", error.field, error.rule)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Figment;
    use figment::providers::{Format, Toml};
    use serde_json::json;

    /// The shipped rules, read straight from the defaults (settings depend on this module).
    fn rules() -> PayoutRules {
        let shipped: BTreeMap<String, CurrencyRule> =
            Figment::from(Toml::string(include_str!("../config/default.toml")))
                .extract_inner("currencies")
                .unwrap();
        PayoutRules::compile(&shipped).unwrap()
    }

    fn fields_of(errors: &ValidationErrors) -> Vec<&str> {
        errors.0.iter().map(|e| e.field.as_str()).collect()
    }

    fn india() -> Value {
        json!({"mchOrderNo": "PAY-1", "amount": "150.50", "currency": "INR", "wayCode": "UPI",
               "customerName": "Asha", "customerEmail": "asha@example.in", "customerContact": "9876543210",
               "ifsc": "HDFC0001234", "someMerchantField": "kept"})
    }

    #[test]
    fn valid_payouts_pass_with_extras_kept() {
        let request = rules().validate_json(&india()).unwrap();
        assert_eq!(request.amount.as_str(), "150.50");
        assert_eq!(
            request.fields.get("someMerchantField").map(String::as_str),
            Some("kept")
        );
        let bd = json!({"mchOrderNo": "B1", "amount": "500", "currency": "BDT", "wayCode": "EWALLET_BKASH", "walletId": "01712345678"});
        assert!(rules().validate_json(&bd).is_ok());
        let ke = json!({"mchOrderNo": "K1", "amount": "1000", "currency": "KES", "wayCode": "EWALLET_MPESA",
                        "customerContact": "254712345678", "customerName": "Wanjiru", "customerEmail": "w@example.ke"});
        assert!(rules().validate_json(&ke).is_ok());
        let my =
            json!({"mchOrderNo": "M1", "amount": "75.20", "currency": "MYR", "wayCode": "MAYBANK"});
        assert!(
            rules().validate_json(&my).is_ok(),
            "open wayCode list passes through"
        );
    }

    #[test]
    fn every_field_error_is_reported_at_once() {
        let errors = rules()
            .validate_json(&json!({"amount": 100, "currency": "XXX", "notifyUrl": "http://x"}))
            .unwrap_err();
        assert_eq!(
            fields_of(&errors),
            vec!["amount", "currency", "mchOrderNo", "notifyUrl", "wayCode"]
        );
        assert!(errors.to_string().contains("not a number"), "{errors}");
    }

    #[test]
    fn each_rule_names_field_and_rule() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({"amount": "-5"}), "amount", "negative"),
            (json!({"amount": "0"}), "amount", "greater than zero"),
            (json!({"amount": "12.345"}), "amount", "decimal places"),
            (json!({"amount": "99"}), "amount", "at least 100"),
            (json!({"amount": "50001"}), "amount", "at most 50000"),
            (
                json!({"wayCode": "PAYTM"}),
                "wayCode",
                "not a payout wayCode for INR",
            ),
            (
                json!({"customerName": ""}),
                "customerName",
                "required for INR",
            ),
            (json!({"customerEmail": "nope"}), "customerEmail", "e-mail"),
            (json!({"ifsc": "SHORT"}), "ifsc", "11 letters"),
            (
                json!({"mchOrderNo": "has space"}),
                "mchOrderNo",
                "characters of",
            ),
            (json!({"mchOrderNo": "x".repeat(65)}), "mchOrderNo", "1-64"),
            (
                json!({"bad-name": "v"}),
                "bad-name",
                "not a valid field name",
            ),
            (
                json!({"customerContact": 9876543210u64}),
                "customerContact",
                "JSON string",
            ),
            (json!({"mchNo": "M1234567890"}), "mchNo", "settings"),
        ];
        for (patch, field, needle) in cases {
            let mut body = india();
            for (key, value) in patch.as_object().unwrap() {
                body[key] = value.clone();
            }
            let errors = rules().validate_json(&body).unwrap_err();
            let hit = errors
                .0
                .iter()
                .find(|e| e.field == field)
                .unwrap_or_else(|| panic!("{field}: {errors}"));
            assert!(hit.rule.contains(needle), "{field}: {}", hit.rule);
        }
    }

    #[test]
    fn an_open_way_code_is_bounded_and_trimmed() {
        let malaysia = |way_code: &str| json!({"mchOrderNo": "M1", "amount": "75", "currency": "MYR", "wayCode": way_code});
        assert!(rules().validate_json(&malaysia("TOUCH 'N_GO")).is_ok());
        for (way_code, needle) in [
            ("x".repeat(MAX_FIELD_LEN + 1), "longer than 256 bytes"),
            (" MAYBANK".to_owned(), "whitespace"),
            ("MAYBANK\n".to_owned(), "control characters"),
            ("MAY\u{0}BANK".to_owned(), "control characters"),
        ] {
            let errors = rules().validate_json(&malaysia(&way_code)).unwrap_err();
            assert_eq!(fields_of(&errors), vec!["wayCode"], "{way_code:?}");
            assert!(errors.0[0].rule.contains(needle), "{way_code:?}: {errors}");
        }
    }

    #[test]
    fn a_field_named_like_a_core_field_is_refused() {
        // A loosely matching JSON binding at the gateway could read these as the amount or
        // the callback address.
        for name in [
            "amount_",
            "Amount",
            "AMOUNT",
            "NotifyUrl",
            "notify_url",
            "Currency",
            "way_code",
            "mch_order_no",
            "MchNo",
        ] {
            let mut body = india();
            body[name] = json!("45000");
            let errors = rules().validate_json(&body).unwrap_err();
            assert_eq!(fields_of(&errors), vec![name], "{name}: {errors}");
            assert!(
                errors.0[0].rule.contains("only in case or '_'"),
                "{name}: {errors}"
            );
        }
        let mut body = india();
        body["amountNote"] = json!("salary");
        assert!(
            rules().validate_json(&body).is_ok(),
            "a longer name is its own field"
        );
    }

    #[test]
    fn a_payout_built_in_code_is_checked_on_what_goes_through() {
        let mut request = rules().validate_json(&india()).unwrap();
        assert!(request.check_pass_through().is_ok());
        request.way_code = " UPI\n".into();
        request.fields.insert("Amount".into(), "45000".into());
        request.fields.insert("amount".into(), "45000".into());
        request.fields.insert("bad-name".into(), "x".into());
        request
            .fields
            .insert("note".into(), "x".repeat(MAX_FIELD_LEN + 1));
        let errors = request.check_pass_through().unwrap_err();
        let mut fields = fields_of(&errors);
        fields.sort();
        assert_eq!(
            fields,
            vec!["Amount", "amount", "bad-name", "note", "wayCode"],
            "{errors}"
        );
    }

    #[test]
    fn a_field_pattern_must_match_the_whole_value() {
        let unanchored: BTreeMap<String, CurrencyRule> = Figment::from(Toml::string(
            "[MYR]\ncountry = \"Malaysia\"\nfields.account = { pattern = \"[0-9]{10}\" }\n",
        ))
        .extract()
        .unwrap();
        let rules = PayoutRules::compile(&unanchored).unwrap();
        let body = |account: &str| json!({"mchOrderNo": "M1", "amount": "75", "currency": "MYR", "wayCode": "CIMB", "account": account});
        assert!(rules.validate_json(&body("0123456789")).is_ok());
        let errors = rules.validate_json(&body("abc0123456789xyz")).unwrap_err();
        assert_eq!(fields_of(&errors), vec!["account"]);
    }

    #[test]
    fn a_required_field_too_long_is_reported_once() {
        let bd = json!({"mchOrderNo": "B1", "amount": "500", "currency": "BDT", "wayCode": "EWALLET_BKASH",
                        "walletId": "0".repeat(MAX_FIELD_LEN + 1)});
        let errors = rules().validate_json(&bd).unwrap_err();
        assert_eq!(fields_of(&errors), vec!["walletId"], "{errors}");
        assert!(errors.0[0].rule.contains("longer than"), "{errors}");
    }

    #[test]
    fn whole_number_currencies_and_country_fields() {
        let bd = json!({"mchOrderNo": "B1", "amount": "500.50", "currency": "BDT", "wayCode": "EWALLET_NAGAD", "walletId": "1712345678"});
        let errors = rules().validate_json(&bd).unwrap_err();
        assert_eq!(fields_of(&errors), vec!["amount", "walletId"]);
        let ke = json!({"mchOrderNo": "K1", "amount": "100", "currency": "KES", "wayCode": "EWALLET_MPESA",
                        "customerContact": "+254712345678", "customerName": "W", "customerEmail": "w@x.ke"});
        let errors = rules().validate_json(&ke).unwrap_err();
        assert!(errors.0[0].rule.contains("no +"), "{errors}");
        let pk =
            json!({"mchOrderNo": "P1", "amount": "10.5", "currency": "PKR", "wayCode": "jazzcash"});
        assert!(
            rules()
                .validate_json(&pk)
                .unwrap_err()
                .to_string()
                .contains("PKR takes whole numbers: no decimal point")
        );
    }

    #[test]
    fn whole_number_currencies_refuse_any_decimal_point() {
        let base = json!({"mchOrderNo": "B1", "currency": "BDT", "wayCode": "EWALLET_BKASH", "walletId": "01712345678"});
        for amount in ["100.00", "100.0", "500.50"] {
            let mut body = base.clone();
            body["amount"] = json!(amount);
            let errors = rules().validate_json(&body).unwrap_err();
            assert_eq!(
                errors.0,
                vec![FieldError::new(
                    "amount",
                    "BDT takes whole numbers: no decimal point"
                )],
                "{amount}"
            );
        }
        let ke = json!({"mchOrderNo": "K1", "amount": "1000.00", "currency": "KES", "wayCode": "EWALLET_MPESA",
                        "customerContact": "254712345678", "customerName": "W", "customerEmail": "w@example.ke"});
        assert_eq!(
            rules().validate_json(&ke).unwrap_err().to_string(),
            "amount: KES takes whole numbers: no decimal point"
        );
        // Other currencies keep their decimals.
        let mut inr = india();
        inr["amount"] = json!("150.00");
        assert_eq!(
            rules().validate_json(&inr).unwrap().amount.as_str(),
            "150.00"
        );
    }

    #[test]
    fn to_create_carries_everything() {
        let request = rules().validate_json(&india()).unwrap();
        let create = request.to_create("https://m.example/notify");
        let params = create.params("M1234567890");
        assert_eq!(params.get("ifsc"), Some("HDFC0001234"));
        assert_eq!(params.get("notifyUrl"), Some("https://m.example/notify"));
        assert_eq!(params.get("wayCode"), Some("UPI"));
    }
}
