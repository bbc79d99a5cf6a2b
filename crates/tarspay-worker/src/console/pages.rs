//! The console's handlers: each page (and its `?fragment=live` region) and each action.

use super::data::{self, DeadRow, WorkerRow};
use super::session::{self, Role, Session};
use super::{ConsoleState, PeerAddr};
use super::{chart, mask, views};
use crate::batch;
use crate::ids::Currency;
use crate::ledger::history::{EventKind, OrderEvent, TimelineEntry, timeline};
use crate::ledger::index::{OrderPage, OrderQuery};
use crate::ledger::{BatchSummary, OrderRecord, Phase};
use crate::queue::QueueStats;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use futures::future::try_join_all;
use maud::{Markup, html};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

type Params = HashMap<String, String>;

// ---- answers ---------------------------------------------------------------------------

fn unavailable(err: impl std::fmt::Display) -> Response {
    tracing::error!(error = %err, "console: storage unavailable");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html("<!DOCTYPE html><title>Unavailable</title><p>Storage is unavailable; try again shortly.</p>"),
    )
        .into_response()
}

fn refused(status: StatusCode, reason: &str) -> Response {
    let body = html! {
        (maud::DOCTYPE)
        html lang="en" { head { meta charset="utf-8"; title { "Refused" } } body { main { h1 { "Refused" } p { (reason) } p { a href="/console/" { "Back to the console" } } } } }
    };
    (status, Html(body.into_string())).into_response()
}

fn see_other(location: &str) -> Response {
    Redirect::to(location).into_response()
}

/// Only the live region when the page's refresh asks for it.
fn is_live(params: &Params) -> bool {
    params.get("fragment").is_some_and(|f| f == "live")
}

/// A page, or only its live region for `?fragment=live`.
fn render(
    live: bool,
    title: &str,
    current: &str,
    session: &Session,
    before: Markup,
    region: Markup,
    after: Markup,
) -> Response {
    if live {
        return Html(region.into_string()).into_response();
    }
    let body = html! {
        (before)
        div #live data-live { (region) }
        (after)
    };
    Html(views::page(title, current, session, session.flash.as_deref(), body).into_string())
        .into_response()
}

/// A path segment, percent-encoded (dead ids hold `/` and `:`).
pub fn encode_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

// ---- access ----------------------------------------------------------------------------

/// The request's session, for a page: to the login page without one (`401` for a live
/// refresh, whose script then reloads).
async fn viewer(
    state: &ConsoleState,
    headers: &HeaderMap,
    live: bool,
) -> Result<(String, Session), Response> {
    let out = || {
        if live {
            StatusCode::UNAUTHORIZED.into_response()
        } else {
            see_other("/console/login")
        }
    };
    let Some(id) = session::cookie_id(headers) else {
        return Err(out());
    };
    match state.console.sessions.get(&id, !live).await {
        Ok(Some(session)) => Ok((id, session)),
        Ok(None) => Err(out()),
        Err(err) => Err(unavailable(err)),
    }
}

/// The request's session, for a `POST`: `401` without one, `403` from another origin or
/// without the session's CSRF token.
async fn poster(
    state: &ConsoleState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(String, Session), Response> {
    let Some(id) = session::cookie_id(headers) else {
        return Err(refused(StatusCode::UNAUTHORIZED, "Log in first."));
    };
    let session = match state.console.sessions.get(&id, false).await {
        Ok(Some(session)) => session,
        Ok(None) => {
            return Err(refused(
                StatusCode::UNAUTHORIZED,
                "Your session has ended: log in again.",
            ));
        }
        Err(err) => return Err(unavailable(err)),
    };
    if !session::same_origin(headers) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "This form came from another site.",
        ));
    }
    if !session::csrf_matches(&session.csrf, form.get("csrf").map(String::as_str)) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "The form's security token is missing or stale: reload the page and try again.",
        ));
    }
    Ok((id, session))
}

/// [`poster`], and an admin.
async fn admin(
    state: &ConsoleState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(String, Session), Response> {
    let (id, session) = poster(state, headers, form).await?;
    if session.role != Role::Admin {
        return Err(refused(StatusCode::FORBIDDEN, "A viewer may only look."));
    }
    Ok((id, session))
}

/// Records the action, leaves `message` for the next page, and sends the browser there.
async fn done(
    state: &ConsoleState,
    (id, session): (&str, &Session),
    action: &str,
    target: &str,
    result: &str,
    message: &str,
    back: &str,
) -> Response {
    if let Err(err) = state
        .console
        .audit(
            &session.operator,
            session.role.as_str(),
            action,
            target,
            result,
        )
        .await
    {
        return unavailable(err);
    }
    tracing::info!(operator = %session.operator, role = session.role.as_str(), action, target, result, "console action");
    let _ = state.console.sessions.set_flash(id, message).await;
    see_other(back)
}

// ---- login -----------------------------------------------------------------------------

pub async fn to_overview() -> Response {
    see_other("/console/")
}

pub async fn login_form(State(state): State<Arc<ConsoleState>>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_id(&headers)
        && let Ok(Some(_)) = state.console.sessions.get(&id, false).await
    {
        return see_other("/console/");
    }
    Html(views::login(None, "").into_string()).into_response()
}

fn login_refused(status: StatusCode, error: &str, operator: &str) -> Response {
    (
        status,
        Html(views::login(Some(error), operator).into_string()),
    )
        .into_response()
}

pub async fn login(
    State(state): State<Arc<ConsoleState>>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer = peer.map_or(
        std::net::IpAddr::from([0, 0, 0, 0]),
        |Extension(PeerAddr(addr))| addr.ip(),
    );
    let form = form_fields(&body);
    let operator = form.get("operator").map(|o| o.trim()).unwrap_or_default();
    let token = form.get("token").map(String::as_str).unwrap_or_default();
    if !state.console.throttle.allows(peer) {
        return login_refused(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many wrong tokens: wait a minute and try again.",
            operator,
        );
    }
    if !session::same_origin(&headers) {
        return login_refused(
            StatusCode::FORBIDDEN,
            "This form came from another site.",
            "",
        );
    }
    if operator.is_empty()
        || operator.chars().count() > 64
        || operator.chars().any(char::is_control)
    {
        return login_refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Give your name (up to 64 characters): the audit log records it.",
            "",
        );
    }
    let Some(role) = state.console.role_of(token) else {
        state.console.throttle.failed(peer);
        tracing::warn!(operator, %peer, "console login refused: wrong token");
        let _ = state
            .console
            .audit(operator, "none", "login", "", "refused")
            .await;
        return login_refused(StatusCode::UNAUTHORIZED, "Wrong token.", operator);
    };
    let id = match state.console.sessions.create(role, operator).await {
        Ok(id) => id,
        Err(err) => return unavailable(err),
    };
    let _ = state
        .console
        .audit(operator, role.as_str(), "login", "", "ok")
        .await;
    let cookie = session::session_cookie(&id, session::is_https(&headers));
    let mut response = see_other("/console/");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

pub async fn logout(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = form_fields(&body);
    let (id, session) = match poster(&state, &headers, &form).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    if let Err(err) = state.console.sessions.delete(&id).await {
        return unavailable(err);
    }
    let _ = state
        .console
        .audit(&session.operator, session.role.as_str(), "logout", "", "ok")
        .await;
    let mut response = see_other("/console/login");
    if let Ok(value) = HeaderValue::from_str(&session::clear_cookie(session::is_https(&headers))) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

// ---- overview --------------------------------------------------------------------------

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
        d.minute_stats(60),
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
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
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
            p #oldest-waiting data-age-ms=[total.oldest_job_age.map(|a| a.as_millis() as u64)] {
                "Oldest job in the queue: "
                @match total.oldest_job_age {
                    Some(age) => strong { (views::age(age.as_millis() as u64)) },
                    None => "none",
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

pub async fn pause(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    set_paused(state, headers, body, true).await
}

pub async fn resume(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    set_paused(state, headers, body, false).await
}

async fn set_paused(
    state: Arc<ConsoleState>,
    headers: HeaderMap,
    body: Bytes,
    paused: bool,
) -> Response {
    let form = form_fields(&body);
    let (id, session) = match admin(&state, &headers, &form).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
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

// ---- payouts ---------------------------------------------------------------------------

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
            Err(err) => errors.push(err),
        }
    }
    if let Some(currency) = get("currency") {
        match Currency::parse(&currency.to_ascii_uppercase()) {
            Ok(c) => query.currency = Some(c),
            Err(err) => errors.push(err.to_string()),
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
    if errors.is_empty() {
        Ok(query)
    } else {
        Err(errors)
    }
}

fn orders_table(id: &str, orders: &[OrderRecord]) -> Markup {
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
                            td { (o.phase.as_str()) @if o.stuck { " (stuck)" } @if o.ambiguous { " (ambiguous)" } }
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
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
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
    headers: HeaderMap,
    Path(mch_order_no): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
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
            dd #phase data-phase=(record.phase.as_str()) { (record.phase.as_str()) @if record.stuck { " — stuck (past the polling deadline)" } @if record.ambiguous { " — ambiguous (a create may have reached the gateway)" } }
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
    headers: HeaderMap,
    Path(mch_order_no): Path<String>,
    body: Bytes,
) -> Response {
    let form = form_fields(&body);
    let (id, session) = match admin(&state, &headers, &form).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
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

// ---- batches ---------------------------------------------------------------------------

/// Orders of the batch in a final phase.
fn finished(summary: &BatchSummary) -> usize {
    summary
        .phases
        .iter()
        .filter(|(phase, _)| Phase::from_str(phase).is_ok_and(Phase::is_final))
        .map(|(_, totals)| totals.count)
        .sum()
}

fn amounts(amounts: &BTreeMap<String, rust_decimal::Decimal>) -> String {
    amounts
        .iter()
        .map(|(c, v)| format!("{v} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn progress(id: Option<&str>, summary: &BatchSummary) -> Markup {
    let done = finished(summary);
    let label = format!("{done} of {} finished", summary.total);
    html! {
        progress id=[id] max=(summary.total.max(1)) value=(done) aria-label=(label) { (label) }
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
    let summaries = match try_join_all(
        entries
            .iter()
            .map(|e| state.deployment.batch_summary(&e.batch_id)),
    )
    .await
    {
        Ok(s) => s,
        Err(err) => return unavailable(err),
    };
    let region = html! {
        div.table-wrap {
            table #batches {
                thead { tr { th scope="col" { "Batch" } th scope="col" { "First payout" } th scope="col" { "Payouts" } th scope="col" { "Progress" } th scope="col" { "Succeeded" } } }
                tbody {
                    @for (entry, summary) in entries.iter().zip(&summaries) {
                        tr data-batch=(entry.batch_id) data-total=(summary.total) data-finished=(finished(summary)) {
                            th scope="row" { a href=(format!("/console/batches/{}", encode_segment(&entry.batch_id))) { (entry.batch_id) } }
                            td { (views::time(entry.first_ms)) }
                            td { (summary.total) }
                            td { (progress(None, summary)) }
                            td { (summary.phases.get("succeeded").map(|t| amounts(&t.amounts)).unwrap_or_default()) }
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

// ---- dead and stuck --------------------------------------------------------------------

pub async fn dead(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let unknown = OrderQuery {
        phase: Some(Phase::Unknown),
        limit: 100,
        ..Default::default()
    };
    let (rows, stuck, ambiguous) = match tokio::join!(
        data::dead_jobs(&state.deployment, 200),
        state.deployment.stuck_len(),
        state.deployment.search_orders(&unknown),
    ) {
        (Ok(rows), Ok(stuck), Ok(page)) => (rows, stuck, page),
        (Err(err), _, _) => return unavailable(err),
        (_, Err(err), _) | (_, _, Err(err)) => return unavailable(err),
    };
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
        p.muted { "Below: payouts in phase " code { "unknown" } " — a create may have reached the gateway without an answer; only a lookup can settle them." }
        (orders_table("stuck", &ambiguous.orders))
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
    headers: HeaderMap,
    Path(dead_id): Path<String>,
    body: Bytes,
) -> Response {
    let form = form_fields(&body);
    let (id, session) = match admin(&state, &headers, &form).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
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

// ---- audit -----------------------------------------------------------------------------

pub async fn audit(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let live = is_live(&params);
    let (_, session) = match viewer(&state, &headers, live).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let entries = match state.console.audit_entries(200).await {
        Ok(entries) => entries,
        Err(err) => return unavailable(err),
    };
    let field = |e: &HashMap<String, String>, name: &str| e.get(name).cloned().unwrap_or_default();
    let region = html! {
        div.table-wrap {
            table #audit {
                caption { "The latest " (entries.len()) " actions, newest first" }
                thead { tr { th scope="col" { "When" } th scope="col" { "Operator" } th scope="col" { "Role" } th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Result" } } }
                tbody {
                    @for e in &entries {
                        tr data-action=(field(e, "action")) data-target=(field(e, "target")) data-result=(field(e, "result")) {
                            td { (views::time(field(e, "at").parse().unwrap_or(0))) }
                            td { (field(e, "operator")) }
                            td { (field(e, "role")) }
                            td { (field(e, "action")) }
                            td { (field(e, "target")) }
                            td { (field(e, "result")) }
                        }
                    }
                    @if entries.is_empty() { tr { td colspan="6" { "Nothing yet." } } }
                }
            }
        }
    };
    render(
        live,
        "Audit log",
        "/console/audit",
        &session,
        html! {},
        region,
        html! {},
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_for_paths() {
        assert_eq!(encode_segment("kenya:2/1700-0"), "kenya%3A2%2F1700-0");
        assert_eq!(encode_segment("po_1-A"), "po_1-A");
    }

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
}
