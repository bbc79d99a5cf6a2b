//! The OpenAPI document, derived rather than written: each route and its operation come from
//! its handler's `#[utoipa::path]` (registered in `server::routes`, the one place a route is
//! added, so the document and the router cannot disagree), and the schemas from the types the
//! handlers serialize. `openapi.json` beside this file is a generated copy for readers, held
//! equal to the derived document by a test (regenerate:
//! `UPDATE_OPENAPI=1 cargo test --lib openapi`).

use crate::batch::BatchError;
use crate::ledger::OrderRecord;
use crate::payout::{FieldError, PayoutRequest};
use axum::Extension;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::sync::Arc;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ArrayBuilder, ObjectBuilder, RefOr, Type, schema::Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tarspay-worker API",
        description = "Queue payouts through TarsPay, follow them, and receive TarsPay callbacks. \
            Every /v1 route needs `Authorization: Bearer <TARSPAY_API_TOKEN>`. Money is always a \
            decimal string. Bodies are strict JSON (`Content-Type: application/json`; a key \
            repeated in an object is refused). A 503 means the outcome is unknown: retry with \
            the same mchOrderNo, never a new one. Every answer carries `x-request-id` (the \
            caller's, if it sent a sane one)."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document's frame (info, security); `server::routes` adds every path.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Answers any operation may give besides its own, added once here rather than on each
/// handler: 401 on the token-protected ones, 404 where the path names something, 408/413
/// where a body is read, and 503 (the outcome is unknown) wherever Redis is asked.
pub fn add_common_answers(openapi: &mut utoipa::openapi::OpenApi) {
    let answer = |description: &str| {
        let content = utoipa::openapi::ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                ErrorBody::name(),
            ))))
            .build();
        RefOr::T(
            utoipa::openapi::ResponseBuilder::new()
                .description(description)
                .content("application/json", content)
                .build(),
        )
    };
    for item in openapi.paths.paths.values_mut() {
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            // No `security` of its own: the document's bearer token applies.
            let protected = operation.security.is_none();
            let mut common = Vec::new();
            if protected {
                common.push(("401", "Missing or wrong bearer token"));
                common.push((
                    "503",
                    "Storage unavailable: the outcome is unknown (the request may have been \
                     stored). Retry with the same mchOrderNo; never read it as \"not queued\"",
                ));
            }
            if operation
                .parameters
                .iter()
                .flatten()
                .any(|p| matches!(p, RefOr::T(p) if p.parameter_in == ParameterIn::Path))
            {
                common.push(("404", "Nothing under that id"));
            }
            if operation.request_body.is_some() {
                common.push(("408", "The body did not arrive within body_read_timeout"));
                common.push(("413", "The body (or its Content-Length) is over the limit"));
            }
            for (status, description) in common {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| answer(description));
            }
        }
    }
}

/// The rendered document, shared by every request for it.
#[derive(Clone)]
pub struct Document(Arc<String>);

impl Document {
    pub fn new(openapi: &utoipa::openapi::OpenApi) -> Self {
        // Serialising plain data into a string cannot fail; an empty object would show it.
        Self(Arc::new(openapi.to_json().unwrap_or_else(|_| "{}".into())))
    }
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", operation_id = "openapi", tag = "operations", security(),
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json"))
)]
pub async fn document(Extension(document): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.0.as_str().to_owned(),
    )
        .into_response()
}

/// Every error answer: what was wrong, naming the field or key.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
        }
    }
}

/// A payout with invalid fields: every one, with the rule it broke.
#[derive(Debug, Serialize, ToSchema)]
pub struct Invalid {
    pub error: String,
    pub errors: Vec<FieldError>,
}

impl Invalid {
    pub fn new(errors: Vec<FieldError>) -> Self {
        Self {
            error: "invalid payout".into(),
            errors,
        }
    }
}

/// The mchOrderNo is held by a different payout: the one registered first.
#[derive(Debug, Serialize, ToSchema)]
pub struct Conflict {
    pub error: String,
    pub current: OrderRecord,
}

impl Conflict {
    pub fn new(current: OrderRecord) -> Self {
        Self {
            error: format!(
                "mchOrderNo {} already exists with a different payout",
                current.mch_order_no
            ),
            current,
        }
    }
}

/// A batch refused whole: nothing was queued. `detail` is absent when the refusal is about
/// the request rather than its rows (a bad `batchId`).
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchRefused {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<BatchError>,
}

impl BatchRefused {
    pub fn new(detail: BatchError) -> Self {
        Self {
            error: detail.to_string(),
            detail: Some(detail),
        }
    }

    pub fn request(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            detail: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueState {
    pub paused: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok` or `down`.
    pub redis: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_alive: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// A fixed message when Redis is down; the details are in the server's log only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

impl Health {
    pub fn up(workers_alive: u64, paused: bool) -> Self {
        Self {
            redis: "ok",
            workers_alive: Some(workers_alive),
            paused: Some(paused),
            error: None,
        }
    }

    pub fn down() -> Self {
        Self {
            redis: "down",
            workers_alive: None,
            paused: None,
            error: Some("Redis unavailable; details are in the server log"),
        }
    }
}

/// A JSON batch: an array of payouts, at least one.
pub struct PayoutBatch;

impl PartialSchema for PayoutBatch {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                PayoutRequest::name(),
            )))
            .min_items(Some(1))
            .into()
    }
}

impl ToSchema for PayoutBatch {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((PayoutRequest::name().into_owned(), PayoutRequest::schema()));
        PayoutRequest::schemas(schemas);
    }
}

/// A CSV batch: a header row naming the fields, then at least one row.
pub struct CsvBatch;

impl PartialSchema for CsvBatch {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^[^\n]+\n[\s\S]*\S"))
            .description(Some(
                "A header row (mchOrderNo,amount,currency,wayCode,...) and at least one row; \
                 empty cells are left out.",
            ))
            .into()
    }
}

impl ToSchema for CsvBatch {}

/// A TarsPay callback, as the gateway documents it. Strict JSON: a repeated key is a 400.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // Only described, never built: the receiver reads the raw body.
pub struct CallbackNotice {
    /// 1 deposit, 2 payout.
    biz_type: i64,
    pay_order_id: Option<String>,
    mch_no: String,
    mch_order_no: String,
    order_amount: Option<String>,
    pay_amount: Option<String>,
    currency: Option<String>,
    state: i64,
    fee: Option<String>,
    fail_reason: Option<String>,
}
