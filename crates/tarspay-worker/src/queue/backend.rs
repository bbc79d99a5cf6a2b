//! apalis `Backend` for [`RedisQueue`]: each worker gets a fetch loop feeding a bounded buffer, a
//! settler writing outcomes, and a renewer keeping its entries and heartbeat fresh. The
//! acknowledging layer is [`SettleLayer`], returned as the backend's middleware.

use apalis::prelude::{Backend, Task, WorkerContext};
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::task::task_id::RandomId;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::queue::backoff::redis_backoff;
use crate::queue::envelope::Envelope;
use crate::queue::fetch::Fetcher;
use crate::queue::inflight::InFlight;
use crate::queue::renew::run_renewer;
use crate::queue::settle::{Request, SettleHandle, run_settler};
use crate::queue::storage::Shared;
use crate::queue::{QueueConfig, QueueError, RedisQueue, SettleLayer, scripts, worker_identity};

/// The stored delivery behind a task; handlers can read it with `Data<Delivery>`.
#[derive(Debug, Clone)]
pub struct Delivery(Arc<DeliveryInner>);

#[derive(Debug)]
struct DeliveryInner {
    entry_id: String,
    envelope: Envelope,
    attempts_before: u32,
    max_attempts: u32,
}

impl Delivery {
    pub(crate) fn new(
        entry_id: String,
        envelope: Envelope,
        attempts_before: u32,
        max_attempts: u32,
    ) -> Self {
        Self(Arc::new(DeliveryInner {
            entry_id,
            envelope,
            attempts_before,
            max_attempts,
        }))
    }

    /// The job id given at enqueue.
    pub fn job_id(&self) -> &str {
        &self.0.envelope.id
    }

    /// The stream entry id of this delivery.
    pub fn entry_id(&self) -> &str {
        &self.0.entry_id
    }

    /// Attempts made before this one (retries and crash redeliveries).
    pub fn attempts_before(&self) -> u32 {
        self.0.attempts_before
    }

    /// The job's ceiling on attempts.
    pub fn max_attempts(&self) -> u32 {
        self.0.max_attempts
    }

    /// The unique key the job holds, if any.
    pub fn unique_key(&self) -> Option<&str> {
        self.0.envelope.unique.as_deref()
    }

    /// The job's stored JSON.
    pub fn payload_json(&self) -> &str {
        self.0.envelope.payload.get()
    }

    pub(crate) fn envelope(&self) -> &Envelope {
        &self.0.envelope
    }
}

/// Per-worker state, created when apalis asks for the backend's middleware.
pub(crate) struct WorkerRuntime<T> {
    consumer: String,
    settle: SettleHandle,
    settle_rx: Option<mpsc::UnboundedReceiver<Request>>,
    tx: Option<mpsc::Sender<Task<T>>>,
    rx: Option<mpsc::Receiver<Task<T>>>,
    inflight: InFlight,
    stop: CancellationToken,
    fetcher: Option<JoinHandle<()>>,
    renewer: Option<JoinHandle<()>>,
    started: bool,
    /// Behind a mutex only so the queue handle is `Sync` (handlers share it to enqueue);
    /// it is only touched through `&mut self`.
    closing: std::sync::Mutex<Option<BoxFuture<'static, ()>>>,
}

impl<T> WorkerRuntime<T> {
    fn new(worker_name: &str, prefetch: usize) -> Self {
        let (settle, settle_rx) = SettleHandle::channel();
        let (tx, rx) = mpsc::channel(prefetch);
        Self {
            consumer: worker_identity(worker_name),
            settle,
            settle_rx: Some(settle_rx),
            tx: Some(tx),
            rx: Some(rx),
            inflight: InFlight::default(),
            stop: CancellationToken::new(),
            fetcher: None,
            renewer: None,
            started: false,
            closing: std::sync::Mutex::new(None),
        }
    }
}

/// The close future, reached through `&mut` (no locking happens).
fn closing_slot<T>(runtime: &mut WorkerRuntime<T>) -> &mut Option<BoxFuture<'static, ()>> {
    runtime
        .closing
        .get_mut()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T> Drop for WorkerRuntime<T> {
    fn drop(&mut self) {
        // A worker dropped without a graceful close must not leave loops running.
        self.stop.cancel();
    }
}

impl<T: DeserializeOwned + Send + 'static> RedisQueue<T> {
    fn runtime(&mut self, worker: &WorkerContext) -> &mut WorkerRuntime<T> {
        let prefetch = self.shared.config.prefetch;
        self.runtime
            .get_or_insert_with(|| WorkerRuntime::new(worker.name(), prefetch))
    }

    /// The consumer name of this worker, once apalis started it.
    pub fn consumer_name(&self) -> Option<&str> {
        self.runtime.as_ref().map(|r| r.consumer.as_str())
    }

    fn start(&mut self, worker: &WorkerContext) {
        let shared = Arc::clone(&self.shared);
        let runtime = self.runtime(worker);
        if runtime.started {
            return;
        }
        runtime.started = true;
        tracing::info!(consumer = %runtime.consumer, stream = %shared.keys.stream, "queue worker starting");
        if let Some(settle_rx) = runtime.settle_rx.take() {
            tokio::spawn(run_settler(
                Arc::clone(&shared),
                runtime.consumer.clone(),
                runtime.inflight.clone(),
                settle_rx,
            ));
        }
        if let Some(tx) = runtime.tx.take() {
            let fetcher = Fetcher {
                shared: Arc::clone(&shared),
                consumer: runtime.consumer.clone(),
                tx,
                settle: runtime.settle.clone(),
                inflight: runtime.inflight.clone(),
                stop: runtime.stop.clone(),
            };
            runtime.fetcher = Some(tokio::spawn(fetcher.run()));
        }
        runtime.renewer = Some(tokio::spawn(run_renewer(
            shared,
            runtime.consumer.clone(),
            runtime.inflight.clone(),
            runtime.stop.clone(),
        )));
    }

    fn close_future(&mut self) -> BoxFuture<'static, ()> {
        let shared = Arc::clone(&self.shared);
        let Some(runtime) = self.runtime.as_mut() else {
            return futures::future::ready(()).boxed();
        };
        let stop = runtime.stop.clone();
        let fetcher = runtime.fetcher.take();
        let renewer = runtime.renewer.take();
        let rx = runtime.rx.take();
        let settle = runtime.settle.clone();
        let consumer = runtime.consumer.clone();
        async move {
            stop.cancel();
            if let Some(fetcher) = fetcher {
                let _ = fetcher.await;
            }
            let mut unstarted = Vec::new();
            if let Some(mut rx) = rx {
                rx.close();
                while let Ok(task) = rx.try_recv() {
                    if let Some(delivery) = task.data().get::<Delivery>() {
                        unstarted.push(delivery.entry_id().to_owned());
                    }
                }
            }
            release_unstarted(&shared, &consumer, &unstarted).await;
            if let Err(e) = settle.flush().await {
                tracing::warn!(error = %e, "flushing settlements at shutdown failed");
            }
            if let Some(renewer) = renewer {
                let _ = renewer.await;
            }
            let mut conn = shared.conn.clone();
            let removed: Result<i64, _> = redis::cmd("ZREM")
                .arg(&shared.keys.workers)
                .arg(&consumer)
                .query_async(&mut conn)
                .await;
            if let Err(e) = removed {
                tracing::debug!(error = %e, "removing heartbeat at shutdown failed");
            }
            tracing::info!(%consumer, released = unstarted.len(), "queue worker stopped");
        }
        .boxed()
    }
}

/// Gives prefetched jobs back so other workers need not wait for the orphan timeout. A few
/// tries only: if Redis is away, they are claimed as orphans later, which is still safe.
async fn release_unstarted(shared: &Shared, consumer: &str, ids: &[String]) {
    let mut backoff = redis_backoff().take(5);
    for chunk in ids.chunks(shared.config.settle_batch) {
        loop {
            let mut conn = shared.conn.clone();
            let invocation = shared.held_entries_call(&scripts::RELEASE, consumer, chunk);
            let released: Result<i64, _> = invocation.invoke_async(&mut conn).await;
            match released {
                Ok(_) => break,
                Err(e) => match backoff.next() {
                    Some(wait) => {
                        tracing::warn!(error = %e, "releasing prefetched jobs failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    None => {
                        tracing::warn!(error = %e, "prefetched jobs left for orphan recovery");
                        return;
                    }
                },
            }
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> Backend for RedisQueue<T> {
    type Task = Task<T>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        self.start(worker);
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        self.start(worker);
        match self.runtime(worker).rx.as_mut() {
            // Errors never surface here: apalis ends a worker on a backend error, so the fetch
            // loop retries internally instead.
            Some(rx) => rx.poll_recv(cx).map(|task| task.map(Ok)),
            None => Poll::Ready(None),
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        let idle = |r: &mut WorkerRuntime<T>| closing_slot(r).is_none();
        if self.runtime.as_mut().is_some_and(idle) {
            let closing = self.close_future();
            if let Some(runtime) = self.runtime.as_mut() {
                *closing_slot(runtime) = Some(closing);
            }
        }
        match self.runtime.as_mut().and_then(|r| closing_slot(r).as_mut()) {
            Some(closing) => closing.poll_unpin(cx).map(Ok),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> BackendConfig for RedisQueue<T> {
    type Args = T;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = QueueConfig;
    type Layer = SettleLayer;

    fn config(&self) -> &Self::Config {
        &self.shared.config
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        let config = self.shared.config.clone();
        let settle = self.runtime(worker).settle.clone();
        SettleLayer::new(settle, &config)
    }
}
