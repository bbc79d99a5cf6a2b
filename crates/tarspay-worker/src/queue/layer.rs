//! The backend's layer: runs outside the user's middleware, turns the handler's result into a
//! settlement (done / retry after a delay / dead) and waits until Redis has it, so a job is
//! acknowledged only after its handler's effect is committed (or, for a payout job, by the
//! ledger step that commits it: then there is nothing left to settle). Each execution, settlement
//! included, runs in a `job` span (see [`job_span`]).

use apalis::prelude::{AbortError, BoxDynError, DeferredError, RetryAfterError, Task};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::queue::QueueConfig;
use crate::queue::backoff::full_jitter;
use crate::queue::delivery::Delivery;
use crate::queue::settle::Settlement;

/// A job that another worker took over while it waited in this worker's fetch buffer.
#[derive(Debug, thiserror::Error)]
#[error("taken over by another worker before it started here; not started")]
struct TakenOverBeforeStart;

/// Defaults for errors that carry no decision of their own.
#[derive(Debug, Clone, Copy)]
struct RetryDefaults {
    base: Duration,
    max: Duration,
}

/// Layer that settles each job after the inner service returns, through the settler of the
/// queue (partition) its delivery came from.
#[derive(Debug, Clone)]
pub struct SettleLayer {
    defaults: RetryDefaults,
    queue: Arc<str>,
}

impl SettleLayer {
    pub(crate) fn new(config: &QueueConfig) -> Self {
        Self {
            defaults: RetryDefaults {
                base: config.retry_base,
                max: config.retry_max,
            },
            queue: config.label().into(),
        }
    }
}

impl<S> Layer<S> for SettleLayer {
    type Service = SettleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SettleService {
            inner,
            defaults: self.defaults,
            queue: self.queue.clone(),
        }
    }
}

/// Service produced by [`SettleLayer`].
#[derive(Debug, Clone)]
pub struct SettleService<S> {
    inner: S,
    defaults: RetryDefaults,
    queue: Arc<str>,
}

impl<S, T> Service<Task<T>> for SettleService<S>
where
    S: Service<Task<T>>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<T>) -> Self::Future {
        let delivery = task.data().get::<Delivery>().cloned();
        let attempt = task.raw_attempt().clone();
        let defaults = self.defaults;
        let span = job_span(&self.queue, delivery.as_ref());
        let fut = span.in_scope(|| self.inner.call(task));
        async move {
            if let Some(delivery) = &delivery
                && delivery.taken_over_before_start().await
            {
                // Not polled, so never started: the job is its new holder's.
                drop(fut);
                delivery.dropped_before_start();
                return Err(TakenOverBeforeStart.into());
            }
            let result = fut.await.map_err(Into::into);
            if let Some(delivery) = delivery.filter(|d| !settled_in_step(d, &result)) {
                // The lifecycle layer has counted this attempt (and any in-process retries).
                let attempts = u32::try_from(attempt.current()).unwrap_or(u32::MAX);
                let settlement = decide(&result, &delivery, attempts, defaults);
                if let Err(e) = delivery.settler().settle(settlement).await {
                    tracing::error!(error = %e, job_id = delivery.job_id(), "job outcome not written; it will run again");
                }
            }
            result
        }
        .instrument(span)
        .boxed()
    }
}

/// Whether a ledger step already acknowledged the delivery with the job's last effect (see
/// `Delivery::ack_in`): then there is nothing to settle. A handler acknowledges that way only
/// on its way to success; should it fail afterwards, the job is still done (its effect is
/// written) and a retry could not be settled anyway (the entry is no longer pending).
fn settled_in_step<R>(delivery: &Delivery, result: &Result<R, BoxDynError>) -> bool {
    let settled = delivery.is_settled();
    if settled && let Err(error) = result {
        tracing::error!(job_id = delivery.job_id(), %error, "job failed after a ledger step acknowledged it: not retried");
    }
    settled
}

/// The span one execution runs in: `queue`, `id` (the job id given at enqueue), `attempt` (1
/// for the first, counting crashed deliveries). The
/// handler knows its job and records `kind` and `mch_order_no` with [`record_job`].
///
/// It is a `debug` span, as tower-http's request spans are: the log layer formats a span's
/// fields when it opens, which costs a no-op job about a sixth of its CPU (docs/performance.md).
/// Logs show it with `RUST_LOG=info,tarspay_worker::queue=debug`; span export always takes it
/// (see `telemetry`). Text fields use `Display`, which the log layer does not escape.
fn job_span(queue: &str, delivery: Option<&Delivery>) -> tracing::Span {
    use tracing::field::Empty;
    match delivery {
        Some(delivery) => tracing::debug_span!(
            "job",
            queue = %queue,
            kind = Empty,
            id = %delivery.job_id(),
            mch_order_no = Empty,
            attempt = delivery.attempts_before().saturating_add(1),
        ),
        None => tracing::debug_span!("job", queue = %queue, kind = Empty, mch_order_no = Empty),
    }
}

/// A handler's "not started": the job goes back to its queue at once, as it was, without
/// counting the attempt (say, a worker stopping before the job touched anything).
#[derive(Debug, thiserror::Error)]
#[error("given back unstarted")]
pub struct GiveBack;

/// A handler's "this job goes on as another one": the entry is settled as a retry whose
/// envelope keeps the job's id and unique key but carries `payload` and `attempts` (the new
/// job's attempts already made) instead, due after `delay`. A create job that polled its
/// accepted order in hand goes on as the order's poll job this way, in the same atomic
/// settlement that acknowledges it: the order is never left between the two jobs.
#[derive(Debug, thiserror::Error)]
#[error("goes on as another job after {delay:?}")]
pub struct ContinueAs {
    pub payload: Box<serde_json::value::RawValue>,
    pub attempts: u32,
    pub delay: Duration,
}

/// Records the job's kind and order number on the `job` span the handler runs in.
pub fn record_job(kind: &'static str, mch_order_no: Option<&str>) {
    let span = tracing::Span::current();
    span.record("kind", kind);
    if let Some(mch_order_no) = mch_order_no {
        span.record("mch_order_no", tracing::field::display(mch_order_no));
    }
}

fn decide<R>(
    result: &Result<R, BoxDynError>,
    delivery: &Delivery,
    attempts: u32,
    defaults: RetryDefaults,
) -> Settlement {
    let entry_id = delivery.entry_id().to_owned();
    let error = match result {
        Ok(_) => {
            return Settlement::Done {
                entry_id,
                unique: delivery.unique_key().map(str::to_owned),
                job_id: delivery.job_id().to_owned(),
            };
        }
        Err(error) => error,
    };
    let given_back = error.downcast_ref::<GiveBack>().is_some();
    let mut envelope = delivery.envelope().clone();
    // Another job now: its own attempts, never the dead stream for this job's.
    if let Some(next) = error.downcast_ref::<ContinueAs>() {
        envelope.payload = next.payload.clone();
        envelope.attempts = next.attempts;
        return Settlement::Retry {
            entry_id,
            delay_ms: u64::try_from(next.delay.as_millis()).unwrap_or(u64::MAX),
            envelope: envelope
                .encode()
                .unwrap_or_else(|_| delivery.payload_json().to_owned()),
        };
    }
    // A job given back unstarted keeps the attempts it had.
    envelope.attempts = if given_back {
        delivery.attempts_before()
    } else {
        attempts
    };
    let stored = || {
        envelope
            .encode()
            .unwrap_or_else(|_| delivery.payload_json().to_owned())
    };
    if given_back {
        return Settlement::Retry {
            entry_id,
            delay_ms: 0,
            envelope: stored(),
        };
    }
    if error.downcast_ref::<AbortError>().is_some() {
        return Settlement::Dead {
            entry_id,
            reason: format!("given up after {attempts} attempts: {error}"),
            envelope: stored(),
        };
    }
    if attempts >= delivery.max_attempts() {
        return Settlement::Dead {
            entry_id,
            reason: format!(
                "attempts exhausted ({attempts} of {}): {error}",
                delivery.max_attempts()
            ),
            envelope: stored(),
        };
    }
    let delay = if let Some(retry) = error.downcast_ref::<RetryAfterError>() {
        retry.get_duration()
    } else if error.downcast_ref::<DeferredError>().is_some() {
        Duration::ZERO
    } else {
        full_jitter(defaults.base, defaults.max, attempts)
    };
    tracing::debug!(job_id = delivery.job_id(), attempts, ?delay, %error, "job will be retried");
    Settlement::Retry {
        entry_id,
        delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        envelope: stored(),
    }
}
