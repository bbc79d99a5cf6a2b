//! TarsPay's signature scheme: `METHOD|PATH|NONCE|PARAMS`, SHA-256 applied twice, ECDSA over
//! secp256k1, DER, lowercase hex. Used to sign requests and to verify TarsPay's (and the
//! sandbox's) signatures.
//!
//! The curve arithmetic is libsecp256k1 (the `secp256k1` crate, Bitcoin Core's constant-time
//! C library): it signs about 1.6× and verifies about 2× faster than the pure-Rust `k256`
//! here, with byte-identical RFC 6979 signatures (docs/performance.md). The tests check
//! interoperability against `k256`.

use super::keys::{PrivateKey, PublicKey};
use super::params::Params;
use secp256k1::ecdsa::Signature;
use secp256k1::{Message, SECP256K1};
use sha2::{Digest, Sha256};

/// Every TarsPay call is a POST.
pub const METHOD: &str = "POST";

pub fn string_to_sign(path: &str, nonce: &str, params: &Params) -> String {
    format!("{METHOD}|{path}|{nonce}|{}", params.to_params_string())
}

/// SHA-256(SHA-256(message)): the Java kit hashes once, then signs with SHA256withECDSA.
pub fn digest(message: &[u8]) -> [u8; 32] {
    let once = Sha256::digest(message);
    Sha256::digest(once).into()
}

/// Signs `message` and returns the lowercase hex of the DER signature.
pub fn sign_message(key: &PrivateKey, message: &[u8]) -> String {
    let digest = Message::from_digest(digest(message));
    let signature = SECP256K1.sign_ecdsa(digest, key.secret_key());
    hex::encode(signature.serialize_der())
}

/// True when `signature_hex` is a valid DER ECDSA signature of `message` by `key`, as TarsPay's
/// scheme writes it (the sandbox checks requests with this, as strictly as a gateway may).
/// High-S signatures are accepted (TarsPay's Java stack does not normalise them).
pub fn verify_message(key: &PublicKey, message: &[u8], signature_hex: &str) -> bool {
    verify_parsed(key, message, signature_hex, |bytes| {
        Signature::from_der(bytes).ok()
    })
}

/// [`verify_message`], also reading DER as other signers loosely write it (needless padding,
/// long-form lengths) and 64 bytes of `r‖s`: for callbacks, whose exact form TarsPay's docs do
/// not prove. Each is the same pair of numbers, so reading more spellings never accepts a
/// different signature.
pub fn verify_message_lenient(key: &PublicKey, message: &[u8], signature_hex: &str) -> bool {
    verify_parsed(key, message, signature_hex, |bytes| {
        Signature::from_der(bytes)
            .or_else(|_| Signature::from_der_lax(bytes))
            .or_else(|_| Signature::from_compact(bytes))
            .ok()
    })
}

fn verify_parsed(
    key: &PublicKey,
    message: &[u8],
    signature_hex: &str,
    parse: impl Fn(&[u8]) -> Option<Signature>,
) -> bool {
    let Ok(bytes) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let Some(mut signature) = parse(&bytes) else {
        return false;
    };
    // libsecp256k1 verifies only low-S signatures; the high-S twin is equally valid ECDSA.
    signature.normalize_s();
    let digest = Message::from_digest(digest(message));
    SECP256K1
        .verify_ecdsa(digest, &signature, key.point())
        .is_ok()
}

/// The three header values of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub api_key: String,
    pub nonce: String,
    pub signature: String,
}

/// Signs requests for one merchant; the public key hex is computed once.
#[derive(Debug, Clone)]
pub struct RequestSigner {
    key: PrivateKey,
    api_key: String,
}

impl RequestSigner {
    pub fn new(key: PrivateKey) -> Self {
        let api_key = key.public_key().to_hex();
        Self { key, api_key }
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    pub fn sign(&self, path: &str, nonce: &str, params: &Params) -> SignedHeaders {
        let message = string_to_sign(path, nonce, params);
        SignedHeaders {
            api_key: self.api_key.clone(),
            nonce: nonce.to_owned(),
            signature: sign_message(&self.key, message.as_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
    use k256::ecdsa::{Signature as K256Signature, SigningKey};

    /// The same key in `k256`, an independent implementation.
    fn k256_key(key: &PrivateKey) -> SigningKey {
        SigningKey::from_slice(&hex::decode(key.expose_hex()).unwrap()).unwrap()
    }

    const DOC_PUBLIC_KEY: &str =
        "03828e8e30fb0a705776e32302d7f54a8037ae3926220bbc19c588eedc3b26ec12";
    const DOC_SIGNATURE: &str = "304402207113128d16fc37707fdc8095b878e70d2d9799b4a14402a6244065a208a99968022004e1b9bead988594c715a40b5fc87642e0f738ff0f97c167c1cab20d5c5a3783";

    fn doc_params() -> Params {
        let mut params = Params::new();
        for (key, value) in [
            ("mchNo", "M1688457769"),
            ("mchOrderNo", "ML202211111111773"),
            ("wayCode", "CASHIER"),
            ("amount", "100"),
            ("currency", "MYR"),
            ("notifyUrl", "http://47.241.33.220:8896/tarspay/notify"),
            ("returnUrl", "https://www.tarspay.com/notify/return"),
            ("customerName", "DW"),
            ("customerEmail", "g13116709877@163.com"),
            ("customerContact", "13116709877"),
            ("customerAccountNumber", "123456789"),
        ] {
            params.insert(key, value);
        }
        params
    }

    #[test]
    fn worked_example_from_the_docs_verifies() {
        let message = string_to_sign("/api/pay/unifiedOrder", "1704180814988", &doc_params());
        assert_eq!(
            message,
            "POST|/api/pay/unifiedOrder|1704180814988|amount=100&currency=MYR&customerAccountNumber=123456789&customerContact=13116709877&customerEmail=g13116709877@163.com&customerName=DW&mchNo=M1688457769&mchOrderNo=ML202211111111773&notifyUrl=http://47.241.33.220:8896/tarspay/notify&returnUrl=https://www.tarspay.com/notify/return&wayCode=CASHIER"
        );
        let key = PublicKey::from_hex(DOC_PUBLIC_KEY).unwrap();
        assert!(verify_message(&key, message.as_bytes(), DOC_SIGNATURE));
        // One changed byte anywhere breaks it.
        let tampered = message.replace("amount=100", "amount=101");
        assert!(!verify_message(&key, tampered.as_bytes(), DOC_SIGNATURE));
    }

    #[test]
    fn sign_then_verify_and_headers() {
        let key = PrivateKey::generate();
        let signer = RequestSigner::new(key.clone());
        let headers = signer.sign("/api/payOutInfo", "1700000000000", &doc_params());
        assert_eq!(headers.api_key, key.public_key().to_hex());
        assert!(headers.api_key.starts_with("02") || headers.api_key.starts_with("03"));
        assert!(headers.signature.starts_with("30"));
        assert_eq!(headers.signature, headers.signature.to_lowercase());
        let message = string_to_sign("/api/payOutInfo", "1700000000000", &doc_params());
        assert!(verify_message(
            &key.public_key(),
            message.as_bytes(),
            &headers.signature
        ));
        let other = PrivateKey::generate().public_key();
        assert!(!verify_message(
            &other,
            message.as_bytes(),
            &headers.signature
        ));
    }

    #[test]
    fn high_s_signatures_are_accepted() {
        let key = PrivateKey::generate();
        let message = b"POST|/api/balanceInfo|1|mchNo=M0000000001";
        let low: K256Signature = k256_key(&key).sign_prehash(&digest(message)).unwrap();
        let (r, s) = low.split_scalars();
        let high = K256Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        assert_ne!(
            high,
            high.normalize_s(),
            "test must build a high-S signature"
        );
        let high_hex = hex::encode(high.to_der().as_bytes());
        assert!(verify_message(&key.public_key(), message, &high_hex));
    }

    #[test]
    fn loosely_encoded_and_compact_signatures_are_read_as_the_same_numbers() {
        let key = PrivateKey::generate();
        let message = b"POST|/api/balanceInfo|1|mchNo=M0000000001";
        let signature: K256Signature = k256_key(&key).sign_prehash(&digest(message)).unwrap();
        let (r, s) = signature.split_scalars();
        let (r, s) = (r.to_bytes().to_vec(), s.to_bytes().to_vec());
        // Each integer written with a leading 00 (two when its high bit is set), which
        // strict DER refuses as needless padding.
        let padded = |n: &[u8]| {
            let pad = if n[0] >= 0x80 { 2 } else { 1 };
            [vec![0; pad], n.to_vec()].concat()
        };
        let (pr, ps) = (padded(&r), padded(&s));
        let mut loose = vec![0x30, (4 + pr.len() + ps.len()) as u8, 0x02, pr.len() as u8];
        loose.extend(&pr);
        loose.extend([0x02, ps.len() as u8]);
        loose.extend(&ps);
        assert!(
            Signature::from_der(&loose).is_err(),
            "strict DER refuses it"
        );
        let public = key.public_key();
        let (loose, compact) = (hex::encode(&loose), hex::encode([r, s].concat()));
        for spelling in [&loose, &compact] {
            assert!(
                !verify_message(&public, message, spelling),
                "strict: DER only"
            );
            assert!(verify_message_lenient(&public, message, spelling));
            // The same numbers, and only they: another message does not verify.
            assert!(!verify_message_lenient(&public, b"other", spelling));
        }
    }

    #[test]
    fn garbage_signatures_are_rejected_not_panicking() {
        let key = PublicKey::from_hex(DOC_PUBLIC_KEY).unwrap();
        for bad in ["", "zz", "3044", "00", &"30".repeat(80)] {
            assert!(!verify_message(&key, b"x", bad));
        }
    }

    #[test]
    fn signing_key_type_is_secp256k1() {
        // Guards against a dependency swap silently changing the curve: the same scalar gives
        // the same point in both implementations.
        let key = PrivateKey::from_hex(&"01".repeat(32)).unwrap();
        let k256_point = k256_key(&key).verifying_key().to_sec1_point(true);
        assert_eq!(
            key.public_key().to_hex(),
            hex::encode(k256_point.as_bytes())
        );
        assert_eq!(key.public_key().to_hex().len(), 66);
    }

    #[test]
    fn signatures_interoperate_with_an_independent_implementation() {
        let key = PrivateKey::generate();
        let message = string_to_sign("/api/payOutInfo", "1700000000000", &doc_params());
        let prehash = digest(message.as_bytes());
        // Ours verifies in k256, and is the same RFC 6979 signature k256 makes.
        let ours = sign_message(&key, message.as_bytes());
        let parsed = K256Signature::from_der(&hex::decode(&ours).unwrap()).unwrap();
        let k256_key = k256_key(&key);
        assert!(
            k256_key
                .verifying_key()
                .verify_prehash(&prehash, &parsed)
                .is_ok()
        );
        let theirs: K256Signature = k256_key.sign_prehash(&prehash).unwrap();
        let theirs_hex = hex::encode(theirs.to_der().as_bytes());
        assert_eq!(ours, theirs_hex);
        assert!(verify_message(
            &key.public_key(),
            message.as_bytes(),
            &theirs_hex
        ));
    }
}
