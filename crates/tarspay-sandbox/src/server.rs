//! The sandbox's HTTP side: its own accept loop (so a fault can drop a connection without an
//! answer), signature checks exactly as TarsPay documents them, the six API endpoints, and the
//! `/sandbox/…` report and control endpoints.

use super::Shared;
use super::book::{InsertError, NewOrder, OrderKind, insert_order};
use super::limits::{RATE_LIMITED_CODE, retry_after_secs};
use super::rules::{
    ContentEncoding, Endpoint, FaultAction, FaultRule, OutcomeRule, RateLimit, SandboxMerchant,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tarspay_worker::gateway::client::{HEADER_API_KEY, HEADER_NONCE, HEADER_SIGNATURE};
use tarspay_worker::gateway::keys::PublicKey;
use tarspay_worker::gateway::params::Params;
use tarspay_worker::gateway::paths;
use tarspay_worker::gateway::signing::{string_to_sign, verify_message};
use tarspay_worker::money::Amount;
use tarspay_worker::wall_clock::now_ms;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// Lets a handler close its own connection without answering.
#[derive(Clone)]
struct ConnectionKill(Arc<Notify>);

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let router = routes(shared.clone());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        shared
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        let router = router.clone();
        let connection_kill = ConnectionKill(kill.clone());
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(connection_kill.clone());
                router.clone().oneshot(request)
            },
        );
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            // Dropping the connection future closes the socket with no answer sent.
            tokio::select! {
                _ = connection => {}
                _ = kill.notified() => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(paths::CREATE_PAYOUT, post(api))
        .route(paths::QUERY_PAYOUT, post(api))
        .route(paths::CREATE_DEPOSIT, post(api))
        .route(paths::QUERY_DEPOSIT, post(api))
        .route(paths::BALANCE, post(api))
        .route(paths::PAYOUT_PROOF, post(api))
        .route("/sandbox/info", get(info))
        .route("/sandbox/orders", get(orders))
        .route("/sandbox/orders/{mch_order_no}", get(order))
        .route("/sandbox/faults", put(set_faults))
        .route("/sandbox/outcomes", put(set_outcomes))
        .route("/sandbox/merchants", post(add_merchant).get(merchants))
        .route("/sandbox/merchants/{mch_no}", get(merchant))
        .route("/sandbox/merchants/{mch_no}/balance", put(set_balance))
        .route(
            "/sandbox/merchants/{mch_no}/rate-limit",
            put(set_rate_limit).delete(lift_rate_limit),
        )
        .route(
            "/sandbox/merchants/{mch_no}/calls",
            get(calls).delete(clear_calls),
        )
        .route("/sandbox/merchants/{mch_no}/orders", get(merchant_orders))
        .route(
            "/sandbox/merchants/{mch_no}/orders/{mch_order_no}",
            get(merchant_order),
        )
        .with_state(shared)
}

fn envelope_ok(data: Value) -> Response {
    axum::Json(json!({"code": 0, "msg": "SUCCESS", "data": data})).into_response()
}

fn refuse_response(code: i64, msg: String) -> Response {
    envelope_err(code, msg).into_response()
}

/// A TarsPay error answer: an envelope with a non-zero code.
struct Refusal {
    code: i64,
    msg: String,
}

fn envelope_err(code: i64, msg: impl Into<String>) -> Refusal {
    Refusal {
        code,
        msg: msg.into(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        axum::Json(json!({"code": self.code, "msg": self.msg})).into_response()
    }
}

/// A call whose signature checked out.
struct SignedCall {
    mch_no: String,
    fields: Map<String, Value>,
}

impl SignedCall {
    fn text(&self, field: &str) -> Option<String> {
        Params::json_field(&self.fields, field)
    }

    fn required(&self, field: &str) -> Result<String, Refusal> {
        self.text(field)
            .ok_or_else(|| envelope_err(5003001, format!("missing parameter: {field}")))
    }
}

/// Header checks, then the signature over `POST|path|nonce|PARAMS`, then the merchant.
fn authenticate(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<SignedCall, Refusal> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| envelope_err(5003001, format!("missing header {name}")))
    };
    let api_key = header(HEADER_API_KEY)?;
    let nonce = header(HEADER_NONCE)?;
    let signature = header(HEADER_SIGNATURE)?;
    let nonce_millis: u64 = nonce
        .parse()
        .map_err(|_| envelope_err(5003001, "X-API-NONCE must be Unix time in milliseconds"))?;
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(envelope_err(5003001, "request body must be a JSON object"));
    };
    let Some((mch_no, public_key)) = shared
        .book()
        .merchant_for_key(api_key)
        .map(|(mch_no, key)| (mch_no.to_owned(), *key))
    else {
        return Err(envelope_err(5003002, "merchant or API key does not exist"));
    };
    let message = string_to_sign(path, nonce, &Params::from_json_object(&fields));
    if !verify_message(&public_key, message.as_bytes(), signature) {
        return Err(envelope_err(5003008, "signature error"));
    }
    let window = shared.config().nonce_window.as_millis() as u64;
    if now_ms().abs_diff(nonce_millis) > window {
        return Err(envelope_err(
            5003008,
            "signature error: nonce outside the accepted window",
        ));
    }
    let call = SignedCall { mch_no, fields };
    if call.text("mchNo").as_deref() != Some(call.mch_no.as_str()) {
        return Err(envelope_err(5003002, "mchNo does not match the API key"));
    }
    Ok(call)
}

fn endpoint_of(path: &str) -> Option<Endpoint> {
    Some(match path {
        paths::CREATE_PAYOUT => Endpoint::CreatePayout,
        paths::QUERY_PAYOUT => Endpoint::QueryPayout,
        paths::CREATE_DEPOSIT => Endpoint::CreateDeposit,
        paths::QUERY_DEPOSIT => Endpoint::QueryDeposit,
        paths::BALANCE => Endpoint::Balance,
        paths::PAYOUT_PROOF => Endpoint::PayoutProof,
        _ => return None,
    })
}

/// The first fault rule that matches this call and still has uses left.
fn pick_fault(
    shared: &Shared,
    endpoint: Endpoint,
    mch_no: &str,
    mch_order_no: &str,
) -> Option<FaultAction> {
    let rules: Vec<FaultRule> = shared.config().faults.clone();
    let mut book = shared.book();
    let age = book.age(mch_no, mch_order_no);
    rules.into_iter().enumerate().find_map(|(index, rule)| {
        let applies = (rule.endpoint == endpoint || rule.endpoint == Endpoint::Any)
            && mch_order_no.starts_with(&rule.prefix)
            && rule.action.applies(endpoint, age)
            && book.take_fault(index, mch_no, mch_order_no, rule.times);
        applies.then_some(rule.action)
    })
}

/// `response` with its body compressed in `encoding`, headers kept (`Content-Length` follows
/// the new body).
async fn compressed(response: Response, encoding: ContentEncoding) -> Response {
    use std::io::Write;
    let (mut parts, body) = response.into_parts();
    let Ok(plain) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let level = flate2::Compression::default();
    let (name, encoded) = match encoding {
        ContentEncoding::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
            (
                "gzip",
                encoder.write_all(&plain).and_then(|()| encoder.finish()),
            )
        }
        ContentEncoding::Deflate => {
            let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
            (
                "deflate",
                encoder.write_all(&plain).and_then(|()| encoder.finish()),
            )
        }
    };
    let Ok(encoded) = encoded else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        header::HeaderValue::from_static(name),
    );
    Response::from_parts(parts, axum::body::Body::from(encoded))
}

const BAD_GATEWAY_PAGE: &str = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>";

async fn api(
    State(shared): State<Arc<Shared>>,
    axum::Extension(kill): axum::Extension<ConnectionKill>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = rate_limit(&shared, &headers) {
        return refused;
    }
    let limit = shared.config().max_body_bytes;
    if body.len() > limit {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    }
    let path = uri.path().to_owned();
    let Some(endpoint) = endpoint_of(&path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Spawned so the call completes (and commits) even if the client goes away mid-way,
    // as a real server would.
    let task = tokio::spawn(async move {
        let call = match authenticate(&shared, &path, &headers, &body) {
            Ok(call) => call,
            Err(refusal) => return Some(refusal.into_response()),
        };
        let order_no = call.text("mchOrderNo").unwrap_or_default();
        if matches!(endpoint, Endpoint::CreatePayout | Endpoint::CreateDeposit) {
            shared.book().count_create(&call.mch_no, &order_no);
        }
        let Some(fault) = pick_fault(&shared, endpoint, &call.mch_no, &order_no) else {
            return Some(handle(&shared, endpoint, &call));
        };
        tracing::debug!(?fault, order_no, "sandbox injects a fault");
        match fault {
            FaultAction::Code { code, msg } | FaultAction::RefuseRepeat { code, msg } => {
                Some(refuse_response(
                    code,
                    msg.unwrap_or_else(|| {
                        tarspay_worker::gateway::codes::known(code)
                            .map_or("error", |c| c.meaning)
                            .to_owned()
                    }),
                ))
            }
            FaultAction::Latency { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Some(handle(&shared, endpoint, &call))
            }
            FaultAction::Slow { ms } => {
                let response = handle(&shared, endpoint, &call);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Some(response)
            }
            FaultAction::CommitThenDrop => {
                handle(&shared, endpoint, &call);
                None
            }
            FaultAction::Drop => None,
            FaultAction::Http {
                status,
                commit,
                body,
            } => {
                if commit {
                    handle(&shared, endpoint, &call);
                }
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                Some(
                    (
                        status,
                        Html(body.unwrap_or_else(|| BAD_GATEWAY_PAGE.to_owned())),
                    )
                        .into_response(),
                )
            }
            FaultAction::Compressed { encoding, padding } => {
                let plain = match padding {
                    Some(bytes) => envelope_ok(json!({"padding": "x".repeat(bytes)})),
                    None => handle(&shared, endpoint, &call),
                };
                Some(compressed(plain, encoding).await)
            }
            FaultAction::Raw { body } => Some((StatusCode::OK, body).into_response()),
            FaultAction::Oversize { bytes } => {
                let padding = "x".repeat(bytes);
                Some(envelope_ok(json!({"padding": padding})))
            }
            // Only picked for a query of an order younger than the lag: answer as for an
            // order the gateway does not have.
            FaultAction::LookupLag { .. } => {
                let kind = match endpoint {
                    Endpoint::QueryDeposit => OrderKind::Deposit,
                    _ => OrderKind::Payout,
                };
                let (code, msg) = not_found(kind);
                Some(refuse_response(code, msg.to_owned()))
            }
        }
    });
    match task.await {
        Ok(Some(response)) => response,
        Ok(None) | Err(_) => {
            kill.0.notify_one();
            std::future::pending::<Response>().await
        }
    }
}

/// Records the call for the merchant whose `X-API-KEY` it carries and applies that
/// merchant's rate limit: beyond it, HTTP 429 with `Retry-After` (whole seconds, at least 1)
/// and an envelope with code [`RATE_LIMITED_CODE`], before anything else is looked at.
fn rate_limit(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let api_key = headers.get(HEADER_API_KEY)?.to_str().ok()?.trim();
    let (mch_no, limit, wait) = {
        let mut book = shared.book();
        // Read under the lock, so arrival times are recorded in order.
        let now = shared.clock_ns();
        book.admit(api_key, now)?
    };
    let secs = retry_after_secs(wait);
    let body = json!({
        "code": RATE_LIMITED_CODE,
        "msg": format!(
            "too many requests: merchant {mch_no} is limited to {}/s with a burst of {}; retry after {secs} s",
            limit.per_second, limit.burst
        ),
    });
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            axum::Json(body),
        )
            .into_response(),
    )
}

/// The documented behaviour of each endpoint.
fn handle(shared: &Arc<Shared>, endpoint: Endpoint, call: &SignedCall) -> Response {
    let result = match endpoint {
        Endpoint::CreatePayout => create_order(shared, call, OrderKind::Payout),
        Endpoint::CreateDeposit => create_order(shared, call, OrderKind::Deposit),
        Endpoint::QueryPayout => query_order(shared, call, OrderKind::Payout),
        Endpoint::QueryDeposit => query_order(shared, call, OrderKind::Deposit),
        Endpoint::Balance => balance(shared, call),
        Endpoint::PayoutProof => payout_proof(shared, call),
        Endpoint::Any => Err(envelope_err(-1, "system error")),
    };
    match result {
        Ok(data) => envelope_ok(data),
        Err(refusal) => refusal.into_response(),
    }
}

/// Currencies whose amounts must be whole numbers.
const WHOLE_NUMBER_CURRENCIES: &[&str] = &["BDT", "PKR", "KES"];

fn create_order(
    shared: &Arc<Shared>,
    call: &SignedCall,
    kind: OrderKind,
) -> Result<Value, Refusal> {
    let mch_order_no = call.required("mchOrderNo")?;
    call.required("wayCode")?;
    let amount_text = call.required("amount")?;
    let currency = call.required("currency")?;
    let notify_url = call.required("notifyUrl")?;
    let amount =
        Amount::parse(&amount_text).map_err(|_| envelope_err(500321, "amount format incorrect"))?;
    // Strict like a gateway may be: "100.00" is refused too, not only "100.50".
    if WHOLE_NUMBER_CURRENCIES.contains(&currency.as_str())
        && (!amount.is_whole() || amount_text.contains('.'))
    {
        return Err(envelope_err(
            500321,
            "amount format incorrect: whole numbers only",
        ));
    }
    if !(notify_url.starts_with("http://") || notify_url.starts_with("https://")) {
        return Err(envelope_err(5003012, "URL format error"));
    }
    let view = insert_order(
        shared,
        NewOrder {
            kind,
            mch_no: call.mch_no.clone(),
            mch_order_no,
            amount: amount.value(),
            amount_text,
            currency,
            notify_url: Some(notify_url),
        },
    )
    .map_err(|err| match err {
        InsertError::Duplicate => envelope_err(5003011, "merchant order number already exists"),
        InsertError::InsufficientBalance => envelope_err(5004006, "merchant balance insufficient"),
    })?;
    let mut data = json!({
        "payOrderId": view.pay_order_id,
        "mchOrderNo": view.mch_order_no,
        "orderState": view.state,
    });
    if kind == OrderKind::Deposit {
        data["payUrl"] = json!(format!(
            "https://sandbox.invalid/cashier/{}",
            view.pay_order_id
        ));
        data["payData"] = json!(format!("sandbox-va-{}", view.pay_order_id));
        data["expiredTime"] = json!(now_ms() / 1000 + 900);
    }
    Ok(data)
}

fn find_order(shared: &Shared, call: &SignedCall, kind: OrderKind) -> Option<super::OrderView> {
    let book = shared.book();
    let view = match (call.text("mchOrderNo"), call.text("payOrderId")) {
        (Some(id), _) => book.view(&call.mch_no, &id),
        (None, Some(pay_id)) => book.view_by_pay_order_id(&call.mch_no, &pay_id),
        (None, None) => None,
    }?;
    (view.kind == kind).then_some(view)
}

/// What a query answers for an order the gateway does not have.
fn not_found(kind: OrderKind) -> (i64, &'static str) {
    match kind {
        OrderKind::Payout => (5003020, "failed to query pay-out order"),
        OrderKind::Deposit => (5003018, "failed to query pay-in order"),
    }
}

fn query_order(shared: &Arc<Shared>, call: &SignedCall, kind: OrderKind) -> Result<Value, Refusal> {
    if call.text("mchOrderNo").is_none() && call.text("payOrderId").is_none() {
        return Err(envelope_err(
            5003001,
            "missing parameter: mchOrderNo or payOrderId",
        ));
    }
    let (not_found_code, not_found_msg) = not_found(kind);
    let view = find_order(shared, call, kind)
        .ok_or_else(|| envelope_err(not_found_code, not_found_msg))?;
    Ok(json!({
        "payOrderId": view.pay_order_id,
        "mchNo": view.mch_no,
        "mchOrderNo": view.mch_order_no,
        "orderAmount": view.amount,
        "payAmount": view.pay_amount,
        "fee": view.fee,
        "currency": view.currency,
        "state": view.state,
    }))
}

/// The calling merchant's balance: of the account payouts in `currency` draw on when the call
/// names one (a sandbox extension), else of the account shared by every currency without its own.
fn balance(shared: &Arc<Shared>, call: &SignedCall) -> Result<Value, Refusal> {
    let currency = call.text("currency");
    let refusal = shared.config().refuse_balance_currency;
    if let (Some(_), Some(code)) = (&currency, refusal) {
        return Err(envelope_err(code, "unexpected parameter: currency"));
    }
    let (available, frozen) = shared
        .book()
        .balance(&call.mch_no, currency.as_deref())
        .ok_or_else(|| envelope_err(500326, "balance query error"))?;
    let mut data = json!({
        "mchNo": call.mch_no,
        "availableAmount": available.to_string(),
        "frozenAmount": frozen.to_string(),
    });
    if let Some(currency) = currency {
        data["currency"] = json!(currency);
    }
    Ok(data)
}

fn payout_proof(shared: &Arc<Shared>, call: &SignedCall) -> Result<Value, Refusal> {
    if call.text("mchOrderNo").is_none() && call.text("payOrderId").is_none() {
        return Err(envelope_err(
            5003001,
            "missing parameter: mchOrderNo or payOrderId",
        ));
    }
    let view = find_order(shared, call, OrderKind::Payout)
        .ok_or_else(|| envelope_err(5003020, "failed to query pay-out order"))?;
    if view.state != 2 {
        return Err(envelope_err(5003010, "order status error"));
    }
    Ok(json!({
        "payOrderId": view.pay_order_id,
        "mchOrderNo": view.mch_order_no,
        "proofUrl": format!("https://sandbox.invalid/proof/{}.pdf", view.pay_order_id),
    }))
}

async fn info(State(shared): State<Arc<Shared>>) -> Response {
    let config = shared.config();
    let merchants: Vec<Value> = config
        .merchants
        .iter()
        .map(|m| json!({"mchNo": m.mch_no, "publicKey": m.public_key.to_hex()}))
        .collect();
    axum::Json(json!({
        "systemPublicKey": config.system_key.public_key().to_hex(),
        "merchants": merchants,
        "finalAfterMs": config.final_after.as_millis() as u64,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrdersQuery {
    #[serde(default)]
    mch_no: Option<String>,
}

async fn orders(State(shared): State<Arc<Shared>>, Query(query): Query<OrdersQuery>) -> Response {
    axum::Json(shared.book().views_of(query.mch_no.as_deref())).into_response()
}

async fn order(State(shared): State<Arc<Shared>>, Path(mch_order_no): Path<String>) -> Response {
    match shared.book().view_any(&mch_order_no) {
        Some(view) => axum::Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, "no such order").into_response(),
    }
}

async fn set_faults(
    State(shared): State<Arc<Shared>>,
    axum::Json(faults): axum::Json<Vec<FaultRule>>,
) -> Response {
    shared.config().faults = faults;
    shared.book().reset_fault_counts();
    StatusCode::NO_CONTENT.into_response()
}

async fn set_outcomes(
    State(shared): State<Arc<Shared>>,
    axum::Json(outcomes): axum::Json<Vec<OutcomeRule>>,
) -> Response {
    shared.config().outcomes = outcomes;
    StatusCode::NO_CONTENT.into_response()
}

fn unprocessable(msg: impl Into<String>) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, msg.into()).into_response()
}

fn no_such_merchant(mch_no: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no such merchant: {mch_no}")).into_response()
}

/// A decimal amount from JSON text; the error says which field.
fn decimal(text: &str, what: &str) -> Result<Decimal, String> {
    Decimal::from_str(text.trim()).map_err(|_| format!("{what} must be a decimal string"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewMerchant {
    mch_no: String,
    public_key: String,
    /// Available balance of the account shared by every currency without its own.
    #[serde(default)]
    balance: Option<String>,
    /// Balances of their own, by currency.
    #[serde(default)]
    balances: BTreeMap<String, String>,
    #[serde(default)]
    rate_limit: Option<RateLimit>,
}

/// `POST /sandbox/merchants`: registers a merchant (or gives one a new key); 204, or 422 with
/// the reason when a field is wrong (then nothing changes).
async fn add_merchant(
    State(shared): State<Arc<Shared>>,
    axum::Json(new): axum::Json<NewMerchant>,
) -> Response {
    if new.mch_no.trim().is_empty() {
        return unprocessable("mchNo must not be empty");
    }
    let Ok(public_key) = PublicKey::from_hex(&new.public_key) else {
        return unprocessable("publicKey is not a secp256k1 public key");
    };
    let balance = match new
        .balance
        .as_deref()
        .map(|b| decimal(b, "balance"))
        .transpose()
    {
        Ok(balance) => balance.unwrap_or(Decimal::from(1_000_000_000u64)),
        Err(reason) => return unprocessable(reason),
    };
    let mut balances = Vec::new();
    for (currency, amount) in &new.balances {
        match decimal(amount, &format!("balances.{currency}")) {
            Ok(amount) => balances.push((currency.clone(), amount)),
            Err(reason) => return unprocessable(reason),
        }
    }
    if new.rate_limit.is_some_and(|limit| !limit.is_valid()) {
        return unprocessable("rateLimit needs perSecond > 0 and burst >= 1");
    }
    let mch_no = new.mch_no.clone();
    shared.add_merchant(SandboxMerchant {
        mch_no: new.mch_no,
        public_key,
        balance,
    });
    {
        let mut book = shared.book();
        for (currency, amount) in balances {
            book.set_balance(&mch_no, Some(&currency), amount);
        }
    }
    if let Some(limit) = new.rate_limit {
        shared.set_rate_limit(&mch_no, Some(limit));
    }
    StatusCode::NO_CONTENT.into_response()
}

fn merchant_json(shared: &Shared, mch_no: &str) -> Option<Value> {
    let public_key = shared
        .config()
        .merchants
        .iter()
        .find(|m| m.mch_no == mch_no)
        .map(|m| m.public_key.to_hex());
    let book = shared.book();
    let calls = book.calls(mch_no)?;
    Some(json!({
        "mchNo": mch_no,
        "publicKey": public_key,
        "balances": book.balances(mch_no),
        "rateLimit": calls.rate_limit,
        "calls": calls,
        "orders": book.order_count(mch_no),
    }))
}

/// `GET /sandbox/merchants`: every merchant with its key, balances, limit, call report and
/// number of orders.
async fn merchants(State(shared): State<Arc<Shared>>) -> Response {
    let numbers = shared.book().merchant_numbers();
    let all: Vec<Value> = numbers
        .iter()
        .filter_map(|mch_no| merchant_json(&shared, mch_no))
        .collect();
    axum::Json(all).into_response()
}

async fn merchant(State(shared): State<Arc<Shared>>, Path(mch_no): Path<String>) -> Response {
    match merchant_json(&shared, &mch_no) {
        Some(found) => axum::Json(found).into_response(),
        None => no_such_merchant(&mch_no),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SetBalance {
    /// Absent: the account shared by every currency without its own.
    #[serde(default)]
    currency: Option<String>,
    available: String,
}

/// `PUT /sandbox/merchants/{mchNo}/balance` `{"currency": "INR", "available": "5000"}`.
async fn set_balance(
    State(shared): State<Arc<Shared>>,
    Path(mch_no): Path<String>,
    axum::Json(set): axum::Json<SetBalance>,
) -> Response {
    let available = match decimal(&set.available, "available") {
        Ok(available) => available,
        Err(reason) => return unprocessable(reason),
    };
    if shared
        .book()
        .set_balance(&mch_no, set.currency.as_deref(), available)
    {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_such_merchant(&mch_no)
    }
}

/// `PUT /sandbox/merchants/{mchNo}/rate-limit` `{"perSecond": 5, "burst": 5}`.
async fn set_rate_limit(
    State(shared): State<Arc<Shared>>,
    Path(mch_no): Path<String>,
    axum::Json(limit): axum::Json<RateLimit>,
) -> Response {
    if !limit.is_valid() {
        return unprocessable("rateLimit needs perSecond > 0 and burst >= 1");
    }
    if shared.set_rate_limit(&mch_no, Some(limit)) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_such_merchant(&mch_no)
    }
}

async fn lift_rate_limit(
    State(shared): State<Arc<Shared>>,
    Path(mch_no): Path<String>,
) -> Response {
    if shared.set_rate_limit(&mch_no, None) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_such_merchant(&mch_no)
    }
}

#[derive(Deserialize)]
struct CallsQuery {
    #[serde(default)]
    arrivals: bool,
}

/// `GET /sandbox/merchants/{mchNo}/calls[?arrivals=true]`: the call report, and with
/// `arrivals` the recorded arrival times (µs since the sandbox started, monotonic).
async fn calls(
    State(shared): State<Arc<Shared>>,
    Path(mch_no): Path<String>,
    Query(query): Query<CallsQuery>,
) -> Response {
    let book = shared.book();
    let Some(report) = book.calls(&mch_no) else {
        return no_such_merchant(&mch_no);
    };
    let mut body = json!(report);
    if query.arrivals {
        body["arrivalsUs"] = json!(book.call_arrivals_us(&mch_no).unwrap_or_default());
    }
    axum::Json(body).into_response()
}

async fn clear_calls(State(shared): State<Arc<Shared>>, Path(mch_no): Path<String>) -> Response {
    if shared.book().clear_calls(&mch_no) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_such_merchant(&mch_no)
    }
}

async fn merchant_orders(
    State(shared): State<Arc<Shared>>,
    Path(mch_no): Path<String>,
) -> Response {
    let book = shared.book();
    if !book.knows(&mch_no) {
        return no_such_merchant(&mch_no);
    }
    axum::Json(book.views_of(Some(&mch_no))).into_response()
}

async fn merchant_order(
    State(shared): State<Arc<Shared>>,
    Path((mch_no, mch_order_no)): Path<(String, String)>,
) -> Response {
    match shared.book().view(&mch_no, &mch_order_no) {
        Some(view) => axum::Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, "no such order").into_response(),
    }
}
