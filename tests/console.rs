//! The operator console (docs/console.md) over real HTTP, against a real redis-server and the
//! sandbox: logins and roles, the contract's element ids on every page, CSRF and origin
//! checks, an admin's retry of a dead job (and its audit line), and that no page shows a
//! token, the merchant's key or a full account number.

mod common;

use common::app::{TestApp, inr, spawn_app_with};
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use std::time::Duration;

const ADMIN: &str = "console-admin-token-0123456789";
const VIEWER: &str = "console-viewer-token-0123456789";
const ACCOUNT: &str = "501234567890123";

struct Console {
    app: TestApp,
    url: String,
    /// Every page body read, checked at the end for secrets.
    bodies: Vec<String>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn console(partitions: &str) -> Console {
    console_with(partitions, &[]).await
}

async fn console_with(partitions: &str, env: &[(&str, &str)]) -> Console {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut all_env = vec![
        ("TARSPAY_API_TOKEN", ADMIN),
        ("TARSPAY_VIEWER_TOKEN", VIEWER),
        ("TARSPAY_PARTITIONS", partitions),
    ];
    all_env.extend_from_slice(env);
    let app = spawn_app_with(false, |_| {}, &all_env).await;
    let stop = app.serve_on(listener);
    Console {
        app,
        url,
        bodies: Vec::new(),
        _stop: stop,
    }
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The CSRF token of the page's forms.
fn csrf_of(body: &str) -> String {
    let at = body
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no csrf field in {body}"));
    let rest = &body[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

impl Console {
    async fn login(&self, client: &reqwest::Client, token: &str) -> reqwest::Response {
        self.login_from(client, token, None).await
    }

    /// A login carrying `X-Forwarded-For: forwarded_for`, as a reverse proxy would send it.
    async fn login_from(
        &self,
        client: &reqwest::Client,
        token: &str,
        forwarded_for: Option<&str>,
    ) -> reqwest::Response {
        let mut request = client
            .post(format!("{}/console/login", self.url))
            .form(&[("operator", "Priya"), ("token", token)]);
        if let Some(forwarded_for) = forwarded_for {
            request = request.header("x-forwarded-for", forwarded_for);
        }
        request.send().await.unwrap()
    }

    async fn session(&self, token: &str) -> reqwest::Client {
        let client = browser();
        let response = self.login(&client, token).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&response), "/console/");
        client
    }

    async fn get(&mut self, client: &reqwest::Client, path: &str) -> (StatusCode, String) {
        let response = client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        self.bodies.push(body.clone());
        (status, body)
    }

    async fn page(&mut self, client: &reqwest::Client, path: &str) -> String {
        let (status, body) = self.get(client, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }

    async fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        form: &[(&str, &str)],
    ) -> reqwest::Response {
        client
            .post(format!("{}{path}", self.url))
            .form(form)
            .send()
            .await
            .unwrap()
    }
}

fn has_ids(body: &str, ids: &[&str]) {
    for id in ids {
        assert!(body.contains(&format!("id=\"{id}\"")), "no #{id} in {body}");
    }
}

/// Moves the only job of `id`'s partition into its dead stream, as an exhausted one would
/// be; returns nothing (the console lists it).
async fn bury(app: &TestApp, id: &str) {
    let partition = app.partition(id);
    let keys = partition.queue.keys().clone();
    let mut conn = partition.queue.connection();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&keys.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.ids.len(), 1);
    let entry = &entries.ids[0];
    let Some(redis::Value::BulkString(envelope)) = entry.map.get("e") else {
        panic!("no envelope in {entry:?}");
    };
    let _: String = redis::cmd("XADD")
        .arg(&keys.dead)
        .arg("*")
        .arg("e")
        .arg(envelope.as_slice())
        .arg("reason")
        .arg("attempts exhausted (test)")
        .arg("worker")
        .arg("test")
        .arg("at")
        .arg(now_ms())
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg(&keys.stream)
        .arg(&entry.id)
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_look_admins_act_and_nothing_secret_is_shown() {
    // Partitioned: dead ids name their partition (`P/ENTRY`), percent-encoded in the path.
    let mut c = console("3").await;
    let mut payout = inr("CON-1", "250");
    payout["accountNo"] = ACCOUNT.into();
    c.app.enqueue(payout).await;

    // Not logged in: pages send to the login, actions are refused.
    let anonymous = browser();
    let response = anonymous
        .get(format!("{}/console/", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/console/login");
    assert_eq!(
        response.headers()["x-frame-options"],
        "DENY",
        "security headers on every console answer"
    );
    assert!(
        response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let login = c.page(&anonymous, "/console/login").await;
    has_ids(&login, &["login", "operator", "token", "login-submit"]);
    let post = c.post(&anonymous, "/console/pause", &[("csrf", "x")]).await;
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);

    // A wrong token is refused with the error in place.
    let response = c.login(&anonymous, "not-the-token").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = response.text().await.unwrap();
    has_ids(&body, &["login-error"]);

    // The viewer: every page, the contract's ids, no controls.
    let viewer = browser();
    let response = c.login(&viewer, VIEWER).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("tarspay_console="), "{cookie}");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let overview = c.page(&viewer, "/console/").await;
    assert!(overview.contains("Partition 2"), "depth per partition");
    has_ids(
        &overview,
        &[
            "role",
            "chart-outcomes",
            "chart-latency",
            "depth",
            "oldest-waiting",
            "workers",
            "guard",
            "paused",
        ],
    );
    assert!(overview.contains("data-role=\"viewer\""));
    assert!(
        overview.contains("data-queue-state=\"waiting\" data-count=\"1\""),
        "{overview}"
    );
    assert!(overview.contains("data-paused=\"false\""));
    assert!(!overview.contains("pause-form") && !overview.contains("resume-form"));
    let live = c.page(&viewer, "/console/?fragment=live").await;
    assert!(
        !live.contains("<html") && live.contains("id=\"depth\""),
        "{live}"
    );

    let search = c.page(&viewer, "/console/payouts?mch_order_no=CON-1").await;
    has_ids(&search, &["search", "payouts"]);
    assert!(search.contains("data-order=\"CON-1\""), "{search}");
    let detail = c.page(&viewer, "/console/payouts/CON-1").await;
    has_ids(&detail, &["phase", "request", "timeline"]);
    assert!(detail.contains("data-kind=\"registered\""), "{detail}");
    assert!(
        detail.contains("••••0123"),
        "the account's last 4: {detail}"
    );
    assert!(!detail.contains("lookup-form"));
    let (status, _) = c.get(&viewer, "/console/payouts/NOPE-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    has_ids(&c.page(&viewer, "/console/batches").await, &["batches"]);
    has_ids(&c.page(&viewer, "/console/audit").await, &["audit"]);

    bury(&c.app, "CON-1").await;
    let dead = c.page(&viewer, "/console/dead").await;
    has_ids(&dead, &["dead", "stuck"]);
    assert!(!dead.contains("retry-form"), "a viewer sees no control");
    let dead_id = {
        let at = dead.find("data-dead-id=\"").expect("a dead row") + "data-dead-id=\"".len();
        dead[at..at + dead[at..].find('"').unwrap()].to_owned()
    };
    assert!(dead_id.contains('/'), "{dead_id}");
    let retry_path = format!("/console/dead/{}/retry", dead_id.replace('/', "%2F"));
    let csrf = csrf_of(&dead);
    let response = c.post(&viewer, &retry_path, &[("csrf", &csrf)]).await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "a viewer may only look"
    );
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 1);

    // The admin: no CSRF token, a wrong one, or another origin → 403.
    let admin = c.session(ADMIN).await;
    let dead = c.page(&admin, "/console/dead").await;
    assert!(dead.contains("class=\"inline retry-form\""), "{dead}");
    assert!(dead.contains(&format!("action=\"{retry_path}\"")), "{dead}");
    assert!(dead.contains(&format!("data-dead-id=\"{dead_id}\"")));
    let csrf = csrf_of(&dead);
    let response = c.post(&admin, &retry_path, &[]).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = c.post(&admin, &retry_path, &[("csrf", "0000")]).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = c
        .post(&admin, &retry_path, &[("csrf", &csrf[..csrf.len() - 1])])
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = admin
        .post(format!("{}{retry_path}", c.url))
        .header("origin", "https://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 1);

    // …and with it, the dead job is back on its queue, with a flash and an audit line.
    let response = admin
        .post(format!("{}{retry_path}", c.url))
        .header("origin", c.url.as_str())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/console/dead");
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 0);
    assert_eq!(c.app.deployment.queue_stats().await.unwrap().waiting, 1);
    let dead = c.page(&admin, "/console/dead").await;
    assert!(dead.contains("is back on its queue"), "{dead}");
    let audit = c.page(&admin, "/console/audit").await;
    assert!(
        audit.contains(&format!(
            "data-action=\"retry\" data-target=\"{dead_id}\" data-result=\"requeued\""
        )),
        "{audit}"
    );
    assert!(audit.contains("Priya"));

    // Look up now: a one-off query is queued and the order's history says who asked.
    let detail = c.page(&admin, "/console/payouts/CON-1").await;
    assert!(detail.contains("id=\"lookup-form\""));
    let response = c
        .post(&admin, "/console/payouts/CON-1/lookup", &[("csrf", &csrf)])
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(c.app.deployment.queue_stats().await.unwrap().waiting, 2);
    let detail = c.page(&admin, "/console/payouts/CON-1").await;
    assert!(detail.contains("data-kind=\"operator\""), "{detail}");

    // Pause and resume, from the overview's forms.
    let overview = c.page(&admin, "/console/").await;
    has_ids(&overview, &["pause-form", "resume-form"]);
    let response = c.post(&admin, "/console/pause", &[("csrf", &csrf)]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(c.app.deployment.is_paused().await.unwrap());
    assert!(
        c.page(&admin, "/console/")
            .await
            .contains("data-paused=\"true\"")
    );
    let response = c.post(&admin, "/console/resume", &[("csrf", &csrf)]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(!c.app.deployment.is_paused().await.unwrap());

    // Logging out ends the session in Redis.
    let response = c.post(&admin, "/console/logout", &[("csrf", &csrf)]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (status, _) = c.get(&admin, "/console/").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    // A page left open stops refreshing: its live region answers 401 (the script reloads to
    // the login page) instead of data, on every page.
    for path in [
        "/console/?fragment=live",
        "/console/payouts?fragment=live",
        "/console/batches?fragment=live",
        "/console/dead?fragment=live",
    ] {
        let (status, body) = c.get(&admin, path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!body.contains("data-"), "{path}: {body}");
    }
    let response = c.post(&admin, "/console/pause", &[("csrf", &csrf)]).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(!c.app.deployment.is_paused().await.unwrap());
    // The viewer's own session is untouched by the admin's logout.
    let live = c.page(&viewer, "/console/?fragment=live").await;
    assert!(live.contains("id=\"depth\""), "{live}");

    let key = c.app.key.expose_hex();
    for body in &c.bodies {
        for secret in [ADMIN, VIEWER, key.as_str(), ACCOUNT] {
            assert!(!body.contains(secret), "a page shows a secret: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_show_progress_and_results() {
    let mut c = console("1").await;
    let csv = "mchOrderNo,amount,currency,wayCode,customerName,customerEmail,customerContact\nCB-1,500,INR,UPI,Asha,asha@example.in,9876543210\nCB-2,700,INR,UPI,Ravi,ravi@example.in,9876543211\n";
    let created = reqwest::Client::new()
        .post(format!("{}/v1/batches?batchId=payroll-dec", c.url))
        .bearer_auth(ADMIN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status(),
        StatusCode::CREATED,
        "{}",
        created.text().await.unwrap()
    );
    let viewer = c.session(VIEWER).await;
    let batch = c.page(&viewer, "/console/batches/payroll-dec").await;
    has_ids(&batch, &["batch-progress", "results-csv"]);
    assert!(batch.contains("0 of 2 finished"), "{batch}");
    assert!(
        batch.contains("data-status=\"in progress\" data-count=\"2\""),
        "{batch}"
    );
    let (status, _) = c.get(&viewer, "/console/batches/no-such-batch").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let results = c
        .page(&viewer, "/console/batches/payroll-dec/results.csv")
        .await;
    assert!(
        results.starts_with("mchOrderNo,status,amount,currency,payOrderId,code,msg,attempts"),
        "{results}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_form_or_a_disguised_operator_name_is_refused() {
    let c = console("1").await;
    let client = browser();
    // Just over the limit, so the client has written it all before the server answers from
    // its length and closes. A server that closes first makes the write fail (a broken pipe,
    // seen under load): that try is made again, and a few failed tries fail the test.
    let huge = "x".repeat(tarspay_worker::console::FORM_LIMIT + 1024);
    let mut refused = None;
    for _ in 0..5 {
        match client
            .post(format!("{}/console/login", c.url))
            .header("origin", &c.url)
            .form(&[("operator", "alice"), ("token", huge.as_str())])
            .send()
            .await
        {
            Ok(response) => {
                refused = Some(response.status());
                break;
            }
            Err(err) => assert!(err.is_request(), "{err:?}"),
        }
    }
    assert_eq!(refused, Some(StatusCode::PAYLOAD_TOO_LARGE));
    // A right-to-left override would make "alice\u{202E}nimda" read as another name.
    let response = client
        .post(format!("{}/console/login", c.url))
        .header("origin", &c.url)
        .form(&[("operator", "alice\u{202E}nimda"), ("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // The same name without it logs in.
    let response = c.login(&client, ADMIN).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_is_rotated() {
    let c = console("1").await;
    // The same deployment served again with a new admin token (the old one leaked).
    const ROTATED: &str = "console-admin-token-rotated-77c2d1e9";
    let mut env = c.app.env.clone();
    env.retain(|(name, _)| name != "TARSPAY_API_TOKEN");
    env.push(("TARSPAY_API_TOKEN".into(), ROTATED.into()));
    let rotated = tarspay_worker::config::Settings::load_with_env(None, env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let deployment = c.app.deployment.clone();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        tarspay_worker::server::serve(&rotated, deployment, listener, shutdown).await
    });
    let client = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let overview = |base: &str, cookie: &str| {
        client
            .get(format!("{base}/console/"))
            .header("cookie", cookie.to_owned())
            .send()
    };
    // Sessions made with the old admin token and with the (unchanged) viewer token.
    for (token, still_valid) in [(ADMIN, false), (VIEWER, true)] {
        let login = c.login(&client, token).await;
        assert_eq!(login.status(), StatusCode::SEE_OTHER);
        let cookie = login
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("a session cookie")
            .to_owned();
        let first = overview(&c.url, &cookie).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK, "its own server takes it");
        let after = overview(&url, &cookie).await.unwrap();
        let expected = if still_valid {
            StatusCode::OK
        } else {
            StatusCode::SEE_OTHER
        };
        assert_eq!(
            after.status(),
            expected,
            "valid after the rotation: {still_valid}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_page_lists_payouts_flagged_stuck_whatever_their_phase() {
    let mut c = console("3").await;
    c.app.enqueue(inr("STK-1", "100")).await;
    let ledger = c.app.deployment.ledger_of("STK-1");
    ledger
        .begin_submit("STK-1", "run-a", Duration::from_secs(30))
        .await
        .unwrap();
    ledger.accept("STK-1", Some("P-STK"), None).await.unwrap();
    ledger.mark_stuck("STK-1").await.unwrap();
    let viewer = c.session(VIEWER).await;
    let dead = c.page(&viewer, "/console/dead").await;
    assert!(
        dead.contains("data-order=\"STK-1\" data-phase=\"accepted\""),
        "{dead}"
    );
    assert!(
        dead.contains("id=\"stuck-count\" data-count=\"1\""),
        "{dead}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_tokens_a_minute_are_all_a_peer_gets() {
    let c = console("1").await;
    let client = browser();
    for n in 0..5 {
        // A made-up X-Forwarded-For changes nothing without trusted proxies.
        let response = c
            .login_from(&client, "wrong-token", Some(&format!("198.51.100.{n}")))
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = c.login_from(&client, ADMIN, Some("198.51.100.99")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_five_tries() {
    // The test's connections come from 127.0.0.1: here that is the trusted proxy.
    let c = console_with("1", &[("TARSPAY_TRUSTED_PROXIES", "127.0.0.1")]).await;
    let attacker = browser();
    for _ in 0..5 {
        let response = c
            .login_from(&attacker, "wrong-token", Some("203.0.113.7"))
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = c.login_from(&attacker, ADMIN, Some("203.0.113.7")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // Forging a left part of the header does not escape the count: the proxy's hop decides.
    let response = c
        .login_from(&attacker, ADMIN, Some("192.0.2.1, 203.0.113.7"))
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client behind the same proxy still logs in.
    let operator = browser();
    let response = c.login_from(&operator, ADMIN, Some("203.0.113.8")).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    // A request that names no client is the proxy's own, a bucket of its own.
    let response = c.login_from(&browser(), ADMIN, None).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
}
