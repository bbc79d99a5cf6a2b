//! The sandbox's order book: merchants with their keys, balances (one account for every
//! currency without its own, plus one per currency given one), rate limits and call records,
//! each merchant's orders (its own `mchOrderNo` namespace) and their schedule, and the
//! counters tests read (create attempts per order, callbacks sent).

use super::limits::{CallLog, CallReport, Gcra};
use super::rules::{RateLimit, SandboxMerchant};
use super::{Shared, callbacks};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarspay_worker::gateway::{OrderState, PublicKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderKind {
    Payout,
    Deposit,
}

#[derive(Debug, Clone, Copy, Default)]
struct Account {
    available: Decimal,
    frozen: Decimal,
}

impl Account {
    fn with(available: Decimal) -> Self {
        Self {
            available,
            frozen: Decimal::ZERO,
        }
    }
}

/// One merchant: its accounts, orders, limit and calls.
#[derive(Default)]
struct Merchant {
    /// The account of every currency without one of its own.
    shared: Account,
    /// Accounts of their own, by currency.
    currencies: BTreeMap<String, Account>,
    /// Keyed by `mchOrderNo`: each merchant has its own namespace.
    orders: HashMap<String, Order>,
    create_attempts: HashMap<String, u32>,
    limiter: Option<Gcra>,
    calls: CallLog,
}

impl Merchant {
    fn account_mut(&mut self, currency: Option<&str>) -> &mut Account {
        match currency.and_then(|c| self.currencies.get_mut(c)) {
            Some(account) => account,
            None => &mut self.shared,
        }
    }

    fn account(&self, currency: Option<&str>) -> Account {
        currency
            .and_then(|c| self.currencies.get(c))
            .copied()
            .unwrap_or(self.shared)
    }
}

/// One merchant's balances as reported under `/sandbox/merchants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceView {
    /// `None` (null) for the account of every currency without its own.
    pub currency: Option<String>,
    pub available: String,
    pub frozen: String,
}

struct Order {
    kind: OrderKind,
    /// The currency whose own account this payout debited; `None` for the shared account.
    account: Option<String>,
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
    merchants: HashMap<String, Merchant>,
    /// `X-API-KEY` hex → merchant number and the parsed key (parsed once: decompressing a
    /// point costs a square root, which every call would otherwise pay).
    keys: HashMap<String, (String, PublicKey)>,
    /// (fault rule index, mchNo, mchOrderNo) → times applied.
    fault_counts: HashMap<(usize, String, String), u32>,
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
    /// Registers a merchant (its key replaces any earlier key of the same `mchNo`); a merchant
    /// already known keeps its balances and orders.
    pub(crate) fn add_merchant(&mut self, merchant: &SandboxMerchant) {
        self.keys
            .retain(|_, (mch_no, _)| *mch_no != merchant.mch_no);
        self.keys.insert(
            merchant.public_key.to_hex(),
            (merchant.mch_no.clone(), merchant.public_key),
        );
        self.merchants
            .entry(merchant.mch_no.clone())
            .or_insert_with(|| Merchant {
                shared: Account::with(merchant.balance),
                ..Merchant::default()
            });
    }

    pub(crate) fn knows(&self, mch_no: &str) -> bool {
        self.merchants.contains_key(mch_no)
    }

    /// How many orders the merchant has (each created once), without building their views.
    pub(crate) fn order_count(&self, mch_no: &str) -> Option<usize> {
        Some(self.merchants.get(mch_no)?.orders.len())
    }

    pub(crate) fn merchant_numbers(&self) -> Vec<String> {
        let mut numbers: Vec<String> = self.merchants.keys().cloned().collect();
        numbers.sort();
        numbers
    }

    pub(crate) fn merchant_for_key(&self, api_key: &str) -> Option<(&str, &PublicKey)> {
        self.keys
            .get(&api_key.to_ascii_lowercase())
            .map(|(mch_no, key)| (mch_no.as_str(), key))
    }

    /// Sets a merchant's available balance, in one currency's own account or (`None`) the
    /// shared one; frozen amounts stay. False for an unknown merchant.
    pub(crate) fn set_balance(
        &mut self,
        mch_no: &str,
        currency: Option<&str>,
        available: Decimal,
    ) -> bool {
        let Some(merchant) = self.merchants.get_mut(mch_no) else {
            return false;
        };
        match currency {
            Some(currency) => {
                merchant
                    .currencies
                    .entry(currency.to_owned())
                    .or_default()
                    .available = available;
            }
            None => merchant.shared.available = available,
        }
        true
    }

    /// (available, frozen) of the account payouts in `currency` draw on (`None`: the shared one).
    pub(crate) fn balance(
        &self,
        mch_no: &str,
        currency: Option<&str>,
    ) -> Option<(Decimal, Decimal)> {
        let account = self.merchants.get(mch_no)?.account(currency);
        Some((account.available, account.frozen))
    }

    pub(crate) fn balances(&self, mch_no: &str) -> Vec<BalanceView> {
        let Some(merchant) = self.merchants.get(mch_no) else {
            return Vec::new();
        };
        let view = |currency: Option<&String>, account: &Account| BalanceView {
            currency: currency.cloned(),
            available: account.available.to_string(),
            frozen: account.frozen.to_string(),
        };
        std::iter::once(view(None, &merchant.shared))
            .chain(merchant.currencies.iter().map(|(c, a)| view(Some(c), a)))
            .collect()
    }

    /// Sets (or with `None` lifts) a merchant's rate limit, starting from a full burst. False
    /// for an unknown merchant or an invalid limit.
    pub(crate) fn set_rate_limit(&mut self, mch_no: &str, limit: Option<RateLimit>) -> bool {
        let limiter = match limit {
            Some(limit) => match Gcra::new(limit) {
                Some(limiter) => Some(limiter),
                None => return false,
            },
            None => None,
        };
        match self.merchants.get_mut(mch_no) {
            Some(merchant) => {
                merchant.limiter = limiter;
                true
            }
            None => false,
        }
    }

    /// Records a call that arrived at `now_ns` (sandbox clock) with this `X-API-KEY` and
    /// applies its merchant's limit. `Some((mchNo, limit, wait))` when it must be refused;
    /// `None` when it may go on (or the key is nobody's: authentication refuses it next).
    pub(crate) fn admit(
        &mut self,
        api_key: &str,
        now_ns: u64,
    ) -> Option<(String, RateLimit, std::time::Duration)> {
        let mch_no = self.merchant_for_key(api_key)?.0.to_owned();
        let merchant = self.merchants.get_mut(&mch_no)?;
        let refused = merchant.limiter.as_mut().and_then(|limiter| {
            limiter
                .admit(now_ns)
                .err()
                .map(|wait| (limiter.limit(), wait))
        });
        merchant.calls.record(now_ns / 1_000, refused.is_some());
        refused.map(|(limit, wait)| (mch_no, limit, wait))
    }

    pub(crate) fn calls(&self, mch_no: &str) -> Option<CallReport> {
        let merchant = self.merchants.get(mch_no)?;
        Some(
            merchant
                .calls
                .report(mch_no, merchant.limiter.as_ref().map(Gcra::limit)),
        )
    }

    pub(crate) fn call_arrivals_us(&self, mch_no: &str) -> Option<Vec<u64>> {
        Some(self.merchants.get(mch_no)?.calls.arrivals_us())
    }

    pub(crate) fn clear_calls(&mut self, mch_no: &str) -> bool {
        self.merchants
            .get_mut(mch_no)
            .map(|m| m.calls.clear())
            .is_some()
    }

    pub(crate) fn count_create(&mut self, mch_no: &str, mch_order_no: &str) {
        if let Some(merchant) = self.merchants.get_mut(mch_no) {
            *merchant
                .create_attempts
                .entry(mch_order_no.to_owned())
                .or_default() += 1;
        }
    }

    pub(crate) fn create_attempts(&self, mch_no: &str, mch_order_no: &str) -> u32 {
        self.merchants
            .get(mch_no)
            .and_then(|m| m.create_attempts.get(mch_order_no))
            .copied()
            .unwrap_or_default()
    }

    /// Create attempts for this `mchOrderNo` under every merchant.
    pub(crate) fn create_attempts_any(&self, mch_order_no: &str) -> u32 {
        self.merchants
            .values()
            .filter_map(|m| m.create_attempts.get(mch_order_no))
            .sum()
    }

    /// Counts one application of fault rule `index` to this order; false once `times` is used up.
    pub(crate) fn take_fault(
        &mut self,
        index: usize,
        mch_no: &str,
        mch_order_no: &str,
        times: Option<u32>,
    ) -> bool {
        let used = self
            .fault_counts
            .entry((index, mch_no.to_owned(), mch_order_no.to_owned()))
            .or_default();
        if times.is_some_and(|limit| *used >= limit) {
            return false;
        }
        *used += 1;
        true
    }

    fn order(&self, mch_no: &str, mch_order_no: &str) -> Option<&Order> {
        self.merchants.get(mch_no)?.orders.get(mch_order_no)
    }

    fn order_mut(&mut self, mch_no: &str, mch_order_no: &str) -> Option<&mut Order> {
        self.merchants.get_mut(mch_no)?.orders.get_mut(mch_order_no)
    }

    /// How long ago this merchant's order was created; `None` if there is none.
    pub(crate) fn age(&self, mch_no: &str, mch_order_no: &str) -> Option<Duration> {
        self.order(mch_no, mch_order_no)
            .map(|o| o.created.elapsed())
    }

    pub(crate) fn reset_fault_counts(&mut self) {
        self.fault_counts.clear();
    }

    pub(crate) fn view(&self, mch_no: &str, mch_order_no: &str) -> Option<OrderView> {
        let order = self.order(mch_no, mch_order_no)?;
        Some(OrderView {
            kind: order.kind,
            mch_no: mch_no.to_owned(),
            mch_order_no: mch_order_no.to_owned(),
            pay_order_id: order.pay_order_id.clone(),
            amount: order.amount_text.clone(),
            pay_amount: order.pay_amount().to_string(),
            fee: "0".to_owned(),
            currency: order.currency.clone(),
            state: order.state().code(),
            final_state: order.final_state.code(),
            create_attempts: self.create_attempts(mch_no, mch_order_no),
            callbacks_sent: order.callbacks_sent,
            callback_acknowledged: order.callback_acknowledged,
            created_at_us: order.created_at_us,
            final_at_us: order.final_at_us,
            first_callback_at_us: order.first_callback_at_us,
            callback_acknowledged_at_us: order.callback_acknowledged_at_us,
        })
    }

    /// The order with this `mchOrderNo` under any merchant (the first by `mchNo` when several
    /// merchants hold one).
    pub(crate) fn view_any(&self, mch_order_no: &str) -> Option<OrderView> {
        self.merchant_numbers()
            .iter()
            .find_map(|mch_no| self.view(mch_no, mch_order_no))
    }

    /// This merchant's order with this `payOrderId`.
    pub(crate) fn view_by_pay_order_id(
        &self,
        mch_no: &str,
        pay_order_id: &str,
    ) -> Option<OrderView> {
        let merchant = self.merchants.get(mch_no)?;
        let (mch_order_no, _) = merchant
            .orders
            .iter()
            .find(|(_, order)| order.pay_order_id == pay_order_id)?;
        self.view(mch_no, mch_order_no)
    }

    /// Every order (of one merchant when `mch_no` is given), by `mchOrderNo` then `mchNo`.
    pub(crate) fn views_of(&self, mch_no: Option<&str>) -> Vec<OrderView> {
        let mut views: Vec<OrderView> = self
            .merchants
            .iter()
            .filter(|(number, _)| mch_no.is_none_or(|wanted| wanted == number.as_str()))
            .flat_map(|(number, merchant)| {
                merchant
                    .orders
                    .keys()
                    .filter_map(|id| self.view(number, id))
            })
            .collect();
        views.sort_by(|a, b| (&a.mch_order_no, &a.mch_no).cmp(&(&b.mch_order_no, &b.mch_no)));
        views
    }

    pub(crate) fn views(&self) -> Vec<OrderView> {
        self.views_of(None)
    }

    pub(crate) fn notify_url(&self, mch_no: &str, mch_order_no: &str) -> Option<String> {
        self.order(mch_no, mch_order_no)?.notify_url.clone()
    }

    /// Stamps the start of the first callback send (resends keep the first stamp).
    pub(crate) fn record_callback_start(&mut self, mch_no: &str, mch_order_no: &str) {
        if let Some(order) = self.order_mut(mch_no, mch_order_no) {
            order.first_callback_at_us.get_or_insert_with(now_us);
        }
    }

    pub(crate) fn record_callback(&mut self, mch_no: &str, mch_order_no: &str, acknowledged: bool) {
        if let Some(order) = self.order_mut(mch_no, mch_order_no) {
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
    fn finalize(&mut self, mch_no: &str, mch_order_no: &str) -> bool {
        let Some(merchant) = self.merchants.get_mut(mch_no) else {
            return false;
        };
        let Some(order) = merchant.orders.get_mut(mch_order_no) else {
            return false;
        };
        if order.finalized {
            return false;
        }
        order.finalized = true;
        order.final_at_us = Some(now_us());
        if order.kind == OrderKind::Payout {
            let (amount, success) = (order.amount, order.final_state == OrderState::Success);
            let currency = order.account.clone();
            let account = merchant.account_mut(currency.as_deref());
            account.frozen -= amount;
            if !success {
                account.available += amount;
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
        let pay_order_id = book.next_pay_order_id();
        let merchant = book.merchants.entry(new.mch_no.clone()).or_default();
        if merchant.orders.contains_key(&new.mch_order_no) {
            return Err(InsertError::Duplicate);
        }
        let mut account_currency = None;
        if new.kind == OrderKind::Payout {
            if merchant.currencies.contains_key(&new.currency) {
                account_currency = Some(new.currency.clone());
            }
            let account = merchant.account_mut(account_currency.as_deref());
            if account.available < new.amount {
                return Err(InsertError::InsufficientBalance);
            }
            account.available -= new.amount;
            account.frozen += new.amount;
        }
        merchant.orders.insert(
            new.mch_order_no.clone(),
            Order {
                kind: new.kind,
                account: account_currency,
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
        book.view(&new.mch_no, &new.mch_order_no)
    };
    let shared = shared.clone();
    let (mch_no, mch_order_no) = (new.mch_no, new.mch_order_no);
    tokio::spawn(async move {
        tokio::time::sleep(final_after).await;
        let (finalized, notify_url) = {
            let mut book = shared.book();
            (
                book.finalize(&mch_no, &mch_order_no),
                book.notify_url(&mch_no, &mch_order_no),
            )
        };
        if finalized
            && callbacks
            && let Some(url) = notify_url
        {
            callbacks::deliver(&shared, &mch_no, &mch_order_no, &url).await;
        }
    });
    // The order was inserted just above, under the same lock.
    view.ok_or(InsertError::Duplicate)
}
