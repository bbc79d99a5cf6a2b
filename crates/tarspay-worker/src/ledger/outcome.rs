//! The outcome stream's entries: one `final` per order, written by the ledger's final
//! transition, and rare `correction`s when the gateway later contradicts it.
//! The field names are a contract with consuming applications.

use redis::Value;
use redis::streams::StreamRangeReply;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How one order ended. Absent values are `None` (empty in the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// `final` for the order's first entry (exactly one per order); `correction` when a
    /// verified gateway state later contradicts it (at most one per order and new status).
    #[serde(default = "final_event")]
    pub event: String,
    /// With `correction`: the status this entry supersedes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<String>,
    /// `payout` or `deposit`.
    pub kind: String,
    pub mch_order_no: String,
    /// `succeeded`, `failed`, `rejected`, `refunded`, `conflict`; deposits also `expired`, `partial`.
    pub status: String,
    /// TarsPay's final `state`, when the gateway reported one.
    pub gateway_state: Option<i64>,
    pub pay_order_id: Option<String>,
    pub amount: String,
    pub currency: String,
    pub fee: Option<String>,
    /// The gateway code (and message) that decided a failure.
    pub code: Option<i64>,
    pub msg: Option<String>,
    pub attempts: u32,
    pub batch_id: Option<String>,
    /// RFC 3339, when the outcome was recorded.
    pub at: String,
}

/// The event of an order's first outcome entry.
pub const FINAL_EVENT: &str = "final";
/// The event of an entry that contradicts the recorded final status.
pub const CORRECTION_EVENT: &str = "correction";

fn final_event() -> String {
    FINAL_EVENT.to_owned()
}

impl Outcome {
    pub fn is_correction(&self) -> bool {
        self.event == CORRECTION_EVENT
    }
}

fn field(map: &HashMap<String, Value>, name: &str) -> Option<String> {
    crate::queue::entries::field(map, name).filter(|text| !text.is_empty())
}

impl Outcome {
    pub(crate) fn from_fields(map: &HashMap<String, Value>) -> Self {
        Self {
            // Entries written before corrections existed have no event: they are finals.
            event: field(map, "event").unwrap_or_else(final_event),
            previous_status: field(map, "previousStatus"),
            kind: field(map, "kind").unwrap_or_default(),
            mch_order_no: field(map, "mchOrderNo").unwrap_or_default(),
            status: field(map, "status").unwrap_or_default(),
            gateway_state: field(map, "gatewayState").and_then(|v| v.parse().ok()),
            pay_order_id: field(map, "payOrderId"),
            amount: field(map, "amount").unwrap_or_default(),
            currency: field(map, "currency").unwrap_or_default(),
            fee: field(map, "fee"),
            code: field(map, "code").and_then(|v| v.parse().ok()),
            msg: field(map, "msg"),
            attempts: field(map, "attempts")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            batch_id: field(map, "batchId"),
            at: field(map, "at").unwrap_or_default(),
        }
    }
}

pub(crate) fn parse_range(range: StreamRangeReply) -> Vec<(String, Outcome)> {
    range
        .ids
        .into_iter()
        .map(|entry| {
            let outcome = Outcome::from_fields(&entry.map);
            (entry.id, outcome)
        })
        .collect()
}
