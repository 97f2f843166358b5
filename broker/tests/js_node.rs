//! volna.js under Node: each test starts a real broker (JWT auth, plain
//! `ws://` WebSocket) and runs one file of `clients/js/test/` against it
//! with Node's own test runner (`node --experimental-websocket --test`).
//!
//! The Node side gets the broker's addresses and JWT secret in environment
//! variables (see `clients/js/test/helpers.js`) and injects faults itself
//! (a WebSocket wrapper that holds, drops, rewrites or answers messages);
//! what needs the broker itself gone asks this side over a tiny HTTP
//! control endpoint (`POST /stop`, `POST /start`: the broker on the same
//! ports).
//!
//! Node is `node` on PATH (`VOLNA_NODE` names another); without it the
//! tests fail under `CI=true` (as scripts/test.sh runs) and otherwise say
//! SKIPPED and pass, like the browser tests without Chromium.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SECRET, TestBroker, jwt_broker};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use volna_broker::Config;

/// How long one Node test file may run.
const NODE_DEADLINE: Duration = Duration::from_secs(240);

/// The Node to run, or why there is none.
fn node() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VOLNA_NODE") {
        return Ok(path.into());
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let path = dir.join("node");
        if path.is_file() {
            return Ok(path);
        }
    }
    Err("no `node` on PATH (Node 20+ is needed; set VOLNA_NODE)".into())
}

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js")
}

/// A broker for the Node tests: JWT auth, plain `ws://`, fixed ports (so
/// that a restart keeps them).
async fn node_broker(tweak: impl FnOnce(&mut Config)) -> TestBroker {
    let mut broker = jwt_broker(|c| {
        c.websocket.plaintext = true;
        tweak(c);
    })
    .await;
    broker.config.http = broker.broker().http_addr();
    broker
}

/// Serves `POST /stop` and `POST /start` for `broker` until dropped.
async fn control(broker: Arc<Mutex<TestBroker>>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let broker = broker.clone();
            tokio::spawn(async move {
                let Some(request) = common::read_request_head(&mut socket).await else {
                    return;
                };
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let (status, body) = match path.as_str() {
                    "/stop" => {
                        broker.lock().await.stop().await;
                        ("200 OK", "stopped")
                    }
                    "/start" => {
                        let mut broker = broker.lock().await;
                        if broker.broker.is_none() {
                            broker.restart().await;
                        }
                        ("200 OK", "started")
                    }
                    _ => ("404 Not Found", "unknown"),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, task)
}

/// Runs `clients/js/test/{file}` against a broker set up by `tweak`;
/// fails the test with Node's report when a Node test fails.
async fn run(file: &str, tweak: impl FnOnce(&mut Config)) {
    let node = match node() {
        Ok(node) => node,
        Err(why) => {
            common::missing_dependency(&why);
            return;
        }
    };
    let broker = node_broker(tweak).await;
    let ws = format!("ws://{}/ws", broker.config.websocket.listen.unwrap());
    let http = broker.config.http.to_string();
    let broker = Arc::new(Mutex::new(broker));
    let (control_url, control_task) = control(broker.clone()).await;
    let path = js_dir().join("test").join(file);
    let mut command = Command::new(node);
    command
        .args([
            "--experimental-websocket",
            "--no-warnings",
            "--test",
            "--test-reporter=spec",
            "--test-concurrency=1",
            "--test-timeout=60000",
            "--test-force-exit",
        ])
        .arg(&path)
        .env("VOLNA_WS_URL", &ws)
        .env("VOLNA_HTTP", &http)
        .env("VOLNA_SECRET", SECRET)
        .env("VOLNA_CONTROL", &control_url)
        .current_dir(js_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || {
        let child = command.spawn().expect("node starts");
        let id = child.id();
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(output) => return output.expect("node output"),
                Err(_) if started.elapsed() > NODE_DEADLINE => {
                    // Only the process this test started, by its id.
                    let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
                    panic!("node --test {} ran over {NODE_DEADLINE:?}", path.display());
                }
                Err(_) => {}
            }
        }
    })
    .await
    .unwrap();
    control_task.abort();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "node --test {file} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    broker.lock().await.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_subscribe() {
    run("subscribe.test.js", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_unsubscribe() {
    run("unsubscribe.test.js", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_publish() {
    run("publish.test.js", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_producer() {
    run("producer.test.js", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_lifecycle() {
    run("lifecycle.test.js", |c| {
        c.limits.max_connections_per_user = 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_restart() {
    run("restart.test.js", |_| {}).await;
}
