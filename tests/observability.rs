//! Spans a user can follow: a worker process with an OTLP endpoint exports its `job` and
//! `gateway.call` spans (nested) to a receiver, flushed when it shuts down; a failed gateway
//! call's span carries the failure's code.

mod common;

use axum::body::Bytes;
use axum::routing::post;
use common::app::{inr, spawn_app};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarspay_worker::gateway::types::OrderRef;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// An OTLP/HTTP receiver on a free loopback port: keeps every body POSTed to `/v1/traces`.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Bytes>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| async move {
            kept.lock().unwrap().push(body);
            // An empty ExportTraceServiceResponse: everything accepted.
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bodies)
}

fn text(value: &Option<AnyValue>) -> Option<String> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .filter_map(|kv| Some((kv.key.clone(), text(&kv.value)?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exports_job_and_gateway_spans_over_otlp_and_flushes_them_on_shutdown() {
    let app = spawn_app(true, |_| {}).await;
    let (url, bodies) = otlp_receiver().await;
    let mut worker = app.worker_process_with(
        2,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_SERVICE_NAME", "otlp-test-worker"),
            // Batches wait a minute: what arrives below was sent by the shutdown's flush.
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
            // The order's poll is a job of its own (its span is checked below), whether or
            // not the order is final by its first poll.
            ("TARSPAY_POLL_IN_HAND", "false"),
        ],
    );
    app.enqueue(inr("OTLP-1", "125.50")).await;
    let outcomes = app.wait_outcomes(1).await;
    assert_eq!(outcomes["OTLP-1"].status.to_string(), "succeeded");
    assert!(
        bodies.lock().unwrap().is_empty(),
        "spans were sent before the batch delay or shutdown"
    );
    assert_eq!(worker.terminate(), Some(0), "worker exit code");

    let requests: Vec<ExportTraceServiceRequest> = bodies
        .lock()
        .unwrap()
        .iter()
        .map(|body| ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf"))
        .collect();
    assert!(!requests.is_empty(), "no OTLP request after shutdown");
    let mut spans: Vec<(Span, HashMap<String, String>)> = Vec::new();
    for resource_spans in requests.iter().flat_map(|r| &r.resource_spans) {
        let resource = attributes(
            &resource_spans
                .resource
                .as_ref()
                .expect("a resource")
                .attributes,
        );
        assert_eq!(
            resource.get("service.name").map(String::as_str),
            Some("otlp-test-worker")
        );
        for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
            spans.push((span.clone(), attributes(&span.attributes)));
        }
    }
    let find = |name: &str, kind: Option<&str>| {
        spans
            .iter()
            .find(|(span, attrs)| {
                span.name == name
                    && attrs.get("mch_order_no").map(String::as_str) == Some("OTLP-1")
                    && kind.is_none_or(|k| attrs.get("kind").map(String::as_str) == Some(k))
            })
            .unwrap_or_else(|| panic!("no {name} span for OTLP-1 in {} spans", spans.len()))
    };
    let (job, job_attrs) = find("job", Some("create_payout"));
    assert_eq!(job_attrs.get("queue").map(String::as_str), Some("payouts"));
    assert!(job_attrs.get("id").is_some_and(|id| !id.is_empty()));
    assert_eq!(job_attrs.get("attempt").map(String::as_str), Some("1"));
    // The order's poll job ran in a span of its own kind.
    find("job", Some("poll_status"));
    let (call, call_attrs) = find("gateway.call", None);
    assert_eq!(call_attrs.get("code").map(String::as_str), Some("0"));
    assert!(call_attrs.contains_key("latency_ms"), "{call_attrs:?}");
    assert!(
        call.parent_span_id == job.span_id && call.trace_id == job.trace_id,
        "the gateway call is not nested in its job"
    );
    // No secret travels with the spans.
    let key = app.key.expose_hex();
    for body in bodies.lock().unwrap().iter() {
        assert!(!body.windows(key.len()).any(|w| w == key.as_bytes()));
    }
}

/// A span's name and fields as text.
type SpanRecord = (String, HashMap<String, String>);

/// Every span's fields, kept when the span closes.
#[derive(Clone, Default)]
struct Closed(Arc<Mutex<Vec<SpanRecord>>>);

struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Closed {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields(HashMap::new());
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions_mut()
                .remove::<Fields>()
                .map(|f| f.0)
                .unwrap_or_default();
            self.0
                .lock()
                .unwrap()
                .push((span.name().to_owned(), fields));
        }
    }
}

#[tokio::test]
async fn gateway_span_records_the_code_of_a_failed_call() {
    let closed = Closed::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(closed.clone()));
    let gateway = common::spawn_gateway(|_| {}).await;
    let absent = gateway
        .client
        .query_payout(&OrderRef::MchOrderNo("NEVER-SENT-1".into()))
        .await
        .unwrap_err();
    assert_eq!(absent.code(), Some(5003020));
    // A port nothing listens on: a transport failure, recorded by its kind.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let closed_port = common::client_for(
        &format!("http://127.0.0.1:{port}"),
        &gateway.key,
        Duration::from_secs(2),
    );
    let unreachable = closed_port
        .query_payout(&OrderRef::MchOrderNo("NEVER-SENT-2".into()))
        .await
        .unwrap_err();
    assert_eq!(unreachable.kind(), "unreachable");

    let spans = closed.0.lock().unwrap().clone();
    let call = |order: &str| {
        spans
            .iter()
            .find(|(name, fields)| {
                name == "gateway.call"
                    && fields.get("mch_order_no").map(String::as_str) == Some(order)
            })
            .map(|(_, fields)| fields.clone())
            .unwrap_or_else(|| panic!("no gateway.call span for {order}: {spans:?}"))
    };
    let absent = call("NEVER-SENT-1");
    assert_eq!(absent.get("code").map(String::as_str), Some("5003020"));
    assert_eq!(
        absent.get("endpoint").map(String::as_str),
        Some(tarspay_worker::gateway::paths::QUERY_PAYOUT)
    );
    assert!(absent.contains_key("latency_ms"), "{absent:?}");
    let unreachable = call("NEVER-SENT-2");
    assert_eq!(
        unreachable.get("code").map(String::as_str),
        Some("unreachable")
    );
    // Only the span's own fields: no key, signature or nonce.
    for (_, fields) in spans.iter().filter(|(name, _)| name == "gateway.call") {
        for name in fields.keys() {
            assert!(
                ["endpoint", "mch_order_no", "code", "latency_ms"].contains(&name.as_str()),
                "unexpected span field {name}"
            );
        }
    }
}

/// A malformed endpoint stops the command at start, naming the variable without its value
/// (an endpoint may carry credentials).
#[test]
fn malformed_otlp_endpoint_stops_the_command_naming_the_variable() {
    let output = std::process::Command::new(common::app::BIN)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:s3cret@[bad")
        .env("TARSPAY_REDIS_URL", "redis://127.0.0.1:1")
        .arg("queue")
        .output()
        .expect("run tarspay-dev queue");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("span export cannot start: OTEL_EXPORTER_OTLP_ENDPOINT is invalid"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
