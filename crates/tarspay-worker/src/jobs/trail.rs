//! The order history lines the jobs note (see `ledger::history`): each gateway call, what it
//! answered and how long it took, and calls held back. Noted with `Ledger::note_soon`, so
//! they ride with the order's next ledger operation; the worker flushes what is left when a
//! run ends.

use super::reconcile::Lookup;
use crate::gateway::GatewayError;
use crate::ledger::history::{EventKind, OrderEvent};
use std::time::Instant;

/// A create that was sent: accepted (`code` 0), or the error.
pub(super) fn create_sent(
    attempt: u32,
    started: Instant,
    result: Result<&str, &GatewayError>,
) -> OrderEvent {
    let mut event = OrderEvent::now(EventKind::Create);
    event.attempt = Some(attempt);
    event.latency_ms = Some(started.elapsed().as_millis() as u64);
    match result {
        Ok(pay_order_id) => {
            event.code = Some(0);
            event.msg = Some(format!("accepted as {pay_order_id}"));
        }
        Err(err) => failed(&mut event, err),
    }
    event
}

/// A lookup at the gateway, made for `reason`.
pub(super) fn query(reason: &str, started: Instant, looked: &Lookup, not_found: i64) -> OrderEvent {
    let mut event = OrderEvent::now(EventKind::Query);
    event.reason = Some(reason.to_owned());
    event.latency_ms = Some(started.elapsed().as_millis() as u64);
    match looked {
        Lookup::Found(info) => {
            event.code = Some(0);
            event.state = Some(info.state.code());
        }
        Lookup::NotFound => {
            event.code = Some(not_found);
            event.msg = Some("no such order at the gateway".into());
        }
        Lookup::Failed(err) => failed(&mut event, err),
    }
    event
}

/// A call that was not made: `reason` says what held it back.
pub(super) fn held(reason: &str) -> OrderEvent {
    let mut event = OrderEvent::now(EventKind::Held);
    event.reason = Some(reason.to_owned());
    event
}

fn failed(event: &mut OrderEvent, err: &GatewayError) {
    event.code = err.code();
    // The error's text names the endpoint and the gateway's message; never a key or body
    // beyond the error's own snippet.
    event.msg = Some(err.to_string());
}
