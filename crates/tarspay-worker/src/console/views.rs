//! The layout every console page shares, and small pieces of markup.

use super::assets;
use super::session::Session;
use maud::{DOCTYPE, Markup, html};

/// The pages of the navigation: (path, label).
const NAV: [(&str, &str); 5] = [
    ("/console/", "Overview"),
    ("/console/payouts", "Payouts"),
    ("/console/batches", "Batches"),
    ("/console/dead", "Dead & stuck"),
    ("/console/audit", "Audit log"),
];

/// A whole page: `current` is the nav entry it belongs to; `live` the region that
/// refreshes itself (the page's `?fragment=live` answer is exactly its content).
pub fn page(
    title: &str,
    current: &str,
    session: &Session,
    flash: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                title { (title) " · TarsPay console" }
                link rel="stylesheet" href=(assets::css_url());
                script src=(assets::js_url()) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/console/" { "TarsPay console" }
                    nav aria-label="Console" {
                        ul {
                            @for (path, label) in NAV {
                                li {
                                    @if path == current {
                                        a href=(path) aria-current="page" { (label) }
                                    } @else {
                                        a href=(path) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    span.who { "Signed in as " (session.operator) " (" span #role data-role=(session.role.as_str()) { (session.role.as_str()) } ")" }
                    form #logout-form method="post" action="/console/logout" {
                        (csrf_field(session))
                        button type="submit" { "Log out" }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    @if let Some(flash) = flash {
                        @let error = flash.starts_with("Refused") || flash.starts_with("Failed") || flash.starts_with("No ");
                        p.flash.error[error] role="status" { (flash) }
                    }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field every `POST` form carries.
pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// An admin's action button in its own confirmed `POST` form.
pub fn action_form(
    session: &Session,
    id: Option<&str>,
    class: &str,
    action: &str,
    label: &str,
    confirm: &str,
) -> Markup {
    html! {
        form class=(format!("inline {class}")) id=[id] method="post" action=(action) data-confirm=(confirm) {
            (csrf_field(session))
            button type="submit" { (label) }
        }
    }
}

/// A timestamp (ms since the epoch) as UTC text.
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return "—".to_owned();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// A duration in ms, short (`3 s`, `2 min`, `1 h 5 min`).
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The login page (no session yet).
pub fn login(error: Option<&str>, operator: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Log in · TarsPay console" }
                link rel="stylesheet" href=(assets::css_url());
            }
            body {
                main #main.login {
                    h1 { "TarsPay console" }
                    @if let Some(error) = error {
                        p #login-error.error role="alert" { (error) }
                    }
                    form #login method="post" action="/console/login" {
                        div {
                            label for="operator" { "Your name (for the audit log)" }
                            input #operator type="text" name="operator" required maxlength="64" autocomplete="username" value=(operator);
                        }
                        div {
                            label for="token" { "Token" }
                            input #token type="password" name="token" required autocomplete="current-password";
                        }
                        button #login-submit type="submit" { "Log in" }
                    }
                    p.muted { "The admin token may act; the viewer token may only look." }
                }
            }
        }
    }
}
