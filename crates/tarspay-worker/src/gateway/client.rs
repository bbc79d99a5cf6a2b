//! The HTTP client for TarsPay: signs each call, sends it with bounded timeouts over a reused
//! connection pool, reads a size-limited answer and unwraps the `{code,msg,data}` envelope.

use super::error::{GatewayError, snippet};
use super::keys::PrivateKey;
use super::params::Params;
use super::paths;
use super::signing::RequestSigner;
use super::types::{
    Balance, CreateDeposit, CreatePayout, DepositCreated, OrderInfo, OrderRef, PayoutAccepted,
    PayoutProof,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;

pub const HEADER_API_KEY: &str = "X-API-KEY";
pub const HEADER_NONCE: &str = "X-API-NONCE";
pub const HEADER_SIGNATURE: &str = "X-API-SIGNATURE";
pub const CONTENT_TYPE: &str = "application/json;charset=utf-8";

/// What the client needs to know about the merchant and the network.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// e.g. `https://payment.tarspay.com`; paths are appended to it.
    pub base_url: String,
    pub mch_no: String,
    pub private_key: PrivateKey,
    pub connect_timeout: Duration,
    /// Whole-call bound: connect, send, wait, read.
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct ClientBuildError(String);

/// A signed TarsPay client for one merchant. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct TarsPayClient {
    http: reqwest::Client,
    base_url: String,
    /// Each known path's URL, parsed once (a request would otherwise parse its URL anew).
    endpoints: std::sync::Arc<[(&'static str, reqwest::Url)]>,
    mch_no: String,
    signer: RequestSigner,
    max_response_bytes: usize,
    request_timeout: Duration,
    last_nonce: std::sync::Arc<AtomicU64>,
    /// Milliseconds since the epoch for nonces: the gateway refuses a nonce far from its own
    /// clock, so a host whose clock is off should pass a better one (see [`Self::with_clock`]).
    clock: fn() -> u64,
}

impl TarsPayClient {
    pub fn new(settings: ClientSettings) -> Result<Self, ClientBuildError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true)
            .https_only(false)
            // A redirect would turn the signed POST into a body-less GET; treat 3xx as an
            // answer (an HTTP error), never follow it.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| ClientBuildError(err.to_string()))?;
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        // A base URL that does not parse is reported by the request, as before.
        let endpoints = super::paths::ALL
            .iter()
            .filter_map(|path| {
                reqwest::Url::parse(&format!("{base_url}{path}"))
                    .ok()
                    .map(|url| (*path, url))
            })
            .collect();
        Ok(Self {
            http,
            base_url,
            endpoints,
            mch_no: settings.mch_no,
            signer: RequestSigner::new(settings.private_key),
            max_response_bytes: settings.max_response_bytes,
            request_timeout: settings.request_timeout,
            last_nonce: Default::default(),
            clock: crate::wall_clock::now_ms,
        })
    }

    /// Takes nonces from `clock` instead of the host's wall clock (workers pass their
    /// estimate of the Redis server's clock, so a host whose clock is minutes off still
    /// signs nonces the gateway accepts).
    pub fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    pub fn mch_no(&self) -> &str {
        &self.mch_no
    }

    /// The merchant's `X-API-KEY`.
    pub fn api_key(&self) -> &str {
        self.signer.api_key()
    }

    pub async fn create_payout(
        &self,
        request: &CreatePayout,
    ) -> Result<PayoutAccepted, GatewayError> {
        self.call(paths::CREATE_PAYOUT, request.params(&self.mch_no))
            .await
    }

    /// `create_payout`, sent only if the whole call can finish before `deadline` (the end of
    /// the caller's submit lease), judged after signing, just before the request leaves. A
    /// worker that stalled (a GC-less freeze: SIGSTOP, a paused VM) past its lease must not
    /// send a create another worker may already have sent: it gets `NotSent` instead.
    pub async fn create_payout_within(
        &self,
        request: &CreatePayout,
        deadline: Instant,
    ) -> Result<PayoutAccepted, GatewayError> {
        self.call_within(
            paths::CREATE_PAYOUT,
            request.params(&self.mch_no),
            Some(deadline),
        )
        .await
    }

    pub async fn query_payout(&self, order: &OrderRef) -> Result<OrderInfo, GatewayError> {
        self.call(paths::QUERY_PAYOUT, order.params(&self.mch_no))
            .await
    }

    pub async fn create_deposit(
        &self,
        request: &CreateDeposit,
    ) -> Result<DepositCreated, GatewayError> {
        self.call(paths::CREATE_DEPOSIT, request.params(&self.mch_no))
            .await
    }

    pub async fn query_deposit(&self, order: &OrderRef) -> Result<OrderInfo, GatewayError> {
        self.call(paths::QUERY_DEPOSIT, order.params(&self.mch_no))
            .await
    }

    pub async fn balance(&self) -> Result<Balance, GatewayError> {
        let mut params = Params::new();
        params.insert("mchNo", self.mch_no.as_str());
        self.call(paths::BALANCE, params).await
    }

    /// The balance of the account payouts in `currency` draw on, for a gateway that keeps
    /// accounts per currency and takes a `currency` in the balance query (TarsPay's docs name
    /// no such field: a gateway that ignores it answers the merchant's one account, and one
    /// that refuses it answers an error; the caller then asks [`Self::balance`]).
    pub async fn balance_in(&self, currency: &str) -> Result<Balance, GatewayError> {
        let mut params = Params::new();
        params.insert("mchNo", self.mch_no.as_str());
        params.insert("currency", currency);
        self.call(paths::BALANCE, params).await
    }

    pub async fn payout_proof(&self, order: &OrderRef) -> Result<PayoutProof, GatewayError> {
        self.call(paths::PAYOUT_PROOF, order.params(&self.mch_no))
            .await
    }

    /// Milliseconds since the epoch, strictly increasing per client so two calls in the same
    /// millisecond never share a nonce.
    fn next_nonce(&self) -> u64 {
        let now = (self.clock)();
        let mut last = self.last_nonce.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_nonce.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    /// Signs and sends one call, then decodes the envelope's `data` as `T`. Runs in a
    /// `gateway.call` span (endpoint, mchOrderNo, code, latency) and records the call's latency
    /// and outcome code as metrics. Only those fields are recorded: never a key, a signature
    /// or a beneficiary field.
    pub async fn call<T: DeserializeOwned>(
        &self,
        path: &'static str,
        params: Params,
    ) -> Result<T, GatewayError> {
        self.call_within(path, params, None).await
    }

    async fn call_within<T: DeserializeOwned>(
        &self,
        path: &'static str,
        params: Params,
        deadline: Option<Instant>,
    ) -> Result<T, GatewayError> {
        let span = tracing::info_span!(
            "gateway.call",
            endpoint = path,
            mch_order_no = params.get("mchOrderNo"),
            code = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self
            .send(path, params, deadline)
            .instrument(span.clone())
            .await;
        let latency = started.elapsed();
        metrics::histogram!(crate::metrics::GATEWAY_LATENCY, "endpoint" => path)
            .record(latency.as_secs_f64());
        let code = call_code(&result);
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        span.record("code", code.as_str());
        span.record("latency_ms", latency_ms);
        span.in_scope(
            || tracing::debug!(endpoint = path, code = %code, latency_ms, "gateway call"),
        );
        metrics::counter!(crate::metrics::GATEWAY_CODES, "endpoint" => path, "code" => code)
            .increment(1);
        result
    }

    /// A POST to `path` on the gateway.
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        match self.endpoints.iter().find(|(known, _)| *known == path) {
            Some((_, url)) => self.http.post(url.clone()),
            None => self.http.post(format!("{}{}", self.base_url, path)),
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        path: &'static str,
        params: Params,
        deadline: Option<Instant>,
    ) -> Result<T, GatewayError> {
        let nonce = self.next_nonce().to_string();
        let headers = self.signer.sign(path, &nonce, &params);
        let request = self
            .post(path)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(HEADER_API_KEY, headers.api_key)
            .header(HEADER_NONCE, headers.nonce)
            .header(HEADER_SIGNATURE, headers.signature)
            .body(params.to_json_body());
        // The last moment before the request leaves: everything above is local work.
        if deadline.is_some_and(|deadline| Instant::now() + self.request_timeout > deadline) {
            return Err(GatewayError::NotSent {
                endpoint: path,
                reason: "the caller's deadline ends before the call could finish",
            });
        }
        let response = request
            .send()
            .await
            .map_err(|err| transport_error(path, &err))?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // Refused for its rate before anything happened, whatever the body says.
            return Err(GatewayError::RateLimited {
                endpoint: path,
                retry_after: retry_after(response.headers()),
            });
        }
        let body = read_limited(path, response, self.max_response_bytes).await?;
        if !status.is_success() {
            // A gateway may carry its error code on a non-2xx status: a code in the envelope
            // (5003011 above all) decides, not the status. Only a body that is no envelope
            // (a proxy's 502 page) is an HTTP error.
            return Err(match decode_envelope::<Value>(path, &body) {
                Err(coded @ GatewayError::Gateway { .. }) => coded,
                _ => GatewayError::Http {
                    endpoint: path,
                    status: status.as_u16(),
                    snippet: snippet(&body),
                },
            });
        }
        decode_envelope(path, &body)
    }
}

/// A call's outcome as one label: `0`, the gateway's code, or the failure's kind
/// (`timeout`, `unreachable`, `http_status`, …).
fn call_code<T>(result: &Result<T, GatewayError>) -> String {
    match result {
        Ok(_) => "0".to_owned(),
        Err(err) => err
            .code()
            .map_or_else(|| err.kind().to_owned(), |c| c.to_string()),
    }
}

/// reqwest with rustls needs a process-wide crypto provider; installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn transport_error(endpoint: &'static str, err: &reqwest::Error) -> GatewayError {
    let reason = super::error::error_chain(err);
    if err.is_connect() || err.is_builder() {
        GatewayError::Unreachable { endpoint, reason }
    } else {
        GatewayError::Ambiguous {
            endpoint,
            reason,
            timed_out: err.is_timeout(),
        }
    }
}

async fn read_limited(
    endpoint: &'static str,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, GatewayError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(GatewayError::TooLarge { endpoint, limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| transport_error(endpoint, &err))?
    {
        if body.len() + chunk.len() > limit {
            return Err(GatewayError::TooLarge { endpoint, limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `{"code": 0, "msg": "...", "data": {...}}`; `code` may arrive as a number or a string.
fn decode_envelope<T: DeserializeOwned>(
    endpoint: &'static str,
    body: &[u8],
) -> Result<T, GatewayError> {
    let decode_error = |reason: String| GatewayError::Decode {
        endpoint,
        reason,
        snippet: snippet(body),
    };
    let envelope: Value =
        serde_json::from_slice(body).map_err(|err| decode_error(format!("not JSON ({err})")))?;
    let Value::Object(mut envelope) = envelope else {
        return Err(decode_error("not a JSON object".into()));
    };
    let code = match envelope.get("code") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| decode_error("no integer `code` field".into()))?;
    let msg = match envelope.get("msg") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    if code != 0 {
        return Err(GatewayError::Gateway {
            endpoint,
            code,
            msg,
        });
    }
    let data = envelope.remove("data").unwrap_or(Value::Null);
    if data.is_null() {
        return Err(decode_error("code 0 without `data`".into()));
    }
    serde_json::from_value(data).map_err(|err| decode_error(format!("unexpected `data`: {err}")))
}

/// A `Retry-After` in seconds (RFC 9110 also allows an HTTP date; a gateway's rate limit
/// sends seconds, and a date is read as "not said"), capped at an hour.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_decoding() {
        let ok: Balance = decode_envelope(
            "/b",
            br#"{"code":0,"msg":"SUCCESS","data":{"mchNo":"M1","availableAmount":"10.50","frozenAmount":"0"}}"#,
        )
        .unwrap();
        assert_eq!(ok.available_amount, "10.50");

        let err = decode_envelope::<Balance>("/b", br#"{"code":"5003008","msg":"sign error"}"#)
            .unwrap_err();
        assert_eq!(
            err,
            GatewayError::Gateway {
                endpoint: "/b",
                code: 5003008,
                msg: "sign error".into()
            }
        );

        for (body, needle) in [
            (&b"<html>bad gateway</html>"[..], "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"{\"msg\":\"x\"}", "no integer `code`"),
            (b"{\"code\":0,\"msg\":\"ok\"}", "without `data`"),
            (
                b"{\"code\":0,\"data\":{\"mchNo\":\"M1\"}}",
                "unexpected `data`",
            ),
        ] {
            let err = decode_envelope::<Balance>("/b", body).unwrap_err();
            assert!(matches!(err, GatewayError::Decode { .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    /// A gateway that sends amounts as JSON numbers: the text is kept digit for digit
    /// (serde_json's `arbitrary_precision`), never rounded through f64.
    #[test]
    fn amounts_sent_as_numbers_keep_their_exact_text() {
        let info: crate::gateway::types::OrderInfo = decode_envelope(
            "/q",
            br#"{"code":0,"msg":"SUCCESS","data":{"mchOrderNo":"A","orderAmount":100.10,"payAmount":100.10,"fee":1.50,"state":2,"currency":"INR"}}"#,
        )
        .unwrap();
        assert_eq!(info.order_amount.as_deref(), Some("100.10"));
        assert_eq!(info.pay_amount.as_deref(), Some("100.10"));
        assert_eq!(info.fee.as_deref(), Some("1.50"));
        let balance: Balance = decode_envelope(
            "/b",
            br#"{"code":0,"data":{"availableAmount":12345678901234567.80,"frozenAmount":0.10}}"#,
        )
        .unwrap();
        assert_eq!(balance.available_amount, "12345678901234567.80");
        assert_eq!(balance.frozen_amount.as_deref(), Some("0.10"));
    }
}
