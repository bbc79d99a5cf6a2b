//! The order ledger: one Redis hash per order, the source of truth for where each payout
//! stands, and the outcome stream applications consume. Every change is one Lua script
//! (compare-and-set on the phase); reaching a final phase appends the order's one outcome in
//! the same script. Redis only: no HTTP here.

mod outcome;
mod phase;
mod scripts;

pub use outcome::Outcome;
pub use phase::Phase;

use crate::queue::{PreparedJob, QueueKeys};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("ledger record {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
}

/// Key layout. The ledger lives in its queue's partition: every key shares the queue's hash
/// tag (e.g. `{tarspay:payouts}`), so one script can check the queue's pause flag, change an
/// order and append its outcome on one Redis Cluster slot.
#[derive(Debug, Clone)]
pub struct LedgerKeys {
    base: String,
    paused: String,
}

impl LedgerKeys {
    /// `tag` is the partition's hash tag with braces (`{prefix:queue}`); `paused` is the
    /// queue's pause flag, which must carry the same tag.
    pub fn new(tag: &str, paused: &str) -> Self {
        Self {
            base: tag.to_owned(),
            paused: paused.to_owned(),
        }
    }

    /// The queue's pause flag: while it exists no create is sent.
    pub fn paused(&self) -> &str {
        &self.paused
    }

    pub fn order(&self, mch_order_no: &str) -> String {
        format!("{}:order:{mch_order_no}", self.base)
    }

    pub fn batch(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}", self.base)
    }

    /// Orders whose creates failed with auth-class codes since the last accepted create.
    pub fn guard(&self) -> String {
        format!("{}:guard", self.base)
    }

    /// Orders flagged stuck past the polling deadline and not final yet.
    pub fn stuck(&self) -> String {
        format!("{}:stuck", self.base)
    }

    pub fn outcomes(&self) -> String {
        format!("{}:outcomes", self.base)
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

/// What a producer registers.
#[derive(Debug, Clone)]
pub struct NewOrder<'a> {
    pub mch_order_no: &'a str,
    pub kind: OrderKind,
    /// Identifies the request body, so a re-submission can be told apart from a clash.
    pub fingerprint: &'a str,
    pub amount: &'a str,
    pub currency: &'a str,
    /// The request as JSON, so any worker can rebuild the same create.
    pub request: &'a str,
    pub batch_id: Option<&'a str>,
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
    /// The gateway already holds the order; nothing to create.
    Accepted,
    /// Already final; nothing to do.
    Final(Phase),
    Missing,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderRecord {
    pub mch_order_no: String,
    pub kind: String,
    pub phase: Phase,
    pub amount: String,
    pub currency: String,
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
    pub batch_id: Option<String>,
    pub stuck: bool,
    /// A create of this order may have reached the gateway without an answer; it is never
    /// failed on a lookup alone.
    pub ambiguous: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(skip)]
    pub fingerprint: String,
    #[serde(skip)]
    pub request: String,
}

/// Where a batch stands: per phase, how many orders and how much money per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchSummary {
    pub batch_id: String,
    pub total: usize,
    pub phases: BTreeMap<String, PhaseTotals>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PhaseTotals {
    pub count: usize,
    /// Currency → sum, as decimal text.
    #[serde(serialize_with = "decimal_map")]
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

#[derive(Clone)]
pub struct Ledger {
    conn: ConnectionManager,
    keys: LedgerKeys,
    /// Approximate cap on the outcome stream (0 = unbounded).
    outcome_max_len: u64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("keys", &self.keys).finish()
    }
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

/// An order record from its hash fields; `None` for no fields (no such order).
fn record_from_fields(
    mch_order_no: &str,
    fields: &HashMap<String, String>,
) -> Result<Option<OrderRecord>, LedgerError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let phase = fields
        .get("phase")
        .ok_or("no phase")
        .and_then(|p| p.parse::<Phase>().map_err(|_| "bad phase"))
        .map_err(|reason| LedgerError::Corrupt {
            id: mch_order_no.to_owned(),
            reason: reason.to_owned(),
        })?;
    Ok(Some(OrderRecord {
        mch_order_no: mch_order_no.to_owned(),
        kind: fields.get("kind").cloned().unwrap_or_default(),
        phase,
        amount: fields.get("amount").cloned().unwrap_or_default(),
        currency: fields.get("currency").cloned().unwrap_or_default(),
        attempts: number(fields.get("attempts")).unwrap_or(0),
        pay_order_id: text(fields.get("payOrderId")),
        gateway_state: number(fields.get("gatewayState")),
        fee: text(fields.get("fee")),
        last_code: number(fields.get("lastCode")),
        last_msg: text(fields.get("lastMsg")),
        batch_id: text(fields.get("batchId")),
        stuck: fields.get("stuck").is_some_and(|v| v == "1"),
        ambiguous: fields.get("ambiguous").is_some_and(|v| v == "1"),
        created_at_ms: number(fields.get("createdAt")).unwrap_or(0),
        updated_at_ms: number(fields.get("updatedAt")).unwrap_or(0),
        finished_at_ms: number(fields.get("finishedAt")),
        fingerprint: fields.get("fingerprint").cloned().unwrap_or_default(),
        request: fields.get("request").cloned().unwrap_or_default(),
    }))
}

impl Ledger {
    pub fn new(conn: ConnectionManager, keys: LedgerKeys) -> Self {
        Self {
            conn,
            keys,
            outcome_max_len: 0,
        }
    }

    pub fn with_outcome_max_len(mut self, max_len: u64) -> Self {
        self.outcome_max_len = max_len;
        self
    }

    pub fn keys(&self) -> &LedgerKeys {
        &self.keys
    }

    /// Registers an order without a job (the caller queues work some other way).
    pub async fn register(&self, order: &NewOrder<'_>) -> Result<Registered, LedgerError> {
        self.register_as(order, Phase::Queued, None).await
    }

    /// Registers an order and, only if it is new, queues its first job in the same atomic
    /// step: a crash can never leave a registered order without work. `initial` is `Queued`
    /// for payouts to create, `Accepted` for orders the merchant created itself (deposits to
    /// follow).
    pub async fn register_with_job(
        &self,
        order: &NewOrder<'_>,
        initial: Phase,
        job: &PreparedJob,
        queue: &QueueKeys,
    ) -> Result<Registered, LedgerError> {
        self.register_as(order, initial, Some((job, queue))).await
    }

    async fn register_as(
        &self,
        order: &NewOrder<'_>,
        initial: Phase,
        job: Option<(&PreparedJob, &QueueKeys)>,
    ) -> Result<Registered, LedgerError> {
        let batch = order.batch_id.unwrap_or_default();
        let mut invocation = scripts::REGISTER.prepare_invoke();
        invocation
            .key(self.keys.order(order.mch_order_no))
            .key(self.keys.batch(batch));
        match job {
            Some((_, queue)) => invocation
                .key(&queue.stream)
                .key(&queue.delayed)
                .key(&queue.unique),
            // Unused without a job, but declared so the script's keys stay in one slot.
            None => invocation
                .key(self.keys.order(order.mch_order_no))
                .key(self.keys.order(order.mch_order_no))
                .key(self.keys.order(order.mch_order_no)),
        };
        let reply: Vec<String> = invocation
            .arg(order.mch_order_no)
            .arg(order.kind.as_str())
            .arg(order.fingerprint)
            .arg(order.amount)
            .arg(order.currency)
            .arg(order.request)
            .arg(batch)
            .arg(initial.as_str())
            .arg(crate::queue::now_ms())
            .arg(job.map_or(0, |(j, _)| j.run_at_ms))
            .arg(job.map_or("", |(j, _)| j.unique.as_str()))
            .arg(job.map_or("", |(j, _)| j.id.as_str()))
            .arg(job.map_or("", |(j, _)| j.text.as_str()))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let corrupt = |reason: &str| LedgerError::Corrupt {
            id: order.mch_order_no.to_owned(),
            reason: reason.to_owned(),
        };
        match reply.as_slice() {
            [verdict, _, _] if verdict == "created" => Ok(Registered::Created),
            [verdict, phase, fingerprint] if verdict == "exists" => Ok(Registered::Exists {
                phase: phase.parse().map_err(|e: String| corrupt(&e))?,
                same_request: fingerprint == order.fingerprint,
            }),
            _ => Err(corrupt("unexpected reply from register")),
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
    /// now (read by the same script: one round trip instead of two).
    pub async fn begin_submit_with_record(
        &self,
        mch_order_no: &str,
        token: &str,
        lease: Duration,
    ) -> Result<(SubmitTicket, Option<OrderRecord>), LedgerError> {
        let reply: Vec<String> = scripts::BEGIN_SUBMIT
            .key(self.keys.order(mch_order_no))
            .key(self.keys.paused())
            .arg(token)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let corrupt = |reason: String| LedgerError::Corrupt {
            id: mch_order_no.to_owned(),
            reason,
        };
        Ok(match reply.as_slice() {
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
            [verdict] if verdict == "accepted" => (SubmitTicket::Accepted, None),
            [verdict] if verdict == "paused" => (SubmitTicket::Paused, None),
            [verdict, phase] if verdict == "final" => {
                (SubmitTicket::Final(phase.parse().map_err(corrupt)?), None)
            }
            [verdict] if verdict == "missing" => (SubmitTicket::Missing, None),
            other => {
                return Err(corrupt(format!(
                    "unexpected reply from begin_submit: {other:?}"
                )));
            }
        })
    }

    /// Records that the gateway holds the order. False if the order is already final.
    pub async fn accept(
        &self,
        mch_order_no: &str,
        pay_order_id: Option<&str>,
    ) -> Result<bool, LedgerError> {
        let changed: i64 = scripts::ACCEPT
            .key(self.keys.order(mch_order_no))
            .key(self.keys.guard())
            .arg(pay_order_id.unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(changed == 1)
    }

    /// Gives the lease back: to `Queued` (retry the create) or `Unknown` (query first).
    /// False if `token` no longer holds the lease.
    pub async fn release(
        &self,
        mch_order_no: &str,
        token: &str,
        next: Phase,
        code: Option<i64>,
        msg: &str,
    ) -> Result<bool, LedgerError> {
        let changed: i64 = scripts::RELEASE
            .key(self.keys.order(mch_order_no))
            .arg(token)
            .arg(next.as_str())
            .arg(code.map(|c| c.to_string()).unwrap_or_default())
            .arg(msg)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(changed == 1)
    }

    /// The one terminal transition: true when this call finalised the order and appended its
    /// outcome; false when it was already final (the caller's result is dropped).
    pub async fn finalize(
        &self,
        mch_order_no: &str,
        phase: Phase,
        result: &FinalResult,
    ) -> Result<bool, LedgerError> {
        self.finalize_as(mch_order_no, phase, result, "").await
    }

    /// [`Ledger::finalize`] for a decision the caller made itself (a create it gives up on):
    /// applied only while `token` still holds the submit lease, so a run that lost its lease
    /// can never finalise an order another run is creating. False when not applied.
    pub async fn finalize_leased(
        &self,
        mch_order_no: &str,
        token: &str,
        phase: Phase,
        result: &FinalResult,
    ) -> Result<bool, LedgerError> {
        self.finalize_as(mch_order_no, phase, result, token).await
    }

    async fn finalize_as(
        &self,
        mch_order_no: &str,
        phase: Phase,
        result: &FinalResult,
        token: &str,
    ) -> Result<bool, LedgerError> {
        debug_assert!(phase.is_final());
        let changed: i64 = scripts::FINALIZE
            .key(self.keys.order(mch_order_no))
            .key(self.keys.outcomes())
            .key(self.keys.stuck())
            .arg(phase.as_str())
            .arg(
                result
                    .gateway_state
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            )
            .arg(result.pay_order_id.as_deref().unwrap_or_default())
            .arg(result.fee.as_deref().unwrap_or_default())
            .arg(result.code.map(|c| c.to_string()).unwrap_or_default())
            .arg(result.msg.as_deref().unwrap_or_default())
            .arg(rfc3339_now())
            .arg(self.outcome_max_len)
            .arg(token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if changed < 0 {
            return Err(LedgerError::Corrupt {
                id: mch_order_no.to_owned(),
                reason: "finalize on an order that is not in the ledger".into(),
            });
        }
        if changed == 1 {
            metrics::counter!(crate::metrics::OUTCOMES, "status" => phase.as_str()).increment(1);
        }
        Ok(changed == 1)
    }

    pub async fn mark_stuck(&self, mch_order_no: &str) -> Result<bool, LedgerError> {
        let changed: i64 = scripts::MARK_STUCK
            .key(self.keys.order(mch_order_no))
            .key(self.keys.stuck())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(changed == 1)
    }

    pub async fn get(&self, mch_order_no: &str) -> Result<Option<OrderRecord>, LedgerError> {
        let fields: HashMap<String, String> = self
            .conn
            .clone()
            .hgetall(self.keys.order(mch_order_no))
            .await?;
        record_from_fields(mch_order_no, &fields)
    }

    /// Members of a batch (their mchOrderNos).
    pub async fn batch_members(&self, batch_id: &str) -> Result<Vec<String>, LedgerError> {
        Ok(self
            .conn
            .clone()
            .smembers(self.keys.batch(batch_id))
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
        Ok(outcome::parse_range(reply))
    }

    pub async fn stuck_count(&self) -> Result<u64, LedgerError> {
        Ok(self.conn.clone().scard(self.keys.stuck()).await?)
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
                    .arg("phase")
                    .arg("amount")
                    .arg("currency");
            }
            let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
                pipe.query_async(&mut self.conn.clone()).await?;
            for (phase, amount, currency) in rows {
                let entry = summary
                    .phases
                    .entry(phase.unwrap_or_else(|| "missing".into()))
                    .or_default();
                entry.count += 1;
                if let (Some(amount), Some(currency)) = (amount, currency)
                    && let Ok(value) = rust_decimal::Decimal::from_str_exact(&amount)
                {
                    *entry.amounts.entry(currency).or_default() += value;
                }
            }
        }
        Ok(summary)
    }

    pub async fn outcome_count(&self) -> Result<u64, LedgerError> {
        Ok(self.conn.clone().xlen(self.keys.outcomes()).await?)
    }
}

/// The final phases as the Lua prelude lists them (so a test can hold Rust and Lua together).
#[cfg(test)]
pub(crate) fn scripts_final_list() -> Vec<&'static str> {
    let start = scripts::PRELUDE
        .find("local FINAL = {")
        .map_or(0, |i| i + 15);
    let end = scripts::PRELUDE[start..]
        .find('}')
        .map_or(start, |i| start + i);
    scripts::PRELUDE[start..end]
        .split(',')
        .filter_map(|item| item.trim().strip_suffix("=true"))
        .collect()
}
