//! TarsPay's order states and error codes as data: what each means, whether a state is final,
//! and how each error code is handled (its class). The classes are defaults; settings can
//! override any code's class.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What the worker does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// Transient: try the same call again later, with backoff and a bound on attempts.
    Retryable,
    /// Final: retrying cannot help; the payout fails now with this code and message.
    Terminal,
    /// The gateway may already hold the order: query it, then decide.
    Reconcile,
}

/// One row of the error-code table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeInfo {
    pub code: i64,
    pub meaning: &'static str,
    pub class: ErrorClass,
}

const fn row(code: i64, meaning: &'static str, class: ErrorClass) -> CodeInfo {
    CodeInfo {
        code,
        meaning,
        class,
    }
}

use ErrorClass::{Reconcile, Retryable, Terminal};

/// Every code TarsPay documents, with its default class.
pub const KNOWN_CODES: &[CodeInfo] = &[
    row(-1, "system error", Retryable),
    row(5003001, "missing parameter", Terminal),
    row(5003002, "merchant or API key does not exist", Terminal),
    row(5003003, "merchant disabled", Terminal),
    row(5003004, "merchant not authenticated", Terminal),
    row(5003005, "merchant API key does not exist", Terminal),
    row(5003006, "API key expired", Terminal),
    row(5003007, "IP error (server IP not bound)", Terminal),
    row(5003008, "signature error", Terminal),
    row(5003009, "wayCode not supported", Terminal),
    // The table reuses this code for "order status error" and "failed to create pay-out
    // order"; neither means the order was created, so it is terminal.
    row(
        5003010,
        "order status error / failed to create pay-out order",
        Terminal,
    ),
    row(5003011, "merchant order number already exists", Reconcile),
    row(5003012, "URL format error", Terminal),
    row(5003013, "channel error", Terminal),
    row(
        5003014,
        "merchant rate configuration not initialised",
        Terminal,
    ),
    row(5003015, "channel does not exist", Terminal),
    row(5003017, "failed to create pay-in order", Terminal),
    row(5003018, "failed to query pay-in order", Terminal),
    row(5003020, "failed to query pay-out order", Terminal),
    row(5004006, "merchant balance insufficient", Terminal),
    row(500321, "amount format incorrect", Terminal),
    row(500322, "URL not supported", Terminal),
    row(500323, "remote client error", Retryable),
    row(500324, "order expired", Terminal),
    row(500326, "balance query error", Retryable),
    row(500327, "wayCode error", Terminal),
];

pub const DUPLICATE_ORDER: i64 = 5003011;
pub const SIGNATURE_ERROR: i64 = 5003008;
pub const INSUFFICIENT_BALANCE: i64 = 5004006;

pub fn known(code: i64) -> Option<&'static CodeInfo> {
    KNOWN_CODES.iter().find(|info| info.code == code)
}

/// Codes that mean the merchant's credentials or set-up are wrong, so every other order will
/// fail the same way: the systemic guard counts these.
pub fn is_auth_class(code: i64) -> bool {
    (5003002..=5003008).contains(&code) || code == 5003014
}

/// Refusals that prove the gateway created nothing: the request was rejected before an order
/// could exist (parameters, format, credentials, signature, balance). Any other terminal
/// answer to a create is checked with a query before the payout is failed.
pub fn refused_before_creating(code: i64) -> bool {
    matches!(
        code,
        5003001..=5003009 | 5003012 | 5003014 | 5003015 | 5004006 | 500321 | 500322 | 500327
    )
}

/// The classification in force: the defaults above plus overrides from settings.
#[derive(Debug, Clone, Default)]
pub struct CodeTable {
    overrides: HashMap<i64, ErrorClass>,
}

impl CodeTable {
    pub fn with_overrides(overrides: HashMap<i64, ErrorClass>) -> Self {
        Self { overrides }
    }

    /// Unknown codes are terminal: never retry what is not understood.
    pub fn classify(&self, code: i64) -> ErrorClass {
        self.overrides
            .get(&code)
            .copied()
            .or_else(|| known(code).map(|info| info.class))
            .unwrap_or(Terminal)
    }
}

/// An order's `state` as TarsPay reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "i64", into = "i64")]
pub enum OrderState {
    Creating,
    Processing,
    Success,
    Failure,
    Refund,
    /// Deposit only: expired unpaid.
    Expired,
    /// Payout only: rejected, a failure.
    Rejected,
    /// Deposit only: paid less than ordered.
    Partial,
    /// A state number the documentation does not list; treated as not final.
    Other(i64),
}

impl OrderState {
    pub fn code(self) -> i64 {
        match self {
            Self::Creating => 0,
            Self::Processing => 1,
            Self::Success => 2,
            Self::Failure => 3,
            Self::Refund => 5,
            Self::Expired => 6,
            Self::Rejected => 8,
            Self::Partial => 9,
            Self::Other(code) => code,
        }
    }

    /// Final states never change again. Unknown states are polled on rather than guessed at.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Success
                | Self::Failure
                | Self::Refund
                | Self::Expired
                | Self::Rejected
                | Self::Partial
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Processing => "processing",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Refund => "refund",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
            Self::Partial => "partial",
            Self::Other(_) => "unknown",
        }
    }
}

impl From<i64> for OrderState {
    fn from(code: i64) -> Self {
        match code {
            0 => Self::Creating,
            1 => Self::Processing,
            2 => Self::Success,
            3 => Self::Failure,
            5 => Self::Refund,
            6 => Self::Expired,
            8 => Self::Rejected,
            9 => Self::Partial,
            other => Self::Other(other),
        }
    }
}

impl From<OrderState> for i64 {
    fn from(state: OrderState) -> Self {
        state.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_classes() {
        let table = CodeTable::default();
        assert_eq!(table.classify(-1), Retryable);
        assert_eq!(table.classify(500323), Retryable);
        assert_eq!(table.classify(5003008), Terminal);
        assert_eq!(table.classify(5004006), Terminal);
        assert_eq!(table.classify(5003011), Reconcile);
        assert_eq!(
            table.classify(424242),
            Terminal,
            "unknown codes are terminal"
        );
    }

    #[test]
    fn overrides_win() {
        let table =
            CodeTable::with_overrides(HashMap::from([(5003013, Retryable), (-1, Terminal)]));
        assert_eq!(table.classify(5003013), Retryable);
        assert_eq!(table.classify(-1), Terminal);
        assert_eq!(table.classify(500323), Retryable);
    }

    #[test]
    fn every_documented_code_is_listed_once() {
        let mut codes: Vec<i64> = KNOWN_CODES.iter().map(|info| info.code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), KNOWN_CODES.len());
        assert_eq!(KNOWN_CODES.len(), 26);
    }

    #[test]
    fn auth_class() {
        for code in [5003002, 5003005, 5003006, 5003007, 5003008, 5003014] {
            assert!(is_auth_class(code), "{code}");
        }
        for code in [-1, 5003001, 5003009, 5003011, 5004006, 500323] {
            assert!(!is_auth_class(code), "{code}");
        }
    }

    #[test]
    fn states() {
        for (code, is_final) in [
            (0, false),
            (1, false),
            (2, true),
            (3, true),
            (5, true),
            (6, true),
            (8, true),
            (9, true),
            (4, false),
            (7, false),
        ] {
            let state = OrderState::from(code);
            assert_eq!(state.is_final(), is_final, "state {code}");
            assert_eq!(state.code(), code);
        }
    }
}
