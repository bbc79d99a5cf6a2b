//! The phases of an order in the ledger, and the outcome status each final phase reports.

use crate::gateway::OrderState;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Registered; the create has not been sent (or will be sent again after a retryable error).
    Queued,
    /// A worker holds the lease and is calling create.
    Submitting,
    /// The gateway holds the order; its final state is awaited.
    Accepted,
    /// A create may or may not have reached the gateway; only a query can tell.
    Unknown,
    Succeeded,
    Failed,
    Rejected,
    Refunded,
    /// The gateway already holds this mchOrderNo for a different amount or currency.
    Conflict,
    /// Deposit only: expired unpaid.
    Expired,
    /// Deposit only: paid in part.
    Partial,
}

impl Phase {
    pub const ALL: [Phase; 11] = [
        Self::Queued,
        Self::Submitting,
        Self::Accepted,
        Self::Unknown,
        Self::Succeeded,
        Self::Failed,
        Self::Rejected,
        Self::Refunded,
        Self::Conflict,
        Self::Expired,
        Self::Partial,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Submitting => "submitting",
            Self::Accepted => "accepted",
            Self::Unknown => "unknown",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Refunded => "refunded",
            Self::Conflict => "conflict",
            Self::Expired => "expired",
            Self::Partial => "partial",
        }
    }

    /// Final phases never change again (the ledger's write-once `final` field).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::Rejected
                | Self::Refunded
                | Self::Conflict
                | Self::Expired
                | Self::Partial
        )
    }

    /// The final phase a final gateway state maps to; `None` for states that are not final.
    pub fn from_gateway(state: OrderState) -> Option<Self> {
        Some(match state {
            OrderState::Success => Self::Succeeded,
            OrderState::Failure => Self::Failed,
            OrderState::Rejected => Self::Rejected,
            OrderState::Refund => Self::Refunded,
            OrderState::Expired => Self::Expired,
            OrderState::Partial => Self::Partial,
            _ => return None,
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|phase| phase.as_str() == s)
            .ok_or_else(|| format!("unknown phase {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for phase in Phase::ALL {
            assert_eq!(phase.as_str().parse::<Phase>(), Ok(phase));
        }
        assert!("nope".parse::<Phase>().is_err());
    }

    #[test]
    fn gateway_states() {
        assert_eq!(
            Phase::from_gateway(OrderState::Success),
            Some(Phase::Succeeded)
        );
        assert_eq!(
            Phase::from_gateway(OrderState::Rejected),
            Some(Phase::Rejected)
        );
        assert_eq!(Phase::from_gateway(OrderState::Processing), None);
        assert_eq!(Phase::from_gateway(OrderState::Other(4)), None);
    }
}
