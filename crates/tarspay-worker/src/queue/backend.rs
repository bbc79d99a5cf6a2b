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

use crate::queue::backoff::redis_backoff;
use crate::queue::delivery::Delivery;
use crate::queue::delivery::Holder;
use crate::queue::fetch::Fetcher;
use crate::queue::promoter::{Handover, run_promoter};
use crate::queue::renew::run_renewer;
use crate::queue::runtime::{WorkerRuntime, closing_slot};
use crate::queue::settle::run_settler;
use crate::queue::shared::Shared;
use crate::queue::{QueueConfig, QueueError, RedisQueue, SettleLayer, scripts};

impl<T: DeserializeOwned + Send + 'static> RedisQueue<T> {
    pub(crate) fn runtime(&mut self, worker: &WorkerContext) -> &mut WorkerRuntime<T> {
        let prefetch = self.shared.config.prefetch;
        self.runtime
            .get_or_insert_with(|| WorkerRuntime::new(worker.name(), prefetch))
    }

    /// The consumer name of this worker, once apalis started it.
    pub fn consumer_name(&self) -> Option<&str> {
        self.runtime.as_ref().map(|r| r.consumer.as_str())
    }

    pub(crate) fn start(&mut self, worker: &WorkerContext) {
        let shared = Arc::clone(&self.shared);
        let fetch_stop_on = self.fetch_stop.clone();
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
        let (due_times, markers) = tokio::sync::mpsc::unbounded_channel();
        runtime.promoter = Some(tokio::spawn(run_promoter(
            Arc::clone(&shared),
            runtime.consumer.clone(),
            markers,
            runtime.stop.clone(),
        )));
        if let Some(tx) = runtime.tx.take() {
            // The fetch loop ends with the runtime, or as soon as the pool starts to stop.
            let fetch_stop = runtime.stop.child_token();
            if let Some(pool_stopping) = fetch_stop_on.clone() {
                let fetch_stop = fetch_stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = pool_stopping.cancelled() => fetch_stop.cancel(),
                        () = fetch_stop.cancelled() => {}
                    }
                });
            }
            let fetcher = Fetcher {
                shared: Arc::clone(&shared),
                consumer: runtime.consumer.clone(),
                tx,
                settle: runtime.settle.clone(),
                inflight: runtime.inflight.clone(),
                stop: fetch_stop,
                due_times: due_times.clone(),
                holder: Arc::new(Holder {
                    stream: shared.keys.stream.clone(),
                    group: shared.keys.group.clone(),
                    consumer: runtime.consumer.clone(),
                    paused: shared.keys.paused.clone(),
                    inflight: runtime.inflight.clone(),
                    due_times,
                    stop: runtime.stop.clone(),
                    handover: Handover::new(shared.conn.clone(), shared.keys.wake.clone()),
                    conn: shared.conn.clone(),
                    orphan_timeout: shared.config.orphan_timeout,
                }),
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
        let promoter = runtime.promoter.take();
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
            if let Some(promoter) = promoter {
                let _ = promoter.await;
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
pub(crate) async fn release_unstarted(shared: &Shared, consumer: &str, ids: &[String]) {
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
        // The runtime (and its settler) exists from here on.
        self.runtime(worker);
        SettleLayer::new(&self.shared.config)
    }
}
