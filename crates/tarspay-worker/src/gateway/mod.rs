//! Everything that speaks to TarsPay: request signing, signature verification, the HTTP
//! client, typed requests and responses, and the tables of order states and error codes.
//! Nothing in here touches Redis.

pub mod callback;
pub mod client;
pub mod codes;
pub mod error;
pub mod keys;
pub mod params;
pub mod signing;
pub mod types;

pub use client::{ClientSettings, TarsPayClient, install_crypto_provider};
pub use codes::{CodeTable, ErrorClass, OrderState};
pub use error::GatewayError;
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use params::Params;

/// Request paths, exactly as they enter the string to sign.
pub mod paths {
    pub const CREATE_DEPOSIT: &str = "/api/pay/unifiedOrder";
    pub const QUERY_DEPOSIT: &str = "/api/payInInfo";
    pub const CREATE_PAYOUT: &str = "/api/payOut/unifiedOrder";
    pub const QUERY_PAYOUT: &str = "/api/payOutInfo";
    pub const BALANCE: &str = "/api/balanceInfo";
    pub const PAYOUT_PROOF: &str = "/api/payOutProof";

    /// Every path above.
    pub const ALL: [&str; 6] = [
        CREATE_DEPOSIT,
        QUERY_DEPOSIT,
        CREATE_PAYOUT,
        QUERY_PAYOUT,
        BALANCE,
        PAYOUT_PROOF,
    ];
}

/// TarsPay's published system public key, which signs callbacks.
pub const TARSPAY_SYSTEM_PUBLIC_KEY: &str =
    "03029c655932f22aee81034d109795fbd7e23ca173ca27e195091d434e593a2e0f";
