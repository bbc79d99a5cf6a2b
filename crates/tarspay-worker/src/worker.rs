//! The payout worker pool: an apalis worker on the payout queue whose handler runs the
//! create-payout and poll-status jobs and turns their [`Step`] into the queue's language
//! (acknowledge, or retry after a delay; an accepted order's poll job is queued by the ledger),
//! and, when webhooks are configured, a second apalis worker on the webhook queue.

use crate::config::Settings;
use crate::deployment::{DeploymentError, PAYOUT_QUEUE};
use crate::jobs::{
    CallSlots, JobContext, JobError, PayoutJob, PollsInHand, Step, run_create_payout,
    run_poll_status,
};
use crate::ledger::WEBHOOK_QUEUE;
use crate::queue::Partitioned;
use crate::webhooks::{Deliverer, WebhookError, WebhookSettings};
use apalis::layers::catch_panic::CatchPanicLayer;
use apalis::prelude::*;
use std::future::Future;
use std::sync::Arc;

/// Webhook deliveries in flight at once per worker process.
const WEBHOOK_CONCURRENCY: usize = 8;
/// Payout jobs a worker process holds per gateway call it may have in flight. A create holds
/// its call slot from just before its submit lease until the gateway's answer, a poll only
/// around its query; their other ledger steps (an acceptance, a poll's read and its final
/// state) overlap other jobs' calls. On a fast gateway those are about 40 % of a payout's
/// time: `bench e2e` ran fastest at 3 (docs/performance.md, "Call slots").
const JOBS_PER_CALL_SLOT: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Deployment(#[from] DeploymentError),
    #[error(transparent)]
    Start(#[from] crate::startup::StartError),
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error("worker stopped: {0}")]
    Runtime(String),
}

/// What every handler invocation shares: each partition's jobs' contexts, one per merchant
/// lane this process serves.
#[derive(Clone)]
struct Shared {
    partitions: Vec<Vec<JobContext>>,
}

impl Shared {
    /// The context of the job's merchant lane in the partition holding its order.
    fn context(&self, job: &PayoutJob) -> Option<&JobContext> {
        let index = crate::partition::of_order(job.mch_order_no(), self.partitions.len());
        self.partitions[index]
            .iter()
            .find(|ctx| &ctx.merchant == job.merchant())
    }
}

/// How soon a job of a merchant this process does not serve is looked at again.
const UNKNOWN_MERCHANT_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Later(&'static str);

async fn handle(
    job: PayoutJob,
    shared: Data<Arc<Shared>>,
    attempt: Attempt,
    delivery: Data<crate::queue::Delivery>,
) -> Result<(), BoxDynError> {
    let kind = match &job {
        PayoutJob::CreatePayout { .. } => "create_payout",
        PayoutJob::PollStatus { .. } => "poll_status",
    };
    // The queue's `job` span (id, attempt) is current here; gateway calls nest under it.
    crate::queue::record_job(kind, Some(job.mch_order_no()));
    // Taken back when the run ends, however it ends (a panic unwinds through it).
    let _in_flight = InFlightGauge::enter();
    let result: Result<(), BoxDynError> = async move {
        let Some(ctx) = shared.context(&job) else {
            // Only a lane this process serves delivers jobs, so this is a job written into
            // the wrong lane by hand: leave it for a process that has the merchant's key.
            tracing::error!(mch_order_no = %job.mch_order_no(), merchant = %job.merchant(), "job of a merchant this worker has no profile for");
            return Err(RetryAfterError::new(Later("unknown merchant"), UNKNOWN_MERCHANT_RECHECK).into());
        };
        let step = match &job {
            PayoutJob::CreatePayout { mch_order_no, .. } => {
                run_create_payout(ctx, mch_order_no, Some(&delivery)).await
            }
            PayoutJob::PollStatus {
                mch_order_no, once, ..
            } => {
                let attempt = attempt.current().max(1) as u32;
                run_poll_status(ctx, mch_order_no, attempt, *once, Some(&delivery)).await
            }
        };
        // What the run noted and no ledger operation took along (a poll that found the
        // order still processing, say). The history never fails a job.
        if let Err(err) = ctx.ledger.flush_noted(job.mch_order_no()).await {
            tracing::debug!(mch_order_no = %job.mch_order_no(), error = %err, "order history not written");
        }
        let step = match step {
            Ok(step) => step,
            // Retrying cannot fix a record that does not parse: give the job up (dead stream).
            Err(err @ JobError::BadRecord { .. }) => return Err(AbortError::new(err).into()),
            Err(err) => return Err(err.into()),
        };
        match step {
            Step::Done => Ok(()),
            Step::RetryAfter(delay) => {
                Err(RetryAfterError::new(Later("not final yet"), delay).into())
            }
            Step::GiveBack => Err(crate::queue::GiveBack.into()),
            Step::ContinueAs {
                job,
                attempts,
                after,
            } => {
                let payload = serde_json::value::to_raw_value(&job)?;
                Err(crate::queue::ContinueAs {
                    payload,
                    attempts,
                    delay: after,
                }
                .into())
            }
        }
    }
    .await;
    let label = match &result {
        Ok(()) => "done",
        Err(err) if err.is::<RetryAfterError>() => "retry",
        Err(err) if err.is::<crate::queue::GiveBack>() => "given_back",
        Err(err) if err.is::<crate::queue::ContinueAs>() => "continued",
        Err(_) => "error",
    };
    metrics::counter!(crate::metrics::JOBS, "kind" => kind, "result" => label).increment(1);
    result
}

/// Runs the payout worker pool until `shutdown` resolves; then stops fetching and gives
/// in-flight jobs `settings.worker.shutdown_grace` to finish. Jobs still running after that stay in
/// the queue's pending list and are taken over by other workers after the orphan timeout.
/// It waits for a Redis that cannot be reached yet ([`crate::startup::connect`]); a
/// `shutdown` that resolves meanwhile ends it there, with nothing fetched.
pub async fn run(
    settings: &Settings,
    concurrency: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let mut shutdown = Box::pin(shutdown);
    let deployment = tokio::select! {
        deployment = crate::startup::connect(settings) => deployment?,
        () = &mut shutdown => {
            tracing::info!("stopped while starting: nothing was fetched");
            return Ok(());
        }
    };
    let partitions = deployment.partitions();
    // Every merchant this process can sign for; each has a lane in every partition.
    let profiles = settings.gateway.active_profiles();
    let mut contexts: Vec<Vec<JobContext>> = vec![Vec::new(); partitions.len()];
    // `concurrency` bounds the gateway calls in flight; the process holds more jobs than
    // that, so that some jobs' ledger steps overlap other jobs' calls.
    let call_slots = CallSlots::new(concurrency);
    let polls_in_hand = settings
        .worker
        .poll_in_hand
        .then(|| PollsInHand::new(call_slots.clone()));
    let jobs_in_hand = concurrency.saturating_mul(JOBS_PER_CALL_SLOT);
    let mut payout_queues = Vec::new();
    // A merchant over its call limit closes its lanes to this process for a while.
    let mut gates = Vec::new();
    for profile in &profiles {
        for (index, mut ctx) in deployment.lane_contexts(settings, profile)? {
            ctx.call_slots = Some(call_slots.clone());
            ctx.polls_in_hand = polls_in_hand.clone();
            payout_queues.push(ctx.queue.clone());
            gates.push(ctx.limits.as_ref().map(|limits| limits.gate().clone()));
            contexts[index].push(ctx);
        }
    }
    let shared = Arc::new(Shared {
        partitions: contexts,
    });
    let merchants: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
    tracing::info!(
        concurrency,
        jobs_in_hand,
        partitions = partitions.len(),
        merchants = ?merchants,
        "payout worker starting"
    );
    // Cancelled as shutdown starts: apalis then stops taking jobs, and the queues stop
    // fetching (and claiming) at once rather than after the drain.
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let payout_queues = payout_queues
        .into_iter()
        .map(|queue| queue.stop_fetching_on(stop_workers.clone()))
        .collect();
    // A handler that panics (a bug) fails its job, which is retried, and the process goes
    // on: uncaught, the panic ended the process, and the worker that took the job over next
    // died the same way, every orphan timeout, with the jobs in hand it held.
    let worker = WorkerBuilder::new(PAYOUT_QUEUE)
        .backend(Partitioned::new(payout_queues)?.with_gates(gates)?)
        .data(shared.clone())
        .layer(CatchPanicLayer::with_panic_handler(panic_as_error))
        .concurrency(jobs_in_hand)
        .build(handle);
    let deliveries = match WebhookSettings::from_settings(settings)? {
        Some(webhooks) => {
            tracing::info!(host = %webhooks.host(), "webhook worker starting");
            let ledgers: Vec<_> = partitions.iter().map(|p| &p.ledger).collect();
            let deliverer =
                Deliverer::new(webhooks, &ledgers, partitions[0].webhooks.connection())?;
            let webhook_queues = partitions
                .iter()
                .map(|p| p.webhooks.clone().stop_fetching_on(stop_workers.clone()))
                .collect();
            Some(
                WorkerBuilder::new(WEBHOOK_QUEUE)
                    .backend(Partitioned::new(webhook_queues)?)
                    .data(Arc::new(deliverer))
                    .layer(CatchPanicLayer::with_panic_handler(panic_as_error))
                    .concurrency(WEBHOOK_CONCURRENCY)
                    .build(crate::webhooks::handle),
            )
        }
        None => None,
    };
    let stopped = |token: tokio_util::sync::CancellationToken| async move {
        token.cancelled().await;
        Ok::<(), std::io::Error>(())
    };
    let payouts = worker.run_until(stopped(stop_workers.clone()));
    let webhooks_stop = stopped(stop_workers.clone());
    let webhooks = async {
        match deliveries {
            Some(worker) => worker.run_until(webhooks_stop).await,
            None => Ok(()),
        }
    };
    // The lifeline sweeps each partition for orders without work (one worker at a time per
    // partition, see `audit`).
    let lifeline_stop = tokio_util::sync::CancellationToken::new();
    let lifeline_tasks: Vec<_> = partitions
        .iter()
        .map(|partition| {
            let lanes = partition
                .lanes
                .iter()
                .map(|lane| (lane.merchant.clone(), lane.queue.clone()))
                .collect();
            let lifeline = crate::audit::Lifeline::new(
                partition.ledger.clone(),
                lanes,
                settings.worker.lifeline_interval,
            );
            AbortOnDrop(tokio::spawn(
                lifeline.run(lifeline_stop.clone().cancelled_owned()),
            ))
        })
        .collect();
    let grace = settings.worker.shutdown_grace;
    let deadline = async move {
        shutdown.await;
        lifeline_stop.cancel();
        tracing::info!("shutting down: no new jobs, waiting for in-flight ones");
        stop_workers.cancel();
        // Jobs still waiting for a gateway call slot go back to the queue unstarted, and
        // first polls held in hand go on as poll jobs.
        call_slots.close();
        if let Some(holds) = &polls_in_hand {
            holds.stop();
        }
        tokio::time::sleep(grace).await;
    };
    let _lifeline_tasks = lifeline_tasks;
    let ended = tokio::select! {
        result = async { tokio::try_join!(payouts, webhooks) } => result
            .map(|_| ())
            .map_err(|err| WorkerError::Runtime(err.to_string())),
        _ = deadline => {
            tracing::warn!(grace_s = grace.as_secs(), "grace period over; unfinished jobs are left to other workers");
            Ok(())
        }
    };
    // The console's chart counts of the last seconds.
    for ctx in shared.partitions.iter().flatten() {
        ctx.ledger.flush_counters().await;
    }
    ended
}

/// Ends a background task when the pool that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One job run counted in the in-flight gauge while the guard lives.
struct InFlightGauge(metrics::Gauge);

impl InFlightGauge {
    fn enter() -> Self {
        let gauge = metrics::gauge!(crate::metrics::IN_FLIGHT);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A handler's panic (a bug), as a plain error of its job: retried with backoff like any
/// other failure (a payout job's attempts are many: one that panics every time retries
/// about every `retry_max` for days, so alert on `tarspay_job_panics_total`). A payout's next
/// run is safe (the ledger decides what it may do), and a rare panic then costs a retry,
/// not an operator. A fn item rather than apalis' `catch_panic()`, whose fn-pointer
/// handler type makes the worker's future fail `tokio::spawn`'s `Send` check.
#[allow(clippy::borrowed_box)] // the layer's handler signature
fn panic_as_error(panic: &Box<dyn std::any::Any + Send>) -> std::io::Error {
    let message = panic_text(panic.as_ref()).unwrap_or("a panic without a message");
    tracing::error!(%message, "a job's handler panicked; the job is retried");
    metrics::counter!(crate::metrics::JOB_PANICS).increment(1);
    std::io::Error::other(format!("the handler panicked: {message}"))
}

/// A panic's message, when it has one (`panic!` with a literal or with formatting).
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}
