//! The developer's own commands; the product's are `tarspay_worker::cli`.

pub mod bench;
pub mod demo;
