//! A string that must never be printed: API tokens, webhook secrets, raw key material.

use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// Holds a secret string. `Debug` and `Display` print `[redacted]`; the value is reachable
/// only through [`Secret::expose`], so every use is greppable.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares in time independent of where the inputs differ and of the candidate's
    /// length (SHA-256 digests of both, compared in constant time), so a caller probing a
    /// token learns neither its content nor its length from response timing.
    pub fn matches(&self, candidate: &str) -> bool {
        let (mine, theirs) = (Sha256::digest(self.0.as_bytes()), Sha256::digest(candidate));
        mine.as_slice().ct_eq(theirs.as_slice()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2-token");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert!(!format!("{:?}", Some(&secret)).contains("hunter2"));
    }

    #[test]
    fn matches_compares_whole_value() {
        let secret = Secret::new("abc123");
        assert!(secret.matches("abc123"));
        assert!(!secret.matches("abc12"));
        assert!(!secret.matches("abc1234"));
        assert!(!secret.matches(""));
    }
}
