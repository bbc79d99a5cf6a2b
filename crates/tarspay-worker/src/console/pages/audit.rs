//! The audit log.

use super::{Viewing, render, unavailable};
use crate::console::ConsoleState;
use crate::console::views;
use axum::extract::State;
use axum::response::Response;
use maud::html;
use std::collections::HashMap;
use std::sync::Arc;

pub async fn audit(
    State(state): State<Arc<ConsoleState>>,
    Viewing { session, live }: Viewing,
) -> Response {
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
