//! Dead and stuck orders, and retrying them.

use super::payouts::orders_table;
use super::{Acting, Viewing, done, encode_segment, render, unavailable};
use crate::console::ConsoleState;
use crate::console::data::{self, DeadRow};
use crate::console::session::Session;
use crate::console::views;
use crate::ledger::Phase;
use crate::ledger::index::OrderQuery;
use axum::extract::{Path, State};
use axum::response::Response;
use maud::{Markup, html};
use std::sync::Arc;

pub async fn dead(
    State(state): State<Arc<ConsoleState>>,
    Viewing { session, live }: Viewing,
) -> Response {
    let unknown = OrderQuery {
        phase: Some(Phase::Unknown),
        limit: 100,
        ..Default::default()
    };
    let (rows, stuck, flagged, ambiguous) = match tokio::join!(
        data::dead_jobs(&state.deployment, 200),
        state.deployment.stuck_len(),
        state.deployment.stuck_orders(100),
        state.deployment.search_orders(&unknown),
    ) {
        (Ok(rows), Ok(stuck), Ok(flagged), Ok(page)) => (rows, stuck, flagged, page),
        (Err(err), ..) => return unavailable(err),
        (_, Err(err), ..) | (_, _, Err(err), _) | (.., Err(err)) => return unavailable(err),
    };
    // The flagged ones first (longest without news first), then the newest unknown ones.
    let mut listed = flagged;
    for order in ambiguous.orders {
        if !listed.iter().any(|o| o.mch_order_no == order.mch_order_no) {
            listed.push(order);
        }
    }
    let region = html! {
        h2 #dead-h { "Dead payout jobs" }
        p.muted { "Jobs that used up their attempts. Retrying puts one back on its queue with fresh attempts." }
        div.table-wrap {
            table #dead aria-labelledby="dead-h" {
                thead { tr {
                    th scope="col" { "Id" } th scope="col" { "Job" } th scope="col" { "Payout" } th scope="col" { "Merchant" }
                    th scope="col" { "Attempts" } th scope="col" { "Reason" } th scope="col" { "Died" }
                    @if session.is_admin() { th scope="col" { "Action" } }
                } }
                tbody {
                    @for row in &rows { (dead_row(&session, row)) }
                    @if rows.is_empty() { tr { td colspan="8" { "No dead jobs." } } }
                }
            }
        }
        h2 #stuck-h { "Stuck and ambiguous payouts" }
        p #stuck-count data-count=(stuck) { (stuck) " payout(s) flagged stuck (no final state by the polling deadline; still polled)." }
        p.muted { "Below: the payouts flagged stuck (their last news: Updated), then those in phase " code { "unknown" } " — a create may have reached the gateway without an answer; only a lookup (on the payout's page) can settle them." }
        (orders_table("stuck", &listed))
        @if ambiguous.next.is_some() {
            p { a #more-unknown href="/console/payouts?status=unknown" { "More payouts in phase unknown" } }
        }
    };
    render(
        live,
        "Dead jobs, stuck payouts",
        "/console/dead",
        &session,
        html! {},
        region,
        html! {},
    )
}

fn dead_row(session: &Session, row: &DeadRow) -> Markup {
    html! {
        tr data-dead-id=(row.id) {
            th scope="row" { code { (row.id) } }
            td { (row.kind) }
            td { @if let Some(o) = &row.mch_order_no { a href=(format!("/console/payouts/{}", encode_segment(o))) { (o) } } }
            td { (row.merchant) }
            td { (row.job.attempts.unwrap_or(0)) }
            td { (row.job.reason) }
            td { (views::time(row.job.died_at_ms)) }
            @if session.is_admin() {
                td { (views::action_form(session, None, "retry-form",
                    &format!("/console/dead/{}/retry", encode_segment(&row.id)),
                    "Retry", &format!("Put dead job {} back on its queue?", row.id))) }
            }
        }
    }
}

pub async fn retry(
    State(state): State<Arc<ConsoleState>>,
    Path(dead_id): Path<String>,
    Acting { id, session }: Acting,
) -> Response {
    let (result, message) = match data::retry_dead(&state.deployment, &dead_id).await {
        Ok(true) => (
            "requeued",
            format!("Dead job {dead_id} is back on its queue."),
        ),
        Ok(false) => (
            "not found",
            format!("No dead job {dead_id} (already retried?)."),
        ),
        Err(err) => ("error", format!("Failed to retry {dead_id}: {err}")),
    };
    done(
        &state,
        (&id, &session),
        "retry",
        &dead_id,
        result,
        &message,
        "/console/dead",
    )
    .await
}
