//! One apalis backend over every partition of a queue (see `crate::partition`): each
//! partition keeps its own fetch loop, settler and renewer (promotion, orphan claiming and
//! group commit stay per partition, in its hash tag), and the worker takes the next job
//! round-robin over the partitions that have one. The worker's concurrency is one budget
//! for all of them, and a partition with a deep backlog cannot starve the others: each turn
//! starts at the partition after the one served last.

use apalis::prelude::{Backend, Task, WorkerContext};
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::task::task_id::RandomId;
use serde::de::DeserializeOwned;
use std::task::{Context, Poll};

use crate::queue::{QueueConfig, QueueError, RedisQueue, SettleLayer};

/// The partitions of one queue, consumed as one.
pub struct Partitioned<T> {
    queues: Vec<RedisQueue<T>>,
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
            queues,
            next: 0,
            closed,
        })
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
        for turn in 0..count {
            let index = (self.next + turn) % count;
            let queue = &mut self.queues[index];
            queue.start(worker);
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
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
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
