//! `tarspay-worker serve`: the callback receiver and the HTTP API, on axum.

mod api;
mod auth;
mod body;
mod callback;
mod gauges;
mod listener;
mod note_limit;
mod openapi;
mod request_id;
mod unmatched;

pub use body::{BodyLimit, read_within};
pub use request_id::HEADER as REQUEST_ID_HEADER;

use crate::config::{ConfigError, Settings};
use crate::deployment::Deployment;
use crate::gateway::PublicKey;
use crate::ids::MerchantName;
use crate::producer::Producer;
use crate::secret::Secret;
use axum::extract::DefaultBodyLimit;
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

/// Shared by every request.
pub struct AppState {
    pub deployment: Deployment,
    pub producer: Producer,
    pub system_key: PublicKey,
    /// Each merchant profile's number: TarsPay's system key signs every merchant's
    /// callbacks, so a callback counts only if it names the mchNo of the order's merchant.
    pub merchants: Vec<(MerchantName, Option<String>)>,
    pub api_token: Option<Secret>,
    pub metrics: PrometheusHandle,
    /// The operator console's state (its own router's).
    pub console: Arc<crate::console::ConsoleState>,
    /// Untrusted callbacks noted in order histories (one per order per minute).
    pub untrusted_notes: note_limit::UntrustedNotes,
}

impl AppState {
    /// The merchant number of profile `merchant`, if set.
    pub fn mch_no_of(&self, merchant: &str) -> Option<&str> {
        self.merchants
            .iter()
            .find(|(name, _)| name == merchant)
            .and_then(|(_, mch_no)| mch_no.as_deref())
    }

    pub fn new(settings: &Settings, deployment: Deployment) -> Result<Self, ConfigError> {
        let console = Arc::new(crate::console::ConsoleState::new(
            settings,
            deployment.clone(),
        )?);
        Ok(Self {
            producer: deployment.producer(settings)?,
            deployment,
            system_key: settings.gateway.system_public_key,
            merchants: settings
                .gateway
                .profiles()
                .iter()
                .map(|p| (p.name.clone(), p.mch_no.clone()))
                .collect(),
            api_token: settings.server.api_token()?,
            metrics: crate::metrics::install(),
            console,
            untrusted_notes: Default::default(),
        })
    }
}

/// Where a request's body is bounded: batches are larger than everything else.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub body: BodyLimit,
    pub batch: BodyLimit,
}

impl Limits {
    pub fn from_settings(settings: &Settings) -> Self {
        let limit = |max_bytes: usize| BodyLimit {
            max_bytes,
            read_timeout: settings.server.body_read_timeout,
        };
        Self {
            body: limit(settings.server.max_body_bytes),
            batch: limit(settings.server.max_batch_bytes),
        }
    }
}

type Routes = OpenApiRouter<Arc<AppState>>;

/// Every route, each registered with its OpenAPI operation (this is the only place routes
/// are added): the `/v1` API, and the public routes (callback, health, metrics, document).
fn routes(limits: Limits, callback_path: &str) -> (Routes, Routes) {
    let bounded = |limit: BodyLimit| axum::middleware::from_fn_with_state(limit, body::read_within);
    let api = OpenApiRouter::new()
        .routes(routes!(api::create_payout).layer(bounded(limits.body)))
        .routes(routes!(api::get_payout))
        .routes(routes!(api::create_batch).layer(bounded(limits.batch)))
        .routes(routes!(api::get_batch))
        .routes(routes!(api::pause))
        .routes(routes!(api::resume));
    let (schemas, mut paths, method_router) = routes!(callback::receive);
    if let Some(item) = paths.paths.remove(callback::DOCUMENTED_PATH) {
        paths.paths.insert(callback_path.to_owned(), item);
    }
    let public = OpenApiRouter::new()
        .routes((schemas, paths, method_router).layer(bounded(limits.body)))
        .routes(routes!(api::healthz))
        .routes(routes!(api::metrics))
        .routes(routes!(openapi::document));
    (api, public)
}

/// The OpenAPI document of the router [`router`] builds for `callback_path`.
pub fn openapi(callback_path: &str) -> utoipa::openapi::OpenApi {
    let limits = BodyLimit {
        max_bytes: 0,
        read_timeout: Duration::ZERO,
    };
    let (api, public) = routes(
        Limits {
            body: limits,
            batch: limits,
        },
        callback_path,
    );
    assemble(api, public).1
}

/// The router and its document, from the same registrations.
fn assemble(api: Routes, public: Routes) -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    let (router, mut document) = OpenApiRouter::with_openapi(openapi::base())
        .merge(api)
        .merge(public)
        .split_for_parts();
    openapi::add_common_answers(&mut document);
    (router, document)
}

/// Every route; the API under `/v1` behind the bearer token; a request id and span on all.
pub fn router(state: Arc<AppState>, callback_path: &str, limits: Limits) -> Router {
    let (api, public) = routes(limits, callback_path);
    let api = api.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::require_token,
    ));
    let console = crate::console::router(state.console.clone(), limits.body.read_timeout);
    let (router, document) = assemble(api, public);
    router
        .with_state(state)
        // The console is not part of the API's document.
        .merge(console)
        .layer(Extension(openapi::Document::new(&document)))
        // Bodies are bounded per route by `body`; this is a backstop for the extractors.
        .layer(DefaultBodyLimit::max(limits.batch.max_bytes))
        .layer(axum::middleware::map_response(unmatched::with_json_error))
        .layer(axum::middleware::from_fn(request_id::trace))
}

/// Serves until `shutdown` resolves, then finishes requests in flight.
pub async fn serve(
    settings: &Settings,
    deployment: Deployment,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), std::io::Error> {
    let state = AppState::new(settings, deployment.clone()).map_err(std::io::Error::other)?;
    let app = router(
        Arc::new(state),
        &settings.server.callback_path,
        Limits::from_settings(settings),
    );
    // One shutdown signal for the server and the gauges. (Webhooks are delivered by workers.)
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let gauges = tokio::spawn(gauges::run(deployment, stopped));
    listener::run(
        listener,
        app,
        settings.server.header_read_timeout,
        async move {
            shutdown.await;
            let _ = stop.send(true);
        },
    )
    .await;
    let _ = gauges.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_is_documented_at_its_configured_path() {
        let document = openapi("/hooks/tarspay");
        assert!(document.paths.paths.contains_key("/hooks/tarspay"));
        assert!(!document.paths.paths.contains_key(callback::DOCUMENTED_PATH));
    }

    #[test]
    fn the_committed_document_is_the_derived_one() {
        let derived = openapi(callback::DOCUMENTED_PATH)
            .to_pretty_json()
            .expect("the document serialises");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/server/openapi.json");
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, format!("{derived}\n"))
                .expect("src/server/openapi.json is writable");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            committed.trim_end(),
            derived,
            "src/server/openapi.json is stale: regenerate with UPDATE_OPENAPI=1 cargo test --lib the_committed_document"
        );
    }
}
