//! The lifeline: a worker's periodic sweep that gives an order without work a new job (not
//! one whose job was given up into the dead stream: that stays an operator's decision), and
//! trims the outcome stream by the retention (`Ledger::trim_outcomes`) and the indexes, with
//! the history lists of the orders they drop, at twice the retention (`Ledger::trim_indexes`).
//!
//! One sweep per interval for the whole deployment: a worker sweeps only while it holds a
//! lock key that expires after the interval. An order is repaired only if two reads, a
//! moment apart, both find it without work and unchanged, and the repair itself re-checks the
//! order in the same atomic step as it queues the job. A job missed by both reads (it moved
//! at the wrong instants twice) would leave the order with two jobs: harmless, because every
//! effect goes through the ledger, and visible to the audit.

use super::orders::{self, OrderView};
use super::report::Pass;
use super::{AuditError, Auditor, Pace};
use crate::ids::MerchantName;
use crate::jobs::{PAYOUT_JOB_MAX_ATTEMPTS, PayoutJob};
use crate::ledger::Ledger;
use crate::queue::{JobOptions, RedisQueue};
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

/// KEYS: order hash, the queue's stream. ARGV: '1' if it was accepted, its updatedAt, the
/// job's envelope. Queues the job only if the order is still as the sweep saw it.
static REPAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], 'final') == 1 then return 0 end
local h = redis.call('HMGET', KEYS[1], 'req', 'accepted', 'updatedAt')
if not h[1] then return 0 end
local accepted = ''
if h[2] then accepted = '1' end
if accepted ~= ARGV[1] or (h[3] or '') ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
return 1
"#,
    )
});

/// KEYS: the lifeline lock. ARGV: owner, ms. Extends the lock only for its owner: a sweep
/// that outlived its interval (another worker may be sweeping now) repairs nothing.
static STILL_MINE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#,
    )
});

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifelineSweep {
    /// False when another worker holds this interval's sweep.
    pub ran: bool,
    pub without_work: usize,
    pub repaired: usize,
    /// Outcome entries trimmed by the retention.
    pub trimmed: u64,
}

#[derive(Clone)]
pub struct Lifeline {
    auditor: Auditor,
    ledger: Ledger,
    /// The default lane's queue (the lock's connection, and the lane of an order whose
    /// merchant has no lane here).
    queue: RedisQueue<PayoutJob>,
    /// Every merchant lane of the partition: a repair goes to the order's own.
    lanes: Vec<(MerchantName, RedisQueue<PayoutJob>)>,
    owner: String,
    interval: Duration,
}

impl Lifeline {
    /// `lanes`: the partition's merchant lanes, `default` first.
    pub fn new(
        ledger: Ledger,
        lanes: Vec<(MerchantName, RedisQueue<PayoutJob>)>,
        interval: Duration,
    ) -> Self {
        let queue = lanes[0].1.clone();
        let auditor = Auditor::new(
            queue.connection(),
            ledger.keys().clone(),
            lanes.iter().map(|(_, q)| q.keys().clone()).collect(),
            Pace::BACKGROUND,
        );
        Self {
            auditor,
            ledger,
            queue,
            lanes,
            owner: format!("{:016x}", rand::random::<u64>()),
            interval,
        }
    }

    /// Sweeps about once per interval (with jitter, so workers do not all ask at once)
    /// until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let pause = self.interval / 2 + crate::queue::random_up_to(self.interval / 2);
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(pause) => {}
            }
            match self.sweep().await {
                Ok(sweep) if sweep.ran => {
                    tracing::debug!(?sweep, "lifeline sweep");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "lifeline sweep failed; next interval"),
            }
        }
    }

    /// One sweep, if no other worker holds this interval's.
    pub async fn sweep(&self) -> Result<LifelineSweep, AuditError> {
        let mut conn = self.queue.connection();
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.ledger.keys().lifeline())
            .arg(&self.owner)
            .arg("NX")
            .arg("PX")
            .arg(self.interval.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await?;
        if taken.is_none() {
            return Ok(LifelineSweep::default());
        }
        // Bounded memory: the sweep's holder also trims the outcome stream and the indexes.
        let trimmed = self.ledger.trim_outcomes().await?;
        self.ledger.trim_indexes().await?;
        let first = self.auditor.pass(false).await?;
        let candidates: Vec<OrderView> = first.without_work().into_iter().cloned().collect();
        let mut sweep = LifelineSweep {
            ran: true,
            trimmed,
            ..LifelineSweep::default()
        };
        if !candidates.is_empty() {
            // A moment later, read their jobs and records again: only what stays without
            // work, unchanged, is repaired.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let ids: Vec<String> = candidates.iter().map(|o| o.id.clone()).collect();
            let again = Pass::new(
                orders::reread(&self.auditor.conn, &self.auditor.ledger, &ids).await?,
                self.auditor.jobs(Pace::BACKGROUND).await?,
                None,
            );
            let still: Vec<&OrderView> = again
                .without_work()
                .into_iter()
                .filter(|now| candidates.contains(now))
                .collect();
            sweep.without_work = still.len();
            let mine: i64 = STILL_MINE
                .key(self.ledger.keys().lifeline())
                .arg(&self.owner)
                .arg(self.interval.as_millis().max(1) as u64)
                .invoke_async(&mut self.queue.connection())
                .await?;
            if mine != 1 {
                tracing::warn!("lifeline sweep outlived its interval: repairing nothing this time");
                metrics::gauge!(crate::metrics::ORDERS_WITHOUT_WORK).set(sweep.without_work as f64);
                return Ok(sweep);
            }
            for order in still {
                // A job in the dead stream was given up on purpose (exhausted, unreadable):
                // that is for an operator (`dead retry`), and the audit keeps showing it.
                let dead = again.jobs.dead.get(&order.id).copied().unwrap_or(0);
                if dead > 0 {
                    tracing::warn!(
                        mch_order_no = %order.id,
                        dead,
                        "order's only job is dead: retry or settle it by hand"
                    );
                    continue;
                }
                if self.repair(order).await? {
                    sweep.repaired += 1;
                }
            }
        }
        metrics::gauge!(crate::metrics::ORDERS_WITHOUT_WORK).set(sweep.without_work as f64);
        Ok(sweep)
    }

    async fn repair(&self, order: &OrderView) -> Result<bool, AuditError> {
        let Ok(Some(record)) = self.ledger.get(&order.id).await else {
            return Ok(false);
        };
        let job = if order.accepted {
            PayoutJob::poll(&record, false)
        } else {
            PayoutJob::create(&record)
        };
        let options = JobOptions {
            max_attempts: Some(PAYOUT_JOB_MAX_ATTEMPTS),
            ..JobOptions::default()
        };
        let queue = self
            .lanes
            .iter()
            .find(|(merchant, _)| *merchant == record.merchant)
            .map_or(&self.queue, |(_, queue)| queue);
        let prepared = queue.prepare(&job, &options)?;
        let queued: i64 = REPAIR
            .key(self.ledger.keys().order(&order.id))
            .key(&queue.keys().stream)
            .arg(if order.accepted { "1" } else { "" })
            .arg(&order.updated_at)
            .arg(&prepared.text)
            .invoke_async(&mut self.queue.connection())
            .await?;
        if queued == 1 {
            metrics::counter!(crate::metrics::LIFELINE_REPAIRS).increment(1);
            tracing::error!(
                mch_order_no = %order.id,
                phase = %order.shown_phase(),
                "order had no job left: lifeline queued a new one"
            );
        }
        Ok(queued == 1)
    }
}
