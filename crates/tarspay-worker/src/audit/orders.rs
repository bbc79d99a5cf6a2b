//! Reading orders (SCAN over the ledger's order hashes) and the outcome stream.

use super::{AuditError, Pace, read_stream};
use crate::ledger::LedgerKeys;
use crate::queue::entries::{entry_id_ms, field};
use crate::redis_conn::RedisConn;
use serde::Deserialize;
use std::collections::HashMap;

/// What the audit needs of one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderView {
    pub id: String,
    /// The recorded final status, when final.
    pub final_status: Option<String>,
    pub finished_at_ms: Option<u64>,
    pub accepted: bool,
    /// Accepted with no poll job queued: its create job polls it in hand, and goes on as its
    /// poll job (`jobs::PollsInHand`). False once an adoption queued the poll job after all
    /// (`pollQueued`).
    pub poll_in_hand: bool,
    /// The working phase (queued, submitting, unknown), before acceptance.
    pub phase: String,
    pub stuck: bool,
    /// Changes whenever a create run moves the order; compared before a repair.
    pub updated_at: String,
    /// When this registration was made (ms, the server's clock as estimated).
    pub registered_at_ms: Option<u64>,
}

impl OrderView {
    /// The phase as `status` shows it.
    pub fn shown_phase(&self) -> String {
        match (&self.final_status, self.accepted) {
            (Some(status), _) => status.clone(),
            (None, true) => "accepted".to_owned(),
            (None, false) => self.phase.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FinalPart {
    status: String,
    #[serde(default)]
    finished_at: u64,
}

/// Whether an acceptance left the first poll to its create job.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AcceptedPart {
    #[serde(default)]
    poll_in_hand: bool,
}

/// The registration's time: final entries older than it belong to an earlier registration
/// of the same `mchOrderNo` (its record expired after the retention).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisteredPart {
    #[serde(default)]
    created_at: u64,
}

const FIELDS: [&str; 7] = [
    "final",
    "accepted",
    "phase",
    "stuck",
    "updatedAt",
    "req",
    "pollQueued",
];

/// Every order hash of the ledger, read chunk by chunk.
pub(crate) async fn scan(
    conn: &RedisConn,
    keys: &LedgerKeys,
    pace: Pace,
) -> Result<Vec<OrderView>, AuditError> {
    let prefix = keys.order("");
    let pattern = format!("{}*", glob_escape(&prefix));
    let mut conn = conn.clone();
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(pace.chunk);
        // On a cluster: the node holding this partition.
        let (next, found): (u64, Vec<String>) = conn.query_at(&prefix, &scan).await?;
        if !found.is_empty() {
            out.extend(read(&mut conn, &prefix, &found).await?);
        }
        pace.after(pace.chunk).await;
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(out)
}

/// The views of these orders now (an order deleted meanwhile is left out).
pub(crate) async fn reread(
    conn: &RedisConn,
    keys: &LedgerKeys,
    ids: &[String],
) -> Result<Vec<OrderView>, AuditError> {
    let prefix = keys.order("");
    let found: Vec<String> = ids.iter().map(|id| keys.order(id)).collect();
    read(&mut conn.clone(), &prefix, &found).await
}

async fn read(
    conn: &mut RedisConn,
    prefix: &str,
    order_keys: &[String],
) -> Result<Vec<OrderView>, AuditError> {
    let mut pipe = redis::pipe();
    for key in order_keys {
        pipe.cmd("HMGET").arg(key).arg(&FIELDS[..]);
    }
    let rows: Vec<[Option<String>; 7]> = pipe.query_async(conn).await?;
    Ok(order_keys
        .iter()
        .zip(rows)
        .filter_map(
            |(key, [finished, accepted, phase, stuck, updated, req, poll_queued])| {
                let id = key.strip_prefix(prefix)?.to_owned();
                let finished: Option<FinalPart> =
                    finished.and_then(|json| serde_json::from_str(&json).ok());
                Some(OrderView {
                    id,
                    final_status: finished.as_ref().map(|f| f.status.clone()),
                    finished_at_ms: finished.as_ref().map(|f| f.finished_at),
                    poll_in_hand: poll_queued.is_none()
                        && accepted
                            .as_deref()
                            .and_then(|json| serde_json::from_str::<AcceptedPart>(json).ok())
                            .is_some_and(|a| a.poll_in_hand),
                    accepted: accepted.is_some(),
                    // A registered order no run has touched yet has no working phase: queued.
                    phase: phase.unwrap_or_else(|| "queued".to_owned()),
                    stuck: stuck.as_deref() == Some("1"),
                    updated_at: updated.unwrap_or_default(),
                    registered_at_ms: req
                        .and_then(|json| serde_json::from_str::<RegisteredPart>(&json).ok())
                        .map(|r| r.created_at)
                        .filter(|&at| at > 0),
                })
            },
        )
        .collect())
}

/// `final` entries per order (their times, ms), and the time of the stream's oldest entry
/// (ms; entries older than it were trimmed away).
#[derive(Debug, Default)]
pub(crate) struct OutcomeEntries {
    pub finals: HashMap<String, Vec<u64>>,
    pub oldest_ms: Option<u64>,
    pub total: u64,
}

pub(crate) async fn outcome_entries(
    conn: &RedisConn,
    keys: &LedgerKeys,
    pace: Pace,
) -> Result<OutcomeEntries, AuditError> {
    let mut conn = conn.clone();
    let mut entries = OutcomeEntries::default();
    read_stream(&mut conn, &keys.outcomes(), "-", pace, |entry| {
        if entries.oldest_ms.is_none() {
            entries.oldest_ms = entry_id_ms(&entry.id);
        }
        entries.total += 1;
        let text = |name: &str| field(&entry.map, name);
        // Entries written before corrections existed carry no event: finals.
        let event = text("event").unwrap_or_else(|| "final".to_owned());
        if event == "final"
            && let Some(id) = text("mchOrderNo")
        {
            let at = entry_id_ms(&entry.id).unwrap_or(0);
            entries.finals.entry(id).or_default().push(at);
        }
    })
    .await?;
    Ok(entries)
}

/// `text` with Redis glob's special characters escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
