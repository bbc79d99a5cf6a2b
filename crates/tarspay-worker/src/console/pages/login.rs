//! Logging in and out.

use super::{form_fields, poster, see_other, unavailable};
use crate::console::session;
use crate::console::views;
use crate::console::{ConsoleState, PeerAddr};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use std::sync::Arc;

pub async fn to_overview() -> Response {
    see_other("/console/")
}

pub async fn login_form(State(state): State<Arc<ConsoleState>>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_id(&headers)
        && let Ok(Some(_)) = state.console.session(&id, false).await
    {
        return see_other("/console/");
    }
    Html(views::login(None, "").into_string()).into_response()
}

/// Invisible formatting characters (bidirectional overrides, zero-width ones, the soft
/// hyphen, the byte-order mark): an operator name with one could read as another's.
fn is_format(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}')
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
    let peer = session::client_ip(
        peer.map_or(
            std::net::IpAddr::from([0, 0, 0, 0]),
            |Extension(PeerAddr(addr))| addr.ip(),
        ),
        &headers,
        &state.console.trusted_proxies,
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
        || operator.chars().any(|c| c.is_control() || is_format(c))
    {
        return login_refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Give your name (up to 64 characters): the audit log records it.",
            "",
        );
    }
    let Some(role) = state.console.role_of(token) else {
        let audited = state.console.throttle.failed(peer);
        tracing::warn!(operator = ?operator, %peer, "console login refused: wrong token");
        if audited {
            let _ = state
                .console
                .audit(operator, "none", "login", "", "refused")
                .await;
        }
        return login_refused(StatusCode::UNAUTHORIZED, "Wrong token.", operator);
    };
    let grant = state.console.grant(role).unwrap_or_default();
    let id = match state.console.sessions.create(role, operator, &grant).await {
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
