//! tarspay-worker: moves money through the TarsPay payment gateway without losing or doubling
//! a payout. See `ARCHITECTURE.md` for the map of this crate.

pub mod audit;
pub mod batch;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod console;
pub mod deployment;
pub mod gateway;
pub mod ids;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod partition;
pub mod payout;
pub mod producer;
pub mod queue;
pub mod ratelimit;
pub mod redis_conn;
pub mod redis_safety;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod startup;
pub mod strict_json;
pub mod telemetry;
pub mod wall_clock;
pub mod webhooks;
pub mod worker;
