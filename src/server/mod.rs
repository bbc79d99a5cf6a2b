//! `tarspay-worker serve`: the callback receiver and the HTTP API, on axum.

mod api;
mod auth;
mod callback;
mod openapi;

pub use openapi::{OPENAPI_JSON, ROUTES};

use crate::config::{ConfigError, Settings};
use crate::gateway::PublicKey;
use crate::producer::Producer;
use crate::secret::Secret;
use crate::worker::Deployment;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Shared by every request.
pub struct AppState {
    pub deployment: Deployment,
    pub producer: Producer,
    pub system_key: PublicKey,
    /// Our merchant number: TarsPay's system key signs every merchant's callbacks, so a
    /// callback counts only if it is about our merchant.
    pub mch_no: Option<String>,
    pub api_token: Option<Secret>,
    pub metrics: PrometheusHandle,
    pub max_batch_bytes: usize,
}

impl AppState {
    pub fn new(settings: &Settings, deployment: Deployment) -> Result<Self, ConfigError> {
        Ok(Self {
            producer: deployment.producer(settings)?,
            deployment,
            system_key: settings.system_public_key(),
            mch_no: settings.mch_no.clone(),
            api_token: settings.api_token()?,
            metrics: crate::metrics::install(),
            max_batch_bytes: settings.max_batch_bytes as usize,
        })
    }
}

/// Every route; the API under `/v1` behind the bearer token.
pub fn router(state: Arc<AppState>, callback_path: &str, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/payouts", post(api::create_payout))
        .route("/v1/payouts/{mch_order_no}", get(api::get_payout))
        .route(
            "/v1/batches",
            post(api::create_batch).layer(DefaultBodyLimit::max(state.max_batch_bytes)),
        )
        .route("/v1/batches/{batch_id}", get(api::get_batch))
        .route("/v1/queue/pause", post(api::pause))
        .route("/v1/queue/resume", post(api::resume))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .merge(api)
        .route(callback_path, post(callback::receive))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(openapi::document))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
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
        &settings.callback_path,
        settings.max_body_bytes as usize,
    );
    // One shutdown signal for the server and the webhook deliverer.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let webhooks = match (&settings.webhook_url, &settings.webhook_secret) {
        (Some(url), Some(secret)) => {
            let (url, secret) = (url.as_str().to_owned(), secret.clone());
            let mut stopped = stopped.clone();
            Some(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(err) = crate::webhooks::run(&deployment, &url, &secret, shutdown).await {
                    tracing::error!(error = %err, "outcome webhooks not started");
                }
            }))
        }
        _ => None,
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await;
    if let Some(webhooks) = webhooks {
        let _ = webhooks.await;
    }
    result
}
