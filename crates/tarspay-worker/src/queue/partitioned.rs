//! One apalis backend over every partition of a queue (see `crate::partition`): each
//! partition keeps its own fetch loop, settler and renewer (promotion, orphan claiming and
//! group commit stay per partition, in its hash tag), and the worker takes the next job
//! round-robin over the partitions that have one. The worker's concurrency (the jobs it
//! holds) is one budget for all of them, and a partition with a deep backlog cannot starve
//! the others: each turn starts at the partition after the one served last. (A payout
//! worker's gateway calls then take their slots in turn per merchant: `jobs::CallSlots`.)

use apalis::prelude::{Backend, Task, WorkerContext};
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::task::task_id::RandomId;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

use crate::queue::{QueueConfig, QueueError, RedisQueue, SettleLayer};

/// Closes a set of queues to this process for a while: its worker takes none of their
/// jobs (already fetched ones wait, renewed) until the gate opens. A merchant over its rate
/// limit closes its lanes' gate, so its backlog neither spins through the handlers nor holds
/// the concurrency other merchants' jobs need. Local to the process; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<AtomicU64>);

/// The instant gates count from (a gate stores milliseconds since it).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Gate {
    /// Takes no job of the gated queues for `for_` (a later opening than one already set wins).
    pub fn close_for(&self, for_: Duration) {
        let until = (Instant::now() + for_).duration_since(epoch()).as_millis() as u64;
        self.0.fetch_max(until, Ordering::Relaxed);
    }

    /// When the gate opens, if it is closed now.
    fn closed_until(&self) -> Option<Instant> {
        let until = epoch() + Duration::from_millis(self.0.load(Ordering::Relaxed));
        (until > Instant::now()).then_some(until)
    }
}

/// The partitions of one queue, consumed as one.
pub struct Partitioned<T> {
    queues: Vec<RedisQueue<T>>,
    /// Each queue's gate, if it has one.
    gates: Vec<Option<Gate>>,
    /// Wakes the worker when the earliest closed gate opens.
    reopen: Option<Pin<Box<Sleep>>>,
    /// The partition whose turn it is.
    next: usize,
    /// Partitions whose close finished (a finished close must not be polled again).
    closed: Vec<bool>,
}

impl<T> Partitioned<T> {
    /// `queues` must be the partitions of one queue (same job type and settings), at least
    /// one.
    pub fn new(queues: Vec<RedisQueue<T>>) -> Result<Self, QueueError> {
        if queues.is_empty() {
            return Err(QueueError::InvalidConfig(
                "a partitioned queue needs at least one partition".into(),
            ));
        }
        let closed = vec![false; queues.len()];
        Ok(Self {
            gates: vec![None; queues.len()],
            reopen: None,
            queues,
            next: 0,
            closed,
        })
    }

    /// With a gate per queue (same order as the queues; `None` for an ungated one).
    pub fn with_gates(mut self, gates: Vec<Option<Gate>>) -> Result<Self, QueueError> {
        if gates.len() != self.queues.len() {
            return Err(QueueError::InvalidConfig(
                "one gate (or none) per partition queue".into(),
            ));
        }
        self.gates = gates;
        Ok(self)
    }
}

impl<T: DeserializeOwned + Send + 'static> Backend for Partitioned<T> {
    type Task = Task<T>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        for queue in &mut self.queues {
            queue.start(worker);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        let count = self.queues.len();
        let mut open = 0;
        let mut reopen: Option<Instant> = None;
        for turn in 0..count {
            let index = (self.next + turn) % count;
            let queue = &mut self.queues[index];
            queue.start(worker);
            if let Some(until) = self.gates[index].as_ref().and_then(Gate::closed_until) {
                // Not polled, so its jobs cannot wake us: the timer below does, at opening.
                reopen = Some(reopen.map_or(until, |r| r.min(until)));
                open += 1;
                continue;
            }
            let Some(rx) = queue.runtime(worker).rx.as_mut() else {
                continue;
            };
            // Every pending receiver registers the waker: a job in any partition wakes us.
            match rx.poll_recv(cx) {
                Poll::Ready(Some(task)) => {
                    self.next = (index + 1) % count;
                    return Poll::Ready(Some(Ok(task)));
                }
                Poll::Ready(None) => {}
                Poll::Pending => open += 1,
            }
        }
        if open == 0 {
            return Poll::Ready(None);
        }
        if let Some(until) = reopen {
            let timer = self
                .reopen
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            timer.as_mut().reset(until);
            // Registers the waker; a gate that has opened meanwhile is seen on the next poll.
            if timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        // Every partition closes at once (each releases its prefetched jobs and flushes its
        // settlements); done when all are.
        for (queue, closed) in self.queues.iter_mut().zip(&mut self.closed) {
            if !*closed {
                match Backend::poll_close(queue, cx, worker) {
                    Poll::Ready(Ok(())) => *closed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
        }
        if self.closed.iter().all(|&closed| closed) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> BackendConfig for Partitioned<T> {
    type Args = T;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = QueueConfig;
    type Layer = SettleLayer;

    fn config(&self) -> &Self::Config {
        self.queues[0].config()
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        // Each delivery settles through its own partition's settler (see `Delivery`).
        for queue in &mut self.queues {
            queue.runtime(worker);
        }
        SettleLayer::new(self.queues[0].config())
    }
}

#[cfg(test)]
mod tests {
    use super::Gate;
    use std::time::Duration;

    #[tokio::test]
    async fn a_gate_closes_for_the_longest_time_asked_and_opens_by_itself() {
        let gate = Gate::default();
        assert!(gate.closed_until().is_none(), "a new gate is open");
        gate.close_for(Duration::from_millis(200));
        gate.close_for(Duration::from_millis(50));
        let until = gate.closed_until().expect("closed");
        let left = until - tokio::time::Instant::now();
        assert!(
            left > Duration::from_millis(100),
            "the later opening wins: {left:?}"
        );
        let shared = gate.clone();
        tokio::time::sleep(left + Duration::from_millis(5)).await;
        assert!(
            shared.closed_until().is_none(),
            "open again, for every clone"
        );
    }
}
