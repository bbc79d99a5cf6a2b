//! Metric names and the Prometheus recorder. Code records through the `metrics` facade; the
//! server renders the text format at `/metrics`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const JOBS: &str = "tarspay_jobs_total";
/// Job handler panics (a bug): each fails its job, which is retried.
pub const JOB_PANICS: &str = "tarspay_job_panics_total";
pub const GATEWAY_LATENCY: &str = "tarspay_gateway_latency_seconds";
pub const GATEWAY_CODES: &str = "tarspay_gateway_codes_total";
pub const CREATE_RETRIES: &str = "tarspay_create_retries_total";
/// Gateway calls held back by a merchant's limit (`by`: `limiter`, or `gateway` for a 429).
pub const RATE_LIMITED: &str = "tarspay_rate_limited_total";
pub const OUTCOMES: &str = "tarspay_outcomes_total";
pub const CALLBACKS: &str = "tarspay_callbacks_total";
pub const WEBHOOKS: &str = "tarspay_webhook_deliveries_total";
/// Payout jobs a worker process holds (running, or waiting for a call slot).
pub const IN_FLIGHT: &str = "tarspay_jobs_in_flight";
/// A worker process's gateway call slots in use (at most its `concurrency`).
pub const CALL_SLOTS_IN_USE: &str = "tarspay_call_slots_in_use";
/// A worker process's first polls held in hand: accepted creates whose job waits out the
/// first poll's delay and polls itself (at most a quarter of its `concurrency`).
pub const POLLS_IN_HAND: &str = "tarspay_polls_in_hand";
/// Held first polls that found their order final already, by another's hand (a callback
/// that beat the first-poll delay, mostly). After one, a process's next held polls read the
/// ledger before they query the gateway (`jobs::in_hand`).
pub const POLLS_IN_HAND_OVERTAKEN: &str = "tarspay_polls_in_hand_overtaken_total";
/// Held first polls that read the order's record before querying the gateway.
pub const POLLS_IN_HAND_READ_FIRST: &str = "tarspay_polls_in_hand_read_first_total";
/// Held first polls whose acceptance waited for what they found (written only if not final),
/// as the process's last held poll had found its order final (`jobs::in_hand`).
pub const POLLS_IN_HAND_ACCEPTANCE_DEFERRED: &str =
    "tarspay_polls_in_hand_acceptance_deferred_total";
pub const QUEUE_WAITING: &str = "tarspay_queue_waiting";
pub const QUEUE_PENDING: &str = "tarspay_queue_pending";
pub const QUEUE_DELAYED: &str = "tarspay_queue_delayed";
pub const QUEUE_DEAD: &str = "tarspay_queue_dead";
pub const QUEUE_OLDEST_AGE: &str = "tarspay_queue_oldest_job_age_seconds";
pub const QUEUE_PAUSED: &str = "tarspay_queue_paused";
pub const WORKERS_ALIVE: &str = "tarspay_workers_alive";
/// Settlements a worker dropped because the entry had been taken over by another worker (the
/// first one stalled past the orphan timeout); the new holder settles it (or, when one of the
/// two made the order final, that one's step acknowledged it). Not an error by itself;
/// a steady rise means workers stall (GC, swap, SIGSTOP, VM pauses) or the orphan timeout is short.
pub const QUEUE_STALE_SETTLEMENTS: &str = "tarspay_queue_stale_settlements_total";
/// Jobs acknowledged by the ledger step that wrote their last effect (a create's acceptance, a
/// poll's final state) rather than by a settlement of their own: every payout job that ends
/// that way, when it came from its ledger's queue and holds no unique key.
pub const QUEUE_ACKED_IN_STEP: &str = "tarspay_queue_acked_in_step_total";
/// Per promotion pass that moved delayed jobs (retries, polls) into the stream: how long past
/// its due time the most overdue of them was, by the Redis server's clock. Delays are meant to
/// start on time: outside a killed or frozen lease holder (up to its lease plus
/// `promote_interval` late), a p99 over a few ms means a promoter missed a wake-up and waited
/// for its periodic pass.
pub const QUEUE_PROMOTION_LATENESS: &str = "tarspay_queue_promotion_lateness_seconds";
/// Fetch reads that found no job (`queue` = the queue's name): an idle worker's blocking
/// reads (one per block time per fetch loop) and reads that brought wake markers alone.
pub const QUEUE_EMPTY_READS: &str = "tarspay_queue_empty_reads_total";
/// Submit lease steps sent with the upper bound of the server's clock their job's delivery
/// brings (`queue::clock::AddedAfter`: a job that came to an idle worker); the step reads no
/// `TIME` if the order is free and no other step of its batch read it.
pub const LEASE_STEPS_ON_DELIVERY_CLOCK: &str = "tarspay_lease_steps_on_delivery_clock_total";
pub const ORDERS_STUCK: &str = "tarspay_orders_stuck";
/// Orders we failed ourselves that the gateway accepted afterwards (a create run outlived its
/// lease): money may move under a `failed` outcome. Should stay 0; alert on any increase.
pub const ACCEPTED_AFTER_FAILED: &str = "tarspay_accepted_after_failed_total";

/// Verified gateway states that contradicted a recorded final status (`status` = the new
/// one). Each is an outcome entry with `event = correction`: money moved unlike we said.
pub const OUTCOME_CORRECTIONS: &str = "tarspay_outcome_corrections_total";
/// Orders the last lifeline sweep found without work (no job waiting, running or delayed).
pub const ORDERS_WITHOUT_WORK: &str = "tarspay_orders_without_work";
/// Jobs the lifeline queued for orders that had lost theirs.
pub const LIFELINE_REPAIRS: &str = "tarspay_lifeline_repairs_total";
/// Submit leases given back because fewer replicas than `TARSPAY_REDIS_MIN_REPLICAS` confirmed
/// them: those creates wait. A steady rise means a primary is short of replicas (lagging, or
/// lost after a failover) and its partitions' payouts are held until replicas return.
pub const LEASES_UNREPLICATED: &str = "tarspay_leases_unreplicated_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(GATEWAY_LATENCY.to_owned()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(QUEUE_PROMOTION_LATENESS.to_owned()),
                        &[
                            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        ],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); ours still renders its own.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Sums the values of counter `name` grouped by one label, from rendered Prometheus text.
/// Used by the demo's summary.
pub fn counter_by_label(rendered: &str, name: &str, label: &str) -> Vec<(String, u64)> {
    let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
    for line in rendered.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let key = format!("{label}=\"");
        let Some(start) = labels.find(&key) else {
            continue;
        };
        let tail = &labels[start + key.len()..];
        let Some(end) = tail.find('"') else { continue };
        let count = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *totals.entry(tail[..end].to_owned()).or_default() += count;
    }
    totals.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_read_back_by_label() {
        let text = "# TYPE x counter\ntarspay_create_retries_total{code=\"-1\"} 10\ntarspay_create_retries_total{code=\"500323\",endpoint=\"/a\"} 4\ntarspay_create_retries_total{endpoint=\"/b\",code=\"500323\"} 2\nother{code=\"1\"} 9\n";
        assert_eq!(
            super::counter_by_label(text, super::CREATE_RETRIES, "code"),
            vec![("-1".to_owned(), 10), ("500323".to_owned(), 6)]
        );
    }
}
