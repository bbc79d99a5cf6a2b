//! A simulated TarsPay: the same endpoints, envelope, codes and signature checks, orders that
//! progress to a chosen final state on a schedule, signed callbacks with resends, and faults
//! injected per order. Tests, the demo and benchmarks run against it; it is never "the gateway".
//!
//! It hosts any number of merchants, each with its own key, orders (`mchOrderNo` is per
//! merchant), balances (one account for every currency plus accounts of their own for chosen
//! currencies), an optional rate limit ([`RateLimit`], answered with HTTP 429) and a record of
//! its calls ([`CallReport`]).
//!
//! Start it in-process with [`Sandbox::start`], or as a process with
//! `tarspay-sandbox --listen ADDR` (or `cargo run -- sandbox` in the workspace). It reports what it saw under `/sandbox/…`.

mod book;
mod callbacks;
pub mod cli;
pub mod limits;
pub mod rules;
mod server;

pub use book::{BalanceView, OrderKind, OrderView};
pub use limits::{CallReport, MAX_RECORDED_CALLS, RATE_LIMITED_CODE};
pub use rules::{
    ContentEncoding, CurrencyBalance, Endpoint, FaultAction, FaultRule, OutcomeRule, RateLimit,
    SandboxConfig, SandboxMerchant,
};
use rust_decimal::Decimal;

use book::Book;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Shared by the server, the order timers and the callback sender.
pub(crate) struct Shared {
    pub(crate) config: Mutex<SandboxConfig>,
    pub(crate) book: Mutex<Book>,
    pub(crate) http: reqwest::Client,
    /// TCP connections accepted so far (shows whether clients reuse connections).
    pub(crate) connections: std::sync::atomic::AtomicU64,
    /// The zero of the sandbox's monotonic clock (call arrival times count from it).
    pub(crate) started: std::time::Instant,
}

impl Shared {
    /// The config in force; a poisoned lock only means a panicking test thread, keep going.
    pub(crate) fn config(&self) -> std::sync::MutexGuard<'_, SandboxConfig> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nanoseconds since the sandbox started, on the monotonic clock.
    pub(crate) fn clock_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Registers (or re-keys) a merchant in the book and the config.
    pub(crate) fn add_merchant(&self, merchant: SandboxMerchant) {
        self.book().add_merchant(&merchant);
        let mut config = self.config();
        config.merchants.retain(|m| m.mch_no != merchant.mch_no);
        config.merchants.push(merchant);
    }

    pub(crate) fn set_rate_limit(&self, mch_no: &str, limit: Option<RateLimit>) -> bool {
        if !self.book().set_rate_limit(mch_no, limit) {
            return false;
        }
        let mut config = self.config();
        match limit {
            Some(limit) => config.rate_limits.insert(mch_no.to_owned(), limit),
            None => config.rate_limits.remove(mch_no),
        };
        true
    }
}

/// A running sandbox. Dropping the handle stops it.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot build the callback client: {0}")]
    Client(String),
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
}

impl Sandbox {
    /// Binds `listen` (use `127.0.0.1:0` for a free port) and serves in the background.
    pub async fn start(config: SandboxConfig, listen: &str) -> Result<Self, SandboxError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| SandboxError::Bind {
                addr: listen.to_owned(),
                source,
            })?;
        Self::serve(config, listener)
    }

    pub fn serve(config: SandboxConfig, listener: TcpListener) -> Result<Self, SandboxError> {
        let addr = listener.local_addr().map_err(|source| SandboxError::Bind {
            addr: "listener".into(),
            source,
        })?;
        tarspay_worker::gateway::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.callback_timeout)
            .build()
            .map_err(|err| SandboxError::Client(err.to_string()))?;
        let mut book = Book::default();
        for merchant in &config.merchants {
            book.add_merchant(merchant);
        }
        for balance in &config.balances {
            if !book.set_balance(&balance.mch_no, Some(&balance.currency), balance.available) {
                return Err(SandboxError::Config(format!(
                    "a balance for {} {}: no such merchant",
                    balance.mch_no, balance.currency
                )));
            }
        }
        for (mch_no, limit) in &config.rate_limits {
            if !book.set_rate_limit(mch_no, Some(*limit)) {
                return Err(SandboxError::Config(format!(
                    "rate limit of {mch_no}: no such merchant, or not a positive rate and burst"
                )));
            }
        }
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            book: Mutex::new(book),
            http,
            connections: Default::default(),
            started: std::time::Instant::now(),
        });
        let (shutdown, stopped) = watch::channel(false);
        tokio::spawn(server::accept_loop(listener, shared.clone(), stopped));
        Ok(Self {
            addr,
            shared,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, to use as the gateway URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn system_public_key(&self) -> tarspay_worker::gateway::PublicKey {
        self.shared.config().system_key.public_key()
    }

    /// TCP connections accepted since start.
    pub fn connections_accepted(&self) -> u64 {
        self.shared
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registers a merchant, or gives a registered one (same `mchNo`) a new key; a merchant
    /// already known keeps its balances, orders, limit and calls.
    pub fn add_merchant(&self, merchant: SandboxMerchant) {
        self.shared.add_merchant(merchant);
    }

    /// Numbers of the registered merchants, sorted.
    pub fn merchants(&self) -> Vec<String> {
        self.shared.book().merchant_numbers()
    }

    /// Sets a merchant's available balance: in `currency`'s own account (created on first
    /// use; from then on that currency's payouts draw on it), or with `None` in the account
    /// of every currency without its own. Frozen amounts are kept. False for an unknown
    /// merchant.
    pub fn set_balance(&self, mch_no: &str, currency: Option<&str>, available: Decimal) -> bool {
        self.shared.book().set_balance(mch_no, currency, available)
    }

    /// The available balance that payouts in `currency` draw on, as decimal text.
    pub fn balance_in(&self, mch_no: &str, currency: &str) -> Option<String> {
        self.shared
            .book()
            .balance(mch_no, Some(currency))
            .map(|(available, _)| available.to_string())
    }

    /// Every account of a merchant (the shared one first), available and frozen.
    pub fn balances(&self, mch_no: &str) -> Vec<BalanceView> {
        self.shared.book().balances(mch_no)
    }

    /// Limits a merchant's calls (`Some`), starting with a full burst, or lifts the limit
    /// (`None`). False for an unknown merchant or an invalid limit ([`RateLimit::is_valid`]).
    pub fn set_rate_limit(&self, mch_no: &str, limit: Option<RateLimit>) -> bool {
        self.shared.set_rate_limit(mch_no, limit)
    }

    /// What a merchant's calls looked like: totals, 429s, the busiest second.
    pub fn calls(&self, mch_no: &str) -> Option<CallReport> {
        self.shared.book().calls(mch_no)
    }

    /// The recorded arrival times of a merchant's calls (µs since the sandbox started, its
    /// monotonic clock, oldest first; the newest [`MAX_RECORDED_CALLS`]).
    pub fn call_arrivals_us(&self, mch_no: &str) -> Option<Vec<u64>> {
        self.shared.book().call_arrivals_us(mch_no)
    }

    /// Forgets a merchant's recorded calls and counters (its limit's state stays).
    pub fn clear_calls(&self, mch_no: &str) -> bool {
        self.shared.book().clear_calls(mch_no)
    }

    /// Refuses balance queries that name a currency with `code` from now on (`None`: answers
    /// them), as [`SandboxConfig::refuse_balance_currency`].
    pub fn set_refuse_balance_currency(&self, code: Option<i64>) {
        self.shared.config().refuse_balance_currency = code;
    }

    /// Replaces the fault rules (and resets their per-order counters).
    pub fn set_faults(&self, faults: Vec<FaultRule>) {
        self.shared.config().faults = faults;
        self.shared.book().reset_fault_counts();
    }

    pub fn set_outcomes(&self, outcomes: Vec<OutcomeRule>) {
        self.shared.config().outcomes = outcomes;
    }

    /// Changes the config in place (schedule, callback policy, …).
    pub fn update_config(&self, change: impl FnOnce(&mut SandboxConfig)) {
        change(&mut self.shared.config());
    }

    /// Every merchant's orders, by `mchOrderNo` then `mchNo`.
    pub fn orders(&self) -> Vec<OrderView> {
        self.shared.book().views()
    }

    /// One merchant's orders, by `mchOrderNo`.
    pub fn orders_of(&self, mch_no: &str) -> Vec<OrderView> {
        self.shared.book().views_of(Some(mch_no))
    }

    /// The order with this `mchOrderNo` under any merchant (when several merchants hold one,
    /// the first by `mchNo`; use [`Sandbox::order_of`] to choose).
    pub fn order(&self, mch_order_no: &str) -> Option<OrderView> {
        self.shared.book().view_any(mch_order_no)
    }

    /// This merchant's order with this `mchOrderNo`.
    pub fn order_of(&self, mch_no: &str, mch_order_no: &str) -> Option<OrderView> {
        self.shared.book().view(mch_no, mch_order_no)
    }

    /// How many create calls arrived for this `mchOrderNo` under any merchant, accepted or
    /// refused (a call answered 429 is not one: it never reached the create).
    pub fn create_attempts(&self, mch_order_no: &str) -> u32 {
        self.shared.book().create_attempts_any(mch_order_no)
    }

    /// How many create calls of this merchant arrived for this `mchOrderNo`.
    pub fn create_attempts_of(&self, mch_no: &str, mch_order_no: &str) -> u32 {
        self.shared.book().create_attempts(mch_no, mch_order_no)
    }

    /// The available balance of the merchant's account shared by every currency without its
    /// own (the only account of a merchant given no currency balances), as decimal text.
    pub fn balance(&self, mch_no: &str) -> Option<String> {
        self.shared
            .book()
            .balance(mch_no, None)
            .map(|(available, _)| available.to_string())
    }

    /// Creates an order directly, as if an earlier create had been accepted (for reconciliation
    /// tests: "the gateway already holds this mchOrderNo").
    pub fn insert_payout(
        &self,
        mch_no: &str,
        mch_order_no: &str,
        amount: &str,
        currency: &str,
    ) -> bool {
        let Ok(amount) = tarspay_worker::money::Amount::parse(amount) else {
            return false;
        };
        book::insert_order(
            &self.shared,
            book::NewOrder {
                kind: OrderKind::Payout,
                mch_no: mch_no.to_owned(),
                mch_order_no: mch_order_no.to_owned(),
                amount: amount.value(),
                amount_text: amount.as_str().to_owned(),
                currency: currency.to_owned(),
                notify_url: None,
            },
        )
        .is_ok()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
