//! The sandbox's configuration: merchants, the schedule orders follow, which final state each
//! order reaches, and the faults to inject. All of it deterministic, chosen per order by a
//! prefix of its `mchOrderNo`.

use crate::gateway::OrderState;
use crate::gateway::keys::{PrivateKey, PublicKey};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            system_key: PrivateKey::from_hex(SANDBOX_SYSTEM_PRIVATE_KEY)
                .unwrap_or_else(|_| PrivateKey::generate()),
            merchants: Vec::new(),
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
