//! The sandbox's configuration: merchants, the schedule orders follow, which final state each
//! order reaches, and the faults to inject. All of it deterministic, chosen per order by a
//! prefix of its `mchOrderNo`.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tarspay_worker::gateway::OrderState;
use tarspay_worker::gateway::keys::{PrivateKey, PublicKey};

/// A key pair for the sandbox's own "system" signatures on callbacks. It is published on
/// purpose: it protects nothing but sandbox traffic.
pub const SANDBOX_SYSTEM_PRIVATE_KEY: &str =
    "d6c2c909d4b2d0023d52b5f4182590d8a3ce9f8b073ad842a7adf41a103127d2";

#[derive(Debug, Clone)]
pub struct SandboxMerchant {
    pub mch_no: String,
    pub public_key: PublicKey,
    /// Available balance at start, in major units.
    pub balance: Decimal,
}

impl SandboxMerchant {
    pub fn new(mch_no: impl Into<String>, public_key: PublicKey, balance: Decimal) -> Self {
        Self {
            mch_no: mch_no.into(),
            public_key,
            balance,
        }
    }
}

/// A merchant's own balance in one currency. A merchant's payouts in a currency that has one
/// draw on it; payouts in any other currency draw on the merchant's `balance` (one account
/// for every currency without its own, as the sandbox had before currencies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyBalance {
    pub mch_no: String,
    pub currency: String,
    /// Available balance at start, in major units.
    pub available: Decimal,
}

/// A merchant's rate limit: `per_second` calls per second sustained, up to `burst` at once
/// (GCRA). Calls beyond it are answered HTTP 429 with `Retry-After` and change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    /// A rate above 0 (at most 10⁹/s) and a burst of at least 1.
    pub fn is_valid(&self) -> bool {
        self.per_second.is_finite()
            && self.per_second > 0.0
            && self.per_second <= 1e9
            && self.burst >= 1
    }
}

/// The endpoint a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    CreatePayout,
    QueryPayout,
    CreateDeposit,
    QueryDeposit,
    Balance,
    PayoutProof,
    Any,
}

/// What to do instead of (or around) the normal answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum FaultAction {
    /// Answer with this gateway error code; nothing is created.
    Code {
        code: i64,
        #[serde(default)]
        msg: Option<String>,
    },
    /// Wait, then handle the call normally.
    Latency { ms: u64 },
    /// Handle the call (an order is created), then wait before answering: with a wait beyond
    /// the client's timeout this is the "timed out after the gateway committed" case.
    Slow { ms: u64 },
    /// Handle the call (an order is created), then close the connection with no answer.
    CommitThenDrop,
    /// Close the connection with no answer and without handling the call.
    Drop,
    /// Answer with an HTTP status and body (default: a 502 HTML page), optionally after
    /// handling the call.
    Http {
        status: u16,
        #[serde(default)]
        commit: bool,
        #[serde(default)]
        body: Option<String>,
    },
    /// Answer 200 with this exact body (bad envelopes).
    Raw { body: String },
    /// Answer 200 with a valid-looking envelope of this many bytes.
    Oversize { bytes: usize },
    /// Queries only: for `ms` after an order was created, a lookup of it answers "no such
    /// order" (5003020 for payouts, 5003018 for deposits), as a gateway whose reads lag its
    /// writes. After that the order is found. Unknown orders are answered as usual.
    LookupLag { ms: u64 },
    /// Handle the call normally and send the answer compressed (`Content-Encoding`), whether
    /// or not the client said it takes that encoding, as a gateway or a proxy in front of it
    /// may. With `padding`, the answer is instead a valid-looking envelope of that many bytes
    /// before compression (an answer small on the wire and large decoded).
    Compressed {
        encoding: ContentEncoding,
        #[serde(default)]
        padding: Option<usize>,
    },
    /// Creates only: a create for an `mchOrderNo` the sandbox already holds is answered with
    /// this code (e.g. 5004006, 5003006, 5003007) instead of 5003011, as a gateway that checks
    /// balance or key before duplicates. The held order is unaffected; a first create is
    /// handled as usual.
    RefuseRepeat {
        code: i64,
        #[serde(default)]
        msg: Option<String>,
    },
}

/// An HTTP content encoding the sandbox can answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentEncoding {
    Gzip,
    /// zlib-wrapped deflate (RFC 1950), as HTTP's `deflate` is.
    Deflate,
}

impl FaultAction {
    /// Whether this action applies to this call; a rule that does not apply is skipped (and
    /// uses none of its `times`), so it never shadows a later rule. `age` is how long ago the
    /// sandbox created the call's order, `None` if it holds none.
    pub(crate) fn applies(&self, endpoint: Endpoint, age: Option<Duration>) -> bool {
        match self {
            Self::LookupLag { ms } => {
                matches!(endpoint, Endpoint::QueryPayout | Endpoint::QueryDeposit)
                    && age.is_some_and(|age| age < Duration::from_millis(*ms))
            }
            Self::RefuseRepeat { .. } => {
                matches!(endpoint, Endpoint::CreatePayout | Endpoint::CreateDeposit)
                    && age.is_some()
            }
            _ => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Applies to orders whose `mchOrderNo` starts with this; empty matches every call.
    #[serde(default)]
    pub prefix: String,
    pub endpoint: Endpoint,
    /// Apply to the first N matching calls per order only; absent means every call.
    #[serde(default)]
    pub times: Option<u32>,
    #[serde(flatten)]
    pub action: FaultAction,
}

/// Orders whose `mchOrderNo` starts with `prefix` end in `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRule {
    pub prefix: String,
    pub state: i64,
    /// Overrides the schedule's time to final for these orders.
    #[serde(default, with = "optional_millis")]
    pub final_after_ms: Option<Duration>,
}

mod optional_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub system_key: PrivateKey,
    pub merchants: Vec<SandboxMerchant>,
    /// Balances of their own for some merchants' currencies (applied at start, after
    /// `merchants`; at run time use [`crate::Sandbox::set_balance`]).
    pub balances: Vec<CurrencyBalance>,
    /// Rate limits by `mchNo` (applied at start; at run time use
    /// [`crate::Sandbox::set_rate_limit`]). A merchant without one is not limited.
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// From creation until this much time has passed the order is `creating` (0).
    pub processing_after: Duration,
    /// From creation until this much time has passed the order is `processing` (1); then final.
    pub final_after: Duration,
    /// Final state of payouts no outcome rule matches.
    pub default_payout_state: OrderState,
    /// Final state of deposits no outcome rule matches.
    pub default_deposit_state: OrderState,
    pub outcomes: Vec<OutcomeRule>,
    pub faults: Vec<FaultRule>,
    /// Send callbacks to `notifyUrl` when orders become final.
    pub callbacks: bool,
    /// TarsPay resends until it reads `OK`, up to this many sends in all.
    pub callback_attempts: u32,
    /// First wait between sends; doubles each time, capped at 64× this.
    pub callback_retry_delay: Duration,
    pub callback_timeout: Duration,
    /// Signatures whose nonce is further than this from the sandbox's clock are refused.
    pub nonce_window: Duration,
    /// Largest request body read.
    pub max_body_bytes: usize,
    /// A balance query that names a `currency` (this sandbox's extension; TarsPay documents
    /// no parameter there) is refused with this code, as a gateway that knows no such field
    /// may answer (e.g. 5003001, a parameter refusal). `None` (the default) answers it.
    pub refuse_balance_currency: Option<i64>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            system_key: PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY)
                .unwrap_or_else(|_| PrivateKey::generate()),
            merchants: Vec::new(),
            balances: Vec::new(),
            rate_limits: BTreeMap::new(),
            processing_after: Duration::from_millis(0),
            final_after: Duration::from_millis(500),
            default_payout_state: OrderState::Success,
            default_deposit_state: OrderState::Success,
            outcomes: Vec::new(),
            faults: Vec::new(),
            callbacks: true,
            callback_attempts: 16,
            callback_retry_delay: Duration::from_secs(1),
            callback_timeout: Duration::from_secs(10),
            nonce_window: Duration::from_secs(300),
            max_body_bytes: 64 * 1024,
            refuse_balance_currency: None,
        }
    }
}

impl SandboxConfig {
    /// The final state and schedule for a new order.
    pub(crate) fn outcome_for(
        &self,
        mch_order_no: &str,
        default: OrderState,
    ) -> (OrderState, Duration) {
        self.outcomes
            .iter()
            .find(|rule| mch_order_no.starts_with(&rule.prefix))
            .map(|rule| {
                (
                    OrderState::from(rule.state),
                    rule.final_after_ms.unwrap_or(self.final_after),
                )
            })
            .unwrap_or((default, self.final_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_failure_rules_read_from_json() {
        let rules: Vec<FaultRule> = serde_json::from_str(
            r#"[{"prefix": "LAG-", "endpoint": "query_payout", "action": "lookup_lag", "ms": 2000},
                {"prefix": "BAL-", "endpoint": "create_payout", "action": "refuse_repeat", "code": 5004006}]"#,
        )
        .unwrap();
        assert_eq!(rules[0].action, FaultAction::LookupLag { ms: 2000 });
        assert_eq!(
            rules[1].action,
            FaultAction::RefuseRepeat {
                code: 5004006,
                msg: None
            }
        );
    }

    #[test]
    fn conditional_actions_apply_only_where_they_mean_something() {
        let lag = FaultAction::LookupLag { ms: 1000 };
        let young = Some(Duration::from_millis(10));
        let old = Some(Duration::from_millis(1000));
        assert!(lag.applies(Endpoint::QueryPayout, young));
        assert!(!lag.applies(Endpoint::QueryPayout, old), "the lag is over");
        assert!(!lag.applies(Endpoint::QueryPayout, None), "unknown order");
        assert!(!lag.applies(Endpoint::CreatePayout, young));
        let repeat = FaultAction::RefuseRepeat {
            code: 5003007,
            msg: None,
        };
        assert!(repeat.applies(Endpoint::CreatePayout, old));
        assert!(
            !repeat.applies(Endpoint::CreatePayout, None),
            "first create"
        );
        assert!(!repeat.applies(Endpoint::QueryPayout, old));
    }
}
