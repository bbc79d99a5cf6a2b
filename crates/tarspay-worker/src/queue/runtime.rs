//! Per-worker state of the backend: the channels between fetcher, handler and settler, the
//! in-flight set, and the loops' handles. Created when apalis asks for the middleware.

use apalis::prelude::Task;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::queue::inflight::InFlight;
use crate::queue::settle::{Request, SettleHandle};
use crate::queue::worker_identity;

/// Per-worker state, created when apalis asks for the backend's middleware.
pub(crate) struct WorkerRuntime<T> {
    pub(crate) consumer: String,
    pub(crate) settle: SettleHandle,
    pub(crate) settle_rx: Option<mpsc::UnboundedReceiver<Request>>,
    pub(crate) tx: Option<mpsc::Sender<Task<T>>>,
    pub(crate) rx: Option<mpsc::Receiver<Task<T>>>,
    pub(crate) inflight: InFlight,
    pub(crate) stop: CancellationToken,
    pub(crate) fetcher: Option<JoinHandle<()>>,
    pub(crate) renewer: Option<JoinHandle<()>>,
    pub(crate) promoter: Option<JoinHandle<()>>,
    pub(crate) started: bool,
    /// Behind a mutex only so the queue handle is `Sync` (handlers share it to enqueue);
    /// it is only touched through `&mut self`.
    pub(crate) closing: std::sync::Mutex<Option<BoxFuture<'static, ()>>>,
}

impl<T> WorkerRuntime<T> {
    pub(crate) fn new(worker_name: &str, prefetch: usize) -> Self {
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
            promoter: None,
            started: false,
            closing: std::sync::Mutex::new(None),
        }
    }
}

/// The close future, reached through `&mut` (no locking happens).
pub(crate) fn closing_slot<T>(
    runtime: &mut WorkerRuntime<T>,
) -> &mut Option<BoxFuture<'static, ()>> {
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
