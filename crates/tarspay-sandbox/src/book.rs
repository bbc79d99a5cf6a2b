//! The sandbox's order book: merchants and their balances, orders and their schedule, and the
//! counters tests read (create attempts per order, callbacks sent).

use super::rules::SandboxMerchant;
use super::{Shared, callbacks};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarspay_worker::gateway::{OrderState, PublicKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderKind {
    Payout,
    Deposit,
}

struct Account {
    available: Decimal,
    frozen: Decimal,
}

struct Order {
    kind: OrderKind,
    mch_no: String,
    pay_order_id: String,
    amount: Decimal,
    amount_text: String,
    currency: String,
    notify_url: Option<String>,
    created: Instant,
    /// Wall-clock stamps (µs since the epoch) for `/sandbox/orders`: `created` drives the
    /// schedule, these only report it, comparable with other processes' clocks on the host.
    created_at_us: u64,
    final_at_us: Option<u64>,
    first_callback_at_us: Option<u64>,
    callback_acknowledged_at_us: Option<u64>,
    processing_after: Duration,
    final_state: OrderState,
    finalized: bool,
    callbacks_sent: u32,
    callback_acknowledged: bool,
}

impl Order {
    fn state(&self) -> OrderState {
        if self.finalized {
            self.final_state
        } else if self.created.elapsed() < self.processing_after {
            OrderState::Creating
        } else {
            OrderState::Processing
        }
    }

    /// What the beneficiary (payout) or the merchant (deposit) actually received.
    fn pay_amount(&self) -> Decimal {
        match (self.finalized, self.final_state) {
            (true, OrderState::Success) => self.amount,
            (true, OrderState::Partial) => (self.amount / Decimal::TWO).round_dp(2),
            _ => Decimal::ZERO,
        }
    }
}

/// An order as the sandbox reports it (`/sandbox/orders`, query answers, callbacks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub kind: OrderKind,
    pub mch_no: String,
    pub mch_order_no: String,
    pub pay_order_id: String,
    pub amount: String,
    pub pay_amount: String,
    pub fee: String,
    pub currency: String,
    pub state: i64,
    pub final_state: i64,
    pub create_attempts: u32,
    pub callbacks_sent: u32,
    pub callback_acknowledged: bool,
    /// When the create was accepted (µs since the Unix epoch, the host's wall clock).
    pub created_at_us: u64,
    /// When the order reached its final state; `None` (null) before.
    pub final_at_us: Option<u64>,
    /// When the first callback send started; `None` (null) without callbacks.
    pub first_callback_at_us: Option<u64>,
    /// When a callback was first answered `OK`; `None` (null) until then.
    pub callback_acknowledged_at_us: Option<u64>,
}

/// Microseconds since the Unix epoch on the host's wall clock (the stamps of [`OrderView`]).
fn now_us() -> u64 {
    tarspay_worker::wall_clock::since_epoch().as_micros() as u64
}

#[derive(Default)]
pub(crate) struct Book {
    accounts: HashMap<String, Account>,
    /// `X-API-KEY` hex → merchant number and the parsed key (parsed once: decompressing a
    /// point costs a square root, which every call would otherwise pay).
    keys: HashMap<String, (String, PublicKey)>,
    /// Keyed by `mchOrderNo` (the sandbox holds one namespace for all its merchants).
    orders: HashMap<String, Order>,
    create_attempts: HashMap<String, u32>,
    /// (fault rule index, mchOrderNo) → times applied.
    fault_counts: HashMap<(usize, String), u32>,
    pay_order_seq: u64,
}

pub(crate) struct NewOrder {
    pub kind: OrderKind,
    pub mch_no: String,
    pub mch_order_no: String,
    pub amount: Decimal,
    pub amount_text: String,
    pub currency: String,
    pub notify_url: Option<String>,
}

pub(crate) enum InsertError {
    Duplicate,
    InsufficientBalance,
}

impl Book {
    pub(crate) fn add_merchant(&mut self, merchant: &SandboxMerchant) {
        self.keys.insert(
            merchant.public_key.to_hex(),
            (merchant.mch_no.clone(), merchant.public_key),
        );
        self.accounts
            .entry(merchant.mch_no.clone())
            .or_insert(Account {
                available: merchant.balance,
                frozen: Decimal::ZERO,
            });
    }

    pub(crate) fn merchant_for_key(&self, api_key: &str) -> Option<(&str, &PublicKey)> {
        self.keys
            .get(&api_key.to_ascii_lowercase())
            .map(|(mch_no, key)| (mch_no.as_str(), key))
    }

    pub(crate) fn balance(&self, mch_no: &str) -> Option<(Decimal, Decimal)> {
        self.accounts.get(mch_no).map(|a| (a.available, a.frozen))
    }

    pub(crate) fn count_create(&mut self, mch_order_no: &str) {
        *self
            .create_attempts
            .entry(mch_order_no.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn create_attempts(&self, mch_order_no: &str) -> u32 {
        self.create_attempts
            .get(mch_order_no)
            .copied()
            .unwrap_or_default()
    }

    /// Counts one application of fault rule `index` to this order; false once `times` is used up.
    pub(crate) fn take_fault(
        &mut self,
        index: usize,
        mch_order_no: &str,
        times: Option<u32>,
    ) -> bool {
        let used = self
            .fault_counts
            .entry((index, mch_order_no.to_owned()))
            .or_default();
        if times.is_some_and(|limit| *used >= limit) {
            return false;
        }
        *used += 1;
        true
    }

    /// How long ago the order with this `mchOrderNo` was created; `None` if there is none.
    pub(crate) fn age(&self, mch_order_no: &str) -> Option<Duration> {
        self.orders.get(mch_order_no).map(|o| o.created.elapsed())
    }

    pub(crate) fn reset_fault_counts(&mut self) {
        self.fault_counts.clear();
    }

    pub(crate) fn view(&self, mch_order_no: &str) -> Option<OrderView> {
        let order = self.orders.get(mch_order_no)?;
        Some(OrderView {
            kind: order.kind,
            mch_no: order.mch_no.clone(),
            mch_order_no: mch_order_no.to_owned(),
            pay_order_id: order.pay_order_id.clone(),
            amount: order.amount_text.clone(),
            pay_amount: order.pay_amount().to_string(),
            fee: "0".to_owned(),
            currency: order.currency.clone(),
            state: order.state().code(),
            final_state: order.final_state.code(),
            create_attempts: self.create_attempts(mch_order_no),
            callbacks_sent: order.callbacks_sent,
            callback_acknowledged: order.callback_acknowledged,
            created_at_us: order.created_at_us,
            final_at_us: order.final_at_us,
            first_callback_at_us: order.first_callback_at_us,
            callback_acknowledged_at_us: order.callback_acknowledged_at_us,
        })
    }

    pub(crate) fn views(&self) -> Vec<OrderView> {
        let mut views: Vec<OrderView> = self.orders.keys().filter_map(|id| self.view(id)).collect();
        views.sort_by(|a, b| a.mch_order_no.cmp(&b.mch_order_no));
        views
    }

    pub(crate) fn notify_url(&self, mch_order_no: &str) -> Option<String> {
        self.orders.get(mch_order_no)?.notify_url.clone()
    }

    /// Stamps the start of the first callback send (resends keep the first stamp).
    pub(crate) fn record_callback_start(&mut self, mch_order_no: &str) {
        if let Some(order) = self.orders.get_mut(mch_order_no) {
            order.first_callback_at_us.get_or_insert_with(now_us);
        }
    }

    pub(crate) fn record_callback(&mut self, mch_order_no: &str, acknowledged: bool) {
        if let Some(order) = self.orders.get_mut(mch_order_no) {
            order.callbacks_sent += 1;
            order.callback_acknowledged |= acknowledged;
            if acknowledged {
                order.callback_acknowledged_at_us.get_or_insert_with(now_us);
            }
        }
    }

    /// "P" + 19 digits, like TarsPay's payOrderId.
    fn next_pay_order_id(&mut self) -> String {
        self.pay_order_seq += 1;
        let millis = tarspay_worker::wall_clock::now_ms();
        format!(
            "P{:013}{:06}",
            millis % 10u64.pow(13),
            self.pay_order_seq % 1_000_000
        )
    }

    /// Moves an order to its final state; a failed payout's money goes back to available.
    fn finalize(&mut self, mch_order_no: &str) -> bool {
        let Some(order) = self.orders.get_mut(mch_order_no) else {
            return false;
        };
        if order.finalized {
            return false;
        }
        order.finalized = true;
        order.final_at_us = Some(now_us());
        if order.kind == OrderKind::Payout
            && let Some(account) = self.accounts.get_mut(&order.mch_no)
        {
            account.frozen -= order.amount;
            if order.final_state != OrderState::Success {
                account.available += order.amount;
            }
        }
        true
    }
}

/// Records a new order (debiting a payout from the balance) and schedules its final state
/// and callback.
pub(crate) fn insert_order(shared: &Arc<Shared>, new: NewOrder) -> Result<OrderView, InsertError> {
    let (final_state, final_after, processing_after, callbacks) = {
        let config = shared.config();
        let default = match new.kind {
            OrderKind::Payout => config.default_payout_state,
            OrderKind::Deposit => config.default_deposit_state,
        };
        let (state, after) = config.outcome_for(&new.mch_order_no, default);
        (state, after, config.processing_after, config.callbacks)
    };
    let view = {
        let mut book = shared.book();
        if book.orders.contains_key(&new.mch_order_no) {
            return Err(InsertError::Duplicate);
        }
        if new.kind == OrderKind::Payout {
            let account = book.accounts.entry(new.mch_no.clone()).or_insert(Account {
                available: Decimal::ZERO,
                frozen: Decimal::ZERO,
            });
            if account.available < new.amount {
                return Err(InsertError::InsufficientBalance);
            }
            account.available -= new.amount;
            account.frozen += new.amount;
        }
        let pay_order_id = book.next_pay_order_id();
        book.orders.insert(
            new.mch_order_no.clone(),
            Order {
                kind: new.kind,
                mch_no: new.mch_no,
                pay_order_id,
                amount: new.amount,
                amount_text: new.amount_text,
                currency: new.currency,
                notify_url: new.notify_url,
                created: Instant::now(),
                created_at_us: now_us(),
                final_at_us: None,
                first_callback_at_us: None,
                callback_acknowledged_at_us: None,
                processing_after,
                final_state,
                finalized: false,
                callbacks_sent: 0,
                callback_acknowledged: false,
            },
        );
        book.view(&new.mch_order_no)
    };
    let shared = shared.clone();
    let mch_order_no = new.mch_order_no;
    tokio::spawn(async move {
        tokio::time::sleep(final_after).await;
        let (finalized, notify_url) = {
            let mut book = shared.book();
            (book.finalize(&mch_order_no), book.notify_url(&mch_order_no))
        };
        if finalized
            && callbacks
            && let Some(url) = notify_url
        {
            callbacks::deliver(&shared, &mch_order_no, &url).await;
        }
    });
    // The order was inserted just above, under the same lock.
    view.ok_or(InsertError::Duplicate)
}
