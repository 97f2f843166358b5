//! What operators use: Prometheus metrics and the admin API.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TestBroker, channel, eventually, http};
use serde_json::{Value, json};
use volna_client::{Client, Position};

const TOKEN: &str = "operator-token-0123456789";

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_admin_api_show_and_steer_the_broker() {
    let broker = TestBroker::start_with(|c| {
        c.admin.token = Some(TOKEN.into());
        c.engine.retention_interval_ms = 20;
    })
    .await;
    let ch = channel("chat.ops");
    let mut config = broker.client_config();
    config.token = "alice".into();
    let alice = Client::connect(config).await.unwrap();
    let mut sub = alice.subscribe(&ch, Position::Latest).await.unwrap();
    for i in 0..3 {
        alice.publish(&ch, format!("m{i}")).await.unwrap();
    }

    let (status, metrics) = http(&broker, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    for line in [
        "volna_publishes_total 3",
        "volna_connections 1",
        "volna_subscriptions 1",
        "volna_resident_channels 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(
        metrics.contains("volna_storage{property=\"memtable_bytes\"}"),
        "{metrics}"
    );

    // The admin API needs the token.
    assert_eq!(
        http(&broker, "GET", "/admin/channels", None, None).await.0,
        401
    );
    assert_eq!(
        http(&broker, "GET", "/admin/channels", Some("wrong"), None)
            .await
            .0,
        401
    );
    let (status, body) = http(&broker, "GET", "/admin/channels", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    let channels = json_of(&body);
    assert_eq!(channels[0]["name"], "chat.ops");
    assert_eq!(channels[0]["next_offset"], 4);
    assert_eq!(channels[0]["messages"], 3);
    assert_eq!(channels[0]["subscribers"], 1);
    assert_eq!(
        http(
            &broker,
            "GET",
            "/admin/channels/chat.ops",
            Some(TOKEN),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        http(
            &broker,
            "GET",
            "/admin/channels/chat.none",
            Some(TOKEN),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        http(
            &broker,
            "GET",
            "/admin/channels/bad..name",
            Some(TOKEN),
            None
        )
        .await
        .0,
        400
    );

    let (_, body) = http(&broker, "GET", "/admin/sessions", Some(TOKEN), None).await;
    let sessions = json_of(&body);
    assert_eq!(sessions[0]["user"], "alice");
    assert_eq!(sessions[0]["subscriptions"], 1);

    // Server-side publish reaches subscribers like any other.
    let (status, body) = http(
        &broker,
        "POST",
        "/admin/publish",
        Some(TOKEN),
        Some(json!({"channel": "chat.ops", "payload": "from ops"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["offset"], 4);
    assert_eq!(
        common::next_texts(&mut sub, 4).await,
        ["m0", "m1", "m2", "from ops"]
    );

    // Retention changed at run time takes effect.
    let (status, _) = http(
        &broker,
        "PUT",
        "/admin/namespaces/chat/retention",
        Some(TOKEN),
        Some(json!({"max_messages": 1})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, body) = http(
        &broker,
        "GET",
        "/admin/namespaces/chat/retention",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(json_of(&body)["max_messages"], 1);
    let (status, _) = http(
        &broker,
        "PUT",
        "/admin/namespaces/chat/retention",
        Some(TOKEN),
        Some(json!({"max_messages": 0})),
    )
    .await;
    assert_eq!(status, 400);
    let log = broker.broker().log().unwrap().clone();
    eventually("retention to keep one message", || {
        let len = log.meta(&ch).map(|m| m.len());
        async move { len == Some(1) }
    })
    .await;

    // Kicking a user closes its sessions (its client then reconnects).
    let (status, body) = http(
        &broker,
        "POST",
        "/admin/kick",
        Some(TOKEN),
        Some(json!({"user": "alice"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["disconnected"], 1);
    let (status, _) = http(&broker, "POST", "/admin/kick", Some(TOKEN), Some(json!({}))).await;
    assert_eq!(status, 400);
    let mut kicked = false;
    for _ in 0..500 {
        let (_, metrics) = http(&broker, "GET", "/metrics", None, None).await;
        if metrics.contains("volna_connections_closed_total{reason=\"kicked\"} 1") {
            kicked = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(kicked, "the kick was not counted");
    let publish = alice.publish(&ch, "after the kick").await.unwrap();
    assert_eq!(publish.offset.get(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_off_without_a_token() {
    let broker = TestBroker::start().await;
    let (status, body) = http(&broker, "GET", "/admin/channels", Some("anything"), None).await;
    assert_eq!(status, 403);
    assert!(body.contains("admin API is disabled"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_broker_setting_is_one_readable_error() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_volna-broker"))
        .env("VOLNA_LIMITS__CONTROL_STALL_SECS", "0")
        .env("RUST_BACKTRACE", "1")
        .arg("--print-config")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::DEADLINE, out)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.starts_with("volna-broker: "), "{stderr}");
    assert!(stderr.contains("limits.control_stall_secs"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
