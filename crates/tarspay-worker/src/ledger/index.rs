//! Finding orders without knowing their numbers: a time index per partition
//! (`{tag}:index`, a sorted set: member mchOrderNo, score its registration time) and a batch
//! index (`{tag}:batches`: member batch id, score the first registration in it), both added
//! to by the registration's script step. Entries of records that expired are skipped when
//! read and trimmed by the retention.
//!
//! A search walks the time index newest first, reads each candidate's record and keeps the
//! ones that match, within a budget of candidates per page: a page is fast however many
//! orders are kept, and a rare filter over a long history says how far it looked and
//! continues from a cursor.

use super::{OrderRecord, Phase};
use crate::ids::Currency;

/// What to look for; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderQuery {
    /// A prefix of the mchOrderNo (an exact number is looked up directly).
    pub mch_order_no: Option<String>,
    pub batch_id: Option<String>,
    pub phase: Option<Phase>,
    pub currency: Option<Currency>,
    /// Registered at or after, ms since the epoch.
    pub from_ms: Option<u64>,
    /// Registered before, ms since the epoch.
    pub to_ms: Option<u64>,
    /// Where the previous page stopped ([`OrderPage::next`]).
    pub cursor: Option<String>,
    /// Orders per page (at most [`MAX_PAGE`]).
    pub limit: usize,
}

/// Most orders on one page.
pub const MAX_PAGE: usize = 200;

/// Most index entries one page reads (per partition) before it stops and offers a cursor.
pub const SCAN_BUDGET: usize = 2_000;

/// One page of a search, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderPage {
    pub orders: Vec<OrderRecord>,
    /// Where to continue, if there may be more.
    pub next: Option<String>,
    /// Index entries read for this page.
    pub scanned: usize,
    /// The oldest registration time the page looked at (how far back it searched).
    pub searched_back_to_ms: Option<u64>,
}

/// A batch, as the batch index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    pub batch_id: String,
    /// Its first registration, ms since the epoch.
    pub first_ms: u64,
}
