//! The console's handlers: each page (and its `?fragment=live` region) and each action,
//! one file per page group; here the answers and access checks they share.

use super::ConsoleState;
use super::session::{self, Role, Session};
use super::views;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{Markup, html};
use std::collections::HashMap;
use std::sync::Arc;

mod audit;
mod batches;
mod dead;
mod login;
mod overview;
mod payouts;

pub(super) use audit::audit;
pub(super) use batches::{batch, batch_results, batches};
pub(super) use dead::{dead, retry};
pub(super) use login::{login, login_form, logout, to_overview};
pub(super) use overview::{overview, pause, resume};
pub(super) use payouts::{lookup, payout, payouts};

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
fn encode_segment(text: &str) -> String {
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
    match state.console.session(&id, !live).await {
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
    let session = match state.console.session(&id, false).await {
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

/// A page's reader: the session (see [`viewer`]) and whether only the live region is asked
/// for (`?fragment=live`).
pub(super) struct Viewing {
    session: Session,
    live: bool,
}

impl FromRequestParts<Arc<ConsoleState>> for Viewing {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ConsoleState>,
    ) -> Result<Self, Response> {
        let params: Params = parts
            .uri
            .query()
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default();
        let live = is_live(&params);
        let (_, session) = viewer(state, &parts.headers, live).await?;
        Ok(Self { session, live })
    }
}

/// An admin's action: the form (see [`admin`]), its session and the session's id.
pub(super) struct Acting {
    id: String,
    session: Session,
}

impl FromRequest<Arc<ConsoleState>> for Acting {
    type Rejection = Response;

    async fn from_request(req: Request, state: &Arc<ConsoleState>) -> Result<Self, Response> {
        let headers = req.headers().clone();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = form_fields(&body);
        let (id, session) = admin(state, &headers, &form).await?;
        Ok(Self { id, session })
    }
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
    tracing::info!(operator = ?session.operator, role = session.role.as_str(), action, target, result, "console action");
    let _ = state.console.sessions.set_flash(id, message).await;
    see_other(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_for_paths() {
        assert_eq!(encode_segment("kenya:2/1700-0"), "kenya%3A2%2F1700-0");
        assert_eq!(encode_segment("po_1-A"), "po_1-A");
    }
}
