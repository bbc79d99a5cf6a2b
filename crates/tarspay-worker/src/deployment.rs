//! The composition root: one deployment's connected parts, assembled from settings — its
//! partitions (each a payout queue, the ledger in the same hash tag, the webhook queue nested
//! in it; see `crate::partition`) — and what each process builds from them (a producer, the
//! jobs' contexts). Workers (`worker`), the server, the CLI, the demo and the tests all start
//! here. Whatever reads "the deployment" as a whole (stats, pause, batches, counts) adds its
//! partitions up here.

use futures::future::try_join_all;
use std::collections::HashMap;
use std::sync::Arc;

/// Records read per step of a batch search.
const CHUNK_OF_RECORDS: usize = 200;

use crate::config::{ConfigError, MerchantProfile, Settings};
use crate::gateway::TarsPayClient;
use crate::gateway::client::ClientBuildError;
use crate::ids::MerchantName;
use crate::jobs::{CallLimits, JobContext, PayoutJob, SystemicGuard};
use crate::ledger::history::OrderEvent;
use crate::ledger::index::{BatchEntry, IndexPosition, OrderPage, OrderQuery, SCAN_BUDGET};
use crate::ledger::minutes::MinuteStats;
use crate::ledger::{
    BatchProgress, BatchSummary, Ledger, LedgerError, LedgerKeys, OrderRecord, Replication,
    WEBHOOK_QUEUE,
};
use crate::producer::Producer;
use crate::queue::{Gate, QueueConfig, QueueError, QueueKeys, QueueStats, RedisQueue};
use crate::ratelimit::{Limiter, RateLimit};
use crate::redis_conn::{RedisClient, RedisConn, Timeouts};
use crate::webhooks::DeliverWebhook;

/// The queue every payout job goes through (the base name of each partition's queue).
pub const PAYOUT_QUEUE: &str = "payouts";

/// Why a deployment could not be assembled from its settings.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "refusing to run: this deployment's keys (prefix {prefix:?}) were written with {stored} partition(s), and this process is set to {configured} (TARSPAY_PARTITIONS). Partitions are fixed once written: set TARSPAY_PARTITIONS={stored}, or use a new queue_prefix"
    )]
    PartitionMismatch {
        prefix: String,
        stored: String,
        configured: usize,
    },
}

/// The payout queue's settings for the partition queue `name`, from the worker settings.
pub fn queue_config(settings: &Settings, name: &str) -> QueueConfig {
    QueueConfig::new(name)
        .with_label(PAYOUT_QUEUE)
        .with_prefix(&settings.redis.queue_prefix)
        .with_orphan_timeout(settings.worker.orphan_timeout)
}

/// The payout queue of merchant `merchant`'s lane in partition `partition`: the partition's
/// queue itself for `default` (the layout from before profiles), a queue nested in the
/// partition's hash tag for every other merchant (so the ledger's script writes its jobs).
pub fn lane_queue_config(
    settings: &Settings,
    partition: &str,
    merchant: &MerchantName,
) -> QueueConfig {
    if merchant.is_default() {
        return queue_config(settings, partition);
    }
    QueueConfig::new(format!("lane:{merchant}"))
        .with_label(PAYOUT_QUEUE)
        .with_prefix(&settings.redis.queue_prefix)
        .within(partition)
        .with_orphan_timeout(settings.worker.orphan_timeout)
}

/// The webhook queue's settings: nested in the payout queue `partition`'s hash tag, where
/// the ledger queues deliveries; retries bounded by the webhook settings.
pub fn webhook_queue_config(settings: &Settings, partition: &str) -> QueueConfig {
    let mut config = QueueConfig::new(WEBHOOK_QUEUE)
        .with_prefix(&settings.redis.queue_prefix)
        .within(partition)
        .with_orphan_timeout(settings.worker.orphan_timeout);
    // Without webhook settings this process queues and delivers none: the defaults stand.
    if let Some(webhooks) = &settings.webhooks {
        config.max_attempts = webhooks.max_attempts;
        config.retry_max = webhooks.retry_max_delay;
    }
    config.retry_base = config.retry_base.min(config.retry_max);
    config
}

/// One partition's connected parts: everything that changes atomically with its orders.
#[derive(Clone)]
pub struct Partition {
    pub index: usize,
    /// The default merchant's lane (`lanes[0]`): its queue and ledger handle.
    pub queue: RedisQueue<PayoutJob>,
    pub ledger: Ledger,
    pub webhooks: RedisQueue<DeliverWebhook>,
    /// One lane per merchant profile, `default` first: each its own payout queue (fetched
    /// round-robin with the others, paused by its own guard) and a ledger handle that
    /// queues the merchant's follow-up jobs there. Every lane's handle reads and writes
    /// the same orders and outcome stream.
    pub lanes: Vec<Lane>,
}

/// One merchant's jobs in one partition.
#[derive(Clone)]
pub struct Lane {
    pub merchant: MerchantName,
    pub queue: RedisQueue<PayoutJob>,
    pub ledger: Ledger,
}

impl Partition {
    /// Merchant `merchant`'s lane, if the settings have that profile.
    pub fn lane(&self, merchant: &str) -> Option<&Lane> {
        self.lanes.iter().find(|lane| lane.merchant == merchant)
    }

    /// Every lane's payout queue.
    pub fn queues(&self) -> impl Iterator<Item = &RedisQueue<PayoutJob>> {
        self.lanes.iter().map(|lane| &lane.queue)
    }
}

/// Connected handles on one deployment's Redis: its partitions.
#[derive(Clone)]
pub struct Deployment {
    partitions: Arc<[Partition]>,
}

impl Deployment {
    /// With webhooks configured (malformed ones were refused at load), every outcome a
    /// partition's ledger appends gets its delivery job in the same step. Refuses a Redis
    /// whose keys were written with another number of partitions.
    pub async fn connect(settings: &Settings) -> Result<Self, DeploymentError> {
        let client = RedisClient::open(settings.redis.url.as_str(), settings.redis.cluster).await?;
        let count = settings.redis.partitions;
        let base = queue_config(settings, PAYOUT_QUEUE);
        // One connection for every partition (multiplexed), and one for `WAIT`, which holds
        // up whatever is queued behind it.
        let conn = client.connect(Timeouts {
            connect: base.connection_timeout,
            response: base.response_timeout,
        })?;
        check_partitions(&mut conn.clone(), &settings.redis.queue_prefix, count).await?;
        let waits = match settings.redis.min_replicas {
            0 => None,
            _ => Some(client.connect(Timeouts {
                connect: base.connection_timeout,
                response: base.response_timeout + settings.redis.replica_timeout,
            })?),
        };
        let mut partitions = Vec::with_capacity(count);
        for index in 0..count {
            let name = crate::partition::queue_name(
                &settings.redis.queue_prefix,
                PAYOUT_QUEUE,
                index,
                count,
            );
            partitions.push(
                Self::connect_partition(
                    settings,
                    &client,
                    &conn,
                    waits.as_ref(),
                    index,
                    &name,
                    count,
                )
                .await?,
            );
        }
        publish_outcome_streams(&mut conn.clone(), &settings.redis.queue_prefix, &partitions)
            .await?;
        Ok(Self {
            partitions: partitions.into(),
        })
    }

    async fn connect_partition(
        settings: &Settings,
        client: &RedisClient,
        conn: &RedisConn,
        waits: Option<&RedisConn>,
        index: usize,
        name: &str,
        count: usize,
    ) -> Result<Partition, DeploymentError> {
        let merchants = settings.gateway.profiles();
        // A worker holds fetched jobs of every partition (and every merchant's lane): the
        // prefetch is shared out, with a floor that keeps each fetch a batch.
        let share = |mut config: QueueConfig, queues: usize| {
            config.prefetch = config
                .prefetch
                .div_ceil(queues)
                .max(16)
                .min(config.prefetch);
            config
        };
        let webhooks = RedisQueue::with_connection(
            client.clone(),
            conn.clone(),
            share(webhook_queue_config(settings, name), count),
        )
        .await?;
        // The ledger shares the payout queue's partition (hash tag), see `LedgerKeys`.
        let tag = format!("{{{}:{name}}}", settings.redis.queue_prefix);
        let mut lanes = Vec::with_capacity(merchants.len());
        for profile in merchants {
            let queue = RedisQueue::with_connection(
                client.clone(),
                conn.clone(),
                share(
                    lane_queue_config(settings, name, &profile.name),
                    count * merchants.len(),
                ),
            )
            .await?;
            let keys = LedgerKeys::for_lane(&tag, queue.keys(), &profile.name);
            debug_assert_eq!(&keys.webhooks(), webhooks.keys());
            let ledger = match waits {
                None => Ledger::new(conn.clone(), keys),
                Some(waits) => Ledger::with_replicas(
                    conn.clone(),
                    waits.clone(),
                    keys,
                    Replication {
                        replicas: settings.redis.min_replicas,
                        timeout: settings.redis.replica_timeout,
                    },
                ),
            };
            let mut ledger = ledger
                .with_outcome_max_len(settings.redis.outcome_max_len)
                .with_retention(settings.redis.retention);
            if settings.webhooks.is_some() {
                ledger = ledger
                    .with_webhook_jobs(crate::webhooks::job_preparer(webhooks.clone(), index));
            }
            lanes.push(Lane {
                merchant: profile.name.clone(),
                queue,
                ledger,
            });
        }
        Ok(Partition {
            index,
            queue: lanes[0].queue.clone(),
            ledger: lanes[0].ledger.clone(),
            webhooks,
            lanes,
        })
    }

    /// Every partition, in index order.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// The partition that holds the order `mch_order_no`.
    pub fn partition_of(&self, mch_order_no: &str) -> &Partition {
        let index = crate::partition::of_order(mch_order_no, self.partitions.len());
        &self.partitions[index]
    }

    /// The ledger that holds the order `mch_order_no`.
    pub fn ledger_of(&self, mch_order_no: &str) -> &Ledger {
        &self.partition_of(mch_order_no).ledger
    }

    /// The order's record, from its partition.
    pub async fn order(&self, mch_order_no: &str) -> Result<Option<OrderRecord>, LedgerError> {
        self.ledger_of(mch_order_no).get(mch_order_no).await
    }

    /// The order's event history, oldest first.
    pub async fn order_events(&self, mch_order_no: &str) -> Result<Vec<OrderEvent>, LedgerError> {
        self.ledger_of(mch_order_no).events(mch_order_no).await
    }

    /// Appends `event` to the order's history (an operator's action, say).
    pub async fn note_event(
        &self,
        mch_order_no: &str,
        event: OrderEvent,
    ) -> Result<(), LedgerError> {
        self.ledger_of(mch_order_no).note(mch_order_no, event).await
    }

    /// The last `count` whole minutes and the current one, oldest first, summed over
    /// partitions (minutes without activity are zero).
    pub async fn minute_stats(&self, count: u64) -> Result<Vec<MinuteStats>, LedgerError> {
        let current = crate::ledger::minutes::minute_of(crate::queue::now_ms());
        let minutes: Vec<u64> = (0..=count)
            .rev()
            .map(|back| current.saturating_sub(back * 60_000))
            .collect();
        let parts = self
            .partitions
            .iter()
            .map(|p| p.ledger.minute_stats(&minutes));
        let mut sums: Vec<MinuteStats> = minutes
            .iter()
            .map(|m| MinuteStats {
                minute_ms: *m,
                ..Default::default()
            })
            .collect();
        for part in try_join_all(parts).await? {
            for (sum, minute) in sums.iter_mut().zip(part) {
                for (status, n) in minute.finals {
                    *sum.finals.entry(status).or_default() += n;
                }
                sum.creates += minute.creates;
                sum.create_errors += minute.create_errors;
                sum.latency_sum_ms += minute.latency_sum_ms;
                for (total, n) in sum.latency_buckets.iter_mut().zip(minute.latency_buckets) {
                    *total += n;
                }
            }
        }
        Ok(sums)
    }

    /// Orders matching `query`, one page (see `ledger::index`): newest first, or for a batch
    /// in mchOrderNo order.
    pub async fn search_orders(&self, query: &OrderQuery) -> Result<OrderPage, LedgerError> {
        if let Some(id) = &query.mch_order_no {
            let orders = self.order(id).await?.into_iter();
            return Ok(OrderPage {
                orders: orders.filter(|r| query.matches(r)).collect(),
                scanned: 1,
                ..Default::default()
            });
        }
        if let Some(batch_id) = &query.batch_id {
            return self.search_batch(batch_id, query).await;
        }
        let limit = query.page_size();
        let after = query.cursor.as_deref().and_then(IndexPosition::parse);
        let scans = self.partitions.iter().map(|p| {
            p.ledger
                .scan_index(query, after.as_ref(), limit, SCAN_BUDGET)
        });
        let scans = try_join_all(scans).await?;
        // A partition that ran out of budget read nothing older than where it stopped: the
        // page ends there, and the next one continues from it.
        let horizon = scans.iter().filter_map(|s| s.stopped_at.clone()).max();
        let scanned = scans.iter().map(|s| s.scanned).sum();
        let mut found: Vec<(IndexPosition, OrderRecord)> =
            scans.into_iter().flat_map(|s| s.found).collect();
        found.sort_by(|a, b| b.0.cmp(&a.0));
        found.retain(|(at, _)| horizon.as_ref().is_none_or(|h| at >= h));
        found.truncate(limit);
        let next = if found.len() == limit {
            found.last().map(|(at, _)| at.clone())
        } else {
            horizon
        };
        Ok(OrderPage {
            searched_back_to_ms: next.as_ref().map(|n| n.ms),
            next: next.map(|n| n.encode()),
            orders: found.into_iter().map(|(_, record)| record).collect(),
            scanned,
        })
    }

    /// A batch's orders matching `query`, in mchOrderNo order, after the cursor (the last
    /// number of the previous page).
    async fn search_batch(
        &self,
        batch_id: &str,
        query: &OrderQuery,
    ) -> Result<OrderPage, LedgerError> {
        let limit = query.page_size();
        let ids = self.batch_members(batch_id).await?;
        let start = query
            .cursor
            .as_deref()
            .map_or(0, |after| ids.partition_point(|id| id.as_str() <= after));
        let mut page = OrderPage::default();
        // Where this page stopped reading: the next page starts after it, so a filter that
        // matched nothing within the budget still offers the rest of the batch.
        let mut last_read: Option<&String> = None;
        'chunks: for chunk in ids[start..].chunks(CHUNK_OF_RECORDS) {
            if page.scanned >= SCAN_BUDGET {
                break;
            }
            let records = self.records(chunk).await?;
            for (id, record) in chunk.iter().zip(records) {
                page.scanned += 1;
                last_read = Some(id);
                if let Some(record) = record
                    && query.matches(&record)
                {
                    page.orders.push(record);
                    if page.orders.len() == limit {
                        break 'chunks;
                    }
                }
            }
        }
        let more = last_read.is_some_and(|last| ids.last().is_some_and(|end| end > last));
        page.next = if more { last_read.cloned() } else { None };
        Ok(page)
    }

    /// A batch's mchOrderNos over every partition, sorted (one `SMEMBERS` per partition: a
    /// batch holds at most `batch::MAX_ROWS` rows).
    pub async fn batch_members(&self, batch_id: &str) -> Result<Vec<String>, LedgerError> {
        let members = try_join_all(
            self.partitions
                .iter()
                .map(|p| p.ledger.batch_members(batch_id)),
        );
        let mut ids: Vec<String> = members.await?.into_iter().flatten().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The records of `ids`, in that order (`None` for those gone): one pipelined read per
    /// partition, the partitions at once.
    pub async fn records(&self, ids: &[String]) -> Result<Vec<Option<OrderRecord>>, LedgerError> {
        let count = self.partitions.len();
        let mut by_partition: Vec<Vec<(usize, &str)>> = vec![Vec::new(); count];
        for (at, id) in ids.iter().enumerate() {
            by_partition[crate::partition::of_order(id, count)].push((at, id));
        }
        let reads = by_partition
            .iter()
            .zip(self.partitions.iter())
            .map(|(wanted, partition)| partition.ledger.records(wanted.iter().map(|(_, id)| *id)));
        let mut records = vec![None; ids.len()];
        for (wanted, found) in by_partition.iter().zip(try_join_all(reads).await?) {
            for ((at, _), record) in wanted.iter().zip(found) {
                records[*at] = record;
            }
        }
        Ok(records)
    }

    /// Each batch's rows and final rows by status, over every partition, from counters (a
    /// list of batches reads no order record).
    pub async fn batch_progress(
        &self,
        batch_ids: &[String],
    ) -> Result<Vec<BatchProgress>, LedgerError> {
        let parts = try_join_all(
            self.partitions
                .iter()
                .map(|p| p.ledger.batch_progress(batch_ids)),
        )
        .await?;
        let mut sums = vec![BatchProgress::default(); batch_ids.len()];
        for part in parts {
            for (sum, progress) in sums.iter_mut().zip(part) {
                *sum = std::mem::take(sum).merge(progress);
            }
        }
        Ok(sums)
    }

    /// The most recent batches, newest first.
    pub async fn recent_batches(&self, limit: usize) -> Result<Vec<BatchEntry>, LedgerError> {
        let parts = self
            .partitions
            .iter()
            .map(|p| p.ledger.recent_batches(limit));
        let mut first: HashMap<String, u64> = HashMap::new();
        for entry in try_join_all(parts).await?.into_iter().flatten() {
            let at = first.entry(entry.batch_id).or_insert(entry.first_ms);
            *at = (*at).min(entry.first_ms);
        }
        let mut batches: Vec<BatchEntry> = first
            .into_iter()
            .map(|(batch_id, first_ms)| BatchEntry { batch_id, first_ms })
            .collect();
        batches.sort_by(|a, b| {
            b.first_ms
                .cmp(&a.first_ms)
                .then_with(|| b.batch_id.cmp(&a.batch_id))
        });
        batches.truncate(limit);
        Ok(batches)
    }

    /// The payout queue's stats over every partition.
    pub async fn queue_stats(&self) -> Result<QueueStats, QueueError> {
        let all = try_join_all(self.payout_queues().map(|q| q.stats())).await?;
        Ok(all
            .into_iter()
            .reduce(QueueStats::merge)
            .unwrap_or_default())
    }

    /// The webhook queue's stats over every partition.
    pub async fn webhook_stats(&self) -> Result<QueueStats, QueueError> {
        let all = try_join_all(self.partitions.iter().map(|p| p.webhooks.stats())).await?;
        Ok(all
            .into_iter()
            .reduce(QueueStats::merge)
            .unwrap_or_default())
    }

    /// Dead payout jobs, over every partition.
    pub async fn dead_count(&self) -> Result<u64, QueueError> {
        let all = try_join_all(self.payout_queues().map(|q| q.dead_count())).await?;
        Ok(all.into_iter().sum())
    }

    /// Dead webhook deliveries, over every partition.
    pub async fn webhook_dead_count(&self) -> Result<u64, QueueError> {
        let all = try_join_all(self.partitions.iter().map(|p| p.webhooks.dead_count())).await?;
        Ok(all.into_iter().sum())
    }

    /// Outcomes in every partition's stream.
    pub async fn outcome_count(&self) -> Result<u64, LedgerError> {
        let all = try_join_all(self.partitions.iter().map(|p| p.ledger.outcome_count())).await?;
        Ok(all.into_iter().sum())
    }

    /// Every payout queue: each partition's lanes.
    pub fn payout_queues(&self) -> impl Iterator<Item = &RedisQueue<PayoutJob>> {
        self.partitions.iter().flat_map(Partition::queues)
    }

    /// Merchant `merchant`'s lane in every partition (empty for an unknown merchant).
    pub fn lanes_of<'a>(&'a self, merchant: &'a str) -> impl Iterator<Item = &'a Lane> + 'a {
        self.partitions.iter().filter_map(move |p| p.lane(merchant))
    }

    /// Stops every worker from fetching payout jobs, in every partition and lane.
    pub async fn pause(&self) -> Result<(), QueueError> {
        for queue in self.payout_queues() {
            queue.pause().await?;
        }
        Ok(())
    }

    /// Lets workers fetch again, in every partition and lane (a guard's hold too).
    pub async fn resume(&self) -> Result<(), QueueError> {
        for queue in self.payout_queues() {
            queue.resume().await?;
        }
        Ok(())
    }

    /// Whether any lane of any partition is paused (an operator pauses all of them, a
    /// merchant's guard that merchant's lanes).
    pub async fn is_paused(&self) -> Result<bool, QueueError> {
        for queue in self.payout_queues() {
            if queue.is_paused().await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The merchants whose lanes are paused (held by their guard, or by an operator).
    pub async fn paused_merchants(&self) -> Result<Vec<MerchantName>, QueueError> {
        let mut paused = Vec::new();
        for lane in self.partitions[0].lanes.iter() {
            for lane in self.lanes_of(&lane.merchant) {
                if lane.queue.is_paused().await? {
                    paused.push(lane.merchant.clone());
                    break;
                }
            }
        }
        Ok(paused)
    }

    /// A batch's counts and totals, over the partitions its rows went to.
    pub async fn batch_summary(&self, batch_id: &str) -> Result<BatchSummary, LedgerError> {
        let parts = self
            .partitions
            .iter()
            .map(|p| p.ledger.batch_summary(batch_id));
        let all = try_join_all(parts).await?;
        all.into_iter()
            .reduce(BatchSummary::merge)
            .ok_or_else(|| LedgerError::Corrupt {
                id: batch_id.to_owned(),
                reason: "a deployment without partitions".into(),
            })
    }

    /// Orders flagged stuck and not final, up to about `per_partition` from each partition,
    /// longest without news first.
    pub async fn stuck_orders(
        &self,
        per_partition: usize,
    ) -> Result<Vec<OrderRecord>, LedgerError> {
        let members = try_join_all(
            self.partitions
                .iter()
                .map(|p| p.ledger.stuck_members(per_partition)),
        )
        .await?;
        let ids: Vec<String> = members.into_iter().flatten().collect();
        let mut stuck: Vec<OrderRecord> = self
            .records(&ids)
            .await?
            .into_iter()
            .flatten()
            .filter(|r| !r.phase.is_final())
            .collect();
        stuck.sort_by_key(|r| r.updated_at_ms);
        Ok(stuck)
    }

    /// Orders flagged stuck (the sets' sizes), over every partition.
    pub async fn stuck_len(&self) -> Result<u64, LedgerError> {
        let all = try_join_all(self.partitions.iter().map(|p| p.ledger.stuck_len())).await?;
        Ok(all.into_iter().sum())
    }

    /// Round trip to Redis, for health checks.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        self.partitions[0].ledger.ping().await
    }

    pub fn producer(&self, settings: &Settings) -> Result<Producer, ConfigError> {
        Ok(Producer::new(self.clone(), settings.payout_rules.clone()))
    }

    /// The jobs' context of each partition's default lane, in index order.
    pub fn job_contexts(&self, settings: &Settings) -> Result<Vec<JobContext>, DeploymentError> {
        let profile = settings.gateway.default_profile();
        let contexts = self.lane_contexts(settings, profile)?;
        Ok(contexts.into_iter().map(|(_, ctx)| ctx).collect())
    }

    /// The jobs' context of merchant `profile`'s lane in each partition, in index order:
    /// its client (key, notify URL), its guard (counting in its own lanes, pausing them).
    pub fn lane_contexts(
        &self,
        settings: &Settings,
        profile: &MerchantProfile,
    ) -> Result<Vec<(usize, JobContext)>, DeploymentError> {
        // Nonces on the Redis server's clock: a worker whose own clock is off would sign
        // nonces the gateway refuses (as signature errors, which would pause every payout).
        let client = TarsPayClient::new(settings.gateway.client_settings_for(profile)?)?
            .with_clock(crate::queue::now_ms);
        let notify_url = profile.notify_url()?.to_owned();
        let lanes: Vec<&Lane> = self.lanes_of(&profile.name).collect();
        let limits = self.call_limits(settings, profile)?;
        // The guard counts this merchant's auth failures in every partition and pauses its
        // lanes there: another merchant's payouts go on.
        let everywhere: Arc<[(String, QueueKeys)]> = lanes
            .iter()
            .map(|lane| (lane.ledger.keys().guard(), lane.queue.keys().clone()))
            .collect();
        Ok(lanes
            .iter()
            .enumerate()
            .map(|(index, lane)| {
                let ctx = JobContext {
                    ledger: lane.ledger.clone(),
                    client: client.clone(),
                    codes: settings.gateway.codes.clone(),
                    notify_url: notify_url.clone(),
                    retry: settings.worker.retry.clone(),
                    poll: settings.worker.poll.clone(),
                    lease: settings.gateway.submit_lease(),
                    settle_window: settings.worker.settle_window,
                    guard: SystemicGuard::new(
                        lane.queue.connection(),
                        index,
                        Arc::clone(&everywhere),
                        settings.worker.guard_threshold,
                    ),
                    queue: lane.queue.clone(),
                    merchant: profile.name.clone(),
                    limits: limits.clone(),
                    call_slots: None,
                    polls_in_hand: None,
                };
                (index, ctx)
            })
            .collect())
    }

    /// The merchant's limiter (shared through Redis by every process) and a fresh gate for
    /// its lanes in this process; `None` without limits.
    fn call_limits(
        &self,
        settings: &Settings,
        profile: &MerchantProfile,
    ) -> Result<Option<CallLimits>, DeploymentError> {
        let limits = profile.limits;
        if !limits.is_limited() {
            return Ok(None);
        }
        let limit = RateLimit {
            // Only an in-flight cap: the rate is not what limits.
            per_second: if limits.per_second > 0 {
                limits.per_second
            } else {
                crate::ratelimit::MAX_PER_SECOND
            },
            burst: limits.burst.max(1),
            max_in_flight: (limits.max_in_flight > 0).then_some(limits.max_in_flight),
        };
        // A slot is held for one gateway call: it lapses after the longest call can take,
        // so a killed worker's slot comes back.
        let lease = settings.gateway.connect_timeout
            + settings.gateway.request_timeout
            + std::time::Duration::from_secs(5);
        let limiter = Limiter::new(
            self.partitions[0].queue.connection(),
            &settings.redis.queue_prefix,
            &profile.name,
            limit,
            lease,
        )
        .map_err(|err| ConfigError::Invalid {
            key: format!("merchants.{}.rate_limit", profile.name),
            env: crate::config::env_name(&format!("merchants.{}.rate_limit", profile.name)),
            reason: err.to_string(),
        })?;
        Ok(Some(CallLimits::new(limiter, Gate::default())))
    }

    /// The jobs' context of the partition holding `mch_order_no`, in the default merchant's
    /// lane (a payout of another merchant needs [`Deployment::lane_contexts`]).
    pub fn job_context_for(
        &self,
        settings: &Settings,
        mch_order_no: &str,
    ) -> Result<JobContext, DeploymentError> {
        let index = self.partition_of(mch_order_no).index;
        let mut contexts = self.job_contexts(settings)?;
        Ok(contexts.swap_remove(index))
    }
}

/// The sorted set naming every partition's outcome stream (score: the partition's index), so
/// an application reads every outcome without knowing the number of partitions or how their
/// keys are named (README, "Reading outcomes from another language").
pub fn outcome_streams_key(prefix: &str) -> String {
    format!("{{{prefix}:{PAYOUT_QUEUE}}}:outcome-streams")
}

/// Writes [`outcome_streams_key`] (the same members every time: idempotent).
async fn publish_outcome_streams(
    conn: &mut RedisConn,
    prefix: &str,
    partitions: &[Partition],
) -> Result<(), DeploymentError> {
    let mut zadd = redis::cmd("ZADD");
    zadd.arg(outcome_streams_key(prefix));
    for partition in partitions {
        zadd.arg(partition.index)
            .arg(partition.ledger.keys().outcomes());
    }
    zadd.query_async::<i64>(conn).await?;
    Ok(())
}

/// The key recording how many partitions the deployment's keys were written with.
pub fn partitions_key(prefix: &str) -> String {
    format!("{{{prefix}:{PAYOUT_QUEUE}}}:partitions")
}

/// Records the partition count on first use and refuses another one later. A deployment
/// from before partitions (a queue and no record) counts as one partition.
async fn check_partitions(
    conn: &mut RedisConn,
    prefix: &str,
    count: usize,
) -> Result<(), DeploymentError> {
    let key = partitions_key(prefix);
    let stored: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
    let stored = match stored {
        Some(stored) => stored,
        None => {
            let legacy = crate::queue::QueueKeys::new(prefix, PAYOUT_QUEUE)?.stream;
            let legacy_exists: bool = redis::cmd("EXISTS").arg(&legacy).query_async(conn).await?;
            let first = if legacy_exists { 1 } else { count };
            // NX: of two processes starting at once with different numbers, one wins and
            // the other is refused below.
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(first)
                .arg("NX")
                .query_async(conn)
                .await?;
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(conn)
                .await?
                .unwrap_or_default()
        }
    };
    if stored.parse::<usize>() == Ok(count) {
        Ok(())
    } else {
        Err(DeploymentError::PartitionMismatch {
            prefix: prefix.to_owned(),
            stored,
            configured: count,
        })
    }
}
