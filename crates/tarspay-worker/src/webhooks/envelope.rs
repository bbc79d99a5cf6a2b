//! The message a receiver gets: Standard Webhooks' envelope around one outcome, and its id.

use crate::ledger::Outcome;
use serde::Serialize;

/// The `webhook-id` of the outcome stored under stream entry `entry_id` of partition
/// `partition`'s outcome stream: the same on every retry of that outcome's delivery, and
/// unique across partitions (their streams may hold equal entry ids).
pub fn webhook_id(partition: usize, entry_id: &str) -> String {
    match partition {
        0 => format!("msg_{entry_id}"),
        p => format!("msg_p{p}_{entry_id}"),
    }
}

/// `{kind}.{status}` for an order's outcome (`payout.succeeded`, `payout.failed`,
/// `deposit.expired`, …); `{kind}.corrected` for a correction (the new status is in `data`).
pub fn event_type(outcome: &Outcome) -> String {
    if outcome.is_correction() {
        format!("{}.corrected", outcome.kind)
    } else {
        format!("{}.{}", outcome.kind, outcome.status)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    event: String,
    /// When the outcome was recorded, so every retry sends the same bytes.
    timestamp: &'a str,
    data: &'a Outcome,
}

/// One outcome as it is POSTed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookMessage {
    pub id: String,
    pub body: Vec<u8>,
}

impl WebhookMessage {
    pub fn new(id: String, outcome: &Outcome) -> Result<Self, serde_json::Error> {
        let body = serde_json::to_vec(&Body {
            event: event_type(outcome),
            timestamp: &outcome.at,
            data: outcome,
        })?;
        Ok(Self { id, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(event: &str, status: &str) -> Outcome {
        Outcome {
            event: event.parse().unwrap(),
            previous_status: (event == "correction").then(|| "succeeded".parse().unwrap()),
            kind: "payout".parse().unwrap(),
            merchant: Default::default(),
            mch_order_no: "A-1".parse().unwrap(),
            status: status.parse().unwrap(),
            gateway_state: Some(2),
            pay_order_id: Some("P1".into()),
            amount: "100.50".into(),
            currency: "INR".parse().unwrap(),
            fee: None,
            code: None,
            msg: None,
            attempts: 1,
            batch_id: None,
            at: "2026-01-02T03:04:05.678Z".into(),
        }
    }

    #[test]
    fn the_envelope_carries_type_timestamp_and_the_outcome() {
        let message =
            WebhookMessage::new(webhook_id(0, "17-0"), &outcome("final", "succeeded")).unwrap();
        assert_eq!(message.id, "msg_17-0");
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(body["type"], "payout.succeeded");
        assert_eq!(body["timestamp"], "2026-01-02T03:04:05.678Z");
        assert_eq!(body["data"]["mchOrderNo"], "A-1");
        // Money stays text.
        assert_eq!(body["data"]["amount"], "100.50");
    }

    #[test]
    fn corrections_have_a_type_of_their_own() {
        let corrected = outcome("correction", "refunded");
        assert_eq!(event_type(&corrected), "payout.corrected");
        assert_eq!(event_type(&outcome("final", "failed")), "payout.failed");
        let body: serde_json::Value = serde_json::from_slice(
            &WebhookMessage::new(webhook_id(0, "1-0"), &corrected)
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(body["data"]["status"], "refunded");
        assert_eq!(body["data"]["previousStatus"], "succeeded");
    }
}
