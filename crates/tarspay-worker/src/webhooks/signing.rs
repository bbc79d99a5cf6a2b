//! Standard Webhooks signing: `webhook-signature: v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`.

use super::WebhookError;
use crate::config::WebhookKey;
use crate::secret::Secret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// A secret starting with this is `whsec_` + base64 of the key bytes.
pub use crate::config::WEBHOOK_SECRET_PREFIX as SECRET_PREFIX;

type HmacSha256 = Hmac<Sha256>;

/// Computes and checks Standard Webhooks signatures:
/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
///
/// The key is the base64-decoded rest of a secret starting with `whsec_`, otherwise the
/// secret's UTF-8 bytes. `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSigner {
    keyed: HmacSha256,
}

impl std::fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSigner { key: [redacted] }")
    }
}

impl WebhookSigner {
    /// Parses the secret as the settings do ([`WebhookKey::parse`]), for callers holding one.
    pub fn new(secret: &Secret) -> Result<Self, WebhookError> {
        Self::from_key(&WebhookKey::parse(secret).map_err(WebhookError::Secret)?)
    }

    /// Keys the HMAC with a key the settings already decoded.
    pub fn from_key(key: &WebhookKey) -> Result<Self, WebhookError> {
        let keyed = HmacSha256::new_from_slice(key.expose())
            .map_err(|_| WebhookError::Secret("cannot key HMAC-SHA256"))?;
        Ok(Self { keyed })
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for this message id, Unix timestamp (seconds) and body.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// The three Standard Webhooks headers for one attempt.
    pub fn headers(&self, id: &str, timestamp: u64, body: &[u8]) -> [(&'static str, String); 3] {
        [
            (HEADER_ID, id.to_owned()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_SIGNATURE, self.sign(id, timestamp, body)),
        ]
    }

    /// True if any `v1,` signature in the space-separated `signature_header` matches
    /// (constant-time comparison). `timestamp` is the header's text as received. Checking that
    /// the timestamp is recent (Standard Webhooks suggests 5 minutes) is the receiver's part.
    pub fn verify(&self, id: &str, timestamp: &str, body: &[u8], signature_header: &str) -> bool {
        signature_header
            .split(' ')
            .filter_map(|candidate| candidate.strip_prefix("v1,"))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .any(|tag| self.mac(id, timestamp, body).verify_slice(&tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> WebhookSigner {
        WebhookSigner::new(&Secret::new(secret)).unwrap()
    }

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        // The reference implementations' published vector: a receiver's stock library
        // accepts what we send only if this matches exactly.
        let signer = signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            expected
        );
        assert!(signer.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body, expected));
        // Any of several space-separated signatures may match.
        assert!(signer.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            body,
            &format!("v1,bm9wZQ== v2,xyz {expected}")
        ));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let signer = signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let good = signer.sign("msg_1", 100, b"{}");
        assert!(signer.verify("msg_1", "100", b"{}", &good));
        assert!(!signer.verify("msg_1", "100", b"{ }", &good));
        assert!(!signer.verify("msg_2", "100", b"{}", &good));
        assert!(!signer.verify("msg_1", "101", b"{}", &good));
        assert!(!signer.verify("msg_1", "100", b"{}", &good.replace("v1,", "v2,")));
        assert!(!signer.verify("msg_1", "100", b"{}", "v1,not-base64!"));
        assert!(!signer.verify("msg_1", "100", b"{}", ""));
        let other = self::signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSx");
        assert!(!other.verify("msg_1", "100", b"{}", &good));
    }

    #[test]
    fn plain_secrets_are_their_utf8_bytes() {
        // "whsec_" + base64("plain key") signs like the plain string "plain key".
        let plain = signer("plain key");
        let encoded = signer(&format!("whsec_{}", STANDARD.encode("plain key")));
        assert_eq!(plain.sign("msg_1", 7, b"x"), encoded.sign("msg_1", 7, b"x"));
        // Without the prefix, a base64-looking secret is not decoded.
        let raw = signer("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let decoded = signer("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_ne!(raw.sign("msg_1", 7, b"x"), decoded.sign("msg_1", 7, b"x"));
    }

    #[test]
    fn unusable_secrets_are_refused_without_showing_them() {
        for bad in ["", "whsec_", "whsec_%%%not base64%%%"] {
            let err = WebhookSigner::new(&Secret::new(bad)).unwrap_err();
            assert!(!err.to_string().contains("not base64%%%"), "{err}");
        }
        // Unpadded base64 is accepted too.
        assert!(WebhookSigner::new(&Secret::new("whsec_YWJj")).is_ok());
        assert!(WebhookSigner::new(&Secret::new("whsec_YWI")).is_ok());
        let debug = format!("{:?}", signer("hunter2"));
        assert!(!debug.contains("hunter2"));
    }

    #[test]
    fn headers_carry_id_timestamp_and_signature() {
        let signer = signer("k");
        let headers = signer.headers("msg_1-0", 42, b"{}");
        assert_eq!(headers[0], (HEADER_ID, "msg_1-0".to_owned()));
        assert_eq!(headers[1], (HEADER_TIMESTAMP, "42".to_owned()));
        assert_eq!(headers[2].0, HEADER_SIGNATURE);
        assert!(signer.verify("msg_1-0", "42", b"{}", &headers[2].1));
    }
}
