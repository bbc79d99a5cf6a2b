//! Searching payouts, one payout's timeline, and asking the gateway about it.

use super::{Acting, Params, Viewing, done, encode_segment, render, unavailable};
use crate::console::ConsoleState;
use crate::console::{mask, views};
use crate::ids::Currency;
use crate::ledger::history::{EventKind, OrderEvent, TimelineEntry, timeline};
use crate::ledger::index::{IndexPosition, OrderPage, OrderQuery};
use crate::ledger::{OrderRecord, Phase};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{Markup, html};
use std::str::FromStr;
use std::sync::Arc;

/// A `from`/`to` field: RFC 3339, or a form's `datetime-local` (`2026-01-02T03:04`), UTC.
fn parse_time(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let full = match text.len() {
        16 => format!("{text}:00Z"),
        19 => format!("{text}Z"),
        _ => text.to_owned(),
    };
    humantime::parse_rfc3339_weak(&full)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| format!("{text:?} is not a time such as 2026-01-02T03:04 (UTC)"))
}

fn query_of(params: &Params) -> Result<OrderQuery, Vec<String>> {
    let get = |name: &str| params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut errors = Vec::new();
    let mut query = OrderQuery {
        mch_order_no: get("mch_order_no").map(str::to_owned),
        batch_id: get("batch").map(str::to_owned),
        cursor: get("cursor").map(str::to_owned),
        limit: 50,
        ..Default::default()
    };
    if let Some(status) = get("status") {
        match Phase::from_str(status) {
            Ok(phase) => query.phase = Some(phase),
            Err(err) => errors.push(format!("status: {err}")),
        }
    }
    if let Some(currency) = get("currency") {
        match Currency::parse(&currency.to_ascii_uppercase()) {
            Ok(c) => query.currency = Some(c),
            Err(err) => errors.push(format!("currency: {err}")),
        }
    }
    for (name, slot) in [("from", &mut query.from_ms), ("to", &mut query.to_ms)] {
        if let Some(text) = get(name) {
            match parse_time(text) {
                Ok(ms) => *slot = Some(ms),
                Err(err) => errors.push(format!("{name}: {err}")),
            }
        }
    }
    if let (Some(from), Some(to)) = (query.from_ms, query.to_ms)
        && from >= to
    {
        errors.push("to: must be later than from".to_owned());
    }
    // A batch's pages continue after an mchOrderNo; the others at a position in the time
    // index, which a stale or edited link may not hold.
    if let Some(cursor) = &query.cursor
        && query.batch_id.is_none()
        && IndexPosition::parse(cursor).is_none()
    {
        errors.push(format!(
            "cursor: {cursor:?} is not a position from a previous page (follow the page's next link)"
        ));
    }
    if errors.is_empty() {
        Ok(query)
    } else {
        Err(errors)
    }
}

pub(super) fn orders_table(id: &str, orders: &[OrderRecord]) -> Markup {
    html! {
        div.table-wrap {
            table id=(id) {
                thead { tr {
                    th scope="col" { "mchOrderNo" } th scope="col" { "Phase" } th scope="col" { "Amount" }
                    th scope="col" { "Merchant" } th scope="col" { "Attempts" } th scope="col" { "Batch" }
                    th scope="col" { "Registered" } th scope="col" { "Updated" }
                } }
                tbody {
                    @for o in orders {
                        tr data-order=(o.mch_order_no) data-phase=(o.phase.as_str()) {
                            th scope="row" { a href=(format!("/console/payouts/{}", encode_segment(&o.mch_order_no))) { (o.mch_order_no) } }
                            td { (o.phase.as_str()) @if o.stuck { " (stuck)" } @if o.ambiguous && !o.phase.is_final() { " (ambiguous)" } }
                            td { (o.amount) " " (o.currency) }
                            td { (o.merchant) }
                            td { (o.attempts) }
                            td { @if let Some(b) = &o.batch_id { a href=(format!("/console/batches/{}", encode_segment(b.as_str()))) { (b.as_str()) } } }
                            td { (views::time(o.created_at_ms)) }
                            td { (views::time(o.updated_at_ms)) }
                        }
                    }
                    @if orders.is_empty() { tr { td colspan="8" { "No payouts found." } } }
                }
            }
        }
    }
}

pub async fn payouts(
    State(state): State<Arc<ConsoleState>>,
    Viewing { session, live }: Viewing,
    Query(params): Query<Params>,
) -> Response {
    let value = |name: &str| params.get(name).cloned().unwrap_or_default();
    let (page, errors) = match query_of(&params) {
        Ok(query) => match state.deployment.search_orders(&query).await {
            Ok(page) => (page, Vec::new()),
            Err(err) => return unavailable(err),
        },
        Err(errors) => (OrderPage::default(), errors),
    };
    let next = page.next.as_ref().map(|cursor| {
        let mut pairs: Vec<(&str, String)> =
            ["mch_order_no", "batch", "status", "currency", "from", "to"]
                .into_iter()
                .map(|name| (name, value(name)))
                .filter(|(_, v)| !v.is_empty())
                .collect();
        pairs.push(("cursor", cursor.clone()));
        format!(
            "/console/payouts?{}",
            serde_urlencoded::to_string(pairs).unwrap_or_default()
        )
    });
    let status = value("status");
    let before = html! {
        form #search method="get" action="/console/payouts" role="search" {
            div.fields {
                div { label for="mch_order_no" { "mchOrderNo" } input #mch_order_no type="search" name="mch_order_no" value=(value("mch_order_no")); }
                div { label for="batch" { "Batch" } input #batch type="text" name="batch" value=(value("batch")); }
                div {
                    label for="status" { "Phase" }
                    select #status name="status" {
                        option value="" selected[status.is_empty()] { "any" }
                        @for phase in Phase::ALL { option value=(phase.as_str()) selected[status == phase.as_str()] { (phase.as_str()) } }
                    }
                }
                div { label for="currency" { "Currency" } input #currency type="text" name="currency" maxlength="3" value=(value("currency")); }
                div { label for="from" { "Registered from (UTC)" } input #from type="datetime-local" name="from" value=(value("from")); }
                div { label for="to" { "Registered before (UTC)" } input #to type="datetime-local" name="to" value=(value("to")); }
                div { button type="submit" { "Search" } }
            }
        }
        @if !errors.is_empty() {
            ul.error role="alert" { @for e in &errors { li { (e) } } }
        }
    };
    let region = html! {
        p.muted {
            (page.orders.len()) " shown; " (page.scanned) " index entries read"
            @if let Some(back) = page.searched_back_to_ms { "; searched back to " (views::time(back)) }
            "."
        }
        (orders_table("payouts", &page.orders))
        @if let Some(next) = &next { p { a #next-page href=(next) rel="next" { "Next page" } } }
    };
    render(
        live,
        "Payouts",
        "/console/payouts",
        &session,
        before,
        region,
        html! {},
    )
}

fn entry_kind(entry: &TimelineEntry) -> &'static str {
    match entry {
        TimelineEntry::Registered { .. } => "registered",
        TimelineEntry::Accepted { .. } => "accepted",
        TimelineEntry::Final { .. } => "final",
        TimelineEntry::Correction { .. } => "correction",
        TimelineEntry::Event(event) => event.kind.as_str(),
    }
}

fn entry_text(entry: &TimelineEntry) -> Markup {
    let opt =
        |label: &str, v: Option<String>| v.map(|v| format!(" {label} {v}")).unwrap_or_default();
    match entry {
        TimelineEntry::Registered { .. } => html! { "Registered (queued)" },
        TimelineEntry::Accepted { pay_order_id, .. } => {
            html! { "Accepted by the gateway" (opt("payOrderId", pay_order_id.clone())) }
        }
        TimelineEntry::Final {
            status, code, msg, ..
        } => {
            html! { "Final: " (status) (opt("code", code.map(|c| c.to_string()))) (opt("—", msg.clone())) }
        }
        TimelineEntry::Correction {
            status, previous, ..
        } => html! { "Correction: now " (status) (opt("was", previous.clone())) },
        TimelineEntry::Event(e) => html! {
            (match e.kind {
                EventKind::Create => "Create sent",
                EventKind::Query => "Status looked up",
                EventKind::Callback => "Callback received",
                EventKind::Held => "Held back",
                EventKind::Operator => "Operator action",
            })
            (opt("attempt", e.attempt.map(|a| a.to_string())))
            (opt("reason", e.reason.clone()))
            (opt("by", e.actor.clone()))
            (opt("code", e.code.map(|c| c.to_string())))
            (opt("state", e.state.map(|s| s.to_string())))
            (opt("verified", e.verified.map(|v| v.to_string())))
            (opt("in", e.latency_ms.map(|l| format!("{l} ms"))))
            (opt("—", e.msg.clone()))
        },
    }
}

pub async fn payout(
    State(state): State<Arc<ConsoleState>>,
    Viewing { session, live }: Viewing,
    Path(mch_order_no): Path<String>,
) -> Response {
    let (record, events) = match tokio::try_join!(
        state.deployment.order(&mch_order_no),
        state.deployment.order_events(&mch_order_no)
    ) {
        Ok(found) => found,
        Err(err) => return unavailable(err),
    };
    let Some(record) = record else {
        let body = html! { p { "No payout " code { (mch_order_no) } " in the ledger (never queued, or expired)." } p { a href="/console/payouts" { "Search payouts" } } };
        let page = views::page(
            "Payout not found",
            "/console/payouts",
            &session,
            session.flash.as_deref(),
            body,
        );
        return (StatusCode::NOT_FOUND, Html(page.into_string())).into_response();
    };
    let entries = timeline(&record, &events);
    let before = html! {
        p { "Payout " code { (record.mch_order_no) } " of merchant " (record.merchant) }
        @if session.is_admin() {
            (views::action_form(&session, Some("lookup-form"), "lookup-form",
                &format!("/console/payouts/{}/lookup", encode_segment(&record.mch_order_no)),
                "Look up now", "Queue a status lookup of this payout at the gateway now?"))
        }
    };
    let region = html! {
        dl {
            dt { "Phase" }
            dd #phase data-phase=(record.phase.as_str()) { (record.phase.as_str()) @if record.stuck { " — stuck (past the polling deadline)" } @if record.ambiguous && !record.phase.is_final() { " — ambiguous (a create may have reached the gateway)" } }
            dt { "Amount" } dd { (record.amount) " " (record.currency) }
            dt { "Attempts" } dd { (record.attempts) }
            @if let Some(p) = &record.pay_order_id { dt { "payOrderId" } dd { (p) } }
            @if let Some(s) = record.gateway_state { dt { "Gateway state" } dd { (s) } }
            @if let Some(f) = &record.fee { dt { "Fee" } dd { (f) } }
            @if let Some(b) = &record.batch_id { dt { "Batch" } dd { a href=(format!("/console/batches/{}", encode_segment(b.as_str()))) { (b.as_str()) } } }
        }
        h2 { "Timeline" }
        ol #timeline.timeline {
            @for entry in &entries {
                li data-kind=(entry_kind(entry)) {
                    time { (views::time(entry.at_ms())) } " — " span.kind { (entry_kind(entry)) } ": " (entry_text(entry))
                }
            }
        }
    };
    let after = html! {
        h2 { "Request" }
        p.muted { "Beneficiary fields show only their last 4 characters." }
        pre #request { (mask::masked_request(&record.request)) }
    };
    render(
        live,
        &format!("Payout {}", record.mch_order_no),
        "/console/payouts",
        &session,
        before,
        region,
        after,
    )
}

pub async fn lookup(
    State(state): State<Arc<ConsoleState>>,
    Path(mch_order_no): Path<String>,
    Acting { id, session }: Acting,
) -> Response {
    let back = format!("/console/payouts/{}", encode_segment(&mch_order_no));
    let record = match state.deployment.order(&mch_order_no).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return done(
                &state,
                (&id, &session),
                "lookup",
                &mch_order_no,
                "not found",
                "No such payout.",
                "/console/payouts",
            )
            .await;
        }
        Err(err) => return unavailable(err),
    };
    let (result, message) = match state.producer.queue_lookup(&record).await {
        Ok(()) => {
            let mut event = OrderEvent::now(EventKind::Operator);
            event.reason = Some("lookup".into());
            event.actor = Some(format!("{} ({})", session.operator, session.role.as_str()));
            if let Err(err) = state.deployment.note_event(&mch_order_no, event).await {
                tracing::warn!(error = %err, "console: the lookup's history line was not written");
            }
            (
                "queued",
                "Lookup queued: a worker asks the gateway within seconds.".to_owned(),
            )
        }
        Err(err) => ("error", format!("Failed to queue the lookup: {err}")),
    };
    done(
        &state,
        (&id, &session),
        "lookup",
        &mch_order_no,
        result,
        &message,
        &back,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_fields_become_a_query() {
        let params: Params = [
            ("status", "unknown"),
            ("currency", "inr"),
            ("from", "2026-01-02T03:04"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let query = query_of(&params).unwrap();
        assert_eq!(query.phase, Some(Phase::Unknown));
        assert_eq!(query.currency.unwrap().as_str(), "INR");
        assert!(query.from_ms.is_some());
        let bad: Params = [("status", "nope"), ("to", "yesterday")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(query_of(&bad).unwrap_err().len(), 2);
    }

    #[test]
    fn every_refusal_names_its_field() {
        let params = |pairs: &[(&str, &str)]| -> Params {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let errors = query_of(&params(&[
            ("status", "nope"),
            ("currency", "rupees"),
            ("from", "2026-01-02T03:04"),
            ("to", "2026-01-01T00:00"),
            ("cursor", "edited"),
        ]))
        .unwrap_err();
        for (field, error) in ["status:", "currency:", "to:", "cursor:"]
            .iter()
            .zip(&errors)
        {
            assert!(error.starts_with(field), "{errors:?}");
        }
        assert_eq!(errors.len(), 4, "{errors:?}");
        // A batch's cursor is the last mchOrderNo of the previous page.
        let batch = query_of(&params(&[("batch", "B1"), ("cursor", "PO-9")])).unwrap();
        assert_eq!(batch.cursor.as_deref(), Some("PO-9"));
        let index = query_of(&params(&[("cursor", "1700000000000:PO-9")])).unwrap();
        assert!(index.cursor.is_some());
    }
}
