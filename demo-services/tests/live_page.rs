//! The gateway's live page in headless Chromium: it loads, a click submits a solution, and the
//! submission's progress arrives over the WebSocket as the events flow (several pushes, ending
//! with the result). Chromium is driven over the DevTools protocol. Needs Debian's `chromium`
//! (`scripts/install-chromium.sh`); `CHROMIUM` overrides the binary.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    /// The DevTools HTTP endpoint, e.g. `127.0.0.1:40123`.
    devtools: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return PathBuf::from(path);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "Chromium is not installed: run scripts/install-chromium.sh (Debian's `chromium`), or set CHROMIUM"
    );
}

async fn launch() -> Browser {
    let profile = tempfile::tempdir().expect("profile dir");
    let child = Command::new(chromium_binary())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium");
    // Chromium writes the port it chose into DevToolsActivePort.
    let port_file = profile.path().join("DevToolsActivePort");
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
            .filter(|p| !p.is_empty())
        {
            break port;
        }
        assert!(
            Instant::now() < deadline,
            "chromium did not open its DevTools port"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Browser {
        child,
        _profile: profile,
        devtools: format!("127.0.0.1:{port}"),
    }
}

/// A DevTools session with one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn open(browser: &Browser) -> Page {
        let client = support::client();
        let targets: Value = client
            .get(format!("http://{}/json/list", browser.devtools))
            .send()
            .await
            .expect("devtools /json/list")
            .json()
            .await
            .expect("json");
        let url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target: {targets}"))
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("devtools websocket");
        Page { ws, next_id: 1 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("devtools send");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("devtools answer in time")
                .expect("devtools open")
                .expect("devtools message");
            if let Message::Text(text) = msg {
                let v: Value = serde_json::from_str(&text).expect("devtools json");
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method} failed: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    /// Evaluates a JavaScript expression and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "`{expression}` threw: {r}"
        );
        r["result"]["value"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_a_submission_progress_as_it_happens() {
    let t = support::start("127.0.33").await;
    let client = support::client();
    let gateway = format!("http://{}", t.mesh.gateway());
    let lab = demo_services::demo::scenario::create_lab(&client, &t.mesh, &gateway)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", support::logs(t.dir.path())));

    let browser = launch().await;
    let mut page = Page::open(&browser).await;
    page.call("Page.enable", json!({})).await;
    page.call(
        "Page.navigate",
        json!({ "url": format!("{gateway}/?lab={}", lab.id) }),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while page
        .eval("document.readyState === 'complete' && !!document.getElementById('submit')")
        .await
        != json!(true)
    {
        assert!(Instant::now() < deadline, "the page did not load");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        page.eval("document.getElementById('status').textContent")
            .await,
        "idle"
    );

    page.eval("document.getElementById('submit').click(); true")
        .await;

    // Watch the page: every status it shows, until the WebSocket closes after the result.
    let mut statuses: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let last = loop {
        let state = page
            .eval(
                "JSON.stringify({ status: document.body.dataset.status || null, \
                 updates: Number(document.body.dataset.updates), \
                 closed: document.body.dataset.closed === 'true', \
                 submission: document.body.dataset.submission || null, \
                 text: document.getElementById('status').textContent, \
                 stages: [...document.querySelectorAll('#log li')].map(li => li.dataset.stage) })",
            )
            .await;
        let state: Value =
            serde_json::from_str(state.as_str().unwrap_or("{}")).expect("state json");
        if let Some(s) = state["status"].as_str()
            && statuses.last().map(String::as_str) != Some(s)
        {
            statuses.push(s.to_string());
        }
        if state["closed"] == true {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not finish: {state}, seen {statuses:?}\n{}",
            support::logs(t.dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    if let Ok(path) = std::env::var("LIVE_PAGE_SCREENSHOT") {
        // For a human look: LIVE_PAGE_SCREENSHOT=/tmp/page.png cargo test ... --test live_page
        use base64::Engine as _;
        let shot = page
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        if let Some(data) = shot["data"].as_str()
            && let Ok(png) = base64::engine::general_purpose::STANDARD.decode(data)
        {
            let _ = std::fs::write(path, png);
        }
    }
    assert_eq!(last["status"], "passed", "final page state: {last}");
    assert!(
        last["text"].as_str().is_some_and(|t| t == "passed"),
        "{last}"
    );
    let updates = last["updates"].as_u64().unwrap_or(0);
    assert!(
        updates >= 3,
        "the page should get several live updates, got {updates}: {last}"
    );
    assert!(
        statuses.len() >= 2 && statuses.last().map(String::as_str) == Some("passed"),
        "the page showed intermediate states before the result: {statuses:?}"
    );
    let stages: Vec<&str> = last["stages"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for stage in ["queued", "submitted", "running", "passed", "notified"] {
        assert!(stages.contains(&stage), "the log lacks {stage}: {stages:?}");
    }

    // What the page shows is what the services recorded.
    let id = last["submission"].as_str().expect("submission id");
    let sub: Value = client
        .get(format!("{gateway}/v1/submissions/{id}"))
        .send()
        .await
        .expect("submission")
        .json()
        .await
        .expect("json");
    assert_eq!(sub["status"], "passed");
    assert_eq!(sub["notified"], true);
}
