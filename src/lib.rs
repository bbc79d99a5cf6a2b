//! tarspay-worker: moves money through the TarsPay payment gateway without losing or doubling
//! a payout. See `ARCHITECTURE.md` for the map of this crate.

pub mod audit;
pub mod batch;
pub mod bench;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod ids;
pub mod jobs;
pub mod ledger;
pub mod local_redis;
pub mod metrics;
pub mod money;
pub mod payout;
pub mod producer;
pub mod queue;
pub mod redis_safety;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod webhooks;
pub mod worker;
