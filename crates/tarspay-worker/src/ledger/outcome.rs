//! The outcome stream's entries: one `final` per order, written by the ledger's final
//! transition, and rare `correction`s when the gateway later contradicts it.
//! The field names are a contract with consuming applications.

use super::{OrderKind, Phase};
use crate::ids::{BatchId, Currency, MchOrderNo, MerchantName};
use redis::Value;
use redis::streams::StreamRangeReply;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// How one order ended. Absent values are `None` (empty in the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// `final` for the order's first entry (exactly one per order); `correction` when a
    /// verified gateway state later contradicts it (at most one per order and new status).
    #[serde(default)]
    #[schema(value_type = String)]
    pub event: OutcomeEvent,
    /// With `correction`: the status this entry supersedes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub previous_status: Option<OutcomeStatus>,
    /// `payout` or `deposit`.
    #[schema(value_type = String)]
    pub kind: OrderKind,
    /// The merchant profile that created it (`default` for the top-level merchant).
    #[serde(default)]
    #[schema(value_type = String, example = "default")]
    pub merchant: MerchantName,
    #[schema(value_type = String)]
    pub mch_order_no: MchOrderNo,
    /// `succeeded`, `failed`, `rejected`, `refunded`, `conflict`; deposits also `expired`, `partial`.
    #[schema(value_type = String)]
    pub status: OutcomeStatus,
    /// TarsPay's final `state`, when the gateway reported one.
    pub gateway_state: Option<i64>,
    pub pay_order_id: Option<String>,
    pub amount: String,
    #[schema(value_type = String)]
    pub currency: Currency,
    pub fee: Option<String>,
    /// The gateway code (and message) that decided a failure.
    pub code: Option<i64>,
    pub msg: Option<String>,
    pub attempts: u32,
    #[schema(value_type = Option<String>)]
    pub batch_id: Option<BatchId>,
    /// RFC 3339, when the outcome was recorded.
    pub at: String,
}

/// Which entry of an order's outcomes this is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeEvent {
    /// The order's first outcome entry (exactly one per order). Entries written before
    /// corrections existed have no event: they are finals.
    #[default]
    Final,
    /// An entry that contradicts the recorded final status.
    Correction,
}

/// The event of an order's first outcome entry.
pub const FINAL_EVENT: &str = "final";
/// The event of an entry that contradicts the recorded final status.
pub const CORRECTION_EVENT: &str = "correction";

impl OutcomeEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Final => FINAL_EVENT,
            Self::Correction => CORRECTION_EVENT,
        }
    }
}

/// How an order ended: a final [`Phase`] (whose docs say what each means), and only that,
/// so an outcome can never carry `queued` or `accepted`. On the wire it is the phase's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutcomeStatus(Phase);

impl OutcomeStatus {
    /// The status a final phase reports; `None` for phases that are not final.
    pub fn from_phase(phase: Phase) -> Option<Self> {
        phase.is_final().then_some(Self(phase))
    }

    pub fn phase(self) -> Phase {
        self.0
    }

    pub fn as_str(self) -> &'static str {
        self.0.as_str()
    }
}

impl From<OutcomeStatus> for Phase {
    fn from(status: OutcomeStatus) -> Phase {
        status.0
    }
}

impl FromStr for OutcomeStatus {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let phase: Phase = text.parse()?;
        Self::from_phase(phase).ok_or_else(|| format!("{phase} is not a final status"))
    }
}

impl fmt::Display for OutcomeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for OutcomeStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for OutcomeStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl PartialEq<&str> for OutcomeStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for OutcomeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutcomeEvent {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            FINAL_EVENT => Ok(Self::Final),
            CORRECTION_EVENT => Ok(Self::Correction),
            _ => Err(format!("unknown event {text:?}")),
        }
    }
}

impl Outcome {
    pub fn is_correction(&self) -> bool {
        self.event == OutcomeEvent::Correction
    }
}

fn field(map: &HashMap<String, Value>, name: &str) -> Option<String> {
    crate::queue::entries::field(map, name).filter(|text| !text.is_empty())
}

/// A required field, parsed; the error names the field.
fn parsed<T: FromStr>(map: &HashMap<String, Value>, name: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    let text = field(map, name).ok_or_else(|| format!("{name} is missing"))?;
    text.parse().map_err(|err| format!("{name}: {err}"))
}

/// An optional field, parsed; the error names the field.
fn parsed_opt<T: FromStr>(map: &HashMap<String, Value>, name: &str) -> Result<Option<T>, String>
where
    T::Err: fmt::Display,
{
    field(map, name)
        .map(|text| text.parse().map_err(|err| format!("{name}: {err}")))
        .transpose()
}

impl Outcome {
    /// An outcome stream entry's fields; an entry this code did not write is an error that
    /// names the field, never a guess.
    pub(crate) fn from_fields(map: &HashMap<String, Value>) -> Result<Self, String> {
        Ok(Self {
            // Entries written before corrections existed have no event: they are finals.
            event: parsed_opt(map, "event")?.unwrap_or_default(),
            previous_status: parsed_opt(map, "previousStatus")?,
            kind: parsed(map, "kind")?,
            // Entries written before merchant profiles have none: the default merchant.
            merchant: parsed_opt(map, "merchant")?.unwrap_or_default(),
            mch_order_no: parsed(map, "mchOrderNo")?,
            status: parsed(map, "status")?,
            gateway_state: field(map, "gatewayState").and_then(|v| v.parse().ok()),
            pay_order_id: field(map, "payOrderId"),
            amount: field(map, "amount").unwrap_or_default(),
            currency: parsed(map, "currency")?,
            fee: field(map, "fee"),
            code: field(map, "code").and_then(|v| v.parse().ok()),
            msg: field(map, "msg"),
            attempts: field(map, "attempts")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            batch_id: parsed_opt(map, "batchId")?,
            at: field(map, "at").unwrap_or_default(),
        })
    }
}

/// The entries of an `XRANGE`/`XREAD` reply, in order.
pub(crate) fn parse_range(
    range: StreamRangeReply,
) -> Result<Vec<(String, Outcome)>, super::LedgerError> {
    range
        .ids
        .into_iter()
        .map(|entry| {
            let outcome =
                Outcome::from_fields(&entry.map).map_err(|reason| super::LedgerError::Corrupt {
                    id: format!("outcome entry {}", entry.id),
                    reason,
                })?;
            Ok((entry.id, outcome))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::BulkString(v.as_bytes().to_vec())))
            .collect()
    }

    const ENTRY: &[(&str, &str)] = &[
        ("kind", "payout"),
        ("mchOrderNo", "A-1"),
        ("status", "succeeded"),
        ("amount", "100"),
        ("currency", "INR"),
        ("batchId", "B"),
    ];

    #[test]
    fn stream_entries_parse_typed_and_bad_ones_name_the_field() {
        let outcome = Outcome::from_fields(&entry(ENTRY)).unwrap();
        assert_eq!(outcome.event, OutcomeEvent::Final, "no event: a final");
        assert_eq!(outcome.status.phase(), Phase::Succeeded);
        assert_eq!(outcome.kind, OrderKind::Payout);
        assert_eq!(outcome.batch_id.as_deref(), Some("B"));
        for (name, bad) in [
            ("status", "accepted"),
            ("kind", "refund"),
            ("mchOrderNo", "a b"),
            ("event", "maybe"),
            ("previousStatus", "queued"),
        ] {
            let mut fields = entry(ENTRY);
            fields.insert(name.into(), Value::BulkString(bad.as_bytes().to_vec()));
            let err = Outcome::from_fields(&fields).unwrap_err();
            assert!(err.starts_with(name), "{name}: {err}");
        }
    }

    #[test]
    fn statuses_are_exactly_the_final_phases() {
        for phase in Phase::ALL {
            let status = OutcomeStatus::from_phase(phase);
            assert_eq!(status.is_some(), phase.is_final(), "{phase}");
            if let Some(status) = status {
                assert_eq!(status.as_str(), phase.as_str());
            }
        }
    }

    proptest! {
        #[test]
        fn wire_text_round_trips(index in 0usize..Phase::ALL.len(), correction: bool) {
            let phase = Phase::ALL[index];
            let Some(status) = OutcomeStatus::from_phase(phase) else {
                prop_assert!(phase.as_str().parse::<OutcomeStatus>().is_err());
                return Ok(());
            };
            prop_assert_eq!(status.to_string().parse::<OutcomeStatus>(), Ok(status));
            let json = serde_json::to_string(&status).unwrap();
            prop_assert_eq!(json, format!("\"{status}\""));
            let event = if correction { OutcomeEvent::Correction } else { OutcomeEvent::Final };
            prop_assert_eq!(event.to_string().parse::<OutcomeEvent>(), Ok(event));
            prop_assert_eq!(serde_json::to_value(event).unwrap(), serde_json::Value::String(event.to_string()));
        }
    }
}
