//! Logging and tracing set-up: human-readable or JSON logs on stderr, and, when an OTLP
//! endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! spans exported over OTLP/HTTP (protobuf) in batches. Without an endpoint nothing extra runs.

use crate::config::{LogFormat, LogSettings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The variables that turn span export on, most specific first (OpenTelemetry's names).
pub const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// Names the variable, never its value: an endpoint or header may carry credentials.
    #[error("span export cannot start: {variable} is invalid ({reason})")]
    Otlp { variable: String, reason: String },
}

/// Keeps span export running; [`Telemetry::shutdown`] (or dropping it) sends the spans still
/// batched. Drop it outside the async runtime, after the command's work is done.
#[must_use = "dropping it stops span export; keep it until the command ends"]
#[derive(Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        return self.provider.is_some();
        #[cfg(not(feature = "otlp"))]
        false
    }

    /// Flushes the batched spans and stops the exporter (bounded by the SDK's export timeout).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("span export: the last spans may be lost ({err})");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber once; later calls (tests) are ignored and return an idle
/// guard. `RUST_LOG` wins over the configured log filter. Logs go to stderr so command output
/// on stdout stays clean. Exported spans have their own filter (info and above plus the
/// debug-level `job` spans, whatever the log filter), so a quiet log still exports every job
/// and gateway span.
pub fn init(settings: &LogSettings) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: no escape codes in collected logs (and no
    // colouring work per span field).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt: BoxedLayer = match settings.format {
        LogFormat::Human => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let endpoint = endpoint_variable();
    let (export, telemetry) = match endpoint {
        Some(variable) => export_layer(variable)?,
        None => (None, Telemetry::default()),
    };
    let layers: Vec<BoxedLayer> = std::iter::once(fmt).chain(export).collect();
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_err()
    {
        // A subscriber was already installed (tests): this one's exporter would see nothing.
        return Ok(Telemetry::default());
    }
    if let Some(variable) = endpoint
        && !telemetry.exporting()
    {
        tracing::warn!(
            variable,
            "an OTLP endpoint is set but this build has no `otlp` feature; spans are not exported"
        );
    }
    Ok(telemetry)
}

/// The first endpoint variable set to something, if any.
fn endpoint_variable() -> Option<&'static str> {
    OTLP_ENDPOINT_VARS
        .into_iter()
        .find(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

#[cfg(not(feature = "otlp"))]
fn export_layer(
    _variable: &'static str,
) -> Result<(Option<BoxedLayer>, Telemetry), TelemetryError> {
    Ok((None, Telemetry::default()))
}

/// The `tracing-opentelemetry` layer over a batching OTLP/HTTP exporter. The exporter reads
/// the endpoint, headers and timeout from the standard `OTEL_EXPORTER_OTLP_*` variables, the
/// batch sizes and delay from `OTEL_BSP_*`, the service name from `OTEL_SERVICE_NAME`.
#[cfg(feature = "otlp")]
fn export_layer(variable: &'static str) -> Result<(Option<BoxedLayer>, Telemetry), TelemetryError> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    // An https endpoint goes through rustls, which needs the process' crypto provider.
    crate::gateway::install_crypto_provider();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|err| build_error(variable, err))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() <= tracing::Level::INFO || (meta.is_span() && meta.name() == "job")
        }))
        .boxed();
    Ok((
        Some(layer),
        Telemetry {
            provider: Some(provider),
        },
    ))
}

/// The exporter's configuration errors quote the value; keep only the variable they name.
#[cfg(feature = "otlp")]
fn build_error(
    endpoint_variable: &'static str,
    err: opentelemetry_otlp::ExporterBuildError,
) -> TelemetryError {
    use opentelemetry_otlp::ExporterBuildError;
    match err {
        ExporterBuildError::InvalidConfiguration(message) => TelemetryError::Otlp {
            variable: message
                .split(':')
                .next()
                .filter(|name| name.starts_with("OTEL_"))
                .unwrap_or(endpoint_variable)
                .to_owned(),
            reason: "value not shown; an endpoint is an absolute http(s) URL, \
                     e.g. http://127.0.0.1:4318"
                .to_owned(),
        },
        other => TelemetryError::Otlp {
            variable: endpoint_variable.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// `service.name` when `OTEL_SERVICE_NAME` is not set.
#[cfg(feature = "otlp")]
const SERVICE_NAME: &str = "tarspay-worker";
