//! One error type for every way a gateway call can fail, keeping apart the cases a payout
//! worker must treat differently.

use super::codes::{CodeTable, ErrorClass};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GatewayError {
    /// The request never left: connection refused, DNS, TLS handshake, connect timeout.
    /// Nothing reached the gateway, so nothing happened there.
    #[error("could not reach the gateway for {endpoint}: {reason}")]
    Unreachable {
        endpoint: &'static str,
        reason: String,
    },

    /// The request was not sent because the caller's deadline (a create's submit lease) would
    /// end before the call could: nothing reached the gateway.
    #[error("not sent to the gateway for {endpoint}: {reason}")]
    NotSent {
        endpoint: &'static str,
        reason: &'static str,
    },

    /// The request was (or may have been) sent, then the answer was lost: a timeout or a
    /// reset after sending. The gateway may have acted on it.
    #[error(
        "no answer from the gateway for {endpoint} after sending ({reason}); the request may have taken effect"
    )]
    Ambiguous {
        endpoint: &'static str,
        reason: String,
        timed_out: bool,
    },

    /// A non-2xx HTTP status, e.g. a proxy's 502 HTML page. `snippet` is the start of the body.
    #[error("gateway answered HTTP {status} for {endpoint}: {snippet}")]
    Http {
        endpoint: &'static str,
        status: u16,
        snippet: String,
    },

    /// HTTP 429: the gateway refused the call for its rate, before acting on it. `retry_after`
    /// is its `Retry-After` (seconds) when it sent one.
    #[error("gateway rate-limited {endpoint} (HTTP 429){}", retry_after.map(|d| format!(", retry after {} s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        endpoint: &'static str,
        retry_after: Option<std::time::Duration>,
    },

    /// A well-formed envelope with a non-zero `code`.
    #[error("gateway error {code} for {endpoint}: {msg}")]
    Gateway {
        endpoint: &'static str,
        code: i64,
        msg: String,
    },

    /// A 2xx answer that is not the documented envelope.
    #[error("undecodable gateway response for {endpoint}: {reason}; body starts: {snippet}")]
    Decode {
        endpoint: &'static str,
        reason: String,
        snippet: String,
    },

    #[error("gateway response for {endpoint} is larger than the {limit}-byte limit")]
    TooLarge {
        endpoint: &'static str,
        limit: usize,
    },
}

impl GatewayError {
    /// The request may have taken effect at the gateway without us learning the result. A
    /// create that fails this way must be reconciled by a query, never re-created under a new
    /// order number.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            Self::Ambiguous { .. } | Self::Decode { .. } | Self::TooLarge { .. } => true,
            Self::Http { status, .. } => *status >= 500,
            Self::Unreachable { .. }
            | Self::NotSent { .. }
            | Self::RateLimited { .. }
            | Self::Gateway { .. } => false,
        }
    }

    /// The gateway's `code`, when it answered with one.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Gateway { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How a worker should treat this failure. Transport trouble, 5xx, 3xx (a misrouted
    /// request), 408 and 429 are retryable; other 4xx statuses are terminal; gateway codes follow
    /// the code table.
    pub fn class(&self, table: &CodeTable) -> ErrorClass {
        match self {
            Self::Gateway { code, .. } => table.classify(*code),
            Self::Http { status, .. }
                if *status >= 500
                    || (300..400).contains(status)
                    || *status == 408
                    || *status == 429 =>
            {
                ErrorClass::Retryable
            }
            Self::Http { .. } => ErrorClass::Terminal,
            Self::Unreachable { .. }
            | Self::NotSent { .. }
            | Self::RateLimited { .. }
            | Self::Ambiguous { .. }
            | Self::Decode { .. }
            | Self::TooLarge { .. } => ErrorClass::Retryable,
        }
    }

    /// A short machine-readable label for metrics and outcomes.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::NotSent { .. } => "not_sent",
            Self::Ambiguous {
                timed_out: true, ..
            } => "timeout",
            Self::Ambiguous { .. } => "connection_lost",
            Self::Http { .. } => "http_status",
            Self::RateLimited { .. } => "rate_limited",
            Self::Gateway { .. } => "gateway_code",
            Self::Decode { .. } => "decode",
            Self::TooLarge { .. } => "too_large",
        }
    }
}

/// An error and its causes on one line ("error sending request: connection reset …").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The first characters of a body, on one line, for error messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    const MAX: usize = 160;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX * 4)]);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguity_and_class() {
        let table = CodeTable::default();
        let timeout = GatewayError::Ambiguous {
            endpoint: "/x",
            reason: "timeout".into(),
            timed_out: true,
        };
        assert!(timeout.is_ambiguous());
        assert_eq!(timeout.class(&table), ErrorClass::Retryable);
        let refused = GatewayError::Unreachable {
            endpoint: "/x",
            reason: "refused".into(),
        };
        assert!(!refused.is_ambiguous());
        let bad_gateway = GatewayError::Http {
            endpoint: "/x",
            status: 502,
            snippet: "<html>".into(),
        };
        assert!(bad_gateway.is_ambiguous());
        assert_eq!(bad_gateway.class(&table), ErrorClass::Retryable);
        let not_found = GatewayError::Http {
            endpoint: "/x",
            status: 404,
            snippet: String::new(),
        };
        assert!(!not_found.is_ambiguous());
        assert_eq!(not_found.class(&table), ErrorClass::Terminal);
        let duplicate = GatewayError::Gateway {
            endpoint: "/x",
            code: 5003011,
            msg: "exists".into(),
        };
        assert_eq!(duplicate.class(&table), ErrorClass::Reconcile);
        assert_eq!(duplicate.code(), Some(5003011));
    }

    #[test]
    fn snippet_is_one_bounded_line() {
        let body = format!("<html>\n<body>{}</body></html>", "x".repeat(1000));
        let text = snippet(body.as_bytes());
        assert!(!text.contains('\n'));
        assert!(text.chars().count() <= 161);
        assert!(text.starts_with("<html>"));
    }
}
