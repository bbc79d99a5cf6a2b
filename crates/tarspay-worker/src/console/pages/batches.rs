//! The batches page, one batch, and its results.

use super::{Params, encode_segment, is_live, render, unavailable, viewer};
use crate::batch;
use crate::console::ConsoleState;
use crate::console::views;
use crate::ledger::index::OrderQuery;
use crate::ledger::{BatchSummary, Phase};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{Markup, html};
use std::str::FromStr;
use std::sync::Arc;

/// Orders of the batch in a final phase.
pub(super) fn finished(summary: &BatchSummary) -> usize {
    summary
        .phases
        .iter()
        .filter(|(phase, _)| Phase::from_str(phase).is_ok_and(Phase::is_final))
        .map(|(_, totals)| totals.count)
        .sum()
}

fn progress(id: Option<&str>, summary: &BatchSummary) -> Markup {
    bar(id, finished(summary) as u64, summary.total as u64)
}

fn bar(id: Option<&str>, done: u64, total: u64) -> Markup {
    let label = format!("{done} of {total} finished");
    html! {
        progress id=[id] max=(total.max(1)) value=(done) aria-label=(label) { (label) }
        " " span { (label) }
    }
}

pub async fn batches(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let entries = match state.deployment.recent_batches(50).await {
        Ok(entries) => entries,
        Err(err) => return unavailable(err),
    };
    // Counters, not the rows: a list of 50 payroll batches reads no order record.
    let ids: Vec<String> = entries.iter().map(|e| e.batch_id.clone()).collect();
    let progress = match state.deployment.batch_progress(&ids).await {
        Ok(progress) => progress,
        Err(err) => return unavailable(err),
    };
    let region = html! {
        div.table-wrap {
            table #batches {
                thead { tr { th scope="col" { "Batch" } th scope="col" { "First payout" } th scope="col" { "Payouts" } th scope="col" { "Progress" } th scope="col" { "Finished by status" } } }
                tbody {
                    @for (entry, batch) in entries.iter().zip(&progress) {
                        tr data-batch=(entry.batch_id) data-total=(batch.total) data-finished=(batch.finished()) {
                            th scope="row" { a href=(format!("/console/batches/{}", encode_segment(&entry.batch_id))) { (entry.batch_id) } }
                            td { (views::time(entry.first_ms)) }
                            td { (batch.total) }
                            td { (bar(None, batch.finished(), batch.total)) }
                            td { (batch.finals.iter().map(|(status, n)| format!("{n} {status}")).collect::<Vec<_>>().join(", ")) }
                        }
                    }
                    @if entries.is_empty() { tr { td colspan="5" { "No batches." } } }
                }
            }
        }
    };
    render(
        live,
        "Batches",
        "/console/batches",
        &session,
        html! {},
        region,
        html! {},
    )
}

pub async fn batch(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(batch_id): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let summary = match state.deployment.batch_summary(&batch_id).await {
        Ok(summary) => summary,
        Err(err) => return unavailable(err),
    };
    if summary.total == 0 && !live {
        let body = html! { p { "No batch " code { (batch_id) } "." } };
        let page = views::page(
            "Batch not found",
            "/console/batches",
            &session,
            session.flash.as_deref(),
            body,
        );
        return (StatusCode::NOT_FOUND, Html(page.into_string())).into_response();
    }
    let currencies: Vec<String> = summary
        .phases
        .values()
        .flat_map(|t| t.amounts.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let csv = format!("/console/batches/{}/results.csv", encode_segment(&batch_id));
    let before =
        html! { p { a #results-csv href=(csv) download { "Download the results (CSV)" } } };
    let region = html! {
        p { (progress(Some("batch-progress"), &summary)) }
        div.table-wrap {
            table #batch-totals {
                caption { "Payouts and amounts by phase and currency" }
                thead { tr { th scope="col" { "Phase" } th scope="col" { "Payouts" } @for c in &currencies { th scope="col" { (c) } } } }
                tbody {
                    @for (phase, totals) in &summary.phases {
                        tr data-phase=(phase) data-count=(totals.count) {
                            th scope="row" { a href=(format!("/console/payouts?batch={}&status={}", encode_segment(&batch_id), encode_segment(phase))) { (phase) } }
                            td { (totals.count) }
                            @for c in &currencies { td { (totals.amounts.get(c).map(|v| v.to_string()).unwrap_or_default()) } }
                        }
                    }
                }
                tfoot { tr { th scope="row" { "All" } td { (summary.total) } @for c in &currencies {
                    td { (summary.phases.values().filter_map(|t| t.amounts.get(c)).copied().sum::<rust_decimal::Decimal>()) }
                } } }
            }
        }
    };
    render(
        live,
        &format!("Batch {batch_id}"),
        "/console/batches",
        &session,
        before,
        region,
        html! {},
    )
}

pub async fn batch_results(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(batch_id): Path<String>,
) -> Response {
    if let Err(answer) = viewer(&state, &headers, false).await {
        return answer;
    }
    let mut writer = csv::Writer::from_writer(Vec::new());
    let _ = writer.write_record(batch::RESULT_COLUMNS);
    let mut query = OrderQuery {
        batch_id: Some(batch_id.clone()),
        limit: crate::ledger::index::MAX_PAGE,
        ..Default::default()
    };
    // Bounded: a batch holds at most `batch::MAX_ROWS` payouts.
    for _ in 0..10_000 {
        let page = match state.deployment.search_orders(&query).await {
            Ok(page) => page,
            Err(err) => return unavailable(err),
        };
        for record in &page.orders {
            let _ = writer.write_record(batch::result_row(
                &record.mch_order_no,
                &record.amount,
                &record.currency,
                Some(record),
            ));
        }
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
    }
    let body = writer.into_inner().unwrap_or_default();
    let name: String = batch_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.results.csv\""),
            ),
        ],
        body,
    )
        .into_response()
}
