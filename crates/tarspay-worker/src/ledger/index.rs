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

use super::{Ledger, LedgerError, OrderRecord, Phase, record_from_fields};
use crate::ids::Currency;
use std::collections::HashMap;

/// What to look for; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderQuery {
    /// The exact mchOrderNo (looked up directly, not through the index).
    pub mch_order_no: Option<String>,
    /// The batch's orders, in mchOrderNo order (from the batch's member set).
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

/// Index entries (and history lists) one trim script call removes: short script calls.
const TRIM_CHUNK: u64 = 500;

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

impl OrderQuery {
    /// Whether a record matches the filters (the index already bounds the time).
    pub fn matches(&self, record: &OrderRecord) -> bool {
        self.phase.is_none_or(|phase| record.phase == phase)
            && self.currency.as_ref().is_none_or(|c| record.currency == *c)
            && self
                .batch_id
                .as_deref()
                .is_none_or(|b| record.batch_id.as_ref().is_some_and(|id| id.as_str() == b))
            && self.from_ms.is_none_or(|from| record.created_at_ms >= from)
            && self.to_ms.is_none_or(|to| record.created_at_ms < to)
    }

    pub fn page_size(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE)
    }
}

/// A position in the time index: entries strictly after it (older, or as old with a
/// smaller member) come next. Written `<ms>:<mchOrderNo>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexPosition {
    pub ms: u64,
    pub member: String,
}

impl IndexPosition {
    pub fn parse(text: &str) -> Option<Self> {
        let (ms, member) = text.split_once(':')?;
        Some(Self {
            ms: ms.parse().ok()?,
            member: member.to_owned(),
        })
    }

    pub fn encode(&self) -> String {
        format!("{}:{}", self.ms, self.member)
    }
}

/// One partition's part of a page.
#[derive(Debug, Default)]
pub(crate) struct PartitionScan {
    /// Matches, newest first, with their index positions.
    pub found: Vec<(IndexPosition, OrderRecord)>,
    pub scanned: usize,
    /// Where the scan stopped because the budget ran out (entries after it were not read).
    pub stopped_at: Option<IndexPosition>,
}

/// Largest chunk of index entries read at once.
const CHUNK: usize = 500;

impl Ledger {
    /// Walks this partition's time index newest first from `after`, keeping up to `limit`
    /// orders that match, reading at most `budget` entries.
    pub(crate) async fn scan_index(
        &self,
        query: &OrderQuery,
        after: Option<&IndexPosition>,
        limit: usize,
        budget: usize,
    ) -> Result<PartitionScan, LedgerError> {
        let mut scan = PartitionScan::default();
        let mut position = after.cloned();
        let min = query.from_ms.map_or("-inf".to_owned(), |ms| ms.to_string());
        let mut chunk = limit.clamp(1, CHUNK);
        while scan.found.len() < limit {
            if scan.scanned >= budget {
                scan.stopped_at = position;
                break;
            }
            // From the position's millisecond (inclusive: members of the same ms past the
            // position come after it), or from the upper time bound.
            let max = match (&position, query.to_ms) {
                (Some(p), _) => p.ms.to_string(),
                (None, Some(to)) => format!("({to}"),
                (None, None) => "+inf".to_owned(),
            };
            let take = chunk.min(budget - scan.scanned);
            // Entries of the position's own millisecond that come before it are skipped, so
            // ask for that many more (bounded: a millisecond holds few registrations).
            let skip = match &position {
                Some(p) => self.same_ms_before(p).await?,
                None => 0,
            };
            let entries: Vec<(String, u64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(self.keys.index())
                .arg(&max)
                .arg(&min)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(skip)
                .arg(take)
                .query_async(&mut self.conn.clone())
                .await?;
            if entries.is_empty() {
                break;
            }
            let exhausted = entries.len() < take;
            scan.scanned += entries.len();
            let records = self
                .records(entries.iter().map(|(id, _)| id.as_str()))
                .await?;
            for ((member, ms), record) in entries.into_iter().zip(records) {
                let here = IndexPosition { ms, member };
                if let Some(record) = record
                    && scan.found.len() < limit
                    && query.matches(&record)
                {
                    scan.found.push((here.clone(), record));
                }
                position = Some(here);
            }
            if exhausted {
                break;
            }
            chunk = (chunk * 4).min(CHUNK);
        }
        Ok(scan)
    }

    /// Index entries of `position`'s millisecond that come before it (newest first: the
    /// members greater than or equal to it).
    async fn same_ms_before(&self, position: &IndexPosition) -> Result<usize, LedgerError> {
        let ms = position.ms.to_string();
        let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.index())
            .arg(&ms)
            .arg(&ms)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(members
            .iter()
            .filter(|m| m.as_str() >= position.member.as_str())
            .count())
    }

    /// The records of `ids` (one pipelined round trip), `None` for those gone. A record that
    /// does not read (e.g. a stray field written after it expired) is logged and shown as
    /// gone: one bad hash must not take every list that passes it down.
    pub(crate) async fn records<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Option<OrderRecord>>, LedgerError> {
        let ids: Vec<&str> = ids.collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(self.keys.order(id));
        }
        let all: Vec<HashMap<String, String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(ids
            .iter()
            .zip(all)
            .map(|(id, fields)| {
                record_from_fields(id, &fields).unwrap_or_else(|err| {
                    tracing::warn!(mch_order_no = %id, error = %err, "an unreadable order record is left out of a list");
                    None
                })
            })
            .collect())
    }

    /// The most recent batches of this partition, newest first.
    pub(crate) async fn recent_batches(
        &self,
        limit: usize,
    ) -> Result<Vec<BatchEntry>, LedgerError> {
        let entries: Vec<(String, u64)> = redis::cmd("ZREVRANGE")
            .arg(self.keys.batches())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(entries
            .into_iter()
            .map(|(batch_id, first_ms)| BatchEntry { batch_id, first_ms })
            .collect())
    }

    /// Drops index entries registered more than twice the retention ago (their records
    /// have expired unless the order stayed unsettled that long; an exact number still
    /// finds those), and with each order's entry its history list (see [`super::history`]).
    /// Without a retention nothing is dropped. Returns the entries removed.
    pub async fn trim_indexes(&self) -> Result<u64, LedgerError> {
        if self.retention_ms == 0 {
            return Ok(0);
        }
        let bound = crate::queue::now_ms().saturating_sub(self.retention_ms.saturating_mul(2));
        let bound = format!("({bound}");
        let mut removed = 0;
        loop {
            let trimmed: u64 = super::scripts::TRIM_INDEX
                .key(self.keys.index())
                .arg(&bound)
                .arg(self.keys.events(""))
                .arg(TRIM_CHUNK)
                .invoke_async(&mut self.conn.clone())
                .await?;
            removed += trimmed;
            if trimmed < TRIM_CHUNK {
                break;
            }
        }
        let batches: u64 = redis::cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.batches())
            .arg("-inf")
            .arg(&bound)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(removed + batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_order() {
        let p = IndexPosition::parse("1700000000000:PAY-1").unwrap();
        assert_eq!(p.encode(), "1700000000000:PAY-1");
        assert!(IndexPosition::parse("nope").is_none());
        assert!(IndexPosition::parse("x:PAY").is_none());
        let older = IndexPosition::parse("5:B").unwrap();
        assert!(older < p);
    }
}
