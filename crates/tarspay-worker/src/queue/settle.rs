//! Writing handler outcomes to Redis: acknowledgements, retries and deaths are batched into one
//! Lua call (up to `settle_batch` per call), and each caller waits until its outcome is durable.

use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use crate::queue::backoff::redis_backoff;
use crate::queue::envelope::Envelope;
use crate::queue::inflight::InFlight;
use crate::queue::shared::Shared;
use crate::queue::{QueueError, scripts};

/// What to do with one delivered entry.
#[derive(Debug, Clone)]
pub(crate) enum Settlement {
    /// Done: acknowledge, delete, release the unique key.
    Done {
        entry_id: String,
        unique: Option<String>,
        job_id: String,
    },
    /// Acknowledge and put the job (with its new attempt count) back after a delay, measured
    /// from the moment Redis writes it, on the server's clock.
    Retry {
        entry_id: String,
        delay_ms: u64,
        envelope: String,
    },
    /// Acknowledge and move the job to the dead stream.
    Dead {
        entry_id: String,
        reason: String,
        envelope: String,
    },
}

impl Settlement {
    /// The job id, if known (a buried entry may not decode).
    pub(crate) fn job_id(&self) -> Option<String> {
        match self {
            Self::Done { job_id, .. } => Some(job_id.clone()),
            Self::Retry { envelope, .. } | Self::Dead { envelope, .. } => {
                Envelope::decode(envelope).ok().map(|e| e.id)
            }
        }
    }

    /// "done", "retry" or "dead", for logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Done { .. } => "done",
            Self::Retry { .. } => "retry",
            Self::Dead { .. } => "dead",
        }
    }

    pub(crate) fn entry_id(&self) -> &str {
        match self {
            Self::Done { entry_id, .. }
            | Self::Retry { entry_id, .. }
            | Self::Dead { entry_id, .. } => entry_id,
        }
    }
}

pub(crate) struct Request {
    settlement: Option<Settlement>,
    reply: Option<oneshot::Sender<()>>,
}

/// Sends settlements to the worker's settler task.
#[derive(Clone, Debug)]
pub(crate) struct SettleHandle {
    tx: mpsc::UnboundedSender<Request>,
}

impl SettleHandle {
    pub(crate) fn channel() -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Queues a settlement and waits until it is written.
    pub(crate) async fn settle(&self, settlement: Settlement) -> Result<(), QueueError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Request {
                settlement: Some(settlement),
                reply: Some(reply),
            })
            .map_err(|_| QueueError::SettlerStopped)?;
        done.await.map_err(|_| QueueError::SettlerStopped)
    }

    /// Queues a settlement without waiting for it.
    pub(crate) fn settle_detached(&self, settlement: Settlement) -> Result<(), QueueError> {
        self.tx
            .send(Request {
                settlement: Some(settlement),
                reply: None,
            })
            .map_err(|_| QueueError::SettlerStopped)
    }

    /// Waits until everything queued before this call is written.
    pub(crate) async fn flush(&self) -> Result<(), QueueError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Request {
                settlement: None,
                reply: Some(reply),
            })
            .map_err(|_| QueueError::SettlerStopped)?;
        done.await.map_err(|_| QueueError::SettlerStopped)
    }
}

/// The settler task: drains the channel in batches and writes each batch, retrying on Redis
/// failures until it succeeds (an outcome is never dropped while the process lives).
pub(crate) async fn run_settler(
    shared: Arc<Shared>,
    consumer: String,
    inflight: InFlight,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    let max = shared.config.settle_batch;
    let mut batch: Vec<Settlement> = Vec::with_capacity(max);
    let mut replies = Vec::with_capacity(max);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(request) = next.take() {
            if let Some(settlement) = request.settlement {
                batch.push(settlement);
            }
            if let Some(reply) = request.reply {
                replies.push(reply);
            }
            if batch.len() < max {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            write_until_done(&shared, &consumer, &batch).await;
            inflight.remove(batch.iter().map(Settlement::entry_id));
        }
        for reply in replies.drain(..) {
            let _ = reply.send(());
        }
        batch.clear();
    }
}

async fn write_until_done(shared: &Shared, consumer: &str, batch: &[Settlement]) {
    let mut backoff = redis_backoff();
    loop {
        match write_batch(shared, consumer, batch).await {
            Ok(()) => return,
            Err(e) if e.is_no_group() => {
                // The group vanished (Redis restarted empty, say), and with it every
                // delivery: recreated, the next write finds these settlements stale and
                // drops them. Retrying as it was would never succeed, and jobs waiting on it
                // would keep the worker from fetching the group's recreation.
                tracing::warn!(
                    jobs = batch.len(),
                    "settling jobs found no consumer group; recreating it"
                );
                if let Err(e) = shared.ensure_group().await {
                    tracing::warn!(error = %e, "cannot recreate the consumer group");
                }
                // Backed off all the same: a group that keeps vanishing is no hot loop.
                let wait = backoff.next().unwrap_or(std::time::Duration::from_secs(2));
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(std::time::Duration::from_secs(2));
                tracing::warn!(error = %e, ?wait, jobs = batch.len(), "settling jobs failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn write_batch(
    shared: &Shared,
    consumer: &str,
    batch: &[Settlement],
) -> Result<(), QueueError> {
    let keys = &shared.keys;
    let mut invocation = scripts::SETTLE.prepare_invoke();
    invocation
        .key(&keys.stream)
        .key(&keys.delayed)
        .key(&keys.dead)
        .key(&keys.unique)
        .arg(&keys.group)
        .arg(consumer)
        .arg(shared.config.dead_max_len);
    for settlement in batch {
        match settlement {
            Settlement::Done {
                entry_id,
                unique,
                job_id,
            } => invocation
                .arg("a")
                .arg(entry_id)
                .arg(unique.as_deref().unwrap_or(""))
                .arg(job_id)
                .arg(""),
            Settlement::Retry {
                entry_id,
                delay_ms,
                envelope,
            } => invocation
                .arg("r")
                .arg(entry_id)
                .arg(*delay_ms)
                .arg(envelope)
                .arg(""),
            Settlement::Dead {
                entry_id,
                reason,
                envelope,
            } => invocation
                .arg("d")
                .arg(entry_id)
                .arg(reason)
                .arg(envelope)
                .arg(consumer),
        };
    }
    let mut conn = shared.conn.clone();
    let (_settled, stale): (i64, Vec<String>) = invocation.invoke_async(&mut conn).await?;
    if !stale.is_empty() {
        report_stale_batch(consumer, batch, &stale);
    }
    Ok(())
}

/// Settlements dropped because this worker no longer owns their entries: it stalled past the
/// orphan timeout and another worker took them over (that worker settles them).
fn report_stale_batch(consumer: &str, batch: &[Settlement], stale: &[String]) {
    for entry_id in stale {
        let settlement = batch.iter().find(|s| s.entry_id() == entry_id);
        let job_id = settlement.and_then(Settlement::job_id).unwrap_or_default();
        let outcome = settlement.map(Settlement::kind).unwrap_or("unknown");
        report_stale(consumer, entry_id, &job_id, outcome);
    }
}

/// One settlement dropped because its entry is no longer this worker's (see
/// [`report_stale_batch`]; a ledger step that meant to acknowledge its job reports the same).
pub(crate) fn report_stale(consumer: &str, entry_id: &str, job_id: &str, outcome: &str) {
    metrics::counter!(crate::metrics::QUEUE_STALE_SETTLEMENTS).increment(1);
    tracing::warn!(
        %job_id,
        %entry_id,
        outcome,
        consumer,
        "stale settlement dropped: the entry is no longer held by this worker (taken over after the orphan timeout); its new holder settles it, or the step that made its order final acknowledged it"
    );
}
