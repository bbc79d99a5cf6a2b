//! tarspay-dev: the developer's kit around the product crate `tarspay-worker` — the README's
//! demo and the benchmarks. Nothing here ships to users; the integration tests of the whole
//! system live beside it in `tests/`.

pub mod bench;
pub mod demo;
