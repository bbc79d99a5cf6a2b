//! The operator console in a real headless Chromium (WebDriver through chromedriver), against
//! `serve` on a real redis-server, the in-process sandbox and in-process workers. Written
//! against the contract in docs/console.md only: its routes, form ids, cookie, CSRF field and
//! stable element ids.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without them
//! every test here fails, naming the packages. `UPDATE_SCREENSHOTS=1` also writes the docs'
//! screenshots (docs/console-*.png).

mod common;

use common::app::{TestApp, inr, spawn_app_with};
use common::browser::{Browser, DESKTOP};
use common::{fault_rule, outcome_rule, poll};
use redis::AsyncCommands;
use reqwest::StatusCode;
use std::time::Duration;
use tarspay_sandbox::{Endpoint, FaultAction, SandboxConfig};
use tarspay_worker::ids::BatchId;

const ADMIN: &str = "console-admin-token-4f1c9a7e2b";
const VIEWER: &str = "console-viewer-token-8d3e6b0a5c";
const COOKIE: &str = "tarspay_console";
/// A beneficiary account number: pages show at most its last 4 characters.
const ACCOUNT: &str = "501234567890";

/// How long a page may take to show what a test waits for (a hang guard, not a speed check).
const PATIENCE: Duration = Duration::from_secs(60);
const EVERY: Duration = Duration::from_millis(100);

/// `serve` (API and console) on a free port, with an admin and a viewer token.
struct Console {
    app: TestApp,
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn console(change: impl FnOnce(&mut SandboxConfig)) -> Console {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = spawn_app_with(
        false,
        change,
        &[
            ("TARSPAY_API_TOKEN", ADMIN),
            ("TARSPAY_VIEWER_TOKEN", VIEWER),
        ],
    )
    .await;
    let stop = app.serve_on(listener);
    Console {
        app,
        url,
        _stop: stop,
    }
}

impl Console {
    fn page(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// An Indian payout with a beneficiary account number (a field the pages must mask).
fn with_account(id: &str, amount: &str) -> serde_json::Value {
    let mut payout = inr(id, amount);
    payout["customerAccountNumber"] = ACCOUNT.into();
    payout
}

/// The number in a `data-count` attribute.
fn number(value: Option<String>, what: &str) -> u64 {
    let value = value.unwrap_or_else(|| panic!("{what} has no data-count"));
    value
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: data-count {value:?} is not a number"))
}

/// The `data-count` of the overview's `#depth` row for queue state `state`, if it has one.
async fn depth(browser: &Browser, state: &str) -> Option<u64> {
    let css = format!("#depth tr[data-queue-state=\"{state}\"]");
    if browser.count(&css).await == 0 {
        return None;
    }
    Some(number(browser.attr(&css, "data-count").await, &css))
}

/// The session's CSRF token as the page gives it to its forms (the field `csrf`).
async fn csrf_of(browser: &Browser) -> Option<String> {
    let value = browser
        .execute(
            "const field = document.querySelector('input[name=\"csrf\"]'); \
             return field ? field.value : null",
        )
        .await;
    value.as_str().map(str::to_owned)
}

/// An HTTP client that shows redirects instead of following them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `value` percent-encoded but for unreserved characters (a form value, a path segment).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A console `POST` as a browser of this session would send it: its cookie, an `Origin` of
/// this host, the form field `csrf`.
async fn post_as(c: &Console, path: &str, session: &str, csrf: &str) -> StatusCode {
    http()
        .post(c.page(path))
        .header("cookie", format!("{COOKIE}={session}"))
        .header("origin", &c.url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={}", encode(csrf)))
        .send()
        .await
        .unwrap()
        .status()
}

/// Moves the queued job of order `id` into the dead stream by hand, as an exhausted job would
/// be (no worker runs yet).
async fn bury(app: &TestApp, id: &str) {
    let partition = app.partition(id);
    let keys = partition.queue.keys().clone();
    let mut conn = partition.queue.connection();
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&keys.stream).await.unwrap();
    let entry = entries
        .ids
        .iter()
        .find(|entry| match entry.map.get("e") {
            Some(redis::Value::BulkString(envelope)) => {
                String::from_utf8_lossy(envelope).contains(id)
            }
            _ => false,
        })
        .unwrap_or_else(|| panic!("no job of {id} in {entries:?}"));
    let Some(redis::Value::BulkString(envelope)) = entry.map.get("e") else {
        unreachable!()
    };
    let _: String = conn
        .xadd(
            &keys.dead,
            "*",
            &[
                ("e", envelope.as_slice()),
                ("reason", b"attempts exhausted (test)".as_slice()),
                ("worker", b"test".as_slice()),
                ("at", b"0".as_slice()),
            ],
        )
        .await
        .unwrap();
    let _: i64 = conn.xdel(&keys.stream, &[&entry.id]).await.unwrap();
    let dead = partition.queue.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
}

/// The console's id of the dead job of order `id` (its `table#dead` row's `data-dead-id`),
/// once the dead page lists it.
async fn dead_row_of(browser: &Browser, c: &Console, id: &str) -> String {
    let what = format!("the dead job of {id} on /console/dead");
    poll(&what, PATIENCE, EVERY, || async {
        let rows = "table#dead tr[data-dead-id]";
        let texts = browser.texts(rows).await;
        let ids = browser.attrs(rows, "data-dead-id").await;
        match texts.iter().zip(&ids).find(|(text, _)| text.contains(id)) {
            Some((_, Some(dead_id))) => Ok(dead_id.clone()),
            _ => {
                browser.goto(&c.page("/console/dead")).await;
                Err(format!("(rows {texts:?})"))
            }
        }
    })
    .await
}

/// A browser with nothing in it proves the fixture itself: Chromium renders, scripts run,
/// the window resizes. (A console test failing beside a passing one here is the console's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_fixture_drives_a_headless_chromium() {
    let browser = Browser::start().await;
    browser
        .goto("data:text/html,<title>t</title><p id=a data-n=3>hello</p><p class=b>1</p><p class=b>2</p>")
        .await;
    assert_eq!(browser.text_of("#a").await, "hello");
    assert_eq!(browser.attr("#a", "data-n").await.as_deref(), Some("3"));
    assert_eq!(browser.count("p.b").await, 2);
    assert_eq!(browser.count("#missing").await, 0);
    let width = browser.execute("return window.innerWidth").await;
    assert_eq!(width.as_u64(), Some(u64::from(DESKTOP.0)), "{width}");
    browser.phone().await;
    let width = browser.execute("return window.innerWidth").await;
    assert_eq!(width.as_u64(), Some(390), "{width}");
    assert!(browser.png().await.len() > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_log_in_as_viewer_or_admin_and_a_wrong_token_is_refused() {
    let c = console(|_| {}).await;
    let browser = Browser::start().await;

    // The login form: the token is a password field.
    browser.goto(&c.page("/console/login")).await;
    assert_eq!(
        browser.attr("input#token", "type").await.as_deref(),
        Some("password")
    );
    assert_eq!(
        browser.attr("input#operator", "name").await.as_deref(),
        Some("operator")
    );
    assert_eq!(
        browser.attr("input#token", "name").await.as_deref(),
        Some("token")
    );

    // Logged out, the overview shows nothing of the deployment.
    browser.goto(&c.page("/console/")).await;
    assert_eq!(
        browser.count("#role").await,
        0,
        "{}",
        browser.source().await
    );
    assert_eq!(browser.count("#depth").await, 0);

    browser.login(&c.url, "vera", VIEWER).await;
    assert_eq!(browser.count("#login-error").await, 0);
    let role = browser.text_of("#role").await.to_lowercase();
    assert!(
        role.contains("viewer") && !role.contains("admin"),
        "#role: {role}"
    );
    assert!(browser.cookie(COOKIE).await.is_some(), "no session cookie");
    browser.forget_cookies().await;

    browser.login(&c.url, "alice", ADMIN).await;
    let role = browser.text_of("#role").await.to_lowercase();
    assert!(
        role.contains("admin") && !role.contains("viewer"),
        "#role: {role}"
    );
    let admin_session = browser.cookie(COOKIE).await.expect("a session cookie");
    browser.forget_cookies().await;

    // A wrong token: the error, no session, and the token is not echoed back.
    let wrong = "console-admin-token-4f1c9a7e2c";
    browser.login(&c.url, "mallory", wrong).await;
    let error = browser.text_of("#login-error").await;
    assert!(!error.trim().is_empty(), "#login-error is empty");
    assert_eq!(browser.count("#role").await, 0);
    assert_eq!(browser.cookie(COOKIE).await, None);
    assert!(!browser.source().await.contains(wrong));
    browser.goto(&c.page("/console/")).await;
    assert_eq!(browser.count("#role").await, 0);

    // The admin's session was its own: a new random id each login.
    browser.login(&c.url, "alice", ADMIN).await;
    let again = browser.cookie(COOKIE).await.expect("a session cookie");
    assert_ne!(again, admin_session);
    assert!(
        !again.contains(ADMIN),
        "the cookie holds the token: {again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_what_was_enqueued_and_paid() {
    const N: u64 = 6;
    const FAILING: u64 = 2;
    let c = console(|config| config.outcomes = vec![outcome_rule("OVF", 3)]).await;
    for k in 1..=N - FAILING {
        c.app.enqueue(inr(&format!("OVS-{k}"), "100")).await;
    }
    for k in 1..=FAILING {
        c.app.enqueue(inr(&format!("OVF-{k}"), "100")).await;
    }
    let browser = Browser::start().await;
    browser.login(&c.url, "vera", VIEWER).await;

    // No worker yet: all N wait.
    browser.wait_for("#depth tr[data-queue-state]").await;
    assert_eq!(depth(&browser, "waiting").await, Some(N));
    assert_eq!(depth(&browser, "dead").await.unwrap_or(0), 0);
    assert_eq!(
        browser.attr("#paused", "data-paused").await.as_deref(),
        Some("false")
    );
    let oldest = browser.text_of("#oldest-waiting").await;
    assert!(!oldest.trim().is_empty(), "#oldest-waiting is empty");

    // A pool pays them; the page follows without being reloaded (its live region refreshes).
    let pool = c.app.pool(4);
    let outcomes = c.app.wait_outcomes(N as usize).await;
    let succeeded = outcomes
        .values()
        .filter(|o| o.status == "succeeded")
        .count() as u64;
    assert_eq!(succeeded, N - FAILING, "{outcomes:?}");
    poll("the overview's queue to empty", PATIENCE, EVERY, || async {
        match depth(&browser, "waiting").await {
            Some(0) => Ok(()),
            other => Err(format!("(waiting {other:?})")),
        }
    })
    .await;
    poll("a worker on the overview", PATIENCE, EVERY, || async {
        let workers = browser.count("#workers tr[data-worker]").await;
        (workers >= 1)
            .then_some(())
            .ok_or(format!("({workers} workers)"))
    })
    .await;

    // The charts: SVGs whose outcome data counts what was paid and what failed. The contract
    // names the charts but not their marks: this reads the console's `data-status` and
    // `data-count` on the outcome chart's bars (summed over minutes).
    for chart in ["#chart-outcomes", "#chart-latency"] {
        let svgs = browser.count(&format!("svg{chart}, {chart} svg")).await;
        assert!(svgs >= 1, "{chart} is no SVG");
    }
    browser.goto(&c.page("/console/")).await;
    let total = |status: &'static str| {
        let browser = &browser;
        async move {
            let css = format!("#chart-outcomes [data-status=\"{status}\"][data-count]");
            browser
                .attrs(&css, "data-count")
                .await
                .into_iter()
                .map(|v| number(v, &css))
                .sum::<u64>()
        }
    };
    poll("the outcomes chart", PATIENCE, EVERY, || async {
        let (ok, failed) = (total("succeeded").await, total("failed").await);
        if (ok, failed) == (N - FAILING, FAILING) {
            Ok(())
        } else {
            browser.goto(&c.page("/console/")).await;
            Err(format!("(succeeded {ok}, failed {failed})"))
        }
    })
    .await;
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_pauses_and_resumes_from_the_overview_and_the_audit_log_says_who() {
    let c = console(|_| {}).await;
    let browser = Browser::start().await;
    browser.login(&c.url, "alice", ADMIN).await;
    browser.wait_for("#paused").await;
    assert_eq!(
        browser.attr("#paused", "data-paused").await.as_deref(),
        Some("false")
    );
    let pause = "form#pause-form [type=submit], form#pause-form button";
    // Every action asks first; declined, nothing happens.
    let question = browser.click_declined(pause).await;
    assert!(!question.trim().is_empty());
    assert!(
        !c.app.deployment.is_paused().await.unwrap(),
        "paused unasked"
    );
    let asked = browser.click_confirmed(pause).await;
    assert_eq!(asked, Some(question), "the pause was not confirmed first");
    assert!(c.app.deployment.is_paused().await.unwrap(), "not paused");
    browser.goto(&c.page("/console/")).await;
    assert_eq!(
        browser.attr("#paused", "data-paused").await.as_deref(),
        Some("true")
    );
    let asked = browser
        .click_confirmed("form#resume-form [type=submit], form#resume-form button")
        .await;
    assert!(asked.is_some(), "the resume was not confirmed first");
    assert!(!c.app.deployment.is_paused().await.unwrap(), "still paused");

    browser.goto(&c.page("/console/audit")).await;
    let actions = browser
        .attrs("table#audit tr[data-action]", "data-action")
        .await;
    let rows = browser.texts("table#audit tr[data-action]").await;
    let pause = actions
        .iter()
        .position(|a| a.as_deref().is_some_and(|a| a.contains("pause")))
        .unwrap_or_else(|| panic!("no pause in the audit log: {actions:?}"));
    let resume = actions
        .iter()
        .position(|a| a.as_deref().is_some_and(|a| a.contains("resume")))
        .unwrap_or_else(|| panic!("no resume in the audit log: {actions:?}"));
    assert!(resume < pause, "the audit log is newest first: {actions:?}");
    assert!(rows[pause].contains("alice"), "{}", rows[pause]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_a_payout_by_its_mch_order_no() {
    let c = console(|_| {}).await;
    for id in ["FIND-ME-7", "OTHER-1", "OTHER-2"] {
        c.app.enqueue(inr(id, "250")).await;
    }
    let browser = Browser::start().await;
    browser.login(&c.url, "vera", VIEWER).await;
    browser.goto(&c.page("/console/payouts")).await;
    browser.wait_for("form#search").await;
    // All three are listed unfiltered.
    poll("every payout in the list", PATIENCE, EVERY, || async {
        let rows = browser.count("table#payouts tr[data-order]").await;
        if rows >= 3 {
            Ok(())
        } else {
            browser.goto(&c.page("/console/payouts")).await;
            Err(format!("({rows} rows)"))
        }
    })
    .await;

    // The form, as an operator fills it in.
    let field = browser
        .expect("form#search input[name=\"mch_order_no\"]")
        .await;
    field.clear().await.unwrap();
    field.send_keys("FIND-ME-7").await.unwrap();
    browser
        .client()
        .form(fantoccini::Locator::Css("form#search"))
        .await
        .unwrap()
        .submit()
        .await
        .unwrap();
    // The list before the search shows FIND-ME-7 too: wait for the search's own page.
    poll("the search's page", PATIENCE, EVERY, || async {
        let url = browser.current_url().await;
        if url.contains("mch_order_no=FIND-ME-7") {
            Ok(())
        } else {
            Err(url)
        }
    })
    .await;
    browser
        .wait_for("table#payouts tr[data-order=\"FIND-ME-7\"]")
        .await;
    let orders = browser
        .attrs("table#payouts tr[data-order]", "data-order")
        .await;
    assert_eq!(orders, vec![Some("FIND-ME-7".to_owned())]);

    // An order no one enqueued finds nothing.
    browser
        .goto(&c.page("/console/payouts?mch_order_no=NOBODY-1"))
        .await;
    browser.wait_for("table#payouts, form#search").await;
    assert_eq!(browser.count("table#payouts tr[data-order]").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payouts_timeline_lists_the_creates_a_gateway_fault_caused() {
    // The gateway answers FLAKY-1's first two creates with 500323 (busy: retryable).
    let c = console(|config| {
        config.faults = vec![fault_rule(
            "FLAKY",
            Endpoint::CreatePayout,
            Some(2),
            FaultAction::Code {
                code: 500323,
                msg: Some("remote client error".into()),
            },
        )]
    })
    .await;
    c.app.enqueue(inr("FLAKY-1", "100")).await;
    let pool = c.app.pool(2);
    let outcomes = c.app.wait_outcomes(1).await;
    assert_eq!(outcomes["FLAKY-1"].status, "succeeded");
    pool.stop().await;
    assert_eq!(
        c.app.sandbox.create_attempts("FLAKY-1"),
        3,
        "the sandbox saw three creates"
    );

    let browser = Browser::start().await;
    browser.login(&c.url, "vera", VIEWER).await;
    browser.goto(&c.page("/console/payouts/FLAKY-1")).await;
    browser.wait_for("ol#timeline").await;
    let phase = browser.text_of("#phase").await.to_lowercase();
    assert!(phase.contains("succeeded"), "#phase: {phase}");
    let creates = browser.texts("ol#timeline li[data-kind=\"create\"]").await;
    assert!(creates.len() >= 2, "creates on the timeline: {creates:?}");
    let refused = creates.iter().filter(|t| t.contains("500323")).count();
    assert_eq!(
        refused, 2,
        "the two refused creates and their code: {creates:?}"
    );
    assert_eq!(
        browser
            .count("ol#timeline li[data-kind=\"registered\"]")
            .await,
        1
    );
    assert_eq!(
        browser.count("ol#timeline li[data-kind=\"final\"]").await,
        1
    );
    // Registered comes first, the final state last.
    let kinds = browser
        .attrs("ol#timeline li[data-kind]", "data-kind")
        .await;
    assert_eq!(
        kinds.first(),
        Some(&Some("registered".to_owned())),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&Some("final".to_owned())), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_controls_and_a_forged_action_is_refused() {
    let c = console(|_| {}).await;
    c.app.enqueue(inr("LOOK-1", "100")).await;
    c.app.enqueue(inr("DEAD-V", "100")).await;
    bury(&c.app, "DEAD-V").await;

    let browser = Browser::start().await;
    browser.login(&c.url, "vera", VIEWER).await;
    browser.wait_for("#paused").await;
    assert_eq!(browser.count("form#pause-form").await, 0);
    assert_eq!(browser.count("form#resume-form").await, 0);
    browser.goto(&c.page("/console/payouts/LOOK-1")).await;
    browser.wait_for("#phase").await;
    assert_eq!(browser.count("form#lookup-form").await, 0);
    browser.goto(&c.page("/console/dead")).await;
    let dead_id = dead_row_of(&browser, &c, "DEAD-V").await;
    assert_eq!(browser.count("form.retry-form").await, 0);

    // The viewer's own session and CSRF token, sent by hand: still refused.
    let session = browser.cookie(COOKIE).await.expect("a session cookie");
    let csrf = csrf_of(&browser)
        .await
        .expect("no csrf field on the viewer's page (its logout form should carry one)");
    for path in [
        format!("/console/dead/{}/retry", encode(&dead_id)),
        "/console/payouts/LOOK-1/lookup".to_owned(),
        "/console/pause".to_owned(),
    ] {
        let status = post_as(&c, &path, &session, &csrf).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "viewer POST {path}");
    }
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 1);
    assert!(
        !c.app.deployment.is_paused().await.unwrap(),
        "a viewer paused"
    );

    // An admin's session without its CSRF token is refused too; with it, the same request
    // acts (so the viewer's refusal was the role's).
    browser.forget_cookies().await;
    browser.login(&c.url, "alice", ADMIN).await;
    browser.goto(&c.page("/console/dead")).await;
    browser.wait_for("form.retry-form").await;
    let session = browser.cookie(COOKIE).await.expect("a session cookie");
    let csrf = csrf_of(&browser).await.expect("a csrf field");
    let retry = format!("/console/dead/{}/retry", encode(&dead_id));
    let forged = post_as(&c, &retry, &session, "not-the-token").await;
    assert!(
        forged.is_client_error(),
        "an admin POST with a wrong csrf: {forged}"
    );
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 1);
    let status = post_as(&c, &retry, &session, &csrf).await;
    assert!(
        status.is_success() || status.is_redirection(),
        "the admin's POST: {status}"
    );
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_retries_a_dead_job_and_the_audit_log_records_it() {
    let c = console(|_| {}).await;
    c.app.enqueue(inr("DEAD-1", "100")).await;
    bury(&c.app, "DEAD-1").await;
    let pool = c.app.pool(2);

    let browser = Browser::start().await;
    browser.login(&c.url, "alice", ADMIN).await;
    browser.goto(&c.page("/console/dead")).await;
    let dead_id = dead_row_of(&browser, &c, "DEAD-1").await;
    let row = format!("table#dead tr[data-dead-id=\"{dead_id}\"]");
    assert_eq!(browser.count("form.retry-form").await, 1);
    let asked = browser
        .click_confirmed("form.retry-form [type=submit], form.retry-form button")
        .await;
    assert!(asked.is_some(), "the retry was not confirmed first");

    // Re-queued, then paid.
    let outcomes = c.app.wait_outcomes(1).await;
    assert_eq!(outcomes["DEAD-1"].status, "succeeded");
    assert_eq!(c.app.deployment.dead_count().await.unwrap(), 0);
    pool.stop().await;
    browser.goto(&c.page("/console/dead")).await;
    assert_eq!(browser.count(&row).await, 0);

    browser.goto(&c.page("/console/audit")).await;
    browser.wait_for("table#audit tr[data-action]").await;
    let actions = browser
        .attrs("table#audit tr[data-action]", "data-action")
        .await;
    let rows = browser.texts("table#audit tr[data-action]").await;
    let retry = actions
        .iter()
        .position(|a| a.as_deref().is_some_and(|a| a.contains("retry")))
        .unwrap_or_else(|| panic!("no retry in the audit log: {actions:?} {rows:?}"));
    let row = &rows[retry];
    assert!(row.contains("alice"), "{row}");
    assert!(row.to_lowercase().contains("admin"), "{row}");
    assert!(
        row.contains(&dead_id) || row.contains("DEAD-1"),
        "the audit row names no target: {row}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_page_holds_a_key_a_token_or_a_full_account_number() {
    let c = console(|_| {}).await;
    let batch = BatchId::parse("SECRETS-B").unwrap();
    c.app
        .producer
        .enqueue_json(&with_account("ACCT-1", "100"), Some(&batch))
        .await
        .unwrap();
    c.app.enqueue(with_account("ACCT-2", "100")).await;
    bury(&c.app, "ACCT-2").await;
    let pool = c.app.pool(2);
    c.app.wait_outcomes(1).await;
    pool.stop().await;
    let key = c.app.key.expose_hex();

    let browser = Browser::start().await;
    browser.login(&c.url, "alice", ADMIN).await;
    // One admin action, so the audit page has a row to render.
    browser.goto(&c.page("/console/")).await;
    browser
        .click_confirmed("form#pause-form [type=submit], form#pause-form button")
        .await;
    let pages = [
        "/console/".to_owned(),
        "/console/?fragment=live".to_owned(),
        "/console/payouts".to_owned(),
        "/console/payouts?mch_order_no=ACCT-1".to_owned(),
        "/console/payouts/ACCT-1".to_owned(),
        "/console/payouts/ACCT-2".to_owned(),
        "/console/batches".to_owned(),
        "/console/batches/SECRETS-B".to_owned(),
        "/console/dead".to_owned(),
        "/console/audit".to_owned(),
    ];
    for path in &pages {
        browser.goto(&c.page(path)).await;
        let source = browser.source().await;
        assert!(source.len() > 100, "{path} is empty: {source}");
        for (secret, what) in [
            (key.as_str(), "the private key"),
            (ADMIN, "the admin token"),
            (VIEWER, "the viewer token"),
            (ACCOUNT, "the full account number"),
        ] {
            assert!(!source.contains(secret), "{path} holds {what}");
        }
    }
    // The pages did show the orders: the account's last 4 characters, the dead job.
    browser.goto(&c.page("/console/payouts/ACCT-1")).await;
    let request = browser.text_of("#request").await;
    assert!(
        request.contains(&ACCOUNT[ACCOUNT.len() - 4..]),
        "#request: {request}"
    );
    browser.goto(&c.page("/console/dead")).await;
    dead_row_of(&browser, &c, "ACCT-2").await;
    // Nor does the login page, after a failed login with a real token's neighbour.
    browser.forget_cookies().await;
    browser.login(&c.url, "mallory", VIEWER).await;
    browser.forget_cookies().await;
    browser.goto(&c.page("/console/login")).await;
    let source = browser.source().await;
    assert!(!source.contains(VIEWER) && !source.contains(ADMIN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_fits_a_phone_without_horizontal_scrolling() {
    let c = console(|_| {}).await;
    let batch = BatchId::parse("payroll-phone").unwrap();
    for k in 1..=5 {
        c.app
            .producer
            .enqueue_json(
                &with_account(&format!("PHONE-LONG-ORDER-NUMBER-{k}"), "100"),
                Some(&batch),
            )
            .await
            .unwrap();
    }
    c.app.enqueue(inr("PHONE-DEAD", "100")).await;
    bury(&c.app, "PHONE-DEAD").await;
    let pool = c.app.pool(2);
    c.app.wait_outcomes(5).await;
    let browser = Browser::start().await;
    browser.phone().await;
    browser.login(&c.url, "alice", ADMIN).await;
    for path in [
        "/console/",
        "/console/payouts",
        "/console/payouts/PHONE-LONG-ORDER-NUMBER-1",
        "/console/batches",
        "/console/batches/payroll-phone",
        "/console/dead",
        "/console/audit",
    ] {
        browser.goto(&c.page(path)).await;
        browser.wait_for("#role").await;
        let sizes = browser
            .execute(
                "return [document.body.scrollWidth, document.documentElement.scrollWidth, \
                 window.innerWidth]",
            )
            .await;
        let [body, root, inner] = [0, 1, 2].map(|i| sizes[i].as_u64().unwrap());
        assert_eq!(inner, 390, "the window is a phone's: {sizes}");
        assert!(
            body <= inner,
            "{path}: the body is {body} px wide on a {inner} px phone"
        );
        assert!(
            root <= inner,
            "{path}: the page is {root} px wide on a {inner} px phone"
        );
    }
    pool.stop().await;
}

/// A page whose console stops answering says so instead of showing old numbers as current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_says_when_its_live_region_could_not_be_refreshed() {
    let c = console(|_| {}).await;
    let browser = Browser::start().await;
    browser.login(&c.url, "alice", VIEWER).await;
    browser.goto(&c.page("/console/")).await;
    browser.wait_for("#depth").await;
    assert_eq!(browser.count("#live-stale").await, 0);
    // `serve` stops; the page stays open.
    let Console { app, _stop, .. } = c;
    drop(_stop);
    browser.wait_for("#live-stale").await;
    assert_eq!(
        browser.attr("[data-live]", "data-stale").await.as_deref(),
        Some("true")
    );
    drop(app);
}

/// Basic accessibility, checked in the rendered pages (as an admin, so every control is
/// there): a language, a title and one `h1`; every form field labelled, every link and button
/// named, every table header scoped, every chart named; text at a contrast of at least 4.5:1
/// on its rendered background (WCAG AA); and the keyboard: the first Tab lands on the
/// "skip to content" link, which shows a focus outline.
const ACCESSIBILITY_AUDIT: &str = r#"
const problems = [];
const describe = (el) => el.outerHTML.slice(0, 90);
if (!document.documentElement.lang) problems.push('no lang on <html>');
if (!document.title.trim()) problems.push('no title');
const h1s = document.querySelectorAll('h1').length;
if (h1s !== 1) problems.push(h1s + ' h1 elements');
for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
  const named = (el.labels && el.labels.length > 0) || el.getAttribute('aria-label')
    || el.getAttribute('aria-labelledby');
  if (!named) problems.push('unlabelled field ' + describe(el));
}
for (const el of document.querySelectorAll('a[href], button')) {
  const name = (el.innerText || el.getAttribute('aria-label') || el.title || '').trim();
  if (!name) problems.push('nameless control ' + describe(el));
  if (el.tabIndex < 0) problems.push('not reachable by Tab ' + describe(el));
}
for (const th of document.querySelectorAll('th')) {
  if (!th.getAttribute('scope')) problems.push('th without scope: ' + th.innerText);
}
for (const svg of document.querySelectorAll('svg')) {
  if (svg.getAttribute('aria-hidden') === 'true' || svg.closest('[aria-hidden="true"]')) continue;
  const named = svg.getAttribute('aria-label') || svg.getAttribute('aria-labelledby')
    || svg.querySelector(':scope > title');
  if (svg.getAttribute('role') !== 'img' || !named) problems.push('unnamed chart ' + describe(svg));
}
const channels = (color) => (color.match(/[\d.]+/g) || []).map(Number);
const luminance = (color) => {
  const [r, g, b] = channels(color).slice(0, 3).map((v) => {
    v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const background = (el) => {
  for (let e = el; e; e = e.parentElement) {
    const c = getComputedStyle(e).backgroundColor;
    const v = channels(c);
    if (v.length === 3 || (v.length === 4 && v[3] > 0)) return c;
  }
  return 'rgb(255, 255, 255)';
};
let checked = 0;
for (const el of document.body.querySelectorAll('*')) {
  if (el.closest('svg')) continue;
  const ownText = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!ownText || el.getClientRects().length === 0) continue;
  const style = getComputedStyle(el);
  if (style.visibility === 'hidden') continue;
  const [a, b] = [luminance(style.color), luminance(background(el))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  checked += 1;
  if (ratio < 4.5) {
    problems.push('contrast ' + ratio.toFixed(2) + ':1 for ' + el.tagName + ' "'
      + el.textContent.trim().slice(0, 40) + '"');
  }
}
if (checked < 5) problems.push('only ' + checked + ' text elements checked');
return problems;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_basic_accessibility_checks() {
    let c = console(|config| config.outcomes = vec![outcome_rule("A11Y-F", 3)]).await;
    let batch = BatchId::parse("payroll-a11y").unwrap();
    for id in ["A11Y-1", "A11Y-F1"] {
        c.app
            .producer
            .enqueue_json(&with_account(id, "250"), Some(&batch))
            .await
            .unwrap();
    }
    c.app.enqueue(with_account("A11Y-DEAD", "100")).await;
    bury(&c.app, "A11Y-DEAD").await;
    let pool = c.app.pool(2);
    c.app.wait_outcomes(2).await;

    let browser = Browser::start().await;
    // The audit itself finds each kind of fault on a page made of them.
    browser
        .goto(
            "data:text/html,<title>t</title><h1>x</h1><input id=q><p style='color:%23aaa'>faint \
             text</p><table><tr><th>h</th></tr></table><svg></svg><a href='/x'></a>",
        )
        .await;
    let found = browser.execute(ACCESSIBILITY_AUDIT).await.to_string();
    for fault in [
        "no lang",
        "unlabelled field",
        "contrast",
        "th without scope",
        "unnamed chart",
        "nameless control",
    ] {
        assert!(found.contains(fault), "the audit missed {fault:?}: {found}");
    }

    browser.goto(&c.page("/console/login")).await;
    let mut pages = vec![(
        "/console/login".to_owned(),
        browser.execute(ACCESSIBILITY_AUDIT).await,
    )];
    browser.login(&c.url, "alice", ADMIN).await;
    for path in [
        "/console/",
        "/console/payouts",
        "/console/payouts/A11Y-F1",
        "/console/batches",
        "/console/batches/payroll-a11y",
        "/console/dead",
        "/console/audit",
    ] {
        browser.goto(&c.page(path)).await;
        browser.wait_for("#role").await;
        pages.push((path.to_owned(), browser.execute(ACCESSIBILITY_AUDIT).await));
        // The keyboard's first stop is the skip link, drawn with a focus outline.
        browser.press_tab().await;
        let focused = browser
            .execute(
                "const el = document.activeElement; \
                 return [el.getAttribute('href'), el.className, getComputedStyle(el).outlineStyle]",
            )
            .await;
        assert_eq!(
            focused[0], "#main",
            "{path}: the first Tab lands on {focused}"
        );
        assert_ne!(
            focused[2], "none",
            "{path}: the focused link has no outline: {focused}"
        );
    }
    pool.stop().await;
    for (path, problems) in &pages {
        let problems = problems.as_array().expect("the audit returns a list");
        assert!(problems.is_empty(), "{path}: {problems:#?}");
    }
}

/// The docs' screenshots (1280 px): the overview, a payout whose create was retried, a batch.
/// Written to docs/ only with `UPDATE_SCREENSHOTS=1`; the pages' assertions always run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots() {
    let write = std::env::var("UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let c = console(|config| {
        config.outcomes = vec![outcome_rule("DEC-F", 3)];
        config.faults = vec![fault_rule(
            "RETRIED",
            Endpoint::CreatePayout,
            Some(1),
            FaultAction::Code {
                code: 500323,
                msg: Some("remote client error".into()),
            },
        )]
    })
    .await;
    let batch = BatchId::parse("payroll-dec").unwrap();
    let mut n = 0;
    for k in 1..=10 {
        let id = if k % 5 == 0 {
            format!("DEC-F-{k}")
        } else {
            format!("DEC-{k}")
        };
        let amount = format!("{}", 1000 + 250 * k);
        c.app
            .producer
            .enqueue_json(&with_account(&id, &amount), Some(&batch))
            .await
            .unwrap();
        n += 1;
    }
    c.app.enqueue(with_account("RETRIED-1", "4200")).await;
    n += 1;
    let pool = c.app.pool(4);
    c.app.wait_outcomes(n).await;
    let browser = Browser::start().await;
    browser.resize(DESKTOP).await;
    browser.login(&c.url, "alice", ADMIN).await;

    // The overview once its outcome chart counts every final payout (its counters reach Redis
    // every 2 s).
    browser.goto(&c.page("/console/")).await;
    poll("the outcomes chart", PATIENCE, EVERY, || async {
        let css = "#chart-outcomes [data-status][data-count]";
        let counts = browser.attrs(css, "data-count").await;
        let total: u64 = counts.into_iter().map(|v| number(v, css)).sum();
        if total == n as u64 {
            Ok(())
        } else {
            browser.goto(&c.page("/console/")).await;
            Err(format!("({total} of {n})"))
        }
    })
    .await;
    assert_eq!(depth(&browser, "waiting").await, Some(0));
    browser.wait_for("#workers tr[data-worker]").await;
    // Each shot shows its whole page, 1280 px wide.
    let shot = |name: &'static str| {
        let browser = &browser;
        let path = docs.join(name);
        async move {
            browser.resize(DESKTOP).await;
            browser.fit_height(2400).await;
            if write {
                browser.screenshot(&path).await;
            } else {
                browser.png().await;
            }
        }
    };
    shot("console-overview.png").await;

    browser.goto(&c.page("/console/payouts/RETRIED-1")).await;
    browser.wait_for("ol#timeline").await;
    let creates = browser.texts("ol#timeline li[data-kind=\"create\"]").await;
    assert!(creates.len() >= 2, "{creates:?}");
    shot("console-payout.png").await;

    browser.goto(&c.page("/console/batches")).await;
    browser
        .wait_for("table#batches tr[data-batch=\"payroll-dec\"]")
        .await;
    browser.goto(&c.page("/console/batches/payroll-dec")).await;
    browser.wait_for("#batch-progress").await;
    let csv = browser
        .attr("a#results-csv", "href")
        .await
        .expect("an href");
    shot("console-batch.png").await;

    // The results link serves the batch's rows to this session.
    let session = browser.cookie(COOKIE).await.unwrap();
    let csv_url = if csv.starts_with("http") {
        csv
    } else {
        c.page(&csv)
    };
    let response = http()
        .get(&csv_url)
        .header("cookie", format!("{COOKIE}={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{csv_url}");
    let body = response.text().await.unwrap();
    let rows = body.lines().filter(|l| l.contains("DEC-")).count();
    assert_eq!(rows, 10, "{body}");
    assert!(!body.contains(ACCOUNT), "the CSV holds the account number");
    pool.stop().await;
}
