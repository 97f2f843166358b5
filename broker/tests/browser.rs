//! A real browser: headless Chromium, driven over the DevTools protocol
//! (chromiumoxide), loads `volna.js` from the broker, subscribes over
//! WebSocket and must see every message in order, across a broker restart;
//! and the web console shows the broker's live connection count (a
//! screenshot is saved for a person to look at).
//!
//! Pages are loaded from the broker's HTTP listener, the console's origin,
//! which the WebSocket upgrade allows by default (`websocket.
//! allowed_origins`); a page of another origin is refused 403.
//!
//! Chromium is the Debian package `chromium` (scripts/test.sh installs
//! it); `VOLNA_CHROMIUM` names another executable. Each test starts its
//! own browser and ends it. Without Chromium a test fails under `CI=true`
//! (as scripts/test.sh runs) and otherwise says SKIPPED and passes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use common::{TestBroker, channel, eventually, next_texts};
use futures_util::StreamExt;
use volna_client::Position;

const ADMIN_TOKEN: &str = "browser-test-admin-token-0123456789";

/// The Chromium to drive, or why there is none.
fn chromium() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VOLNA_CHROMIUM") {
        return Ok(path.into());
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    Err("no Chromium on PATH (install the Debian package `chromium`, as scripts/test.sh does, or set VOLNA_CHROMIUM)".into())
}

/// A headless browser this test started, and the task driving its
/// DevTools connection.
struct Chromium {
    browser: Browser,
    driver: tokio::task::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    async fn launch(executable: PathBuf) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let config = BrowserConfig::builder()
            .chrome_executable(executable)
            .user_data_dir(profile.path())
            .new_headless_mode()
            // The test runs as root in a container: Chromium's sandbox
            // needs user namespaces it does not get there.
            .no_sandbox()
            // The broker's self-signed development certificate.
            .arg("--ignore-certificate-errors")
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .window_size(1280, 1000)
            .build()
            .unwrap();
        let (browser, mut handler) = Browser::launch(config).await.expect("chromium starts");
        let driver = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Self {
            browser,
            driver,
            _profile: profile,
        }
    }

    async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
        self.driver.abort();
    }
}

/// A browser with a page open on the broker's HTTP origin (where
/// `volna.js` is imported from), or `None` after saying why there is no
/// browser to drive.
async fn page_on(broker: &TestBroker, path: &str) -> Option<(Chromium, Page)> {
    let http = broker.broker().http_addr();
    page_at(&format!("http://{http}{path}")).await
}

/// A browser with a page open at `url`, or `None` after saying why there
/// is no browser to drive.
async fn page_at(url: &str) -> Option<(Chromium, Page)> {
    let executable = match chromium() {
        Ok(path) => path,
        Err(why) => {
            common::missing_dependency(&why);
            return None;
        }
    };
    let chromium = Chromium::launch(executable).await;
    let page = chromium.browser.new_page(url).await.unwrap();
    Some((chromium, page))
}

async fn eval<T: serde::de::DeserializeOwned>(page: &Page, js: &str) -> T {
    page.evaluate(js)
        .await
        .unwrap_or_else(|e| panic!("{js}: {e}"))
        .into_value()
        .unwrap_or_else(|e| panic!("{js}: {e}"))
}

/// The text of the element with `id`.
async fn text(page: &Page, id: &str) -> String {
    eval(
        page,
        &format!(r#"document.getElementById("{id}").textContent"#),
    )
    .await
}

/// What the page received so far: (offset, text).
async fn received(page: &Page) -> Vec<(u64, String)> {
    eval(page, "window.received").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_receives_every_message_in_order_across_a_broker_restart() {
    let mut broker = TestBroker::start().await;
    // The page is served by the HTTP listener, its origin the console's:
    // the restarted broker keeps that address, as a real one does, so the
    // page reconnects from the broker's own origin.
    broker.config.http = broker.broker().http_addr();
    let ch = channel("chat.browser");
    let Some((chromium, page)) = page_on(&broker, "/client/endpoints").await else {
        return;
    };
    let ready: bool = eval(
        &page,
        &format!(
            r#"(async () => {{
                window.received = []; window.events = [];
                const {{ connect }} = await import("/client/volna.js");
                const client = await connect("{url}", {{ token: "test", backoff: {{ initialMs: 50, maxMs: 500 }} }});
                client.addEventListener("disconnected", () => window.events.push("disconnected"));
                client.addEventListener("connected", () => window.events.push("connected"));
                const sub = await client.subscribe("{ch}", {{}});
                sub.addEventListener("message", (e) => window.received.push([e.data.offset, e.data.text()]));
                sub.addEventListener("ended", (e) => window.events.push("ended " + e.detail));
                window.client = client;
                return true;
            }})()"#,
            url = broker.websocket_url(),
        ),
    )
    .await;
    assert!(ready);

    let publisher = broker.client().await;
    for i in 1..=200 {
        publisher.publish(&ch, format!("m{i}")).await.unwrap();
    }
    eventually("the page to receive 200", || {
        let page = page.clone();
        async move { received(&page).await.len() >= 200 }
    })
    .await;

    broker.restart().await;
    // The same Rust publisher waits for its reconnect; the page resumes
    // from its next offset on its own.
    for i in 201..=400 {
        publisher.publish(&ch, format!("m{i}")).await.unwrap();
    }
    eventually("the page to receive 400", || {
        let page = page.clone();
        async move { received(&page).await.len() >= 400 }
    })
    .await;
    let got = received(&page).await;
    let want: Vec<(u64, String)> = (1..=400).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want, "every message once, in order");
    let events: Vec<String> = eval(&page, "window.events").await;
    assert!(
        events.iter().any(|e| e == "disconnected"),
        "the page saw the restart: {events:?}"
    );
    assert!(!events.iter().any(|e| e.starts_with("ended")), "{events:?}");

    // The page publishes too; a Rust subscriber gets it.
    let mut sub = publisher.subscribe(&ch, Position::Latest).await.unwrap();
    let offset: u64 = eval(
        &page,
        &format!(r#"window.client.publish("{ch}", "from the page").then((p) => p.offset)"#),
    )
    .await;
    assert_eq!(offset, 401);
    assert_eq!(next_texts(&mut sub, 1).await, vec!["from the page"]);
    chromium.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_live_connection_count() {
    let broker = TestBroker::start_with(|c| c.admin.token = Some(ADMIN_TOKEN.into())).await;
    let ch = channel("chat.console");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(broker.client().await);
    }
    let _sub = clients[0].subscribe(&ch, Position::Latest).await.unwrap();
    for i in 1..=5 {
        clients[1]
            .publish(&ch, format!("console {i}"))
            .await
            .unwrap();
    }
    let Some((chromium, page)) = page_on(&broker, "/console").await else {
        return;
    };
    let _: bool = eval(
        &page,
        &format!(
            r#"(() => {{
                document.getElementById("admin-token").value = "{ADMIN_TOKEN}";
                document.getElementById("save-token").click();
                document.getElementById("browse-channel").value = "{ch}";
                document.getElementById("browse").click();
                return true;
            }})()"#
        ),
    )
    .await;
    let shows = |id: &'static str, want: &'static str| {
        let page = page.clone();
        async move { text(&page, id).await.contains(want) }
    };
    eventually("the console to show 3 connections", || {
        shows("m-connections", "3")
    })
    .await;
    eventually("the console to list the sessions", || {
        shows("sessions", "volna-client")
    })
    .await;
    eventually("the channel browser to show the last message", || {
        shows("browser", "console 5")
    })
    .await;
    // One more connection shows up live.
    clients.push(broker.client().await);
    eventually("the console to show 4 connections", || {
        shows("m-connections", "4")
    })
    .await;
    assert!(text(&page, "status").await.starts_with("connected"));

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser/console.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let png = page
        .screenshot(ScreenshotParams::builder().full_page(true).build())
        .await
        .unwrap();
    assert!(
        png.len() > 10_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
    std::fs::write(&shot, png).unwrap();
    eprintln!("console screenshot: {}", shot.display());
    chromium.close().await;
}

/// Waits until the page's counted subscription took `count` messages;
/// checks each came once, in order, and that the client dropped none as
/// already seen (its `duplicate` events: nothing resumed, so the broker
/// must have sent each once); returns how long they took (ms).
async fn counted(page: &Page, count: usize) -> f64 {
    eventually("the page to take every message", || {
        let page = page.clone();
        async move { eval::<usize>(&page, "window.taken").await >= count }
    })
    .await;
    let (taken, in_order, millis, duplicates): (usize, bool, f64, usize) = eval(
        page,
        "[window.taken, window.inOrder, window.last - window.first, window.duplicates]",
    )
    .await;
    assert_eq!(taken, count, "each message once");
    assert_eq!(duplicates, 0, "deliveries dropped as already seen");
    assert!(in_order, "in offset order");
    millis
}

/// A burst into one page: every message arrives, in order. Prints how many
/// messages per second the page took (`VOLNA_BROWSER_MESSAGES`, default
/// 20,000; BENCHMARKS.md has the figure for 200,000) — a figure, not an
/// assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_takes_a_burst_whole_and_in_order() {
    let count: usize = std::env::var("VOLNA_BROWSER_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let broker = TestBroker::start().await;
    let ch = channel("chat.burst");
    let Some((chromium, page)) = page_on(&broker, "/client/endpoints").await else {
        return;
    };
    let _: bool = eval(
        &page,
        &format!(
            r#"(async () => {{
                // Counts one subscription's messages and when they came.
                window.counting = (sub) => {{
                    window.taken = 0; window.inOrder = true; window.first = null; window.last = null;
                    window.duplicates = 0;
                    sub.addEventListener("duplicate", (e) => {{ window.duplicates += e.detail.count; }});
                    sub.addEventListener("message", (e) => {{
                        window.taken += 1;
                        if (e.data.offset !== window.taken) window.inOrder = false;
                        const now = performance.now();
                        window.first ??= now;
                        window.last = now;
                    }});
                }};
                const {{ connect }} = await import("/client/volna.js");
                const client = await connect("{url}", {{ token: "test" }});
                window.counting(await client.subscribe("{ch}", {{}}));
                return true;
            }})()"#,
            url = broker.websocket_url(),
        ),
    )
    .await;
    let publisher = broker.client().await;
    let payload = vec![b'x'; 100];
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    for _ in 0..count {
        inflight.push(publisher.publish(&ch, payload.clone()));
        if inflight.len() >= 256
            && let Some(published) = inflight.next().await
        {
            published.unwrap();
        }
    }
    while let Some(published) = inflight.next().await {
        published.unwrap();
    }
    let millis = counted(&page, count).await;
    eprintln!(
        "browser, live: {count} messages of 100 B in {millis:.0} ms = {:.0} msg/s into one page (the publisher's pace)",
        count as f64 / (millis / 1000.0).max(1e-3)
    );
    // The same messages again from the log, as fast as the page takes
    // them: a device catching up (a second connection: one subscription
    // per channel each).
    let _: bool = eval(
        &page,
        &format!(
            r#"(async () => {{
                const {{ connect }} = await import("/client/volna.js");
                const device = await connect("{url}", {{ token: "test" }});
                window.counting(await device.subscribe("{ch}", {{ from: 1 }}));
                return true;
            }})()"#,
            url = broker.websocket_url(),
        ),
    )
    .await;
    let millis = counted(&page, count).await;
    eprintln!(
        "browser, catch-up: {count} messages of 100 B in {millis:.0} ms = {:.0} msg/s into one page",
        count as f64 / (millis / 1000.0).max(1e-3)
    );
    chromium.close().await;
}

/// `Truncated` and `EpochChanged` reach the page as events, and delivery
/// goes on from where they say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_is_told_of_truncation_and_of_a_reset_log() {
    let broker = TestBroker::start_with(|c| {
        c.engine.retention_interval_ms = 20;
        c.namespaces.insert(
            "chat".into(),
            volna_broker::config::NamespaceConfig {
                retention: volna_broker::config::Retention {
                    max_messages: Some(100),
                    ..volna_broker::config::Retention::default()
                },
                ..volna_broker::config::NamespaceConfig::default()
            },
        );
    })
    .await;
    let retained = channel("chat.retained");
    let reset = channel("news.reset");
    let publisher = broker.client().await;
    for i in 1..=150 {
        publisher.publish(&retained, format!("r{i}")).await.unwrap();
    }
    let epoch = publisher.publish(&reset, "one").await.unwrap().epoch;
    let log = broker.broker().log().unwrap().clone();
    eventually("retention to cut the log", || {
        let first = log.meta(&retained).map(|m| m.first_offset.get());
        async move { first == Some(51) }
    })
    .await;
    let Some((chromium, page)) = page_on(&broker, "/client/endpoints").await else {
        return;
    };
    let stale = epoch.0 ^ 1;
    let _: bool = eval(
        &page,
        &format!(
            r#"(async () => {{
                window.events = []; window.received = [];
                const {{ connect }} = await import("/client/volna.js");
                const client = await connect("{url}", {{ token: "test" }});
                const a = await client.subscribe("{retained}", {{ from: 1 }});
                a.addEventListener("truncated", (e) => window.events.push(["truncated", e.detail.requested, e.detail.firstAvailable]));
                a.addEventListener("message", (e) => window.received.push(e.data.offset));
                const b = await client.subscribe("{reset}", {{ from: 5, epoch: {stale}n }});
                b.addEventListener("epochchanged", (e) => window.events.push(["epochchanged", e.detail.start]));
                b.addEventListener("message", (e) => window.events.push(["message", e.data.offset, e.data.text()]));
                return true;
            }})()"#,
            url = broker.websocket_url(),
        ),
    )
    .await;
    eventually("the page to receive what is retained", || {
        let page = page.clone();
        async move { eval::<Vec<u64>>(&page, "window.received").await.len() >= 100 }
    })
    .await;
    let received: Vec<u64> = eval(&page, "window.received").await;
    assert_eq!(received, (51..=150).collect::<Vec<_>>());
    eventually("the reset to be told", || {
        let page = page.clone();
        async move {
            eval::<Vec<serde_json::Value>>(&page, "window.events")
                .await
                .len()
                >= 3
        }
    })
    .await;
    let events: Vec<serde_json::Value> = eval(&page, "window.events").await;
    assert!(
        events.contains(&serde_json::json!(["truncated", 1, 51])),
        "{events:?}"
    );
    let reset_events: Vec<&serde_json::Value> =
        events.iter().filter(|e| e[0] != "truncated").collect();
    assert_eq!(
        reset_events,
        vec![
            &serde_json::json!(["epochchanged", 1]),
            &serde_json::json!(["message", 1, "one"])
        ]
    );
    chromium.close().await;
}

/// The page's `window.events` so far.
async fn page_events(page: &Page) -> Vec<String> {
    eval(page, "window.events").await
}

/// Waits until the page's `window.events` holds `want`.
async fn page_event(page: &Page, want: &str) {
    eventually(&format!("the page to see {want:?}"), || {
        let page = page.clone();
        let want = want.to_owned();
        async move { page_events(&page).await.contains(&want) }
    })
    .await;
}

/// A metric of the broker (a gauge or counter without labels).
async fn metric(broker: &TestBroker, name: &str) -> f64 {
    common::metrics_text(broker)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A subscribe made while the broker is down waits (it does not claim a
/// start it has not got), is retried on the broker's return and resolves;
/// the page's state events tell each step; a subscription it already had
/// resumes without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_subscribe_made_while_the_broker_is_down_is_retried_across_its_restart() {
    let mut broker = TestBroker::start().await;
    // The page's origin stays the console's across the restart (see the
    // test above).
    broker.config.http = broker.broker().http_addr();
    let ch = channel("chat.restart");
    let later = channel("chat.later");
    let url = broker.websocket_url();
    let Some((chromium, page)) = page_on(&broker, "/client/endpoints").await else {
        return;
    };
    let _: bool = eval(
        &page,
        &format!(
            r#"(async () => {{
                window.events = []; window.received = []; window.later = [];
                const {{ VolnaClient }} = await import("/client/volna.js");
                const client = new VolnaClient("{url}", {{ token: "test", backoff: {{ initialMs: 50, maxMs: 300 }}, requestTimeoutMs: 60000 }});
                for (const s of ["connecting", "connected", "disconnected", "closed"]) {{
                    client.addEventListener(s, (e) => window.events.push(s + (s === "closed" ? " " + e.detail.code : "")));
                }}
                const sub = await client.subscribe("{ch}", {{ from: 1 }});
                sub.addEventListener("message", (e) => window.received.push([e.data.offset, e.data.text()]));
                window.client = client;
                return true;
            }})()"#
        ),
    )
    .await;
    let publisher = broker.client().await;
    publisher.publish(&ch, "before").await.unwrap();
    eventually("the page to receive the first", || {
        let page = page.clone();
        async move { received(&page).await.len() == 1 }
    })
    .await;

    broker.stop().await;
    page_event(&page, "disconnected").await;
    let _: bool = eval(
        &page,
        &format!(
            r#"(() => {{
                window.laterResolved = false;
                window.client.subscribe("{later}", {{}}).then((sub) => {{
                    window.laterResolved = true;
                    sub.addEventListener("message", (e) => window.later.push([e.data.offset, e.data.text()]));
                }}, (e) => window.events.push("subscribe failed " + e.message));
                return true;
            }})()"#
        ),
    )
    .await;
    // It keeps trying while the broker is away, and does not resolve.
    eventually("a few attempts", || {
        let page = page.clone();
        async move {
            page_events(&page)
                .await
                .iter()
                .filter(|e| *e == "connecting")
                .count()
                >= 3
        }
    })
    .await;
    assert!(!eval::<bool>(&page, "window.laterResolved").await);
    assert_eq!(
        eval::<String>(&page, "window.client.state").await,
        "connecting"
    );

    broker.restart().await;
    eventually("the subscribe to resolve", || {
        let page = page.clone();
        async move { eval::<bool>(&page, "window.laterResolved").await }
    })
    .await;
    publisher.publish(&ch, "after").await.unwrap();
    publisher.publish(&later, "later").await.unwrap();
    eventually("the page to receive both", || {
        let page = page.clone();
        async move {
            received(&page).await.len() == 2
                && eval::<Vec<(u64, String)>>(&page, "window.later")
                    .await
                    .len()
                    == 1
        }
    })
    .await;
    assert_eq!(
        received(&page).await,
        vec![(1, "before".to_owned()), (2, "after".to_owned())]
    );
    assert_eq!(
        eval::<Vec<(u64, String)>>(&page, "window.later").await,
        vec![(1, "later".to_owned())]
    );
    let _: bool = eval(&page, "(() => { window.client.close(); return true; })()").await;
    let events = page_events(&page).await;
    assert_eq!(events.first().map(String::as_str), Some("connecting"));
    assert_eq!(events.get(1).map(String::as_str), Some("connected"));
    assert_eq!(events.last().map(String::as_str), Some("closed 0"));
    let after_down = &events[events.iter().position(|e| e == "disconnected").unwrap()..];
    assert!(
        after_down.iter().any(|e| e == "connected"),
        "connected again: {events:?}"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("subscribe failed")),
        "{events:?}"
    );
    chromium.close().await;
}

/// `close()` while the connection is being opened (the socket is up, the
/// token on its way) leaves no connection at the broker and no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_closing_its_client_while_connecting_leaves_no_connection() {
    let broker = TestBroker::start().await;
    let url = broker.websocket_url();
    let Some((chromium, page)) = page_on(&broker, "/client/endpoints").await else {
        return;
    };
    let _: bool = eval(
        &page,
        &format!(
            r#"(async () => {{
                window.events = [];
                const {{ VolnaClient }} = await import("/client/volna.js");
                let asked;
                const tokenAsked = new Promise((r) => {{ asked = r; }});
                const client = new VolnaClient("{url}", {{
                    backoff: {{ initialMs: 20, maxMs: 50 }},
                    tokenProvider: () => new Promise((resolve) => {{ window.giveToken = resolve; asked(); }}),
                }});
                for (const s of ["connecting", "connected", "disconnected", "closed"]) {{
                    client.addEventListener(s, () => window.events.push(s));
                }}
                window.client = client;
                await tokenAsked;
                client.close();
                window.giveToken("test");
                return true;
            }})()"#
        ),
    )
    .await;
    eventually("no WebSocket connection at the broker", || async {
        metric(&broker, "volna_websocket_connections").await == 0.0
    })
    .await;
    assert_eq!(metric(&broker, "volna_connections_opened_total").await, 0.0);
    assert_eq!(metric(&broker, "volna_connections").await, 0.0);
    // The page was given its token after close(): still no session, and
    // no new attempt (a second one would be at the broker within the 50 ms
    // backoff; the publish below is answered after it would have come).
    let publisher = broker.client().await;
    publisher
        .publish(&channel("chat.marker"), "m")
        .await
        .unwrap();
    assert_eq!(metric(&broker, "volna_connections_opened_total").await, 1.0);
    assert_eq!(page_events(&page).await, vec!["connecting", "closed"]);
    assert_eq!(eval::<String>(&page, "window.client.state").await, "closed");
    assert_eq!(metric(&broker, "volna_websocket_connections").await, 0.0);
    chromium.close().await;
}

/// A connect the broker refuses for good (a token it does not accept)
/// closes the client with the code: a pending publish fails with the
/// refusal, not a timeout; a pending subscribe too; no reconnect loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_refused_for_good_ends_its_client_with_the_code() {
    let broker = common::jwt_broker(|_| {}).await;
    let url = broker.websocket_url();
    let Some((chromium, page)) = page_on(&broker, "/client/endpoints").await else {
        return;
    };
    let outcome: serde_json::Value = eval(
        &page,
        &format!(
            r#"(async () => {{
                const {{ VolnaClient, ErrorCode }} = await import("/client/volna.js");
                const client = new VolnaClient("{url}", {{ token: "not-a-jwt", backoff: {{ initialMs: 20, maxMs: 50 }} }});
                let connecting = 0;
                client.addEventListener("connecting", () => connecting++);
                const closed = new Promise((r) => client.addEventListener("closed", (e) => r(e.detail)));
                const publish = client.publish("chat.refused", "never").then(() => "stored", (e) => e.code);
                const subscribe = client.subscribe("chat.refused", {{}}).then(() => "subscribed", (e) => e.code);
                const detail = await closed;
                return {{
                    code: detail.code, unauthorized: ErrorCode.Unauthorized,
                    publish: await publish, subscribe: await subscribe,
                    state: client.state, connecting,
                }};
            }})()"#
        ),
    )
    .await;
    assert_eq!(
        outcome,
        serde_json::json!({
            "code": 3, "unauthorized": 3, "publish": 3, "subscribe": 3,
            "state": "closed", "connecting": 1,
        })
    );
    eventually("no connection left", || async {
        metric(&broker, "volna_websocket_connections").await == 0.0
    })
    .await;
    chromium.close().await;
}

/// Serves one small HTML page at every path, as another web site would,
/// until the task is aborted.
async fn another_site() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if common::read_request_head(&mut socket).await.is_none() {
                    return;
                }
                let body = "<!doctype html><title>another site</title><p>elsewhere";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

/// Whether a WebSocket to `url` opened from the page (`"open"`) or failed
/// (`"error"`: a browser is not told the HTTP status of a refused upgrade).
async fn websocket_from(page: &Page, url: &str) -> String {
    eval(
        page,
        &format!(
            r#"new Promise((resolve) => {{
                const ws = new WebSocket("{url}", ["volna.1"]);
                ws.onopen = () => {{ ws.close(); resolve("open"); }};
                ws.onerror = () => resolve("error");
            }})"#
        ),
    )
    .await
}

/// A page of another site cannot open a WebSocket to the broker from the
/// visitor's browser (Chromium's own Origin header, refused 403 and
/// counted); the console's origin, by either name of the loopback
/// listener, can; and a site the operator lists can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pages_of_allowed_origins_open_a_websocket() {
    let (site, site_task) = another_site().await;
    let broker = TestBroker::start().await;
    let url = broker.websocket_url();
    let Some((chromium, elsewhere)) = page_at(&format!("http://{site}/")).await else {
        site_task.abort();
        return;
    };
    assert_eq!(websocket_from(&elsewhere, &url).await, "error");
    let refused = "volna_websocket_upgrades_refused_total{reason=\"origin\"}";
    assert_eq!(metric(&broker, refused).await, 1.0);
    assert_eq!(
        metric(&broker, "volna_websocket_handshakes_total").await,
        0.0
    );

    let http = broker.broker().http_addr();
    for console in [
        format!("http://{http}/console"),
        format!("http://localhost:{}/console", http.port()),
    ] {
        let page = chromium.browser.new_page(console.as_str()).await.unwrap();
        assert_eq!(websocket_from(&page, &url).await, "open", "{console}");
    }
    assert_eq!(metric(&broker, refused).await, 1.0);

    // The operator lists the site: its pages are let in.
    let listed = TestBroker::start_with(|c| {
        c.websocket.allowed_origins = vec![format!("http://{site}")];
    })
    .await;
    assert_eq!(
        websocket_from(&elsewhere, &listed.websocket_url()).await,
        "open"
    );
    assert_eq!(metric(&listed, refused).await, 0.0);
    chromium.close().await;
    site_task.abort();
}
