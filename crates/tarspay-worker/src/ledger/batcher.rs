//! Group commit for ledger changes: operations from concurrent callers are applied by one
//! `EVALSHA` of the batch script while the previous batch is in flight, so a busy worker pays
//! one script call, one clock read and one pause check per batch instead of per operation. An
//! idle one pays no extra latency: a lone operation is sent at once, and one that has a lone
//! form (its whole effect as plain commands, [`LoneForm`]) as those commands.
//!
//! Operations in a batch are independent (different orders or not); the batch runs atomically.
//! An operation that raises an error (a key of the wrong type) answers its own caller with it,
//! and the rest of the batch goes on; a failed call (connection lost) fails every operation of
//! the batch. Each caller decides, exactly as with a lone script, whether to retry: every
//! operation is safe to repeat (a repeated milestone is refused by its write-once field).
//!
//! With [`Replication`], a batch holding a registration or a lease is followed by `WAIT` on
//! the same connection, in the same pipeline (a reconnect between them would make `WAIT`
//! count a fresh client's writes: none), and those operations learn whether enough replicas
//! confirmed it. A write only the primary holds can vanish in a failover.

use super::scripts::BATCH;
use crate::queue::AddedAfter;
use crate::queue::InlineAck;
use crate::redis_conn::RedisConn;
use redis::{RedisError, Value};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most operations one script call applies.
const MAX_BATCH: usize = 128;

/// Operations whose effect must reach the replicas before their caller acts on it: a
/// registration (the producer answers "queued") and a submit lease (a create is sent).
const DURABLE_KINDS: [&str; 2] = ["R", "B"];

/// How many replicas must confirm a durable operation, and how long to wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    pub replicas: u32,
    pub timeout: Duration,
}

/// One operation's reply, and whether the replicas confirmed it (always true for operations
/// that need no confirmation, or without [`Replication`]).
#[derive(Debug)]
pub(crate) struct Reply {
    pub value: Value,
    pub replicated: bool,
    /// What became of the job delivery the operation was to acknowledge ([`Op::ack`]).
    pub job: JobAcked,
    /// The due time (server ms) of a job the operation delayed in its delivery's queue to
    /// before every other one: no wake marker was written, the delivery's worker follows it.
    pub follow_due: Option<u64>,
}

/// What the batch script did with an operation's job delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobAcked {
    /// Nothing: no delivery, or the operation did not answer as asked (the settler settles it).
    No,
    /// Acknowledged and deleted with the operation's change.
    Yes,
    /// No longer pending for the caller's consumer (taken over after the orphan timeout):
    /// left to its new holder; or, for a step that left its order final, no longer pending
    /// at all (its new holder settled it first).
    Stale,
}

/// Parsed batch reply: each operation's reply, then which operations' deliveries were
/// acknowledged and which were stale (1-based positions), why some could not be ('' for
/// no failure), and the due times their workers follow (position, due time, ...).
type BatchReply = (Vec<Value>, Vec<usize>, Vec<usize>, String, Vec<u64>);

/// One ledger operation: what the batch script is told to do for one caller.
pub(crate) struct Op {
    /// One letter, see the script's `ops` table.
    pub kind: &'static str,
    pub order_key: String,
    /// The batch set for a registration; otherwise the order key again.
    pub aux_key: String,
    /// The order's event history list.
    pub events_key: String,
    pub args: Vec<String>,
    /// What happened to the order before this operation (history lines, JSON), written in
    /// the same step.
    pub events: Vec<String>,
    /// The expiry of a history list begun for `events` while the order has none (in flight):
    /// ms, 0 = none (records kept for ever). See `scripts::BATCH`.
    pub list_ttl_ms: u64,
    /// The job delivery the caller finishes with this operation, acknowledged in the same
    /// step when the operation's integer reply is one of `replies` (comma-separated).
    pub ack: Option<(InlineAck, &'static str)>,
    /// When the job this operation queues is due (server ms), if it delays one.
    pub delays_to: Option<u64>,
    /// For a lease step: what its job's fetch loop learned, judged when the batch is sent
    /// (not when the operation was made, so time spent waiting for the batch counts): its last
    /// two arguments.
    pub at_send: Option<FetchReadings>,
    /// The operation's lone form, if it has one: sent instead of the script when the
    /// operation is alone in its batch.
    pub lone: Option<LoneForm>,
}

/// What a lease step's job delivery brings from its fetch loop, turned into the step's last
/// two arguments when its batch is sent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FetchReadings {
    /// When the fetch loop found the queue not paused (its flag, or the delivery itself):
    /// the first argument says whether that reading is at most
    /// [`super::FRESH_PAUSE_READING`] old ('1') or not ('').
    pub pause_clear_read_at: Option<Instant>,
    /// The second: an upper bound of the server's clock (ms), '' for none (the script reads
    /// `TIME`).
    pub added_after: Option<AddedAfter>,
}

impl FetchReadings {
    fn args(&self) -> [String; 2] {
        let fresh = self
            .pause_clear_read_at
            .is_some_and(|read_at| read_at.elapsed() <= super::FRESH_PAUSE_READING);
        let clock = self
            .added_after
            .and_then(|bound| bound.checked_server_ms_at_most())
            .map(|bound| {
                metrics::counter!(crate::metrics::LEASE_STEPS_ON_DELIVERY_CLOCK).increment(1);
                bound.to_string()
            });
        [
            if fresh { "1" } else { "" }.to_owned(),
            clock.unwrap_or_default(),
        ]
    }
}

/// An operation's whole effect as plain commands, for a batch of that operation alone (a
/// payout alone saves the script call): `DEL` of `clear` (if any), then `HSETNX` of a
/// write-once field of the operation's order, in one pipeline (one round trip; not atomic,
/// and need not be: the two are independent, and the script too clears the key whether or
/// not its write succeeds). Its answer 1 is the operation's, and a failure its caller's (as a
/// failed script call is); 0 sends the script, which answers as for a repeated operation
/// (the field is there; its `DEL`, if any, runs again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoneForm {
    /// A key the operation deletes first (the guard count an acceptance clears), unless its
    /// caller did already.
    pub clear: Option<String>,
    pub field: &'static str,
    pub value: String,
}

/// An operation waiting for its batch, and where its reply goes.
struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<Reply, RedisError>>,
}

impl Op {
    pub fn new(
        kind: &'static str,
        order_key: String,
        aux_key: Option<String>,
        events_key: String,
    ) -> Self {
        Self {
            kind,
            aux_key: aux_key.unwrap_or_else(|| order_key.clone()),
            order_key,
            events_key,
            args: Vec::new(),
            events: Vec::new(),
            list_ttl_ms: 0,
            ack: None,
            delays_to: None,
            at_send: None,
            lone: None,
        }
    }

    pub fn arg(mut self, value: impl ToString) -> Self {
        self.args.push(value.to_string());
        self
    }
}

#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the batching task on the current tokio runtime; it ends when the last handle is
    /// dropped. `shared_keys` are the script's leading keys, in its order.
    /// With `replication`, `conn` should be the batcher's own: `WAIT` holds up the commands
    /// queued behind it on its connection.
    pub fn start(
        conn: RedisConn,
        shared_keys: Vec<String>,
        replication: Option<Replication>,
    ) -> Self {
        debug_assert_eq!(shared_keys.len(), super::scripts::SHARED_KEYS);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, shared_keys, replication, rx));
        Self { tx }
    }

    /// Applies one operation (in some batch) and returns its reply.
    pub async fn apply(&self, op: Op) -> Result<Value, RedisError> {
        Ok(self.apply_confirmed(op).await?.value)
    }

    /// [`Batcher::apply`], telling whether the replicas confirmed it.
    pub async fn apply_confirmed(&self, op: Op) -> Result<Reply, RedisError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || RedisError::from((redis::ErrorKind::Io, "ledger batcher stopped"));
        self.tx.send(Pending { op, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    conn: RedisConn,
    shared_keys: Vec<String>,
    replication: Option<Replication>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let wait = replication.filter(|_| {
            batch
                .iter()
                .any(|pending| DURABLE_KINDS.contains(&pending.op.kind))
        });
        if wait.is_none()
            && let [Pending { op, .. }] = batch.as_slice()
            && let Some(lone) = &op.lone
            && op.ack.is_none()
        {
            let written = lone_write(&conn, &op.order_key, lone).await;
            // Written, or failed (a lost reply may have written it: the caller retries as
            // after a failed script call); not written (0): the script answers.
            if !matches!(written, Ok(false))
                && let Some(pending) = batch.pop()
            {
                let _ = pending.reply.send(written.map(|_| Reply {
                    value: Value::Int(1),
                    replicated: true,
                    job: JobAcked::No,
                    follow_due: None,
                }));
                continue;
            }
        }
        let generation = conn.generation();
        match apply_batch(&conn, &shared_keys, &batch, wait).await {
            Ok(((replies, acked, stale, ack_error, followed), confirmed))
                if replies.len() == batch.len() =>
            {
                if !ack_error.is_empty() {
                    tracing::warn!(error = %ack_error, "jobs not acknowledged with their ledger step; their settlements will be");
                }
                if replies.iter().any(reports_readonly) {
                    // The script ran on a replica (a failover demoted the node): its
                    // operations caught the refusals, so the connection did not see them.
                    conn.readonly_reported(generation);
                }
                for (at, (pending, reply)) in batch.drain(..).zip(replies).enumerate() {
                    let replicated = confirmed || !DURABLE_KINDS.contains(&pending.op.kind);
                    let job = if acked.contains(&(at + 1)) {
                        JobAcked::Yes
                    } else if stale.contains(&(at + 1)) {
                        JobAcked::Stale
                    } else {
                        JobAcked::No
                    };
                    let follow_due = followed
                        .chunks_exact(2)
                        .filter(|pair| pair[0] == at as u64 + 1)
                        .map(|pair| pair[1])
                        .min();
                    let reply = operation_result(reply).map(|value| Reply {
                        value,
                        replicated,
                        job,
                        follow_due,
                    });
                    let _ = pending.reply.send(reply);
                }
            }
            Ok(((replies, ..), _)) => {
                let err = RedisError::from((
                    redis::ErrorKind::Parse,
                    "ledger batch answered with the wrong number of replies",
                    format!("{} for {} operations", replies.len(), batch.len()),
                ));
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(err.clone()));
                }
            }
            Err(err) => {
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Sends an operation's lone form (see [`LoneForm`]): whether its `HSETNX` wrote the field.
async fn lone_write(conn: &RedisConn, key: &str, lone: &LoneForm) -> Result<bool, RedisError> {
    let mut pipe = redis::pipe();
    if let Some(clear) = &lone.clear {
        pipe.cmd("DEL").arg(clear).ignore();
    }
    pipe.cmd("HSETNX").arg(key).arg(lone.field).arg(&lone.value);
    let (written,): (i64,) = pipe.query_async(&mut conn.clone()).await?;
    Ok(written == 1)
}

/// One operation's reply; `{'!error', message}` when it raised an error (its effects so far
/// stay; the other operations of the batch were not affected).
fn operation_result(reply: Value) -> Result<Value, RedisError> {
    if let Value::Array(items) = &reply
        && let [Value::BulkString(marker), Value::BulkString(message)] = items.as_slice()
        && marker.as_slice() == b"!error"
    {
        return Err(RedisError::from((
            redis::ErrorKind::Extension,
            "ledger operation failed",
            String::from_utf8_lossy(message).into_owned(),
        )));
    }
    Ok(reply)
}

/// An operation that failed with `READONLY`: the node is a replica.
fn reports_readonly(reply: &Value) -> bool {
    matches!(reply, Value::Array(items)
        if matches!(items.as_slice(), [Value::BulkString(marker), Value::BulkString(message)]
            if marker.as_slice() == b"!error" && message.starts_with(b"READONLY")))
}

/// The batch script's `EVALSHA`: the shared keys, then each operation's three keys; the
/// caller's clock, then each operation's kind, argument count, arguments, events and the
/// delivery to acknowledge ('' for none).
fn batch_command(shared_keys: &[String], batch: &[Pending]) -> redis::Cmd {
    let mut evalsha = redis::cmd("EVALSHA");
    evalsha
        .arg(BATCH.get_hash())
        .arg(shared_keys.len() + 3 * batch.len())
        .arg(shared_keys);
    for Pending { op, .. } in batch {
        evalsha
            .arg(&op.order_key)
            .arg(&op.aux_key)
            .arg(&op.events_key);
    }
    evalsha.arg(crate::queue::now_ms());
    for Pending { op, .. } in batch {
        match &op.at_send {
            Some(readings) => evalsha
                .arg(op.kind)
                .arg(op.args.len() + 2)
                .arg(&op.args)
                .arg(&readings.args()),
            None => evalsha.arg(op.kind).arg(op.args.len()).arg(&op.args),
        };
        evalsha.arg(op.events.len());
        if !op.events.is_empty() {
            evalsha.arg(op.list_ttl_ms).arg(&op.events);
        }
        match &op.ack {
            Some((ack, replies)) => evalsha
                .arg(&ack.entry_id)
                .arg(&ack.group)
                .arg(&ack.consumer)
                .arg(*replies)
                .arg(if ack.follows { "1" } else { "0" }),
            None => evalsha.arg(""),
        };
    }
    evalsha
}

/// Runs the batch script, with `WAIT` after it in the same pipeline when `replication` asks
/// for confirmation; true when at least `replicas` replicas confirmed the batch's writes
/// within the timeout (always true without it).
async fn apply_batch(
    conn: &RedisConn,
    shared_keys: &[String],
    batch: &[Pending],
    replication: Option<Replication>,
) -> Result<(BatchReply, bool), RedisError> {
    let mut pipe = redis::pipe();
    pipe.add_command(batch_command(shared_keys, batch));
    if let Some(wanted) = replication {
        let timeout_ms = u64::try_from(wanted.timeout.as_millis()).unwrap_or(u64::MAX);
        pipe.cmd("WAIT").arg(wanted.replicas).arg(timeout_ms.max(1));
    }
    let mut conn = conn.clone();
    let answered: Result<Vec<Value>, RedisError> = pipe.query_async(&mut conn).await;
    let mut answers = match answered {
        Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            // The script did not run (a restarted or flushed server): load it, send again.
            BATCH.prepare_invoke().load_async(&mut conn).await?;
            pipe.query_async(&mut conn).await?
        }
        other => other?,
    }
    .into_iter();
    let replies: BatchReply = redis::from_redis_value(answers.next().unwrap_or(Value::Nil))?;
    let confirmed = match (replication, answers.next()) {
        (Some(wanted), Some(Value::Int(count))) => count >= i64::from(wanted.replicas),
        (Some(_), _) => false,
        (None, _) => true,
    };
    Ok((replies, confirmed))
}
