//! A simulated TarsPay: the same endpoints, envelope, codes and signature checks, orders that
//! progress to a chosen final state on a schedule, signed callbacks with resends, and faults
//! injected per order. Tests, the demo and benchmarks run against it; it is never "the gateway".
//!
//! Start it in-process with [`Sandbox::start`], or as a process with
//! `tarspay-sandbox --listen ADDR` (or `cargo run -- sandbox` in the workspace). It reports what it saw under `/sandbox/…`.

mod book;
mod callbacks;
pub mod cli;
pub mod rules;
mod server;

pub use book::{OrderKind, OrderView};
pub use rules::{Endpoint, FaultAction, FaultRule, OutcomeRule, SandboxConfig, SandboxMerchant};

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
}

impl Shared {
    /// The config in force; a poisoned lock only means a panicking test thread, keep going.
    pub(crate) fn config(&self) -> std::sync::MutexGuard<'_, SandboxConfig> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
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
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            book: Mutex::new(book),
            http,
            connections: Default::default(),
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

    pub fn add_merchant(&self, merchant: SandboxMerchant) {
        self.shared.book().add_merchant(&merchant);
        self.shared.config().merchants.push(merchant);
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

    pub fn orders(&self) -> Vec<OrderView> {
        self.shared.book().views()
    }

    pub fn order(&self, mch_order_no: &str) -> Option<OrderView> {
        self.shared.book().view(mch_order_no)
    }

    /// How many create calls arrived for this `mchOrderNo`, accepted or not.
    pub fn create_attempts(&self, mch_order_no: &str) -> u32 {
        self.shared.book().create_attempts(mch_order_no)
    }

    /// The merchant's available balance as decimal text.
    pub fn balance(&self, mch_no: &str) -> Option<String> {
        self.shared
            .book()
            .balance(mch_no)
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
