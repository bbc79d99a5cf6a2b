//! The batches page, one batch, and its results.

use super::{Viewing, encode_segment, render, unavailable};
use crate::batch;
use crate::console::ConsoleState;
use crate::console::views;
use crate::ledger::BatchProgress;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{Markup, html};
use std::sync::Arc;

fn bar(id: Option<&str>, done: u64, total: u64) -> Markup {
    let label = format!("{done} of {total} finished");
    html! {
        progress id=[id] max=(total.max(1)) value=(done) aria-label=(label) { (label) }
        " " span { (label) }
    }
}

pub async fn batches(
    State(state): State<Arc<ConsoleState>>,
    Viewing { session, live }: Viewing,
) -> Response {
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
    Viewing { session, live }: Viewing,
    Path(batch_id): Path<String>,
) -> Response {
    // Counters, not the rows: the page costs the same for ten payouts or 100,000.
    let progress = match state
        .deployment
        .batch_progress(std::slice::from_ref(&batch_id))
        .await
    {
        Ok(mut all) => all.pop().unwrap_or_default(),
        Err(err) => return unavailable(err),
    };
    if progress.total == 0 && !live {
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
    let csv = format!("/console/batches/{}/results.csv", encode_segment(&batch_id));
    let before =
        html! { p { a #results-csv href=(csv) download { "Download the results (CSV)" } } };
    render(
        live,
        &format!("Batch {batch_id}"),
        "/console/batches",
        &session,
        before,
        totals(&batch_id, &progress),
        html! {},
    )
}

/// The batch's progress bar and its rows and amounts by status and currency.
fn totals(batch_id: &str, progress: &BatchProgress) -> Markup {
    let finished = progress.finished_amounts();
    let currencies: Vec<&String> = finished.keys().collect();
    let search = |status: Option<&str>| {
        let mut link = format!("/console/payouts?batch={}", encode_segment(batch_id));
        if let Some(status) = status {
            link.push_str(&format!("&status={}", encode_segment(status)));
        }
        link
    };
    let amount = |status: &str, currency: &str| {
        progress
            .amounts
            .get(status)
            .and_then(|by| by.get(currency))
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    html! {
        p { (bar(Some("batch-progress"), progress.finished(), progress.total)) }
        @if progress.amounts_unknown {
            p.flash role="status" { "Some amount totals of this batch are too large to keep: amounts are not shown." }
        }
        div.table-wrap {
            table #batch-totals {
                caption { "Payouts and amounts by status and currency" }
                thead { tr { th scope="col" { "Status" } th scope="col" { "Payouts" } @for c in &currencies { th scope="col" { (c) } } } }
                tbody {
                    @for (status, n) in &progress.finals {
                        tr data-status=(status) data-count=(n) {
                            th scope="row" { a href=(search(Some(status))) { (status) } }
                            td { (n) }
                            @for c in &currencies { td { @if !progress.amounts_unknown { (amount(status, c)) } } }
                        }
                    }
                    tr data-status="in progress" data-count=(progress.in_progress()) {
                        th scope="row" { a href=(search(None)) { "in progress" } }
                        td { (progress.in_progress()) }
                        @for _ in &currencies { td {} }
                    }
                }
                tfoot { tr { th scope="row" { "All" } td { (progress.total) } @for c in &currencies {
                    td { @if !progress.amounts_unknown { (finished.get(*c).map(ToString::to_string).unwrap_or_default()) } }
                } } }
            }
        }
        p.muted { "Amounts are those of finished payouts; the payouts still in progress are in the batch's list." }
    }
}

pub async fn batch_results(
    State(state): State<Arc<ConsoleState>>,
    Path(batch_id): Path<String>,
    _: Viewing,
) -> Response {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let _ = writer.write_record(batch::RESULT_COLUMNS);
    // The members once (a batch holds at most `batch::MAX_ROWS`), then their records in
    // pipelined chunks; a row whose record is gone is written as `missing`, never dropped.
    let ids = match state.deployment.batch_members(&batch_id).await {
        Ok(ids) => ids,
        Err(err) => return unavailable(err),
    };
    for chunk in ids.chunks(500) {
        let records = match state.deployment.records(chunk).await {
            Ok(records) => records,
            Err(err) => return unavailable(err),
        };
        for (id, record) in chunk.iter().zip(&records) {
            let (amount, currency) = record
                .as_ref()
                .map_or(("", ""), |r| (r.amount.as_str(), r.currency.as_str()));
            let _ = writer.write_record(batch::result_row(id, amount, currency, record.as_ref()));
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
