//! secp256k1 key material: the merchant's private key (which signs requests) and public keys
//! (the merchant's `X-API-KEY`, TarsPay's system key that signs callbacks).

use secp256k1::{PublicKey as Point, SecretKey};
use std::fmt;
use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "private key must be 64 hex characters (a 32-byte secp256k1 scalar), got {0} characters"
    )]
    PrivateKeyLength(usize),
    #[error(
        "public key must be 66 hex characters (33-byte compressed point, 02…/03…) or 130 (uncompressed, 04…), got {0} characters"
    )]
    PublicKeyLength(usize),
    #[error("{what} is not valid hex (only 0-9, a-f, A-F are allowed)")]
    BadHex { what: &'static str },
    #[error("private key is not a valid secp256k1 scalar (zero or not below the curve order)")]
    PrivateKeyOutOfRange,
    #[error("public key is not a SEC1-encoded point on secp256k1")]
    PublicKeyNotOnCurve,
    #[error("cannot read private key file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Trims whitespace (key files end with a newline) and an optional `0x` prefix.
fn clean_hex(text: &str) -> &str {
    let text = text.trim();
    text.strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text)
}

/// The merchant's signing key. Its `Debug` shows only the public half; it is overwritten
/// when dropped.
#[derive(Clone)]
pub struct PrivateKey(SecretKey);

impl PrivateKey {
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = clean_hex(text);
        if text.len() != 64 {
            return Err(KeyError::PrivateKeyLength(text.len()));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| KeyError::BadHex {
            what: "private key",
        })?;
        SecretKey::from_byte_array(bytes)
            .map(Self)
            .map_err(|_| KeyError::PrivateKeyOutOfRange)
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|err| KeyError::File {
            path: path.display().to_string(),
            reason: err.kind().to_string(),
        })?;
        Self::from_hex(&text)
    }

    /// A fresh random key (sandbox merchants, the demo, tests).
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        loop {
            rand::fill(&mut seed);
            if let Ok(key) = SecretKey::from_byte_array(seed) {
                return Self(key);
            }
        }
    }

    /// The 64-hex-character private scalar. Only for writing a freshly generated key to a file.
    pub fn expose_hex(&self) -> String {
        hex::encode(self.0.secret_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.public_key(secp256k1::SECP256K1))
    }

    pub(crate) fn secret_key(&self) -> &SecretKey {
        &self.0
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.non_secure_erase();
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PrivateKey([redacted], public={})",
            self.public_key().to_hex()
        )
    }
}

/// A secp256k1 public key; rendered as compressed SEC1 hex, the form TarsPay uses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(Point);

impl PublicKey {
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = clean_hex(text);
        if text.len() != 66 && text.len() != 130 {
            return Err(KeyError::PublicKeyLength(text.len()));
        }
        let bytes = hex::decode(text).map_err(|_| KeyError::BadHex { what: "public key" })?;
        // SEC1 tags: 02/03 compressed, 04 uncompressed. Anything else is not a key TarsPay uses.
        let tag_fits = match bytes.len() {
            33 => matches!(bytes[0], 0x02 | 0x03),
            _ => bytes[0] == 0x04,
        };
        if !tag_fits {
            return Err(KeyError::PublicKeyNotOnCurve);
        }
        Point::from_slice(&bytes)
            .map(Self)
            .map_err(|_| KeyError::PublicKeyNotOnCurve)
    }

    /// Lowercase hex of the 33-byte compressed point: the `X-API-KEY` header value.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.serialize())
    }

    pub(crate) fn point(&self) -> &Point {
        &self.0
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721";

    #[test]
    fn private_key_round_trips_and_accepts_file_formatting() {
        let key = PrivateKey::from_hex(&format!("0x{KEY}\n")).unwrap();
        assert_eq!(key.expose_hex(), KEY);
        assert!(key.public_key().to_hex().len() == 66);
    }

    #[test]
    fn private_key_errors_are_specific() {
        assert_eq!(
            PrivateKey::from_hex("abcd").unwrap_err(),
            KeyError::PrivateKeyLength(4)
        );
        let bad_hex = format!("zz{}", &KEY[2..]);
        assert_eq!(
            PrivateKey::from_hex(&bad_hex).unwrap_err(),
            KeyError::BadHex {
                what: "private key"
            }
        );
        assert_eq!(
            PrivateKey::from_hex(&"0".repeat(64)).unwrap_err(),
            KeyError::PrivateKeyOutOfRange
        );
        assert_eq!(
            PrivateKey::from_hex(&"f".repeat(64)).unwrap_err(),
            KeyError::PrivateKeyOutOfRange
        );
    }

    #[test]
    fn private_key_never_appears_in_debug_or_errors() {
        let key = PrivateKey::from_hex(KEY).unwrap();
        let debug = format!("{key:?}");
        assert!(!debug.contains(KEY), "{debug}");
        assert!(debug.contains(&key.public_key().to_hex()));
        let wrong = format!("{KEY}00");
        let message = PrivateKey::from_hex(&wrong).unwrap_err().to_string();
        assert!(!message.contains(KEY), "{message}");
    }

    #[test]
    fn missing_key_file_names_the_path() {
        let err = PrivateKey::from_file(Path::new("/nonexistent/key.hex")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key.hex"), "{err}");
    }

    #[test]
    fn public_key_parsing() {
        let hex = "03828e8e30fb0a705776e32302d7f54a8037ae3926220bbc19c588eedc3b26ec12";
        assert_eq!(PublicKey::from_hex(hex).unwrap().to_hex(), hex);
        assert_eq!(
            PublicKey::from_hex("03ab").unwrap_err(),
            KeyError::PublicKeyLength(4)
        );
        for not_a_key in [format!("05{}", &hex[2..]), format!("02{}", "f".repeat(64))] {
            assert_eq!(
                PublicKey::from_hex(&not_a_key).unwrap_err(),
                KeyError::PublicKeyNotOnCurve
            );
        }
    }
}
