//! The overview page, and pausing and resuming the worker.

use super::{Acting, Viewing, done, render, unavailable};
use crate::console::ConsoleState;
use crate::console::data::{self, WorkerRow};
use crate::console::{chart, views};
use crate::queue::QueueStats;
use axum::extract::State;
use axum::response::Response;
use maud::html;
use std::sync::Arc;

struct Overview {
    parts: Vec<QueueStats>,
    workers: Vec<WorkerRow>,
    paused: bool,
    held: Vec<String>,
    stuck: u64,
    minutes: Vec<crate::ledger::minutes::MinuteStats>,
}

async fn read_overview(state: &ConsoleState) -> Result<Overview, String> {
    let d = &state.deployment;
    let e = |err: &dyn std::fmt::Display| err.to_string();
    let (parts, workers, paused, held, stuck, minutes) = tokio::join!(
        data::partition_stats(d),
        data::workers(d),
        d.is_paused(),
        d.paused_merchants(),
        d.stuck_len(),
        // 59 whole minutes and the current one: the last hour.
        d.minute_stats(59),
    );
    Ok(Overview {
        parts: parts.map_err(|x| e(&x))?,
        workers: workers.map_err(|x| e(&x))?,
        paused: paused.map_err(|x| e(&x))?,
        held: held
            .map_err(|x| e(&x))?
            .into_iter()
            .map(|m| m.to_string())
            .collect(),
        stuck: stuck.map_err(|x| e(&x))?,
        minutes: minutes.map_err(|x| e(&x))?,
    })
}

pub async fn overview(
    State(state): State<Arc<ConsoleState>>,
    Viewing { session, live }: Viewing,
) -> Response {
    let o = match read_overview(&state).await {
        Ok(o) => o,
        Err(err) => return unavailable(err),
    };
    let total = o
        .parts
        .iter()
        .cloned()
        .reduce(QueueStats::merge)
        .unwrap_or_default();
    let now = crate::queue::now_ms();
    let ttl = state
        .deployment
        .partitions()
        .first()
        .map_or(30_000, |p| p.queue.config().worker_ttl.as_millis() as u64);
    let finals: u64 = o.minutes.iter().map(|m| m.finals_total()).sum();
    let many = o.parts.len() > 1;
    type Count = fn(&QueueStats) -> u64;
    let states: [(&str, &str, Count); 4] = [
        ("waiting", "Waiting", |s| s.waiting),
        ("pending", "In flight (delivered, not settled)", |s| {
            s.pending
        }),
        ("delayed", "Delayed (retries, timers)", |s| s.delayed),
        ("dead", "Dead", |s| s.dead),
    ];
    let region = html! {
        section aria-labelledby="counts-h" {
            h2 #counts-h { "Now" }
            div.cards {
                div.card { span.n { (total.waiting) } span.label { "waiting" } }
                div.card { span.n { (total.pending) } span.label { "in flight" } }
                div.card { span.n { (total.delayed) } span.label { "delayed" } }
                div.card { span.n { (total.dead) } span.label { a href="/console/dead" { "dead" } } }
                div.card { span.n { (o.stuck) } span.label { a href="/console/dead#stuck-h" { "stuck" } } }
                div.card { span.n { (finals) } span.label { "finished, last hour" } }
            }
        }
        section aria-labelledby="state-h" {
            h2 #state-h { "Queue" }
            p #paused data-paused=(o.paused) {
                @if o.paused {
                    span.state-paused { "Paused" } " — workers fetch no new payout jobs in some or all lanes."
                } @else {
                    span.state-running { "Running" } " — workers fetch payout jobs."
                }
            }
            @if session.is_admin() {
                p {
                    (views::action_form(&session, Some("pause-form"), "pause-form", "/console/pause", "Pause all payouts", "Pause every payout lane? Workers stop fetching new jobs; running jobs finish."))
                    " "
                    (views::action_form(&session, Some("resume-form"), "resume-form", "/console/resume", "Resume all payouts", "Resume every payout lane (a merchant's guard hold too)?"))
                }
            }
            div #guard data-held=(o.held.len()) {
                h3 { "Guard" }
                @if o.held.is_empty() {
                    p { "No merchant's lanes are held." }
                } @else {
                    p { "Held (paused by its guard after gateway auth failures, or by an operator):" }
                    ul { @for m in &o.held { li data-merchant=(m) { (m) } } }
                }
            }
            p #oldest-waiting data-age-ms=[total.oldest_waiting_age.map(|a| a.as_millis() as u64)] {
                "Oldest job waiting for a worker: "
                @match total.oldest_waiting_age {
                    Some(age) => strong { (views::age(age.as_millis() as u64)) },
                    None => "none",
                }
                @if let Some(age) = total.oldest_job_age.filter(|_| total.pending > 0) {
                    " (oldest in flight or waiting: " (views::age(age.as_millis() as u64)) ")"
                }
            }
            div.table-wrap {
                table #depth {
                    caption { "Payout jobs by state" @if many { ", per partition" } }
                    thead { tr {
                        th scope="col" { "State" }
                        th scope="col" { "All" }
                        @if many { @for i in 0..o.parts.len() { th scope="col" { "Partition " (i) } } }
                    } }
                    tbody {
                        @for (key, label, count) in states {
                            tr data-queue-state=(key) data-count=(count(&total)) {
                                th scope="row" { (label) }
                                td { (count(&total)) }
                                @if many { @for part in &o.parts { td { (count(part)) } } }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="workers-h" {
            h2 #workers-h { "Workers" }
            div.table-wrap {
                table #workers {
                    caption { "Worker processes by latest heartbeat (alive: within " (ttl / 1000) " s)" }
                    thead { tr { th scope="col" { "Worker" } th scope="col" { "Heartbeat" } th scope="col" { "Jobs in flight" } th scope="col" { "State" } } }
                    tbody {
                        @for w in &o.workers {
                            @let age = now.saturating_sub(w.heartbeat_ms);
                            tr data-worker=(w.name) data-in-flight=(w.in_flight) {
                                th scope="row" { (w.name) }
                                td { @if w.heartbeat_ms == 0 { "never" } @else { (views::age(age)) " ago" } }
                                td { (w.in_flight) }
                                td { @if w.heartbeat_ms > 0 && age <= ttl { "alive" } @else { "gone" } }
                            }
                        }
                        @if o.workers.is_empty() { tr { td colspan="4" { "No worker has registered." } } }
                    }
                }
            }
        }
        section aria-labelledby="charts-h" {
            h2 #charts-h { "Last hour (UTC)" }
            h3 { "Payouts finished per minute" }
            (chart::outcomes(&o.minutes))
            h3 { "Gateway create latency" }
            (chart::latency(&o.minutes))
        }
    };
    let after = chart::table(&o.minutes);
    render(
        live,
        "Overview",
        "/console/",
        &session,
        html! {},
        region,
        after,
    )
}

pub async fn pause(State(state): State<Arc<ConsoleState>>, acting: Acting) -> Response {
    set_paused(state, acting, true).await
}

pub async fn resume(State(state): State<Arc<ConsoleState>>, acting: Acting) -> Response {
    set_paused(state, acting, false).await
}

async fn set_paused(
    state: Arc<ConsoleState>,
    Acting { id, session }: Acting,
    paused: bool,
) -> Response {
    let (action, result) = if paused {
        ("pause", state.deployment.pause().await)
    } else {
        ("resume", state.deployment.resume().await)
    };
    let (result, message) = match result {
        Ok(()) if paused => (
            "ok",
            "Paused: workers stop fetching within a second; running jobs finish.".to_owned(),
        ),
        Ok(()) => ("ok", "Resumed: workers fetch again.".to_owned()),
        Err(err) => ("error", format!("Failed to {action}: {err}")),
    };
    done(
        &state,
        (&id, &session),
        action,
        "all payout lanes",
        result,
        &message,
        "/console/",
    )
    .await
}
