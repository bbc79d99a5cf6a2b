//! A batch's progress from counters (`{tag}:batchdone:<id>`, a hash per batch and
//! partition): finalising a batch row counts it under its status and adds its amount, in
//! minor units, under `amt:<status>:<currency>`; a correction moves both to the new status.
//! Pages about batches read these and the batch's member count, never the rows, so a batch
//! of 100,000 payouts costs what a batch of ten does.
//!
//! Sums are Redis integers (`HINCRBY`, exact; no floating point anywhere). One that would
//! overflow a signed 64-bit integer leaves the field as it was and sets `amt:overflow`:
//! the amounts are then reported as unknown, never wrong. A row registered again after its
//! record expired (a re-run of the same file) is flagged `batchRerun` and not counted twice.

use super::{Ledger, LedgerError};
use crate::money::MAX_DECIMALS;
use redis::Value;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use std::collections::BTreeMap;

/// Prefix of the amount fields.
const AMOUNT: &str = "amt:";
/// Set when an amount sum could not be kept.
const OVERFLOW: &str = "amt:overflow";

/// Where a batch stands: its rows, and its final rows by status with their amounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchProgress {
    pub total: u64,
    /// Final rows by their current status (a correction moves a row).
    pub finals: BTreeMap<String, u64>,
    /// Amounts of the final rows by status, then currency.
    pub amounts: BTreeMap<String, BTreeMap<String, Decimal>>,
    /// Some sum overflowed, or a count went below zero (a correction of a row finalised
    /// before the counters existed): `amounts` must not be shown as totals.
    pub amounts_unknown: bool,
}

impl BatchProgress {
    pub fn finished(&self) -> u64 {
        self.finals.values().sum()
    }

    /// Rows not final yet.
    pub fn in_progress(&self) -> u64 {
        self.total.saturating_sub(self.finished())
    }

    /// Amounts of all final rows, by currency.
    pub fn finished_amounts(&self) -> BTreeMap<String, Decimal> {
        let mut sums: BTreeMap<String, Decimal> = BTreeMap::new();
        for by_currency in self.amounts.values() {
            for (currency, amount) in by_currency {
                *sums.entry(currency.clone()).or_default() += *amount;
            }
        }
        sums
    }

    /// Adds another partition's part of the same batch.
    pub fn merge(mut self, other: Self) -> Self {
        self.total += other.total;
        for (status, n) in other.finals {
            *self.finals.entry(status).or_default() += n;
        }
        for (status, by_currency) in other.amounts {
            let mine = self.amounts.entry(status).or_default();
            for (currency, amount) in by_currency {
                let sum = mine.entry(currency).or_default();
                match sum.checked_add(amount) {
                    Some(total) => *sum = total,
                    None => self.amounts_unknown = true,
                }
            }
        }
        self.amounts_unknown |= other.amounts_unknown;
        self
    }

    /// From the member count and the counters hash's fields.
    fn from_fields(total: u64, fields: BTreeMap<String, String>) -> Self {
        let mut progress = Self {
            total,
            ..Default::default()
        };
        for (field, value) in fields {
            if field == OVERFLOW {
                progress.amounts_unknown = true;
            } else if let Some(rest) = field.strip_prefix(AMOUNT) {
                let parsed = rest.rsplit_once(':').zip(value.parse::<i64>().ok());
                match parsed {
                    Some(((status, currency), minor)) => {
                        progress
                            .amounts
                            .entry(status.to_owned())
                            .or_default()
                            .insert(currency.to_owned(), from_minor(minor));
                    }
                    None => progress.amounts_unknown = true,
                }
            } else {
                match value.parse::<i64>().map(u64::try_from) {
                    Ok(Ok(n)) => {
                        progress.finals.insert(field, n);
                    }
                    // Below zero: a correction took back a row never counted (finalised
                    // before the counters existed); the sums cannot be trusted.
                    _ => progress.amounts_unknown = true,
                }
            }
        }
        progress
    }
}

/// An amount in minor units (`"10.50"` is 1050), for the counters; `None` when it is not a
/// positive decimal with at most [`MAX_DECIMALS`] places that fits an `i64`.
pub(crate) fn minor_units(amount: &str) -> Option<i64> {
    let value = Decimal::from_str_exact(amount).ok()?;
    let minor = value.checked_mul(Decimal::from(10i64.pow(MAX_DECIMALS)))?;
    if !minor.fract().is_zero() || minor.is_sign_negative() {
        return None;
    }
    minor.to_i64()
}

/// Whole amounts without a fraction ("500"), others with every minor digit ("3.50").
fn from_minor(minor: i64) -> Decimal {
    let unit = 10i64.pow(MAX_DECIMALS);
    if minor % unit == 0 {
        Decimal::from(minor / unit)
    } else {
        Decimal::new(minor, MAX_DECIMALS)
    }
}

/// The finalisation's counter argument: `<minor units>:<currency>`, or `""` when the amount
/// cannot be counted (the row is still counted, its amount is not).
pub(crate) fn money_arg(amount: &str, currency: &str) -> String {
    minor_units(amount).map_or_else(String::new, |minor| format!("{minor}:{currency}"))
}

impl Ledger {
    /// For each batch, this partition's rows and its final rows by status and amount, from
    /// two reads per batch.
    pub async fn batch_progress(
        &self,
        batch_ids: &[String],
    ) -> Result<Vec<BatchProgress>, LedgerError> {
        if batch_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in batch_ids {
            pipe.cmd("SCARD").arg(self.keys.batch(id));
            pipe.cmd("HGETALL").arg(self.keys.batch_progress(id));
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let mut progress = Vec::with_capacity(batch_ids.len());
        for pair in replies.chunks(2) {
            let total: u64 =
                redis::from_redis_value(pair[0].clone()).map_err(redis::RedisError::from)?;
            let fields: BTreeMap<String, String> =
                redis::from_redis_value(pair[1].clone()).map_err(redis::RedisError::from)?;
            progress.push(BatchProgress::from_fields(total, fields));
        }
        Ok(progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn minor_units_are_exact() {
        assert_eq!(minor_units("10.50"), Some(1050));
        assert_eq!(minor_units("100"), Some(10_000));
        assert_eq!(minor_units("0.01"), Some(1));
        assert_eq!(
            minor_units("999999999999999.99"),
            Some(99_999_999_999_999_999)
        );
        assert_eq!(minor_units("1.005"), None, "finer than minor units");
        assert_eq!(minor_units("-5"), None);
        assert_eq!(minor_units("abc"), None);
        assert_eq!(money_arg("12.30", "MYR"), "1230:MYR");
        assert_eq!(money_arg("x", "MYR"), "");
    }

    #[test]
    fn counters_read_back_as_counts_and_decimal_amounts() {
        let progress = BatchProgress::from_fields(
            5,
            fields(&[
                ("succeeded", "2"),
                ("failed", "1"),
                ("amt:succeeded:INR", "105050"),
                ("amt:succeeded:BDT", "50000"),
                ("amt:failed:INR", "10000"),
                ("amt:failed:INR:odd", "x"),
            ]),
        );
        assert_eq!(progress.finished(), 3);
        assert_eq!(progress.in_progress(), 2);
        assert_eq!(
            progress.amounts["succeeded"]["INR"],
            Decimal::new(105050, 2)
        );
        assert_eq!(progress.amounts["succeeded"]["BDT"].to_string(), "500");
        assert_eq!(progress.finished_amounts()["INR"], Decimal::new(115050, 2));
        assert!(progress.amounts_unknown, "an unreadable sum is not hidden");
    }

    #[test]
    fn partitions_add_up_and_an_overflow_is_reported() {
        let a = BatchProgress::from_fields(
            3,
            fields(&[("succeeded", "1"), ("amt:succeeded:INR", "100")]),
        );
        let b = BatchProgress::from_fields(
            2,
            fields(&[("succeeded", "2"), ("amt:succeeded:INR", "250")]),
        );
        let sum = a.merge(b);
        assert_eq!((sum.total, sum.finished()), (5, 3));
        assert_eq!(sum.amounts["succeeded"]["INR"].to_string(), "3.50");
        assert!(!sum.amounts_unknown);
        let overflowed = BatchProgress::from_fields(1, fields(&[("amt:overflow", "1")]));
        assert!(sum.merge(overflowed).amounts_unknown);
    }
}
