//! A real headless Chromium for the console's browser tests: `chromedriver` on a free loopback
//! port (a child of the test, its whole process group killed on drop) and one WebDriver session
//! driven with `fantoccini`.
//!
//! Needs Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them). Without
//! them every browser test fails, naming the packages: it never passes silently.

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The window of a desktop: the docs' screenshots are taken at this width.
pub const DESKTOP: (u32, u32) = (1280, 900);
/// The window of a phone (an iPhone 12–15's CSS viewport).
pub const PHONE: (u32, u32) = (390, 844);

/// How long a page may take to show what a test waits for (a hang guard, not a speed check).
const PATIENCE: Duration = Duration::from_secs(60);

pub struct Browser {
    client: Client,
    port: u16,
    session: Option<String>,
    /// Dropped after the session is closed (fields drop after `Drop::drop`).
    _chromedriver: Chromedriver,
    /// Chromium's temporary files (`TMPDIR`): removed after chromedriver's process group is
    /// killed (fields drop in order), so no run leaves its profile copies in /tmp.
    _tmp: tempfile::TempDir,
}

/// The chromedriver child: its whole process group (chromedriver and every Chromium process
/// it started) is SIGKILLed on drop, also when the fixture fails half-way through starting.
struct Chromedriver(Child);

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group is chromedriver's own (`process_group(0)`: its id is chromedriver's pid).
        // Signalled with killpg, never through the `kill` program: one run of it here was
        // seen (strace) to signal -1, every process on the machine, instead of the group.
        if let Ok(group) = libc::pid_t::try_from(self.0.id())
            && group > 1
        {
            // SAFETY: killpg only sends a signal; a stale group id fails with ESRCH.
            unsafe {
                libc::killpg(group, libc::SIGKILL);
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `name`'s path on PATH, if any.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// One HTTP/1.1 exchange with the local chromedriver; the whole answer, or None.
fn raw_http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    // chromedriver may keep the connection open: read the head, then Content-Length bytes.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return Some(text.into_owned());
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Some(String::from_utf8_lossy(&answer).into_owned()),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
}

impl Browser {
    /// Starts chromedriver and opens a headless Chromium at the desktop size. Panics, naming
    /// the Debian packages, when `chromium` or `chromedriver` is not on PATH.
    pub async fn start() -> Self {
        let (Some(chromium), Some(chromedriver)) = (on_path("chromium"), on_path("chromedriver"))
        else {
            panic!(
                "the console's browser tests need Chromium and chromedriver on PATH, found \
                 chromium: {:?}, chromedriver: {:?}; install Debian's packages: \
                 `apt-get install -y chromium chromium-driver` (.ci/run does)",
                on_path("chromium"),
                on_path("chromedriver"),
            );
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let verbose = std::env::var("CHROMEDRIVER_LOG").is_ok();
        let output = || {
            if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        // Its own process group: dropping the fixture kills chromedriver and every Chromium
        // process it started, even if the session could not be closed.
        let tmp = tempfile::tempdir().expect("a temporary directory for Chromium");
        let mut chromedriver = {
            use std::os::unix::process::CommandExt;
            Chromedriver(
                Command::new(&chromedriver)
                    .arg(format!("--port={port}"))
                    .env("TMPDIR", tmp.path())
                    .stdout(output())
                    .stderr(output())
                    .process_group(0)
                    .spawn()
                    .unwrap_or_else(|err| panic!("start {}: {err}", chromedriver.display())),
            )
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(answer) = raw_http(port, "GET", "/status")
                && answer.contains("\"ready\":true")
            {
                break;
            }
            if let Ok(Some(status)) = chromedriver.0.try_wait() {
                panic!("chromedriver exited at start: {status} (CHROMEDRIVER_LOG=1 shows why)");
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on port {port} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"binary": chromium, "args": args}),
        );
        // A dialog left open fails the next command instead of being dismissed behind the
        // test's back: the console's confirmations are accepted explicitly.
        capabilities.insert("unhandledPromptBehavior".into(), "ignore".into());
        let connected = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        let client = connected.unwrap_or_else(|err| {
            panic!(
                "no WebDriver session with {} through chromedriver: {err}",
                chromium.display()
            )
        });
        let session = client.session_id().await.ok().flatten();
        Self {
            client,
            port,
            session,
            _chromedriver: chromedriver,
            _tmp: tmp,
        }
    }

    /// The WebDriver client, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Loads `url` (waits for the page's load event).
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|err| panic!("load {url}: {err}"));
    }

    pub async fn current_url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// Logs in at `base_url`'s console login form as `operator` with `token`. Returns once the
    /// form's answer has loaded (the overview, or the login page with its error).
    pub async fn login(&self, base_url: &str, operator: &str, token: &str) {
        self.goto(&format!("{base_url}/console/login")).await;
        let find = |css: &'static str| async move {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|err| panic!("the login page has no {css}: {err}"))
        };
        find("form#login").await;
        let name = find("input#operator").await;
        name.clear().await.unwrap();
        name.send_keys(operator).await.unwrap();
        let secret = find("input#token").await;
        secret.clear().await.unwrap();
        secret.send_keys(token).await.unwrap();
        let before = self.current_url().await;
        let button = find("button#login-submit").await;
        button.click().await.unwrap();
        // The POST answers with a redirect (success) or the form again with the error.
        super::poll(
            "the login's answer",
            PATIENCE,
            Duration::from_millis(50),
            || async {
                let now = self.current_url().await;
                let error = self.count("#login-error").await;
                let ready = self
                    .client
                    .execute("return document.readyState", vec![])
                    .await
                    .ok();
                let loaded = ready.as_ref().and_then(|v| v.as_str()) == Some("complete");
                if loaded && (now != before || error > 0 || self.count("#role").await > 0) {
                    Ok(())
                } else {
                    Err(format!("(still at {now})"))
                }
            },
        )
        .await;
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        let found = self
            .script(
                "return document.querySelectorAll(arguments[0]).length",
                vec![css.into()],
            )
            .await;
        found.as_u64().unwrap_or(0) as usize
    }

    /// The rendered text of the first element matching `css`; panics (naming the page) when
    /// there is none.
    pub async fn text_of(&self, css: &str) -> String {
        match self.texts(css).await.into_iter().next() {
            Some(text) => text,
            None => self.missing(css, "no match").await,
        }
    }

    /// Attribute `name` of the first element matching `css` (None when it has none); panics
    /// when no element matches.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        match self.attrs(css, name).await.into_iter().next() {
            Some(value) => value,
            None => self.missing(css, "no match").await,
        }
    }

    /// Attribute `name` of every element matching `css`, in document order. Read in one
    /// script, so a live region replaced meanwhile cannot leave a stale element half-read.
    pub async fn attrs(&self, css: &str, name: &str) -> Vec<Option<String>> {
        let values = self
            .script(
                "return Array.from(document.querySelectorAll(arguments[0]), \
                 (e) => e.getAttribute(arguments[1]))",
                vec![css.into(), name.into()],
            )
            .await;
        let values = values.as_array().cloned().unwrap_or_default();
        values
            .into_iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// The rendered text (`innerText`) of every element matching `css`, in document order,
    /// read in one script.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let values = self
            .script(
                "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.innerText)",
                vec![css.into()],
            )
            .await;
        let values = values.as_array().cloned().unwrap_or_default();
        values
            .into_iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Runs `script` with `args`; panics naming the page on a WebDriver error.
    async fn script(&self, script: &str, args: Vec<serde_json::Value>) -> serde_json::Value {
        match self.client.execute(script, args).await {
            Ok(value) => value,
            Err(err) => self.missing(script, &err.to_string()).await,
        }
    }

    /// Panics: `what` went wrong on the current page (its URL and the end of its source).
    async fn missing(&self, what: &str, err: &str) -> ! {
        let url = self.current_url().await;
        let source = self.source().await;
        let start = source.floor_char_boundary(source.len().saturating_sub(4000));
        panic!("{what} on {url}: {err}\n…{}", &source[start..])
    }

    /// The first element matching `css`; panics naming the page when there is none.
    pub async fn expect(&self, css: &str) -> fantoccini::elements::Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(err) => self.missing(css, &err.to_string()).await,
        }
    }

    /// Waits (a hang guard only) until `css` matches something: live regions refresh
    /// themselves every 2 s.
    pub async fn wait_for(&self, css: &str) {
        let what = format!("{css} on the page");
        super::poll(&what, PATIENCE, Duration::from_millis(100), || async {
            if self.count(css).await > 0 {
                Ok(())
            } else {
                Err(format!("(at {})", self.current_url().await))
            }
        })
        .await;
    }

    /// The page's current DOM, serialised.
    pub async fn source(&self) -> String {
        self.client.source().await.unwrap_or_default()
    }

    /// Runs `script` in the page (a function body: `return …`).
    pub async fn execute(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|err| panic!("script {script:?}: {err}"))
    }

    /// Presses the Tab key once, as a keyboard user would (WebDriver key actions).
    pub async fn press_tab(&self) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let tab = char::from(fantoccini::key::Key::Tab);
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab });
        self.client
            .perform_actions(keys)
            .await
            .unwrap_or_else(|err| panic!("pressing Tab: {err}"));
    }

    /// The value of cookie `name` as the browser holds it (HttpOnly ones included: WebDriver
    /// sees them).
    pub async fn cookie(&self, name: &str) -> Option<String> {
        let cookie = self.client.get_named_cookie(name).await.ok()?;
        Some(cookie.value().to_owned())
    }

    /// Forgets every cookie of the current page's site (a logged-out browser).
    pub async fn forget_cookies(&self) {
        self.client.delete_all_cookies().await.unwrap();
    }

    /// Clicks the first element matching `css`, accepts the confirmation dialog it opens
    /// (every console action asks first) and waits for the next page to load. Returns the
    /// dialog's question, None if there was none.
    pub async fn click_confirmed(&self, css: &str) -> Option<String> {
        let before = self.execute("return performance.timeOrigin").await;
        self.expect(css).await.click().await.unwrap();
        let question = std::cell::RefCell::new(None);
        super::poll(
            "the action's answer",
            PATIENCE,
            Duration::from_millis(50),
            || async {
                if question.borrow().is_none()
                    && let Ok(text) = self.client.get_alert_text().await
                    && self.client.accept_alert().await.is_ok()
                {
                    *question.borrow_mut() = Some(text);
                }
                let Ok(origin) = self
                    .client
                    .execute(
                        "return document.readyState === 'complete' ? performance.timeOrigin : null",
                        vec![],
                    )
                    .await
                else {
                    return Err("(a dialog is open)".to_owned());
                };
                if !origin.is_null() && origin != before {
                    Ok(())
                } else {
                    Err(format!("(still at {})", self.current_url().await))
                }
            },
        )
        .await;
        question.into_inner()
    }

    /// Clicks the first element matching `css` and declines the confirmation dialog it must
    /// open; returns the dialog's question. Nothing is sent: the page stays as it was.
    pub async fn click_declined(&self, css: &str) -> String {
        let before = self.execute("return performance.timeOrigin").await;
        self.expect(css).await.click().await.unwrap();
        let question = self
            .client
            .get_alert_text()
            .await
            .unwrap_or_else(|err| panic!("clicking {css} asked nothing: {err}"));
        self.client.dismiss_alert().await.unwrap();
        let after = self.execute("return performance.timeOrigin").await;
        assert_eq!(before, after, "a declined {css} still left the page");
        question
    }

    /// Resizes the window to `(width, height)`.
    pub async fn resize(&self, (width, height): (u32, u32)) {
        self.client.set_window_size(width, height).await.unwrap();
    }

    /// Resizes the window to a phone's (390 x 844).
    pub async fn phone(&self) {
        self.resize(PHONE).await;
    }

    /// A PNG of the viewport, written to `path`; returns its bytes.
    pub async fn screenshot(&self, path: &Path) -> Vec<u8> {
        let png = self.png().await;
        std::fs::write(path, &png).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        png
    }

    /// Makes the window tall enough to show the whole page (at most `max` px), keeping its
    /// width: a screenshot then holds the full page.
    pub async fn fit_height(&self, max: u32) {
        let sizes = self
            .execute(
                "return [window.outerWidth, window.outerHeight - window.innerHeight, \
                 document.documentElement.scrollHeight]",
            )
            .await;
        let [width, chrome, page] = [0, 1, 2].map(|i| sizes[i].as_u64().unwrap_or(0) as u32);
        self.resize((width, (page + chrome).min(max))).await;
    }

    /// A PNG of the viewport.
    pub async fn png(&self) -> Vec<u8> {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        png
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Close the session (Chromium quits); chromedriver's group is killed next.
        if let Some(session) = self.session.take() {
            let _ = raw_http(self.port, "DELETE", &format!("/session/{session}"));
        }
    }
}
