//! Console sessions (in Redis; the browser holds only a random id), the session cookie, the
//! CSRF and same-origin checks on every `POST`, and the login throttle.

use crate::redis_conn::RedisConn;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name (docs/console.md).
pub const COOKIE: &str = "tarspay_console";

/// How long a session lives from login.
pub const TTL: Duration = Duration::from_secs(8 * 3600);

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The API token's holder: may act.
    Admin,
    /// The viewer token's holder: may only look.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Viewer => "viewer",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }
}

/// A logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    pub role: Role,
    pub operator: String,
    /// The token every form of this session carries in its `csrf` field.
    pub csrf: String,
    /// A message for the next page this session loads (set by an action's redirect).
    pub flash: Option<String>,
    /// Which token it logged in with (a digest, see `Console::grant`): a session outlives
    /// neither a rotated nor a removed token.
    pub(crate) grant: Option<String>,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// 256 random bits as hex.
pub fn random_token() -> String {
    format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// Sessions in Redis: `<prefix>:console:session:<sha256 hex of the id>` (a hash of role,
/// operator, csrf, created), so a read of Redis does not hand out live cookies.
#[derive(Clone)]
pub struct Sessions {
    conn: RedisConn,
    prefix: String,
}

impl Sessions {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, id: &str) -> String {
        session_key(&self.prefix, id)
    }

    /// A new session; returns the id for the cookie.
    pub async fn create(
        &self,
        role: Role,
        operator: &str,
        grant: &str,
    ) -> Result<String, redis::RedisError> {
        let id = random_token();
        let key = self.key(&id);
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("role")
            .arg(role.as_str())
            .arg("operator")
            .arg(operator)
            .arg("csrf")
            .arg(random_token())
            .arg("grant")
            .arg(grant)
            .arg("created")
            .arg(crate::queue::now_ms())
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(TTL.as_secs())
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(id)
    }

    /// The session of cookie value `id`; with `take_flash`, its flash message is consumed.
    pub async fn get(
        &self,
        id: &str,
        take_flash: bool,
    ) -> Result<Option<Session>, redis::RedisError> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let key = self.key(id);
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        let (Some(role), Some(operator), Some(csrf)) = (
            fields.get("role").and_then(|r| Role::parse(r)),
            fields.get("operator"),
            fields.get("csrf"),
        ) else {
            return Ok(None);
        };
        let flash = match fields.get("flash") {
            Some(flash) if take_flash => {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg("flash")
                    .query_async::<()>(&mut conn)
                    .await?;
                Some(flash.clone())
            }
            _ => None,
        };
        Ok(Some(Session {
            role,
            operator: operator.clone(),
            csrf: csrf.clone(),
            flash,
            grant: fields.get("grant").cloned(),
        }))
    }

    /// Leaves `message` for the session's next page (only on a live session: one that
    /// expired or logged out is not brought back).
    pub async fn set_flash(&self, id: &str, message: &str) -> Result<(), redis::RedisError> {
        static SET_IF_LIVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'flash', ARGV[1]) end return 0",
            )
        });
        let mut conn = self.conn.clone();
        SET_IF_LIVE
            .key(self.key(id))
            .arg(message)
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn delete(&self, id: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.key(id))
            .query_async::<()>(&mut conn)
            .await
    }
}

/// The Redis key of session `id`: only its hash is stored.
pub fn session_key(prefix: &str, id: &str) -> String {
    format!(
        "{prefix}:console:session:{}",
        hex::encode(Sha256::digest(id.as_bytes()))
    )
}

/// The client a request came from: the connection's `peer`, unless the peer is one of the
/// `trusted` proxies, in which case `X-Forwarded-For` is read from its right end (the
/// address the nearest proxy saw) past every trusted proxy to the first address that is not
/// one. Addresses to the left of that one were written by the client itself and are never
/// believed, so the trusted networks must hold proxies only: a client inside one is passed
/// over like a proxy. A trusted peer whose nearest hop cannot be read (or that sends none)
/// is the client itself. IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Every X-Forwarded-For line, in order, as one list; a line is read byte by byte, so
    // bytes a client put in its part cannot hide the proxies' hops after it.
    let lines: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .collect();
    let hops: Vec<&str> = lines
        .iter()
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            tracing::debug!(
                ?hop,
                "X-Forwarded-For hop is not an address; the client is the hop after it"
            );
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` hop: an address, with or without a port (`203.0.113.7:51234`,
/// `[2001:db8::1]:443`, `[2001:db8::1]`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|at| at.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inner| inner.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

/// Whether the request reached us over HTTPS (directly or through a proxy that says so).
pub fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("https")
        })
}

/// The `Set-Cookie` value that holds session `id`.
pub fn session_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/console{secure}")
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0{secure}")
}

/// The session id the request's cookies carry, if any.
pub fn cookie_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// The form's token against the session's, in constant time.
pub fn csrf_matches(expected: &str, presented: Option<&str>) -> bool {
    match presented {
        Some(presented) if !expected.is_empty() => {
            expected.as_bytes().ct_eq(presented.as_bytes()).into()
        }
        _ => false,
    }
}

/// An `Origin` (or, without one, a `Referer`) that names another host than `Host` (or, behind
/// a proxy, `X-Forwarded-Host`) — or `Origin: null` — is refused; a request with neither
/// passes (old browsers, curl).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let hosts: Vec<&str> = [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .filter_map(|v| v.split(',').next().map(str::trim))
        .collect();
    let authority_of = |url: &str| -> Option<String> {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))?;
        Some(rest.split(['/', '?', '#']).next().unwrap_or("").to_owned())
    };
    let named = if let Some(origin) = headers.get(header::ORIGIN) {
        origin.to_str().ok().and_then(authority_of)
    } else if let Some(referer) = headers.get(header::REFERER) {
        referer.to_str().ok().and_then(authority_of)
    } else {
        return true;
    };
    named.is_some_and(|named| hosts.iter().any(|host| named.eq_ignore_ascii_case(host)))
}

/// Wrong tokens per client: after [`Throttle::MAX_FAILURES`] within [`Throttle::WINDOW`], the
/// client's logins are refused (429) until the window has passed. A client is an IPv4
/// address or an IPv6 /64 (one host usually holds a whole /64, so counting single IPv6
/// addresses would count nothing). Over all clients, [`Throttle::MAX_FAILURES_OVERALL`] wrong
/// tokens within the window close every login until it passes (guesses spread over many
/// addresses; the API and the CLI are not affected), which also bounds the memory and the
/// work each attempt costs.
#[derive(Default)]
pub struct Throttle {
    state: Mutex<ThrottleState>,
}

#[derive(Default)]
struct ThrottleState {
    by_client: HashMap<IpAddr, ClientFailures>,
    /// Every counted failure in the window, oldest first.
    overall: VecDeque<Instant>,
    /// Failures recorded in the audit log in the window, oldest first.
    audited: VecDeque<Instant>,
}

#[derive(Default)]
struct ClientFailures {
    /// Within the window, oldest first.
    at: VecDeque<Instant>,
    /// When one of its refusals was last recorded in the audit log.
    audited: Option<Instant>,
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64.
fn client_of(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(network))
        }
    }
}

impl Throttle {
    pub const MAX_FAILURES: usize = 5;
    pub const WINDOW: Duration = Duration::from_secs(60);
    pub const MAX_FAILURES_OVERALL: usize = 1_000;
    /// Refused logins the audit log records per window: the rest are logged and counted only,
    /// so anonymous guesses cannot push the operators' actions out of the capped log.
    pub const MAX_AUDITED: usize = 100;

    /// Drops the instants older than the window (the queue is oldest first).
    fn expire(queue: &mut VecDeque<Instant>, now: Instant) {
        while queue
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Self::WINDOW)
        {
            queue.pop_front();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `peer` may try a token now.
    pub fn allows(&self, peer: IpAddr) -> bool {
        self.allows_at(peer, Instant::now())
    }

    fn allows_at(&self, peer: IpAddr, now: Instant) -> bool {
        let mut state = self.state();
        Self::expire(&mut state.overall, now);
        if state.overall.len() >= Self::MAX_FAILURES_OVERALL {
            return false;
        }
        match state.by_client.get_mut(&client_of(peer)) {
            Some(client) => {
                Self::expire(&mut client.at, now);
                client.at.len() < Self::MAX_FAILURES
            }
            None => true,
        }
    }

    /// Counts a wrong token from `peer`; true when the refusal is to be recorded in the audit
    /// log (at most one per client per window, and [`Self::MAX_AUDITED`] per window in all).
    pub fn failed(&self, peer: IpAddr) -> bool {
        self.failed_at(peer, Instant::now())
    }

    fn failed_at(&self, peer: IpAddr, now: Instant) -> bool {
        let mut state = self.state();
        Self::expire(&mut state.overall, now);
        Self::expire(&mut state.audited, now);
        // Bounded: at most MAX_FAILURES_OVERALL clients have recent failures; the others
        // are dropped once the map grows past that.
        if state.by_client.len() > Self::MAX_FAILURES_OVERALL {
            state.by_client.retain(|_, client| {
                Self::expire(&mut client.at, now);
                !client.at.is_empty()
            });
        }
        if state.overall.len() < Self::MAX_FAILURES_OVERALL {
            state.overall.push_back(now);
        }
        let room = state.audited.len() < Self::MAX_AUDITED;
        let client = state.by_client.entry(client_of(peer)).or_default();
        Self::expire(&mut client.at, now);
        client.at.push_back(now);
        let due = client
            .audited
            .is_none_or(|at| now.duration_since(at) >= Self::WINDOW);
        let audit = due && room;
        if audit {
            client.audited = Some(now);
            state.audited.push_back(now);
        }
        audit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_client_is_the_first_untrusted_address_from_the_right_behind_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let forwarded = |lines: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append("x-forwarded-for", HeaderValue::from_static(line));
            }
            headers
        };
        let proxy = ip("10.0.0.2");
        // Without trust the header is the client's own words: ignored.
        assert_eq!(
            client_ip(ip("203.0.113.9"), &forwarded(&["198.51.100.1"]), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(proxy, &forwarded(&["198.51.100.1"]), &[]), proxy);
        // Behind a trusted proxy: the address it saw.
        assert_eq!(
            client_ip(proxy, &forwarded(&["198.51.100.1"]), &trusted),
            ip("198.51.100.1")
        );
        // A forged left part does not move the client; trusted hops are passed over, also
        // across several header lines.
        assert_eq!(
            client_ip(
                proxy,
                &forwarded(&["6.6.6.6, 198.51.100.1", "10.1.1.1"]),
                &trusted
            ),
            ip("198.51.100.1")
        );
        // Nothing usable: the proxy itself.
        assert_eq!(client_ip(proxy, &forwarded(&[]), &trusted), proxy);
        assert_eq!(
            client_ip(proxy, &forwarded(&["not-an-address"]), &trusted),
            proxy
        );
        // Only trusted hops: the farthest one.
        assert_eq!(
            client_ip(proxy, &forwarded(&["10.9.9.9"]), &trusted),
            ip("10.9.9.9")
        );
        // Ports, brackets and IPv4-mapped addresses, as some load balancers write them; a
        // mapped peer is trusted as its IPv4 address.
        let mapped_proxy = ip("::ffff:10.0.0.2");
        for (hop, client) in [
            ("198.51.100.1:51234", "198.51.100.1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("::ffff:198.51.100.1", "198.51.100.1"),
        ] {
            let headers = forwarded(&[hop]);
            assert_eq!(
                client_ip(mapped_proxy, &headers, &trusted),
                ip(client),
                "{hop}"
            );
        }
        // Bytes that are not text in the client's part do not hide the proxy's hop.
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"6.6.\xff6.6, 198.51.100.1").unwrap(),
        );
        assert_eq!(client_ip(proxy, &headers, &trusted), ip("198.51.100.1"));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_scoped_to_the_console() {
        let cookie = session_cookie("abc", false);
        assert_eq!(
            cookie,
            "tarspay_console=abc; HttpOnly; SameSite=Strict; Path=/console"
        );
        assert!(session_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; tarspay_console=f00d ; x=2"),
        );
        assert_eq!(cookie_id(&headers).as_deref(), Some("f00d"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(is_https(&headers));
    }

    #[test]
    fn session_keys_hold_a_hash_of_the_id_not_the_id() {
        let id = random_token();
        assert_eq!(id.len(), 64);
        let key = session_key("tarspay", &id);
        assert!(key.starts_with("tarspay:console:session:"));
        assert!(!key.contains(&id));
        assert_ne!(random_token(), id);
    }

    #[test]
    fn csrf_needs_the_exact_token() {
        assert!(csrf_matches("abc123", Some("abc123")));
        assert!(!csrf_matches("abc123", Some("abc12")));
        assert!(!csrf_matches("abc123", Some("abc1234")));
        assert!(!csrf_matches("abc123", None));
        assert!(!csrf_matches("", Some("")));
    }

    #[test]
    fn origin_and_referer_must_name_this_host() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            same_origin(&headers)
        };
        assert!(with(&[("host", "console.example:8080")]));
        assert!(with(&[
            ("host", "console.example:8080"),
            ("origin", "https://console.example:8080")
        ]));
        assert!(!with(&[
            ("host", "console.example:8080"),
            ("origin", "https://evil.example")
        ]));
        assert!(!with(&[("host", "console.example"), ("origin", "null")]));
        assert!(with(&[
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-host", "console.example"),
            ("origin", "https://console.example")
        ]));
        assert!(
            !with(&[("origin", "https://console.example")]),
            "no host: refused"
        );
        assert!(with(&[
            ("host", "console.example"),
            ("referer", "http://console.example/console/dead")
        ]));
        assert!(!with(&[
            ("host", "console.example"),
            ("referer", "http://console.example.evil.example/x")
        ]));
    }

    #[test]
    fn five_wrong_tokens_a_minute_close_the_door() {
        let throttle = Throttle::default();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..Throttle::MAX_FAILURES {
            assert!(throttle.allows(peer));
            throttle.failed(peer);
        }
        assert!(!throttle.allows(peer));
        assert!(throttle.allows("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let throttle = Throttle::default();
        let now = Instant::now();
        for n in 0..Throttle::MAX_FAILURES {
            let peer: IpAddr = format!("2001:db8:1:2::{n:x}").parse().unwrap();
            assert!(throttle.allows_at(peer, now));
            throttle.failed_at(peer, now);
        }
        assert!(!throttle.allows_at("2001:db8:1:2:ffff::1".parse().unwrap(), now));
        assert!(throttle.allows_at("2001:db8:1:3::1".parse().unwrap(), now));
    }

    #[test]
    fn guesses_spread_over_many_clients_close_every_login_for_the_window() {
        let throttle = Throttle::default();
        let start = Instant::now();
        let mut audited = 0;
        for n in 0..Throttle::MAX_FAILURES_OVERALL {
            let peer = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n as u32));
            assert!(throttle.allows_at(peer, start), "client {n}");
            if throttle.failed_at(peer, start) {
                audited += 1;
            }
        }
        assert_eq!(
            audited,
            Throttle::MAX_AUDITED,
            "the audit log's share is capped"
        );
        let fresh: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!throttle.allows_at(fresh, start + Duration::from_secs(1)));
        assert!(throttle.allows_at(fresh, start + Throttle::WINDOW));
        assert!(throttle.state().by_client.len() <= Throttle::MAX_FAILURES_OVERALL);
    }

    #[test]
    fn a_clients_refusals_are_audited_once_a_window() {
        let throttle = Throttle::default();
        let now = Instant::now();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(throttle.failed_at(peer, now));
        assert!(!throttle.failed_at(peer, now));
        // A slow guesser, one try every 50 s: its failures never all age out, yet each
        // window gets one row.
        assert!(!throttle.failed_at(peer, now + Duration::from_secs(50)));
        assert!(throttle.failed_at(peer, now + Duration::from_secs(100)));
        assert!(!throttle.failed_at(peer, now + Duration::from_secs(150)));
    }
}
