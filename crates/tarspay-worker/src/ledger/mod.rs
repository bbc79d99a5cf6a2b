//! The order ledger: one Redis hash per order, the source of truth for where each payout
//! stands, and the outcome stream applications consume. Every change is an atomic operation
//! of the ledger's batch script (see `scripts` for the record's layout: write-once milestones
//! and working fields); reaching a final phase appends the order's one outcome in the same
//! step. Concurrent changes share one script call (`batcher`); an in-hand acceptance alone is
//! sent as plain commands instead (the guard's reset and its `HSETNX`, or the `HSETNX` alone:
//! `batcher::LoneForm`). Redis only: no HTTP here.
//!
//! Records are deleted only by expiry, set when an order becomes final (the retention, see
//! [`Ledger::with_retention`]); callers that finalise pass the record they read, whose
//! registration part never changes.

mod batcher;
pub mod history;
pub mod index;
pub mod minutes;
mod outcome;
mod phase;
mod progress;
mod scripts;

pub use batcher::Replication;
pub use outcome::{Outcome, OutcomeEvent, OutcomeStatus};
pub use phase::Phase;
pub use progress::BatchProgress;

use crate::ids::{BatchId, Currency, MchOrderNo, MerchantName};
use crate::queue::{Delivery, PreparedJob, QueueKeys};
use crate::redis_conn::RedisConn;
use batcher::{Batcher, FetchReadings, JobAcked, LoneForm, Op};
use redis::AsyncCommands;
use redis::Value;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("ledger record {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    /// The change reached the primary but not `wanted` replicas in time: a failover could
    /// still lose it. Not done: try again (with the same `mchOrderNo`; every change is safe
    /// to repeat).
    #[error(
        "{id}: written, but fewer than {wanted} replica(s) confirmed it in time; not yet durable, try again"
    )]
    Unreplicated { id: String, wanted: u32 },
}

/// The queue of webhook deliveries (its keys are nested in the ledger's partition).
pub const WEBHOOK_QUEUE: &str = "webhooks";

/// How recent the fetch loop's reading of the pause state (clear, timed from when it was
/// asked for; the job's own delivery is such a reading, as a pause parks the queue's
/// consumer group: see `queue::park`) must be, when a create's lease step is sent to Redis,
/// for the step to rely on it instead of reading the flag itself: a pause set meanwhile
/// lets a create through at most about this long after it (plus the step's one-way trip),
/// as one already in flight then would be.
pub const FRESH_PAUSE_READING: Duration = Duration::from_millis(10);

/// Prepares one webhook delivery job; the ledger's finalize tells it which outcome it carries.
pub type WebhookJobs =
    std::sync::Arc<dyn Fn() -> Result<PreparedJob, crate::queue::QueueError> + Send + Sync>;

/// Key layout. The ledger lives in its queue's partition: every key shares the queue's hash
/// tag (e.g. `{tarspay:payouts}`), so one script can check the queue's pause flag, change an
/// order and append its outcome on one Redis Cluster slot.
#[derive(Debug, Clone)]
pub struct LedgerKeys {
    base: String,
    queue: QueueKeys,
    /// The merchant lane this handle queues follow-up jobs in (`None`: the default lane).
    lane: Option<MerchantName>,
}

impl LedgerKeys {
    /// `tag` is the partition's hash tag with braces (`{prefix:queue}`); `queue` is the payout
    /// queue's layout (its pause flag, and where follow-up jobs go), under the same tag.
    pub fn new(tag: &str, queue: &QueueKeys) -> Self {
        Self {
            base: tag.to_owned(),
            queue: queue.clone(),
            lane: None,
        }
    }

    /// The keys of merchant `merchant`'s lane of this partition: the same orders, outcomes
    /// and batches, with `queue` (the lane's queue, its pause flag) and the merchant's own
    /// guard count, so one merchant's bad key holds only its own payouts.
    pub fn for_lane(tag: &str, queue: &QueueKeys, merchant: &MerchantName) -> Self {
        Self {
            lane: (!merchant.is_default()).then(|| merchant.clone()),
            ..Self::new(tag, queue)
        }
    }

    /// The queue's pause flag: while it exists no create is sent.
    pub fn paused(&self) -> &str {
        &self.queue.paused
    }

    /// The webhook deliveries' queue: in this partition, so finalize can queue an outcome's
    /// delivery in the step that appends it.
    pub fn webhooks(&self) -> QueueKeys {
        QueueKeys::under(&format!("{}:{WEBHOOK_QUEUE}", self.base))
    }

    /// The batch script's leading keys, in its order.
    fn shared(&self) -> Vec<String> {
        let webhooks = self.webhooks();
        vec![
            self.queue.paused.clone(),
            self.guard(),
            self.outcomes(),
            self.stuck(),
            self.queue.stream.clone(),
            self.queue.delayed.clone(),
            self.queue.unique.clone(),
            webhooks.stream,
            webhooks.delayed,
            webhooks.unique,
            self.index(),
            self.batches(),
        ]
    }

    pub fn order(&self, mch_order_no: &str) -> String {
        format!("{}:order:{mch_order_no}", self.base)
    }

    pub fn batch(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}", self.base)
    }

    /// A batch's final rows counted by status (kept by finalisation; see
    /// [`Ledger::batch_progress`]).
    pub fn batch_progress(&self, batch_id: &str) -> String {
        format!("{}:batchdone:{batch_id}", self.base)
    }

    /// Orders whose creates failed with auth-class codes since the last accepted create.
    pub fn guard(&self) -> String {
        match &self.lane {
            None => format!("{}:guard", self.base),
            Some(merchant) => format!("{}:guard:{merchant}", self.base),
        }
    }

    /// Orders flagged stuck past the polling deadline and not final yet.
    pub fn stuck(&self) -> String {
        format!("{}:stuck", self.base)
    }

    pub fn outcomes(&self) -> String {
        format!("{}:outcomes", self.base)
    }

    /// The time index of orders (see [`index`]).
    pub fn index(&self) -> String {
        format!("{}:index", self.base)
    }

    /// The batch index (see [`index`]).
    pub fn batches(&self) -> String {
        format!("{}:batches", self.base)
    }

    /// The counters of the minute starting at `minute_ms` (see [`minutes`]).
    pub fn minute(&self, minute_ms: u64) -> String {
        format!("{}:minute:{}", self.base, minute_ms / 60_000)
    }

    /// The order's event history (see [`history`]).
    pub fn events(&self, mch_order_no: &str) -> String {
        format!("{}:events:{mch_order_no}", self.base)
    }

    /// Held by the worker running this interval's lifeline sweep.
    pub fn lifeline(&self) -> String {
        format!("{}:lifeline", self.base)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderKind {
    Payout,
    Deposit,
}

impl OrderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payout => "payout",
            Self::Deposit => "deposit",
        }
    }
}

impl std::fmt::Display for OrderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OrderKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        [Self::Payout, Self::Deposit]
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| format!("unknown order kind {text:?}"))
    }
}

/// What a producer registers.
#[derive(Debug, Clone)]
pub struct NewOrder<'a> {
    pub mch_order_no: &'a MchOrderNo,
    pub kind: OrderKind,
    /// Identifies the request body, so a re-submission can be told apart from a clash.
    pub fingerprint: &'a str,
    pub amount: &'a str,
    pub currency: &'a Currency,
    /// The request as JSON, so any worker can rebuild the same create.
    pub request: &'a str,
    pub batch_id: Option<&'a BatchId>,
    /// The merchant profile whose key creates it (see `payout::MerchantRouting`).
    pub merchant: &'a MerchantName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Created,
    /// The mchOrderNo was already registered; `same_request` tells a re-submission of the same
    /// body from a different payout under a reused number.
    Exists {
        phase: Phase,
        same_request: bool,
    },
}

/// The answer to "may I send the create now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitTicket {
    /// The lease is yours. `previous` is `Unknown` when an earlier create's fate is not known
    /// (then query before creating). `attempt` counts creates tried, this one included.
    Go {
        previous: Phase,
        attempt: u32,
    },
    /// Another worker holds a live lease; try again after this long.
    Busy {
        retry_in: Duration,
    },
    /// The queue is paused (by an operator or the systemic guard): send nothing now.
    Paused,
    /// The gateway already holds the order; nothing to create. `poll_in_hand`: no poll job
    /// was queued with the acceptance, because its create job was to poll in hand, and none
    /// by an adoption since: a create job that finds this (its worker died or stalled) goes
    /// on as the order's poll job.
    Accepted {
        poll_in_hand: bool,
    },
    /// Already final; nothing to do.
    Final(Phase),
    Missing,
    /// The lease was taken, but the replicas did not confirm it in time, so it was given
    /// back: send nothing now (a failover could lose the lease and let a second create go).
    Unreplicated,
}

/// What an acceptance that leaves the first poll in hand did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InHandAcceptance {
    /// Recorded: the caller's create job polls the order. Also the answer when another run
    /// left the poll in hand before (it may have lost the lease and die): both poll.
    Recorded,
    /// Already accepted the usual way, or its poll job queued by an adoption: nothing written.
    AlreadyAccepted,
}

/// Whether an acceptance leaves the first poll to its create job, and whether it clears the
/// systemic guard's count (every acceptance does, unless its run did when the gateway
/// accepted).
#[derive(Debug, Clone, Copy)]
enum InHand {
    No,
    Now,
    GuardCleared { accepted_at_ms: u64 },
}

/// What a release says besides the order's next phase and its error.
#[derive(Debug, Clone, Copy)]
struct Release {
    /// This run's create may have created the order (it becomes ambiguous).
    may_exist: bool,
    /// Nothing was sent: the attempt is taken back.
    unsent: bool,
    /// The gateway answered that the order's number exists.
    number_exists: bool,
}

fn in_hand_answer(reply: i64) -> InHandAcceptance {
    match reply {
        1 => InHandAcceptance::Recorded,
        _ => InHandAcceptance::AlreadyAccepted,
    }
}

/// What a final transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finalized {
    /// The order is final now; its one `final` outcome was appended.
    Recorded,
    /// Nothing changed: already final with this status (or this correction was made).
    Unchanged,
    /// Already final with another status: one `correction` entry was appended.
    Corrected,
    /// The caller no longer holds the submit lease: another run owns the order, or (when
    /// failing an order that may exist) the lease ran out.
    LeaseLost,
    /// A create of the order may exist and the gateway's absence is not proven over the
    /// settle window: it may not be failed yet.
    MayExist,
}

/// The gateway's "no such order" streak since the last create that may have created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Absence {
    pub since_ms: u64,
    pub lookups: u32,
    /// The Redis server's clock when the streak was extended.
    pub now_ms: u64,
}

impl Absence {
    /// Repeated, and over at least `window`.
    pub fn proven(&self, window: Duration) -> bool {
        self.lookups >= 2 && self.now_ms.saturating_sub(self.since_ms) >= window.as_millis() as u64
    }
}

/// How an order ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FinalResult {
    pub gateway_state: Option<i64>,
    pub pay_order_id: Option<String>,
    pub fee: Option<String>,
    pub code: Option<i64>,
    pub msg: Option<String>,
}

/// One order's ledger record, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = PayoutStatus)]
pub struct OrderRecord {
    #[schema(value_type = String)]
    pub mch_order_no: MchOrderNo,
    /// `payout`, or `deposit` for followed deposits.
    #[schema(value_type = String, example = "payout")]
    pub kind: OrderKind,
    /// The merchant profile whose key creates and looks it up.
    #[schema(value_type = String, example = "default")]
    pub merchant: MerchantName,
    pub phase: Phase,
    pub amount: String,
    pub currency: Currency,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pay_order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_state: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fee: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_msg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<BatchId>,
    pub stuck: bool,
    /// A create of this order may have reached the gateway without an answer; it is never
    /// failed on a lookup alone.
    pub ambiguous: bool,
    /// The acceptance milestone is set (the gateway held the order at some point), whatever
    /// the phase is now.
    #[serde(skip)]
    pub accepted: bool,
    /// When the acceptance milestone was set.
    #[serde(skip)]
    pub accepted_at_ms: Option<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Verified gateway states that contradicted the final status, oldest first (each is an
    /// outcome entry with `event = correction`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub corrections: Vec<Outcome>,
    #[serde(skip)]
    pub fingerprint: String,
    #[serde(skip)]
    pub request: String,
}

impl OrderRecord {
    /// The record as the in-hand acceptance of `pay_order_id` at `at_ms` leaves it, for the
    /// run that wrote that acceptance onto this record.
    pub fn accepted_in_hand(mut self, pay_order_id: &str, at_ms: u64) -> Self {
        self.phase = Phase::Accepted;
        self.accepted = true;
        self.accepted_at_ms = Some(at_ms);
        // As a record read back has it: an empty id is none.
        self.pay_order_id = Some(pay_order_id.to_owned()).filter(|id| !id.is_empty());
        self.updated_at_ms = at_ms;
        self
    }
}

/// Where a batch stands: per phase, how many orders and how much money per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSummary {
    pub batch_id: String,
    pub total: usize,
    pub phases: BTreeMap<String, PhaseTotals>,
}

impl BatchSummary {
    /// Adds another partition's part of the same batch.
    pub fn merge(mut self, other: Self) -> Self {
        self.total += other.total;
        for (phase, totals) in other.phases {
            let entry = self.phases.entry(phase).or_default();
            entry.count += totals.count;
            for (currency, amount) in totals.amounts {
                *entry.amounts.entry(currency).or_default() += amount;
            }
        }
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PhaseTotals {
    pub count: usize,
    /// Currency → sum, as decimal text.
    #[serde(serialize_with = "decimal_map")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub amounts: BTreeMap<String, rust_decimal::Decimal>,
}

fn decimal_map<S: serde::Serializer>(
    map: &BTreeMap<String, rust_decimal::Decimal>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut out = s.serialize_map(Some(map.len()))?;
    for (currency, value) in map {
        out.serialize_entry(currency, &value.to_string())?;
    }
    out.end()
}

/// Who decides a final state, which sets what the ledger checks before applying it.
#[derive(Debug, Clone, Copy)]
enum Decider<'a> {
    /// Our own decision that needs no lease.
    Us,
    /// The gateway reported it: may correct an earlier final status.
    Gateway,
    /// A create run giving up: only while it holds the lease, and only once an order that
    /// may exist is proven absent.
    LeaseHolder {
        token: &'a str,
        settle_window: Duration,
    },
}

#[derive(Clone)]
pub struct Ledger {
    conn: RedisConn,
    keys: LedgerKeys,
    batcher: Batcher,
    /// Replicas that must confirm registrations and leases (0: none).
    replicas_wanted: u32,
    /// Approximate cap on the outcome stream (0 = unbounded).
    outcome_max_len: u64,
    /// Final records' time to live, ms (0 = forever).
    retention_ms: u64,
    /// Set when this process' settings configure webhooks: every appended outcome gets its
    /// delivery job in the same step.
    webhook_jobs: Option<WebhookJobs>,
    /// Events noted per order and not written yet: they ride with the order's next
    /// operation (see [`Ledger::note_soon`]).
    noted: Arc<std::sync::Mutex<HashMap<String, Vec<history::OrderEvent>>>>,
    /// This process' chart counts, added to Redis in the background (see [`minutes`]).
    tally: Arc<minutes::Tally>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("keys", &self.keys).finish()
    }
}

/// The registration milestone (`req`): what never changes after the order is registered.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Registration {
    mch_order_no: MchOrderNo,
    kind: OrderKind,
    fingerprint: String,
    amount: String,
    currency: Currency,
    request: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch_id: Option<BatchId>,
    created_at: u64,
    /// Whose key creates it; absent in records written before profiles (and for `default`).
    #[serde(default, skip_serializing_if = "MerchantName::is_default")]
    merchant: MerchantName,
}

/// The acceptance milestone (`accepted`): the gateway holds the order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Acceptance {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pay_order_id: String,
    at: u64,
    /// No poll job was queued: the create job that was accepted polls the order itself, held
    /// in its worker's hand, and goes on as the poll job if the order is not final by then
    /// (or as soon as another worker takes the create job over).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    poll_in_hand: bool,
}

/// The final milestone (`final`): the order's outcome, as appended to the outcome stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Finished {
    #[serde(flatten)]
    outcome: Outcome,
    finished_at: u64,
}

fn text(value: Option<&String>) -> Option<String> {
    value.filter(|v| !v.is_empty()).cloned()
}

fn number<T: std::str::FromStr>(value: Option<&String>) -> Option<T> {
    value.and_then(|v| v.parse().ok())
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn milestone<T: serde::de::DeserializeOwned>(
    mch_order_no: &str,
    name: &str,
    value: Option<&String>,
) -> Result<Option<T>, LedgerError> {
    value
        .map(|json| {
            serde_json::from_str(json).map_err(|err| LedgerError::Corrupt {
                id: mch_order_no.to_owned(),
                reason: format!("{name}: {err}"),
            })
        })
        .transpose()
}

/// An order's phase from its milestones and working phase: `final` outranks `accepted`,
/// which outranks `phase` (absent = queued).
fn effective_phase(
    mch_order_no: &str,
    working: Option<&String>,
    accepted: bool,
    finished: Option<&Finished>,
) -> Result<Phase, LedgerError> {
    let corrupt = |reason: String| LedgerError::Corrupt {
        id: mch_order_no.to_owned(),
        reason,
    };
    if let Some(finished) = finished {
        return Ok(finished.outcome.status.into());
    }
    if accepted {
        return Ok(Phase::Accepted);
    }
    match working {
        Some(phase) => phase.parse().map_err(corrupt),
        None => Ok(Phase::Queued),
    }
}

/// An order record from its hash fields; `None` for no fields (no such order).
fn record_from_fields(
    mch_order_no: &str,
    fields: &HashMap<String, String>,
) -> Result<Option<OrderRecord>, LedgerError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let registration: Registration = milestone(mch_order_no, "req", fields.get("req"))?
        .ok_or_else(|| LedgerError::Corrupt {
            id: mch_order_no.to_owned(),
            reason: "no registration".into(),
        })?;
    let accepted: Option<Acceptance> = milestone(mch_order_no, "accepted", fields.get("accepted"))?;
    let finished: Option<Finished> = milestone(mch_order_no, "final", fields.get("final"))?;
    let phase = effective_phase(
        mch_order_no,
        fields.get("phase"),
        accepted.is_some(),
        finished.as_ref(),
    )?;
    let updated_at_ms = [
        number(fields.get("updatedAt")),
        accepted.as_ref().map(|a| a.at),
        finished.as_ref().map(|f| f.finished_at),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(registration.created_at);
    let outcome = finished.as_ref().map(|f| &f.outcome);
    let mut corrections = Vec::new();
    for (name, value) in fields {
        if name.starts_with("corr:") {
            let correction: Finished =
                milestone(mch_order_no, name, Some(value))?.ok_or_else(|| {
                    LedgerError::Corrupt {
                        id: mch_order_no.to_owned(),
                        reason: format!("{name} is empty"),
                    }
                })?;
            corrections.push((correction.finished_at, correction.outcome));
        }
    }
    corrections.sort_by_key(|(at, _)| *at);
    Ok(Some(OrderRecord {
        mch_order_no: registration.mch_order_no,
        kind: registration.kind,
        merchant: registration.merchant,
        phase,
        amount: registration.amount,
        currency: registration.currency,
        attempts: number(fields.get("attempts")).unwrap_or(0),
        pay_order_id: outcome.and_then(|o| o.pay_order_id.clone()).or_else(|| {
            accepted
                .as_ref()
                .map(|a| a.pay_order_id.clone())
                .filter(|id| !id.is_empty())
        }),
        gateway_state: outcome.and_then(|o| o.gateway_state),
        fee: outcome.and_then(|o| o.fee.clone()),
        last_code: match outcome {
            Some(o) => o.code,
            None => number(fields.get("lastCode")),
        },
        last_msg: match outcome {
            Some(o) => o.msg.clone(),
            None => text(fields.get("lastMsg")),
        },
        batch_id: registration.batch_id,
        stuck: finished.is_none() && fields.get("stuck").is_some_and(|v| v == "1"),
        ambiguous: fields.get("ambiguous").is_some_and(|v| v == "1"),
        accepted: accepted.is_some(),
        accepted_at_ms: accepted.as_ref().map(|a| a.at),
        created_at_ms: registration.created_at,
        updated_at_ms,
        finished_at_ms: finished.as_ref().map(|f| f.finished_at),
        corrections: corrections.into_iter().map(|(_, o)| o).collect(),
        fingerprint: registration.fingerprint,
        request: registration.request,
    }))
}

/// The outcome stream's fields for `outcome` (the contract in [`Outcome`]).
fn outcome_fields(outcome: &Outcome) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let num = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    fn opt_text<T: std::fmt::Display>(value: &Option<T>) -> String {
        value.as_ref().map(T::to_string).unwrap_or_default()
    }
    // `event` and `previousStatus` lead: the ledger script rewrites them for a correction.
    vec![
        ("event", outcome.event.to_string()),
        ("previousStatus", opt_text(&outcome.previous_status)),
        ("kind", outcome.kind.to_string()),
        ("merchant", outcome.merchant.to_string()),
        ("mchOrderNo", outcome.mch_order_no.to_string()),
        ("status", outcome.status.to_string()),
        ("gatewayState", num(outcome.gateway_state)),
        ("payOrderId", opt(&outcome.pay_order_id)),
        ("amount", outcome.amount.clone()),
        ("currency", outcome.currency.to_string()),
        ("fee", opt(&outcome.fee)),
        ("code", num(outcome.code)),
        ("msg", opt(&outcome.msg)),
        ("attempts", outcome.attempts.to_string()),
        ("batchId", opt_text(&outcome.batch_id)),
        ("at", outcome.at.clone()),
    ]
}

/// Appends a follow-up job's four script arguments (none: an empty envelope).
fn with_job(mut op: Op, job: Option<&PreparedJob>) -> Op {
    match job {
        Some(job) => {
            op.delays_to = Some(job.run_at_ms).filter(|&at| at > 0);
            op.arg(job.run_at_ms)
                .arg(&job.unique)
                .arg(&job.id)
                .arg(&job.text)
        }
        None => op.arg(0).arg("").arg("").arg(""),
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn as_strings(value: Value) -> Option<Vec<String>> {
    match value {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
                Value::SimpleString(text) => Some(text),
                Value::Int(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

impl Ledger {
    /// Starts the ledger's batching task on the current tokio runtime (so it must be called
    /// inside one; it panics otherwise). The task ends when the last clone is dropped; used
    /// after its runtime is gone, every operation fails with "ledger batcher stopped" (a read,
    /// [`Ledger::get`], with its connection's error).
    pub fn new(conn: RedisConn, keys: LedgerKeys) -> Self {
        Self::assemble(conn.clone(), conn, keys, None)
    }

    /// [`Ledger::new`] whose registrations and submit leases count only once `replication`
    /// replicas confirm them (`WAIT` after the batch); until then a registration is
    /// [`LedgerError::Unreplicated`] and a lease [`SubmitTicket::Unreplicated`].
    /// `batcher_conn` should be a connection of its own: `WAIT` holds up what is queued
    /// behind it.
    pub fn with_replicas(
        conn: RedisConn,
        batcher_conn: RedisConn,
        keys: LedgerKeys,
        replication: Replication,
    ) -> Self {
        Self::assemble(conn, batcher_conn, keys, Some(replication))
    }

    fn assemble(
        conn: RedisConn,
        batcher_conn: RedisConn,
        keys: LedgerKeys,
        replication: Option<Replication>,
    ) -> Self {
        let batcher = Batcher::start(batcher_conn, keys.shared(), replication);
        let tally = Arc::new(minutes::Tally::default());
        let minute_keys = keys.clone();
        tokio::spawn(minutes::flush_every(
            tally.clone(),
            conn.clone(),
            move |minute| minute_keys.minute(minute),
        ));
        Self {
            conn,
            keys,
            batcher,
            replicas_wanted: replication.map_or(0, |r| r.replicas),
            outcome_max_len: 0,
            retention_ms: 0,
            webhook_jobs: None,
            noted: Default::default(),
            tally,
        }
    }

    /// Final orders' records expire `retention` after they became final, and a batch's
    /// membership twice that long after its last registration (an order normally finishes
    /// long before). `None` keeps everything. After it, a re-submitted `mchOrderNo` registers
    /// anew; its create is refused by the gateway as a duplicate and settled from its lookup.
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention_ms =
            retention.map_or(0, |r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Queues a webhook delivery (prepared by `jobs`, see `crate::webhooks::job_preparer`) with
    /// every outcome (final or correction) this handle appends, in the same atomic step.
    pub fn with_webhook_jobs(mut self, jobs: WebhookJobs) -> Self {
        self.webhook_jobs = Some(jobs);
        self
    }

    pub fn with_outcome_max_len(mut self, max_len: u64) -> Self {
        self.outcome_max_len = max_len;
        self
    }

    pub fn keys(&self) -> &LedgerKeys {
        &self.keys
    }

    /// An operation on one order, carrying the events noted for it so far.
    fn op(&self, kind: &'static str, mch_order_no: &str) -> Op {
        let mut op = Op::new(
            kind,
            self.keys.order(mch_order_no),
            None,
            self.keys.events(mch_order_no),
        );
        op.events = self.take_noted(mch_order_no);
        op.list_ttl_ms = history::list_ttl_ms(self.retention_ms);
        op
    }

    /// The history lines noted for the order and not written yet.
    fn take_noted(&self, mch_order_no: &str) -> Vec<String> {
        let events = match self.noted.lock() {
            Ok(mut noted) => noted.remove(mch_order_no).unwrap_or_default(),
            Err(poisoned) => poisoned
                .into_inner()
                .remove(mch_order_no)
                .unwrap_or_default(),
        };
        events
            .iter()
            .filter_map(|event| serde_json::to_string(event).ok())
            .collect()
    }

    /// Notes that `event` happened to the order: it is written with the order's next ledger
    /// operation from this handle, in the same script call (no round trip of its own). A run
    /// that may end without one calls [`Ledger::flush_noted`].
    pub fn note_soon(&self, mch_order_no: &str, event: history::OrderEvent) {
        if event.kind == history::EventKind::Create
            && let Some(latency_ms) = event.latency_ms
        {
            self.tally
                .create(event.at_ms, latency_ms, event.code != Some(0));
        }
        let mut noted = match self.noted.lock() {
            Ok(noted) => noted,
            Err(poisoned) => poisoned.into_inner(),
        };
        noted
            .entry(mch_order_no.to_owned())
            .or_default()
            .push(event);
    }

    /// Adds this process' chart counts to Redis now (a stopping worker does, so the last
    /// seconds' counts are not lost).
    pub async fn flush_counters(&self) {
        let keys = &self.keys;
        minutes::flush(&self.tally, &self.conn, |minute| keys.minute(minute)).await;
    }

    /// Writes the events noted for the order that no operation took along.
    pub async fn flush_noted(&self, mch_order_no: &str) -> Result<(), LedgerError> {
        let op = self.op("E", mch_order_no);
        if op.events.is_empty() {
            return Ok(());
        }
        self.batcher.apply(op).await?;
        Ok(())
    }

    async fn apply_int(&self, op: Op, what: &str, id: &str) -> Result<i64, LedgerError> {
        self.apply_int_finishing(op, None, "", what, id).await
    }

    /// [`Ledger::apply_int`] for an operation that finishes `job`: its delivery is
    /// acknowledged in the same step when the operation answers one of `done_replies`
    /// (comma-separated: the replies on which the job's handler reports success).
    async fn apply_int_finishing(
        &self,
        mut op: Op,
        job: Option<&Delivery>,
        done_replies: &'static str,
        what: &str,
        id: &str,
    ) -> Result<i64, LedgerError> {
        let job = job.filter(|_| !done_replies.is_empty());
        op.ack = job
            .and_then(|job| job.ack_in(&self.keys.queue.stream))
            .map(|mut ack| {
                // A batch that waits for replicas answers only after `WAIT`: a marker, seen
                // when the script ends, wakes a worker sooner than the reply would.
                ack.follows &= self.replicas_wanted == 0;
                (ack, done_replies)
            });
        let acking = op.ack.is_some();
        let follows = op.ack.as_ref().is_some_and(|(ack, _)| ack.follows);
        let delays_to = op.delays_to;
        let reply = match self.batcher.apply_confirmed(op).await {
            Ok(reply) => reply,
            Err(err) => {
                // An operation's own error (`Extension`) acknowledged nothing; any other may
                // have come after the script ran: then the job is done and acknowledged, and
                // the retry its handler now asks for finds its entry gone (a stale settlement
                // that is not a takeover).
                if acking && err.kind() != redis::ErrorKind::Extension {
                    tracing::warn!(mch_order_no = id, error = %err, "ledger step's reply lost; its job may be acknowledged already");
                    // The step may also have queued its job without a marker, for this worker
                    // to follow: it does (one pass too many, if the step never ran).
                    if let (Some(job), Some(due), true) = (job, delays_to, follows) {
                        job.follow_due(due);
                    }
                }
                return Err(err.into());
            }
        };
        if let Some(job) = job
            && reply.job != JobAcked::No
        {
            job.settled_in_step(reply.job == JobAcked::Stale);
        }
        if let (Some(job), Some(due)) = (job, reply.follow_due) {
            job.follow_due(due);
        }
        let value = reply.value;
        as_int(&value).ok_or_else(|| LedgerError::Corrupt {
            id: id.to_owned(),
            reason: format!("unexpected reply from {what}: {value:?}"),
        })
    }

    /// Registers an order without a job (the caller queues work some other way).
    pub async fn register(&self, order: &NewOrder<'_>) -> Result<Registered, LedgerError> {
        self.register_as(order, Phase::Queued, None).await
    }

    /// Registers an order and, only if it is new, queues its first job in the same atomic
    /// step: a crash can never leave a registered order without work. `initial` is `Queued`
    /// for payouts to create, `Accepted` for orders the merchant created itself (deposits to
    /// follow). A registration is idempotent by mchOrderNo, so the job needs no unique key.
    pub async fn register_with_job(
        &self,
        order: &NewOrder<'_>,
        initial: Phase,
        job: &PreparedJob,
    ) -> Result<Registered, LedgerError> {
        self.register_as(order, initial, Some(job)).await
    }

    async fn register_as(
        &self,
        order: &NewOrder<'_>,
        initial: Phase,
        job: Option<&PreparedJob>,
    ) -> Result<Registered, LedgerError> {
        let id = order.mch_order_no.as_str();
        let batch = order.batch_id.map_or("", BatchId::as_str);
        let now = crate::queue::now_ms();
        let registration = Registration {
            mch_order_no: order.mch_order_no.clone(),
            kind: order.kind,
            fingerprint: order.fingerprint.to_owned(),
            amount: order.amount.to_owned(),
            currency: order.currency.clone(),
            request: order.request.to_owned(),
            batch_id: order.batch_id.cloned(),
            created_at: now,
            merchant: order.merchant.clone(),
        };
        let corrupt = |reason: String| LedgerError::Corrupt {
            id: id.to_owned(),
            reason,
        };
        let accepted = match initial {
            Phase::Queued => String::new(),
            Phase::Accepted => serde_json::to_string(&Acceptance {
                pay_order_id: String::new(),
                at: now,
                poll_in_hand: false,
            })
            .map_err(|e| corrupt(e.to_string()))?,
            other => return Err(corrupt(format!("cannot register as {other}"))),
        };
        let aux = (!batch.is_empty()).then(|| self.keys.batch(batch));
        let op = Op::new("R", self.keys.order(id), aux, self.keys.events(id))
            .arg(serde_json::to_string(&registration).map_err(|e| corrupt(e.to_string()))?)
            .arg(batch)
            .arg(id)
            .arg(accepted);
        let op = with_job(op, job)
            .arg(self.retention_ms.saturating_mul(2))
            .arg(now);
        let reply = self.batcher.apply_confirmed(op).await?;
        if !reply.replicated {
            return Err(self.unreplicated(id));
        }
        let reply = reply.value;
        let reply =
            as_strings(reply).ok_or_else(|| corrupt("unexpected reply from register".into()))?;
        match reply.as_slice() {
            [verdict] if verdict == "created" => Ok(Registered::Created),
            [verdict, unindexed] if verdict == "created" && unindexed == "unindexed" => {
                // Registered with its job; only the console's indexes missed it.
                tracing::warn!(
                    mch_order_no = %id,
                    "registered, but not added to the order or batch index (the console's search)"
                );
                Ok(Registered::Created)
            }
            [verdict, req, phase, accepted, finished] if verdict == "exists" => {
                let fields: HashMap<String, String> = [
                    ("req", req),
                    ("phase", phase),
                    ("accepted", accepted),
                    ("final", finished),
                ]
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect();
                let record = record_from_fields(id, &fields)?
                    .ok_or_else(|| corrupt("registered without a record".into()))?;
                Ok(Registered::Exists {
                    phase: record.phase,
                    same_request: record.fingerprint == order.fingerprint,
                })
            }
            other => Err(corrupt(format!(
                "unexpected reply from register: {other:?}"
            ))),
        }
    }

    /// Takes the `submitting` lease for `lease` (longer than one gateway call).
    pub async fn begin_submit(
        &self,
        mch_order_no: &str,
        token: &str,
        lease: Duration,
    ) -> Result<SubmitTicket, LedgerError> {
        Ok(self
            .begin_submit_with_record(mch_order_no, token, lease)
            .await?
            .0)
    }

    /// [`Ledger::begin_submit`], and with [`SubmitTicket::Go`] the order's record as it is
    /// now (read by the same operation).
    pub async fn begin_submit_with_record(
        &self,
        mch_order_no: &str,
        token: &str,
        lease: Duration,
    ) -> Result<(SubmitTicket, Option<OrderRecord>), LedgerError> {
        self.begin_submit_for(mch_order_no, token, lease, None)
            .await
    }

    /// [`Ledger::begin_submit_with_record`] for the create job delivered as `job`. When that
    /// delivery's fetch loop found the queue not paused (by the flag, or by the delivery
    /// itself: a paused queue's group delivers nothing) at most [`FRESH_PAUSE_READING`]
    /// before the step's batch is sent, the step does not read the flag again (a payout alone
    /// saves a command); otherwise it reads it with the lease, as always. When the delivery
    /// brings a bound of the server's clock (`queue::clock::AddedAfter`, checked against the
    /// process' estimate when the batch is sent), a lease on a free order starts there
    /// instead of on `TIME`: the bound is at least the server's clock at the sending, after
    /// the instant the caller's lease deadline counts from, so the lease outlasts it.
    pub async fn begin_submit_for(
        &self,
        mch_order_no: &str,
        token: &str,
        lease: Duration,
        job: Option<&Delivery>,
    ) -> Result<(SubmitTicket, Option<OrderRecord>), LedgerError> {
        let mut op = self
            .op("B", mch_order_no)
            .arg(token)
            .arg(lease.as_millis() as u64);
        // Whether the fetch loop's reading stands for the flag, and the server clock's bound:
        // the last two arguments, set when the batch is sent.
        op.at_send = Some(FetchReadings {
            pause_clear_read_at: job.and_then(|job| job.pause_clear_read_at(self.keys.paused())),
            added_after: job.and_then(|job| job.added_after_in(&self.keys.queue.stream)),
        });
        let corrupt = |reason: String| LedgerError::Corrupt {
            id: mch_order_no.to_owned(),
            reason,
        };
        let reply = self.batcher.apply_confirmed(op).await?;
        let replicated = reply.replicated;
        let reply = as_strings(reply.value)
            .ok_or_else(|| corrupt("unexpected reply from begin_submit".into()))?;
        Ok(match reply.as_slice() {
            [verdict, previous, ..] if verdict == "go" && !replicated => {
                // Give the lease back at once, so the retry need not wait for it to expire,
                // and its attempt with it: nothing was sent, and a replica that lags for a
                // while must not use up the order's attempts.
                let previous: Phase = previous.parse().map_err(corrupt)?;
                let msg = "lease not confirmed by the replicas";
                self.release_unsent(mch_order_no, token, previous, msg)
                    .await?;
                metrics::counter!(crate::metrics::LEASES_UNREPLICATED).increment(1);
                tracing::debug!(mch_order_no, "{msg}; the create waits");
                (SubmitTicket::Unreplicated, None)
            }
            [verdict, previous, attempt, fields @ ..] if verdict == "go" => {
                let fields: HashMap<String, String> = fields
                    .chunks_exact(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                (
                    SubmitTicket::Go {
                        previous: previous.parse().map_err(corrupt)?,
                        attempt: attempt.parse().unwrap_or(1),
                    },
                    record_from_fields(mch_order_no, &fields)?,
                )
            }
            [verdict, ms] if verdict == "busy" => (
                SubmitTicket::Busy {
                    retry_in: Duration::from_millis(ms.parse().unwrap_or(1000)),
                },
                None,
            ),
            [verdict, acceptance, poll_queued @ ..] if verdict == "accepted" => {
                let acceptance: Acceptance = serde_json::from_str(acceptance)
                    .map_err(|e| corrupt(format!("accepted: {e}")))?;
                // Left in hand, unless an adoption queued the poll job since.
                let poll_queued = poll_queued.first().is_some_and(|queued| queued == "1");
                let poll_in_hand = acceptance.poll_in_hand && !poll_queued;
                (SubmitTicket::Accepted { poll_in_hand }, None)
            }
            [verdict] if verdict == "paused" => (SubmitTicket::Paused, None),
            [verdict, finished] if verdict == "final" => {
                let finished: Finished =
                    serde_json::from_str(finished).map_err(|e| corrupt(format!("final: {e}")))?;
                let phase = effective_phase(mch_order_no, None, false, Some(&finished))?;
                (SubmitTicket::Final(phase), None)
            }
            [verdict] if verdict == "missing" => (SubmitTicket::Missing, None),
            other => {
                return Err(corrupt(format!(
                    "unexpected reply from begin_submit: {other:?}"
                )));
            }
        })
    }

    fn unreplicated(&self, id: &str) -> LedgerError {
        LedgerError::Unreplicated {
            id: id.to_owned(),
            wanted: self.replicas_wanted,
        }
    }

    /// Records that the gateway holds the order and, in the same step, queues `poll` (the
    /// order's one regular poll job: it is born with the acceptance, so it needs no unique
    /// key). False when the order was already accepted (nothing queued then). Accepting a
    /// final order changes nothing it reports: `final` outranks `accepted`.
    pub async fn accept(
        &self,
        mch_order_no: &str,
        pay_order_id: Option<&str>,
        poll: Option<&PreparedJob>,
    ) -> Result<bool, LedgerError> {
        self.accept_finishing(mch_order_no, pay_order_id, poll, None)
            .await
    }

    /// [`Ledger::accept`] as the last step of `job` (a create or a lookup that found the
    /// order): the job's delivery is acknowledged in the same step, when it came from this
    /// ledger's queue and holds no unique key (see `queue::Delivery::ack_in`).
    pub async fn accept_finishing(
        &self,
        mch_order_no: &str,
        pay_order_id: Option<&str>,
        poll: Option<&PreparedJob>,
        job: Option<&Delivery>,
    ) -> Result<bool, LedgerError> {
        let accepted = self
            .accept_as(mch_order_no, pay_order_id, poll, job, InHand::No)
            .await?;
        Ok(accepted == 1)
    }

    /// [`Ledger::accept`] for a create job that polls the order in hand: no poll job is
    /// queued and the job is not acknowledged; the milestone says so, and the job goes on as
    /// the order's poll job when it settles (see [`SubmitTicket::Accepted`]). Written without
    /// a lease check: should the caller's run have lost its lease to a run adopting the
    /// order, that run's acceptance finds this one and queues its poll job all the same.
    pub async fn accept_polling_in_hand(
        &self,
        mch_order_no: &str,
        pay_order_id: &str,
    ) -> Result<InHandAcceptance, LedgerError> {
        let reply = self
            .accept_as(mch_order_no, Some(pay_order_id), None, None, InHand::Now)
            .await?;
        Ok(in_hand_answer(reply))
    }

    /// The systemic guard's reset that an accepted create makes, alone: for a run that
    /// leaves its first poll in hand and writes the acceptance only if that poll does not
    /// find the order final ([`Ledger::accept_in_hand_after_clearing`]). The count of
    /// refusals in a row starts over when the gateway accepted, as with every acceptance;
    /// the acceptance written later does not clear it again (refusals counted after this
    /// reset stay counted).
    pub async fn clear_guard_for_acceptance(&self) -> Result<(), LedgerError> {
        let _: i64 = redis::cmd("DEL")
            .arg(self.keys.guard())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// [`Ledger::accept_polling_in_hand`] written after the fact by a run that cleared the
    /// guard when the gateway accepted ([`Ledger::clear_guard_for_acceptance`]), with the
    /// time it accepted (`accepted_at_ms`): the milestone alone (alone in its batch: one
    /// `HSETNX`), the guard left as it is.
    pub async fn accept_in_hand_after_clearing(
        &self,
        mch_order_no: &str,
        pay_order_id: &str,
        accepted_at_ms: u64,
    ) -> Result<InHandAcceptance, LedgerError> {
        let reply = self
            .accept_as(
                mch_order_no,
                Some(pay_order_id),
                None,
                None,
                InHand::GuardCleared { accepted_at_ms },
            )
            .await?;
        Ok(in_hand_answer(reply))
    }

    /// The acceptance; `in_hand` says whether it leaves the first poll to its create job. The
    /// script's answer: 1 recorded (or, for an order another run accepted in hand: `poll`
    /// queued, or the caller in hand too), 0 already accepted.
    async fn accept_as(
        &self,
        mch_order_no: &str,
        pay_order_id: Option<&str>,
        poll: Option<&PreparedJob>,
        job: Option<&Delivery>,
        in_hand: InHand,
    ) -> Result<i64, LedgerError> {
        let (in_hand, at, clear_guard) = match in_hand {
            InHand::No => (false, crate::queue::now_ms(), true),
            InHand::Now => (true, crate::queue::now_ms(), true),
            InHand::GuardCleared { accepted_at_ms } => (true, accepted_at_ms, false),
        };
        let acceptance = Acceptance {
            pay_order_id: pay_order_id.unwrap_or_default().to_owned(),
            at,
            poll_in_hand: in_hand,
        };
        let json = serde_json::to_string(&acceptance).map_err(|e| LedgerError::Corrupt {
            id: mch_order_no.to_owned(),
            reason: e.to_string(),
        })?;
        let mut op = with_job(self.op("A", mch_order_no).arg(&json), poll)
            .arg(if in_hand { "1" } else { "" })
            .arg(if clear_guard { "" } else { "1" });
        if in_hand && poll.is_none() && job.is_none() {
            // Nothing but the guard's reset (unless made already) and the milestone to write
            // (no poll job, no job acknowledged): alone in its batch, `DEL` and `HSETNX` in one
            // pipeline, or the `HSETNX` alone.
            op.lone = Some(LoneForm {
                clear: clear_guard.then(|| self.keys.guard()),
                field: "accepted",
                value: history::milestone_with_events(&json, &op.events),
            });
        }
        self.apply_int_finishing(op, job, "0,1", "accept", mch_order_no)
            .await
    }

    /// Gives the lease back: to `Queued` (retry the create) or `Unknown` (query first).
    /// `may_exist` when this run's create may have created the order: the order is marked
    /// ambiguous for good and any absence streak starts over. A `code` of 5003011 (the
    /// gateway says the order's number exists) marks the order so for good: it is never
    /// failed on the gateway's "no such order" after that, which can only be lag. False if
    /// `token` no longer holds the lease.
    pub async fn release(
        &self,
        mch_order_no: &str,
        token: &str,
        next: Phase,
        may_exist: bool,
        code: Option<i64>,
        msg: &str,
    ) -> Result<bool, LedgerError> {
        let number_exists = code == Some(crate::gateway::codes::DUPLICATE_ORDER);
        let code = code.map(|c| c.to_string()).unwrap_or_default();
        let released = Release {
            may_exist,
            unsent: false,
            number_exists,
        };
        self.release_as(mch_order_no, token, next, &code, msg, released)
            .await
    }

    /// Gives the lease back after a create that provably never reached the gateway's books
    /// (held back by the merchant's rate limit, refused with a 429, or a lease the replicas
    /// did not confirm): the attempt the lease counted is taken back, so a busy gateway can
    /// never use up an order's attempts, and an earlier create's error stays the order's
    /// (`msg` is recorded only on an order without one).
    pub async fn release_unsent(
        &self,
        mch_order_no: &str,
        token: &str,
        next: Phase,
        msg: &str,
    ) -> Result<bool, LedgerError> {
        let released = Release {
            may_exist: false,
            unsent: true,
            number_exists: false,
        };
        self.release_as(mch_order_no, token, next, "", msg, released)
            .await
    }

    /// The release operation (see the script's `release`).
    async fn release_as(
        &self,
        mch_order_no: &str,
        token: &str,
        next: Phase,
        code: &str,
        msg: &str,
        released: Release,
    ) -> Result<bool, LedgerError> {
        let flag = |set: bool| if set { "1" } else { "" };
        let op = self
            .op("X", mch_order_no)
            .arg(token)
            .arg(next.as_str())
            .arg(code)
            .arg(msg)
            .arg(flag(released.may_exist))
            .arg(flag(released.unsent))
            .arg(flag(released.number_exists));
        Ok(self.apply_int(op, "release", mch_order_no).await? == 1)
    }

    /// Records that the gateway said it has no such order (lease holder only); `None` when
    /// `token` no longer holds the lease or the lease ran out (a lookup answered before a
    /// stall past the lease is no evidence for the time the stall took).
    pub async fn note_absent(
        &self,
        mch_order_no: &str,
        token: &str,
    ) -> Result<Option<Absence>, LedgerError> {
        let op = self.op("N", mch_order_no).arg(token);
        let reply = as_strings(self.batcher.apply(op).await?);
        let parse = |v: &String| v.parse::<u64>().ok();
        match reply.as_deref() {
            Some([]) => Ok(None),
            Some([since, lookups, now]) => match (parse(since), parse(lookups), parse(now)) {
                (Some(since_ms), Some(lookups), Some(now_ms)) => Ok(Some(Absence {
                    since_ms,
                    lookups: u32::try_from(lookups).unwrap_or(u32::MAX),
                    now_ms,
                })),
                _ => Err(self.unexpected(mch_order_no, "note_absent")),
            },
            _ => Err(self.unexpected(mch_order_no, "note_absent")),
        }
    }

    fn unexpected(&self, id: &str, what: &str) -> LedgerError {
        LedgerError::Corrupt {
            id: id.to_owned(),
            reason: format!("unexpected reply from {what}"),
        }
    }

    /// The one terminal transition, for a decision of ours that needs no lease (e.g. a
    /// number clash): true when this call finalised the order and appended its outcome;
    /// false when it was already final (the caller's result is dropped). `record` is the
    /// order as the caller read it: the outcome's registration part comes from it.
    pub async fn finalize(
        &self,
        record: &OrderRecord,
        phase: Phase,
        result: &FinalResult,
    ) -> Result<bool, LedgerError> {
        Ok(self
            .finalize_as(record, phase, result, Decider::Us, None)
            .await?
            == Finalized::Recorded)
    }

    /// A final state the gateway reported (a verified callback, a query): it finalises the
    /// order, or, if the order is already final with another status, appends one
    /// `correction` entry per new status.
    pub async fn apply_gateway_final(
        &self,
        record: &OrderRecord,
        phase: Phase,
        result: &FinalResult,
    ) -> Result<Finalized, LedgerError> {
        self.apply_gateway_final_finishing(record, phase, result, None)
            .await
    }

    /// [`Ledger::apply_gateway_final`] as the last step of `job` (a poll that found the
    /// order final): the job's delivery is acknowledged in the same step whenever the state
    /// is applied, found already there, or appended as a correction (see
    /// [`Ledger::accept_finishing`]).
    pub async fn apply_gateway_final_finishing(
        &self,
        record: &OrderRecord,
        phase: Phase,
        result: &FinalResult,
        job: Option<&Delivery>,
    ) -> Result<Finalized, LedgerError> {
        let applied = self
            .finalize_as(record, phase, result, Decider::Gateway, job)
            .await?;
        if applied == Finalized::Corrected {
            metrics::counter!(crate::metrics::OUTCOME_CORRECTIONS, "status" => phase.as_str())
                .increment(1);
            tracing::error!(
                mch_order_no = %record.mch_order_no,
                status = %phase,
                "the gateway contradicts the recorded outcome: correction appended"
            );
        }
        Ok(applied)
    }

    /// [`Ledger::finalize`] for a decision the caller made itself (a create it gives up on):
    /// applied only while `token` still holds the submit lease, so a run that lost its lease
    /// can never finalise an order another run is creating; and for an order some create of
    /// which may exist, only once the gateway's absence is proven over `settle_window`.
    pub async fn finalize_leased(
        &self,
        record: &OrderRecord,
        token: &str,
        phase: Phase,
        result: &FinalResult,
        settle_window: Duration,
    ) -> Result<Finalized, LedgerError> {
        self.finalize_as(
            record,
            phase,
            result,
            Decider::LeaseHolder {
                token,
                settle_window,
            },
            None,
        )
        .await
    }

    async fn finalize_as(
        &self,
        record: &OrderRecord,
        phase: Phase,
        result: &FinalResult,
        decider: Decider<'_>,
        job: Option<&Delivery>,
    ) -> Result<Finalized, LedgerError> {
        debug_assert!(phase.is_final());
        let id = record.mch_order_no.as_str();
        let finished = Finished {
            outcome: Outcome {
                event: OutcomeEvent::Final,
                previous_status: None,
                kind: record.kind,
                merchant: record.merchant.clone(),
                mch_order_no: record.mch_order_no.clone(),
                status: OutcomeStatus::from_phase(phase).ok_or_else(|| LedgerError::Corrupt {
                    id: id.to_owned(),
                    reason: format!("{phase} is not a final phase"),
                })?,
                gateway_state: result.gateway_state,
                pay_order_id: result
                    .pay_order_id
                    .clone()
                    .filter(|p| !p.is_empty())
                    .or_else(|| record.pay_order_id.clone()),
                amount: record.amount.clone(),
                currency: record.currency.clone(),
                fee: result.fee.clone().filter(|f| !f.is_empty()),
                code: result.code,
                msg: result.msg.clone().filter(|m| !m.is_empty()),
                attempts: record.attempts,
                batch_id: record.batch_id.clone(),
                at: rfc3339_now(),
            },
            finished_at: crate::queue::now_ms(),
        };
        let json = serde_json::to_string(&finished).map_err(|e| LedgerError::Corrupt {
            id: id.to_owned(),
            reason: e.to_string(),
        })?;
        let (token, mode, window) = match decider {
            Decider::Us => ("", "", 0),
            Decider::Gateway => ("", "g", 0),
            Decider::LeaseHolder {
                token,
                settle_window,
            } => (token, "", settle_window.as_millis() as u64),
        };
        let webhook = match &self.webhook_jobs {
            Some(prepare) => {
                prepare()
                    .map_err(|e| LedgerError::Corrupt {
                        id: id.to_owned(),
                        reason: format!("cannot prepare the webhook job: {e}"),
                    })?
                    .text
            }
            None => String::new(),
        };
        let mut op = self.op("F", id);
        if let Some(batch_id) = &record.batch_id {
            op.aux_key = self.keys.batch_progress(batch_id.as_str());
        }
        let mut op = op
            .arg(json)
            .arg(token)
            .arg(id)
            .arg(if record.stuck { "1" } else { "" })
            .arg(self.outcome_max_len)
            .arg(mode)
            .arg(window)
            .arg(phase.as_str())
            .arg(webhook)
            .arg(self.retention_ms)
            .arg(if record.batch_id.is_some() {
                progress::money_arg(&record.amount, record.currency.as_str())
            } else {
                String::new()
            });
        for (name, value) in outcome_fields(&finished.outcome) {
            op = op.arg(name).arg(value);
        }
        // Recorded, unchanged or corrected: the job that asked is done (a lost lease or an
        // unproven absence sends it round again).
        let applied = match self
            .apply_int_finishing(op, job, "1,0,3", "finalize", id)
            .await?
        {
            1 => Finalized::Recorded,
            0 => Finalized::Unchanged,
            2 => Finalized::LeaseLost,
            3 => Finalized::Corrected,
            4 => Finalized::MayExist,
            other => {
                return Err(LedgerError::Corrupt {
                    id: id.to_owned(),
                    reason: format!("unexpected reply from finalize: {other}"),
                });
            }
        };
        if applied == Finalized::Recorded {
            metrics::counter!(crate::metrics::OUTCOMES, "status" => phase.as_str()).increment(1);
            self.tally.finished(crate::queue::now_ms(), phase.as_str());
        }
        Ok(applied)
    }

    pub async fn mark_stuck(&self, mch_order_no: &str) -> Result<bool, LedgerError> {
        let op = self.op("S", mch_order_no).arg(mch_order_no);
        Ok(self.apply_int(op, "mark_stuck", mch_order_no).await? == 1)
    }
    /// The order's record, read by its own `HGETALL` on the primary. Not in a ledger batch:
    /// there a busy worker's read (every poll starts with one) waited for the batch in flight
    /// to answer before its own went. Off the batch, `bench e2e` ran 3.8–5.6 % faster for one
    /// round trip more per payout (docs/performance.md, "Reads off the ledger's batch").
    pub async fn get(&self, mch_order_no: &str) -> Result<Option<OrderRecord>, LedgerError> {
        let reply: Value = redis::cmd("HGETALL")
            .arg(self.keys.order(mch_order_no))
            .query_async(&mut self.conn.clone())
            .await?;
        let fields: HashMap<String, String> =
            redis::from_redis_value(reply).map_err(|err| LedgerError::Corrupt {
                id: mch_order_no.to_owned(),
                reason: format!("unexpected reply from get: {err}"),
            })?;
        record_from_fields(mch_order_no, &fields)
    }

    /// Appends `event` to the order's history, if the order exists (see [`history`]).
    pub async fn note(
        &self,
        mch_order_no: &str,
        event: history::OrderEvent,
    ) -> Result<(), LedgerError> {
        self.note_soon(mch_order_no, event);
        self.flush_noted(mch_order_no).await
    }

    /// The order's event history, oldest first (see [`history`]): those its acceptance and
    /// its final milestone keep, and those of its list, as stored (a list kept from an
    /// earlier registration of the number included: [`history::timeline`] leaves those out).
    pub async fn events(
        &self,
        mch_order_no: &str,
    ) -> Result<Vec<history::OrderEvent>, LedgerError> {
        let (listed, milestones): (Vec<String>, Vec<Option<String>>) = redis::pipe()
            .lrange(self.keys.events(mch_order_no), 0, -1)
            .cmd("HMGET")
            .arg(self.keys.order(mch_order_no))
            .arg("accepted")
            .arg("final")
            .query_async(&mut self.conn.clone())
            .await?;
        let mut events = history::parse_events(listed);
        for milestone in milestones.iter().flatten() {
            events.extend(history::carried_events(milestone));
        }
        events.sort_by_key(|event| event.at_ms);
        Ok(events)
    }

    /// The counters of the minutes starting at `minutes_ms`, in that order (this partition's
    /// part).
    pub async fn minute_stats(
        &self,
        minutes_ms: &[u64],
    ) -> Result<Vec<minutes::MinuteStats>, LedgerError> {
        let mut pipe = redis::pipe();
        for minute in minutes_ms {
            pipe.cmd("HGETALL").arg(self.keys.minute(*minute));
        }
        let all: Vec<BTreeMap<String, u64>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(minutes_ms
            .iter()
            .zip(all)
            .map(|(minute, fields)| {
                let mut stats = minutes::MinuteStats {
                    minute_ms: *minute,
                    ..Default::default()
                };
                stats.add_fields(&fields);
                stats
            })
            .collect())
    }

    /// Members of a batch (their mchOrderNos).
    pub async fn batch_members(&self, batch_id: &str) -> Result<Vec<String>, LedgerError> {
        Ok(self
            .conn
            .clone()
            .smembers(self.keys.batch(batch_id))
            .await?)
    }

    /// Trims the outcome stream by the retention (see `scripts::TRIM_OUTCOMES`): entries
    /// older than it that every consumer group has read and acknowledged. Without a
    /// retention nothing is trimmed. Returns the entries removed.
    pub async fn trim_outcomes(&self) -> Result<u64, LedgerError> {
        if self.retention_ms == 0 {
            return Ok(0);
        }
        Ok(scripts::TRIM_OUTCOMES
            .key(self.keys.outcomes())
            .arg(self.retention_ms)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// Outcomes after stream id `after` ("0" for the start), at most `count`.
    pub async fn outcomes_after(
        &self,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Outcome)>, LedgerError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.outcomes())
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        outcome::parse_range(reply)
    }

    /// Orders flagged stuck and not final. The set can briefly hold an order that was
    /// finalised by a caller that had read it just before it was flagged; such members are
    /// pruned here.
    pub async fn stuck_count(&self) -> Result<u64, LedgerError> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn.smembers(self.keys.stuck()).await?;
        let mut stuck = 0;
        for id in members {
            let finished: bool = conn.hexists(self.keys.order(&id), "final").await?;
            if finished {
                let _: i64 = conn.srem(self.keys.stuck(), &id).await?;
            } else {
                stuck += 1;
            }
        }
        Ok(stuck)
    }

    /// Members of the stuck set, read-only and O(1) (SCARD): for gauges. Finalising a stuck
    /// order removes it, so this over-counts only an order flagged stuck after its finaliser
    /// read it (rare; [`Ledger::stuck_count`] counts exactly and prunes those).
    pub async fn stuck_len(&self) -> Result<u64, LedgerError> {
        Ok(self.conn.clone().scard(self.keys.stuck()).await?)
    }

    /// Up to about `count` members of the stuck set (one `SSCAN` step: bounded however many
    /// are flagged; which ones is the set's order, not their age).
    pub async fn stuck_members(&self, count: usize) -> Result<Vec<String>, LedgerError> {
        let (_, members): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(self.keys.stuck())
            .arg(0)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(members)
    }

    /// Round trip to Redis, for health checks.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Counts and amount totals per phase (and currency) of a batch's orders.
    pub async fn batch_summary(&self, batch_id: &str) -> Result<BatchSummary, LedgerError> {
        let members = self.batch_members(batch_id).await?;
        let mut summary = BatchSummary {
            batch_id: batch_id.to_owned(),
            total: members.len(),
            phases: BTreeMap::new(),
        };
        for chunk in members.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(self.keys.order(id))
                    .arg("req")
                    .arg("phase")
                    .arg("accepted")
                    .arg("final");
            }
            let rows: Vec<[Option<String>; 4]> = pipe.query_async(&mut self.conn.clone()).await?;
            for (id, row) in chunk.iter().zip(rows) {
                let fields: HashMap<String, String> = ["req", "phase", "accepted", "final"]
                    .into_iter()
                    .zip(row)
                    .filter_map(|(name, value)| Some((name.to_owned(), value?)))
                    .collect();
                let record = record_from_fields(id, &fields)?;
                let phase = record
                    .as_ref()
                    .map_or_else(|| "missing".to_owned(), |r| r.phase.as_str().to_owned());
                let entry = summary.phases.entry(phase).or_default();
                entry.count += 1;
                if let Some(record) = record
                    && let Ok(value) = rust_decimal::Decimal::from_str_exact(&record.amount)
                {
                    *entry.amounts.entry(record.currency.into()).or_default() += value;
                }
            }
        }
        Ok(summary)
    }

    pub async fn outcome_count(&self) -> Result<u64, LedgerError> {
        Ok(self.conn.clone().xlen(self.keys.outcomes()).await?)
    }
}

#[cfg(test)]
mod finishing_tests;
#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const REQ: &str = r#"{"mchOrderNo":"A","kind":"payout","fingerprint":"fp","amount":"10.50","currency":"INR","request":"{}","batchId":"B","createdAt":5}"#;
    const FINAL: &str = r#"{"kind":"payout","mchOrderNo":"A","status":"succeeded","gatewayState":2,"payOrderId":"P9","amount":"10.50","currency":"INR","fee":"0.10","code":null,"msg":null,"attempts":1,"batchId":"B","at":"2026-01-01T00:00:00.000Z","finishedAt":30}"#;

    #[test]
    fn milestones_carry_their_events_and_the_timeline_keeps_only_this_registrations() {
        // As the batch script writes them: the milestone's JSON with an `events` array (one
        // line this version cannot read, skipped).
        let accepted = r#"{"payOrderId":"P9","at":70000,"events":[{"atMs":69990,"kind":"create","code":0},{"atMs":1,"kind":"teleport"}]}"#;
        let finished = FINAL.replace(
            r#""finishedAt":30}"#,
            r#""finishedAt":90000,"events":[{"atMs":89990,"kind":"query","reason":"poll","state":2}]}"#,
        );
        let req = REQ.replace(r#""createdAt":5"#, r#""createdAt":65000"#);
        let record = record_from_fields(
            "A",
            &fields(&[("req", &req), ("accepted", accepted), ("final", &finished)]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(record.phase, Phase::Succeeded);
        assert_eq!(record.finished_at_ms, Some(90000));

        let mut events = history::carried_events(accepted);
        events.extend(history::carried_events(&finished));
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [history::EventKind::Create, history::EventKind::Query]
        );
        assert!(history::carried_events(r#"{"at":1}"#).is_empty());
        assert!(history::carried_events("not json").is_empty());

        // A line from before this registration (a list kept after an earlier record of the
        // number expired, until the index trim) is not in its timeline; one a second early
        // is (clocks).
        let mut stale = history::OrderEvent::now(history::EventKind::Operator);
        stale.at_ms = 65000 - 61_000;
        let mut early = history::OrderEvent::now(history::EventKind::Operator);
        early.at_ms = 64000;
        events.extend([stale, early]);
        let timeline = history::timeline(&record, &events);
        let at: Vec<u64> = timeline.iter().map(|e| e.at_ms()).collect();
        assert_eq!(at, [64000, 65000, 69990, 70000, 89990, 90000]);
    }

    #[test]
    fn final_outranks_accepted_which_outranks_the_working_phase() {
        let working = fields(&[("req", REQ), ("phase", "submitting"), ("updatedAt", "7")]);
        let record = record_from_fields("A", &working).unwrap().unwrap();
        assert_eq!(record.phase, Phase::Submitting);
        assert_eq!((record.created_at_ms, record.updated_at_ms), (5, 7));
        assert_eq!(record.batch_id.as_deref(), Some("B"));

        let mut accepted = working.clone();
        accepted.insert("accepted".into(), r#"{"payOrderId":"P1","at":20}"#.into());
        accepted.insert("stuck".into(), "1".into());
        let record = record_from_fields("A", &accepted).unwrap().unwrap();
        assert_eq!(
            (record.phase, record.pay_order_id.as_deref(), record.stuck),
            (Phase::Accepted, Some("P1"), true)
        );
        assert_eq!(record.updated_at_ms, 20);

        let mut finished = accepted.clone();
        finished.insert("final".into(), FINAL.into());
        let record = record_from_fields("A", &finished).unwrap().unwrap();
        assert_eq!(record.phase, Phase::Succeeded);
        assert_eq!(record.pay_order_id.as_deref(), Some("P9"));
        assert_eq!(record.gateway_state, Some(2));
        assert_eq!(record.fee.as_deref(), Some("0.10"));
        assert_eq!(record.finished_at_ms, Some(30));
        assert!(!record.stuck, "a final order is not stuck");

        let queued = fields(&[("req", REQ)]);
        assert_eq!(
            record_from_fields("A", &queued).unwrap().unwrap().phase,
            Phase::Queued
        );
    }

    #[test]
    fn unreadable_records_are_reported_not_guessed() {
        assert!(record_from_fields("A", &HashMap::new()).unwrap().is_none());
        for broken in [
            fields(&[("phase", "queued")]),
            fields(&[("req", "{")]),
            fields(&[("req", REQ), ("phase", "flying")]),
            fields(&[("req", REQ), ("accepted", "[]")]),
            fields(&[
                ("req", REQ),
                ("final", &FINAL.replace("succeeded", "accepted")),
            ]),
        ] {
            assert!(
                matches!(
                    record_from_fields("A", &broken),
                    Err(LedgerError::Corrupt { .. })
                ),
                "{broken:?}"
            );
        }
    }
}
