//! Each order's event history: what happened to it besides its milestones (which the record
//! itself keeps with their times: registration, acceptance, final, corrections). The events
//! ride with the ledger operation that follows them, in the same script call. The events
//! that led to the acceptance or to the final state (a payout's create answer, the poll or
//! callback that found it final) are kept inside that milestone's JSON (`events`): no
//! command of their own, and they expire with the record. Any other event goes to one Redis
//! list per order (`{tag}:events:<mchOrderNo>`), capped at [`MAX_EVENTS`] (the oldest go
//! first). A list begun after the order became final gets the record's expiry; one begun
//! while it was in flight (failed creates, pending polls) expires twice the retention after
//! it began ([`list_ttl_ms`]) and goes earlier with the order's time index entry, twice the
//! retention after registration (`Ledger::trim_indexes`, run by the lifeline; it also takes
//! lists older versions left without an expiry). So a list outlives its record by at most
//! about one retention; an order still in flight that long loses its older lines. A
//! finalisation does not touch the list: a payout's last step costs no command for a list it
//! rarely has. Without a retention nothing expires.
//!
//! The history is for people (the console's timeline); nothing decides on it.

use super::OrderRecord;
use serde::{Deserialize, Serialize};

/// Most events kept per order: a payout normally has 2–4; one that retried for a day keeps
/// its latest 64.
pub const MAX_EVENTS: usize = 64;

/// The expiry of a history list begun while its order is in flight: twice the retention
/// (`retention_ms`, 0 = records kept for ever, and so the lists).
pub(crate) fn list_ttl_ms(retention_ms: u64) -> u64 {
    retention_ms.saturating_mul(2)
}

/// A milestone's JSON with the events that led to it (the last [`MAX_EVENTS`] of `events`,
/// each one's JSON) in it, as the batch script's `with_carried` writes it: for an operation
/// written without the script (`batcher::LoneForm`).
pub(crate) fn milestone_with_events(json: &str, events: &[String]) -> String {
    match json.strip_suffix('}') {
        Some(open) if !events.is_empty() && json.len() >= 3 => {
            let from = events.len().saturating_sub(MAX_EVENTS);
            format!("{open},\"events\":[{}]}}", events[from..].join(","))
        }
        _ => json.to_owned(),
    }
}

/// Events from before the order's current registration (a list kept after an earlier record
/// of the number expired, until the index trim removes it) are not this order's: an event
/// this much older than the registration is left out of the timeline.
const BEFORE_REGISTRATION_SLACK_MS: u64 = 60_000;

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A create was sent (an attempt): its answer, or the error, and how long it took.
    Create,
    /// The order was looked up at the gateway (before a create, after a duplicate, a poll).
    Query,
    /// A callback about the order arrived: verified or not.
    Callback,
    /// A create or query was held back without calling the gateway (limit, 429, guard).
    Held,
    /// An operator acted on the order from the console.
    Operator,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Query => "query",
            Self::Callback => "callback",
            Self::Held => "held",
            Self::Operator => "operator",
        }
    }
}

/// One entry of an order's history. Only the fields that apply are set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    /// When it happened, ms since the epoch (the writer's estimate of the Redis clock).
    pub at_ms: u64,
    pub kind: EventKind,
    /// The create attempt's number (creates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Why a query was made (`poll`, `reconcile`, `operator`) or what held a call back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long the gateway call took, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The gateway's code (`0` for success), when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// The gateway's message, or the transport error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    /// The gateway's order state, when it told one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<i64>,
    /// Callbacks: whether its signature verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Operator actions: who (the name given at login, and the role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl OrderEvent {
    /// An event of `kind` now, with no details yet.
    pub fn now(kind: EventKind) -> Self {
        Self {
            at_ms: crate::queue::now_ms(),
            kind,
            attempt: None,
            reason: None,
            latency_ms: None,
            code: None,
            msg: None,
            state: None,
            verified: None,
            actor: None,
        }
    }
}

/// One line of an order's timeline: a milestone from the record, or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimelineEntry {
    Registered {
        at_ms: u64,
    },
    Accepted {
        at_ms: u64,
        pay_order_id: Option<String>,
    },
    Final {
        at_ms: u64,
        status: String,
        code: Option<i64>,
        msg: Option<String>,
    },
    Correction {
        at_ms: u64,
        status: String,
        previous: Option<String>,
    },
    Event(OrderEvent),
}

impl TimelineEntry {
    pub fn at_ms(&self) -> u64 {
        match self {
            Self::Registered { at_ms }
            | Self::Accepted { at_ms, .. }
            | Self::Final { at_ms, .. }
            | Self::Correction { at_ms, .. } => *at_ms,
            Self::Event(event) => event.at_ms,
        }
    }

    /// Order within one millisecond: the registration first, then the events, then the
    /// milestones they caused (a create's answer before the acceptance it recorded).
    fn rank(&self) -> u8 {
        match self {
            Self::Registered { .. } => 0,
            Self::Event(_) => 1,
            Self::Accepted { .. } => 2,
            Self::Final { .. } => 3,
            Self::Correction { .. } => 4,
        }
    }
}

/// The order's milestones and its events, oldest first.
pub fn timeline(record: &OrderRecord, events: &[OrderEvent]) -> Vec<TimelineEntry> {
    let mut entries = vec![TimelineEntry::Registered {
        at_ms: record.created_at_ms,
    }];
    if let Some(at_ms) = record.accepted_at_ms {
        entries.push(TimelineEntry::Accepted {
            at_ms,
            pay_order_id: record.pay_order_id.clone(),
        });
    }
    if let Some(at_ms) = record.finished_at_ms {
        entries.push(TimelineEntry::Final {
            at_ms,
            status: record.phase.to_string(),
            code: record.last_code,
            msg: record.last_msg.clone(),
        });
    }
    for correction in &record.corrections {
        entries.push(TimelineEntry::Correction {
            at_ms: correction_time(correction).unwrap_or(record.updated_at_ms),
            status: correction.status.to_string(),
            previous: correction.previous_status.map(|s| s.to_string()),
        });
    }
    let registered = record
        .created_at_ms
        .saturating_sub(BEFORE_REGISTRATION_SLACK_MS);
    entries.extend(
        events
            .iter()
            .filter(|event| event.at_ms >= registered)
            .cloned()
            .map(TimelineEntry::Event),
    );
    entries.sort_by_key(|entry| (entry.at_ms(), entry.rank()));
    entries
}

/// A correction's time from its outcome's RFC 3339 `at`.
fn correction_time(correction: &super::Outcome) -> Option<u64> {
    humantime::parse_rfc3339(&correction.at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
}

/// Parses the stored list, skipping entries this version cannot read (a history line is
/// never worth failing a page for).
pub(crate) fn parse_events(lines: Vec<String>) -> Vec<OrderEvent> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The events a milestone's JSON keeps (`events`), skipping those this version cannot read.
pub(crate) fn carried_events(milestone: &str) -> Vec<OrderEvent> {
    #[derive(Deserialize)]
    struct Carried {
        #[serde(default)]
        events: Vec<serde_json::Value>,
    }
    serde_json::from_str::<Carried>(milestone)
        .map(|carried| {
            carried
                .events
                .into_iter()
                .filter_map(|event| serde_json::from_value(event).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_milestone_keeps_the_last_events_as_the_script_does() {
        let json = r#"{"payOrderId":"P1"}"#;
        assert_eq!(
            milestone_with_events(json, &[]),
            json,
            "no events: as it was"
        );
        let events: Vec<String> = (0..MAX_EVENTS + 2)
            .map(|i| format!("{{\"n\":{i}}}"))
            .collect();
        let with: serde_json::Value =
            serde_json::from_str(&milestone_with_events(json, &events)).unwrap();
        let kept = with["events"].as_array().unwrap();
        assert_eq!(kept.len(), MAX_EVENTS);
        assert_eq!(
            (kept[0]["n"].clone(), with["payOrderId"].clone()),
            (2.into(), "P1".into())
        );
        // Not an object (the script's checks): left as it is.
        for odd in ["{}", "[1]", "\"x\""] {
            assert_eq!(milestone_with_events(odd, &events), odd);
        }
    }

    #[test]
    fn events_round_trip_and_skip_unset_fields() {
        let mut event = OrderEvent::now(EventKind::Create);
        event.attempt = Some(2);
        event.code = Some(-1);
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains("verified"), "{line}");
        assert_eq!(parse_events(vec![line, "garbage".into()]), vec![event]);
    }
}
