//! The operator console: server-rendered pages at `/console/` beside the API (not part of
//! the OpenAPI document). The contract — routes, cookie, CSRF, stable element ids — is
//! docs/console.md. Pages are maud templates (compiled and escaped at build time); the one
//! stylesheet and the one script are in the binary; charts are SVG drawn here.
//!
//! Access: the API token logs in as admin (may act), `viewer_token` as viewer (may look).
//! A session lives in Redis (`session`), every action is a CSRF-checked, same-origin `POST`
//! that is confirmed in the browser and written to the audit stream
//! `<prefix>:console:audit`.

mod assets;
mod chart;
pub mod data;
pub mod mask;
mod pages;
pub mod session;
mod views;

use crate::config::{ConfigError, Settings};
use crate::deployment::Deployment;
use crate::producer::Producer;
use crate::redis_conn::RedisConn;
use crate::secret::Secret;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use session::{Role, Sessions, Throttle};
use std::sync::Arc;

/// Largest form body a console route reads (login, logout, actions).
pub const FORM_LIMIT: usize = 16 * 1024;

/// Most entries kept in the audit stream (trimmed approximately).
pub const AUDIT_MAX_LEN: u64 = 10_000;

/// The address a request's connection came from (a request extension the server's accept
/// loop adds; behind a proxy, the proxy's): the login throttle counts per client, which is
/// this peer unless it is a trusted proxy (see [`session::client_ip`]).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// What the console's handlers share: the deployment (to read and act on), a producer (to
/// queue lookups), and the console's own sessions and tokens.
pub struct ConsoleState {
    pub(crate) deployment: Deployment,
    pub(crate) producer: Producer,
    pub(crate) console: Console,
}

impl ConsoleState {
    pub fn new(settings: &Settings, deployment: Deployment) -> Result<Self, ConfigError> {
        Ok(Self {
            producer: deployment.producer(settings)?,
            console: Console::new(settings, &deployment)?,
            deployment,
        })
    }
}

/// The console's tokens, sessions, throttle and audit log.
pub struct Console {
    admin: Option<Secret>,
    viewer: Option<Secret>,
    sessions: Sessions,
    throttle: Throttle,
    /// Reverse proxies whose `X-Forwarded-For` names the client (see [`session::client_ip`]).
    trusted_proxies: Vec<ipnet::IpNet>,
    conn: RedisConn,
    prefix: String,
}

impl Console {
    pub fn new(settings: &Settings, deployment: &Deployment) -> Result<Self, ConfigError> {
        // The deployment's own (multiplexed) connection.
        let conn = deployment.partitions()[0].queue.connection();
        let prefix = &settings.redis.queue_prefix;
        Ok(Self {
            // With auth disabled the API has no token, and the console no admin.
            admin: settings.server.api_token()?,
            viewer: settings.server.viewer_token()?,
            sessions: Sessions::new(conn.clone(), prefix),
            throttle: Throttle::default(),
            trusted_proxies: settings.server.trusted_proxies.clone(),
            conn,
            prefix: prefix.clone(),
        })
    }

    /// The role `token` logs in as, compared in constant time with each configured token.
    fn role_of(&self, token: &str) -> Option<Role> {
        let admin = self
            .admin
            .as_ref()
            .is_some_and(|t| !t.is_empty() && t.matches(token));
        let viewer = self
            .viewer
            .as_ref()
            .is_some_and(|t| !t.is_empty() && t.matches(token));
        if admin {
            Some(Role::Admin)
        } else if viewer {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// A digest naming the token `role` logs in with now (never the token itself), kept in
    /// each session: a session whose token was rotated or removed since is no session.
    fn grant(&self, role: Role) -> Option<String> {
        use sha2::{Digest, Sha256};
        let token = match role {
            Role::Admin => self.admin.as_ref(),
            Role::Viewer => self.viewer.as_ref(),
        }?;
        let digest = Sha256::new()
            .chain_update(b"tarspay-console-grant\0")
            .chain_update(token.expose().as_bytes())
            .finalize();
        Some(hex::encode(&digest[..16]))
    }

    /// The live session of cookie value `id`, if its token still logs in as its role; with
    /// `take_flash`, its flash message is consumed.
    async fn session(
        &self,
        id: &str,
        take_flash: bool,
    ) -> Result<Option<session::Session>, redis::RedisError> {
        Ok(self
            .sessions
            .get(id, take_flash)
            .await?
            .filter(|s| s.grant.is_some() && s.grant == self.grant(s.role)))
    }

    fn audit_key(&self) -> String {
        format!("{}:console:audit", self.prefix)
    }

    /// Appends one action to the audit stream.
    async fn audit(
        &self,
        operator: &str,
        role: &str,
        action: &str,
        target: &str,
        result: &str,
    ) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("XADD")
            .arg(self.audit_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(AUDIT_MAX_LEN)
            .arg("*")
            .arg("at")
            .arg(crate::queue::now_ms())
            .arg("operator")
            .arg(operator)
            .arg("role")
            .arg(role)
            .arg("action")
            .arg(action)
            .arg("target")
            .arg(target)
            .arg("result")
            .arg(result)
            .query_async::<String>(&mut conn)
            .await?;
        Ok(())
    }
}

impl Console {
    /// The audit log's latest `count` entries, newest first.
    async fn audit_entries(
        &self,
        count: usize,
    ) -> Result<Vec<std::collections::HashMap<String, String>>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.audit_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| {
                entry
                    .map
                    .into_iter()
                    .filter_map(|(k, v)| redis::from_redis_value::<String>(v).ok().map(|v| (k, v)))
                    .collect()
            })
            .collect())
    }
}

/// The Content-Security-Policy of every console answer: nothing inline, nothing foreign.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The console's routes (all under `/console`), merged into the server's router.
pub fn router(state: Arc<ConsoleState>, body_read_timeout: std::time::Duration) -> Router {
    Router::new()
        .route("/console", get(pages::to_overview))
        .route("/console/", get(pages::overview))
        .route("/console/login", get(pages::login_form).post(pages::login))
        .route("/console/logout", post(pages::logout))
        .route("/console/pause", post(pages::pause))
        .route("/console/resume", post(pages::resume))
        .route("/console/payouts", get(pages::payouts))
        .route("/console/payouts/{id}", get(pages::payout))
        .route("/console/payouts/{id}/lookup", post(pages::lookup))
        .route("/console/batches", get(pages::batches))
        .route("/console/batches/{id}", get(pages::batch))
        .route(
            "/console/batches/{id}/results.csv",
            get(pages::batch_results),
        )
        .route("/console/dead", get(pages::dead))
        .route("/console/dead/{id}/retry", post(pages::retry))
        .route("/console/audit", get(pages::audit))
        .route("/console/assets/{name}", get(assets::serve))
        // Forms are a few fields: a larger body is refused (413) before anyone reads it,
        // whatever limit the API's batch uploads have.
        .layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT))
        // A form sent too slowly is 408 (with the API's body read timeout), and a larger one
        // 413 before anyone reads it; these answers get the console's headers too.
        .layer(axum::middleware::from_fn_with_state(
            crate::server::BodyLimit {
                max_bytes: FORM_LIMIT,
                read_timeout: body_read_timeout,
            },
            crate::server::read_within,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}
