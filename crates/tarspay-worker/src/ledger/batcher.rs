//! Group commit for ledger changes: operations from concurrent callers are applied by one
//! `EVALSHA` of the batch script while the previous batch is in flight, so a busy worker pays
//! one script call, one clock read and one pause check per batch instead of per operation. An
//! idle one pays no extra latency: a lone operation is sent at once.
//!
//! Operations in a batch are independent (different orders or not); the batch runs atomically.
//! An operation that raises an error (a key of the wrong type) answers its own caller with it,
//! and the rest of the batch goes on; a failed call (connection lost) fails every operation of
//! the batch. Each caller decides, exactly as with a lone script, whether to retry: every
//! operation is safe to repeat (a repeated milestone is refused by its write-once field).

use super::scripts::BATCH;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use tokio::sync::{mpsc, oneshot};

/// Most operations one script call applies.
const MAX_BATCH: usize = 128;

/// One ledger operation: what the batch script is told to do for one caller.
pub(crate) struct Op {
    /// One letter, see the script's `ops` table.
    pub kind: &'static str,
    pub order_key: String,
    /// The batch set for a registration; otherwise the order key again.
    pub aux_key: String,
    pub args: Vec<String>,
}

/// An operation waiting for its batch, and where its reply goes.
struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<Value, RedisError>>,
}

impl Op {
    pub fn new(kind: &'static str, order_key: String, aux_key: Option<String>) -> Self {
        Self {
            kind,
            aux_key: aux_key.unwrap_or_else(|| order_key.clone()),
            order_key,
            args: Vec::new(),
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
    pub fn start(conn: ConnectionManager, shared_keys: Vec<String>) -> Self {
        debug_assert_eq!(shared_keys.len(), super::scripts::SHARED_KEYS);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, shared_keys, rx));
        Self { tx }
    }

    /// Applies one operation (in some batch) and returns its reply.
    pub async fn apply(&self, op: Op) -> Result<Value, RedisError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || RedisError::from((redis::ErrorKind::Io, "ledger batcher stopped"));
        self.tx.send(Pending { op, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    conn: ConnectionManager,
    shared_keys: Vec<String>,
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
        match apply_batch(&conn, &shared_keys, &batch).await {
            Ok(replies) if replies.len() == batch.len() => {
                for (pending, reply) in batch.drain(..).zip(replies) {
                    let _ = pending.reply.send(operation_result(reply));
                }
            }
            Ok(replies) => {
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

async fn apply_batch(
    conn: &ConnectionManager,
    shared_keys: &[String],
    batch: &[Pending],
) -> Result<Vec<Value>, RedisError> {
    let mut invocation = BATCH.prepare_invoke();
    for key in shared_keys {
        invocation.key(key);
    }
    for Pending { op, .. } in batch {
        invocation.key(&op.order_key).key(&op.aux_key);
    }
    invocation.arg(crate::queue::now_ms());
    for Pending { op, .. } in batch {
        invocation.arg(op.kind).arg(op.args.len());
        for arg in &op.args {
            invocation.arg(arg);
        }
    }
    invocation.invoke_async(&mut conn.clone()).await
}
