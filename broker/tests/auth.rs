//! Token authentication and channel grants (HS256 JWTs).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{RawConnection, TestBroker, channel, within};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use volna_client::{Client, ClientError, ErrorCode, Position};
use volna_proto::CloseCode;

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn jwt_broker() -> TestBroker {
    let key_dir = tempfile::tempdir().unwrap();
    let key = key_dir.path().join("hs256.key");
    std::fs::write(&key, SECRET).unwrap();
    let broker = TestBroker::start_with(|c| {
        c.auth.mode = volna_broker::auth::AuthMode::Jwt;
        c.auth.hs256_secret_files = vec![key.clone()];
        c.auth.leeway_secs = 0;
    })
    .await;
    drop(key_dir); // the key was read at start
    broker
}

async fn connect(broker: &TestBroker, token: &str) -> Result<Client, ClientError> {
    let mut config = broker.client_config();
    config.token = token.to_owned();
    Client::connect(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_decide_what_a_token_may_publish_and_subscribe() {
    let broker = jwt_broker().await;
    let alice = token(
        SECRET,
        json!({
            "sub": "42", "exp": now() + 3600,
            "subscribe": ["chat.123", "news.>"], "publish": ["chat.123"],
        }),
    );
    let client = connect(&broker, &alice).await.unwrap();
    assert_eq!(
        client
            .publish(&channel("chat.123"), "hi")
            .await
            .unwrap()
            .offset
            .get(),
        1
    );
    let err = client
        .publish(&channel("chat.999"), "no")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let err = client
        .publish(&channel("news.sport"), "no")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    assert!(
        client
            .subscribe(&channel("news.sport.football"), Position::Latest)
            .await
            .is_ok()
    );
    let err = client
        .subscribe(&channel("chat.999"), Position::Latest)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    // The personal namespace is always the user's own.
    client
        .publish(&channel("user.42.inbox"), "mine")
        .await
        .unwrap();
    assert!(
        client
            .subscribe(&channel("user.42.inbox"), Position::Latest)
            .await
            .is_ok()
    );
    let err = client
        .publish(&channel("user.43.inbox"), "theirs")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    // A refused request left the session usable.
    client
        .publish(&channel("chat.123"), "still here")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_typed_error() {
    let broker = jwt_broker().await;
    let cases = [
        (
            "expired",
            token(SECRET, json!({"sub": "1", "exp": now() - 60})),
        ),
        (
            "wrong key",
            token(
                "another-secret-that-is-32-bytes-long!!",
                json!({"sub": "1", "exp": now() + 60}),
            ),
        ),
        ("no exp", token(SECRET, json!({"sub": "1"}))),
        ("garbage", "not.a.jwt".to_owned()),
        ("empty", String::new()),
    ];
    for (what, token) in cases {
        match connect(&broker, &token).await {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::Unauthorized, "{what}");
                assert!(
                    !message.contains(SECRET),
                    "{what}: the message leaks the key"
                );
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
    // The raw connection sees the close code too.
    let mut raw = RawConnection::connect(&broker).await;
    assert!(
        matches!(raw.send_hello("nope").await, Some(volna_proto::Frame::Error(e)) if e.code == ErrorCode::Unauthorized)
    );
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::UNAUTHORIZED.0.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let broker = jwt_broker().await;
    let short = token(
        SECRET,
        json!({"sub": "7", "exp": now() + 2, "publish": ["chat.7"]}),
    );
    let mut raw = RawConnection::connect(&broker).await;
    assert!(matches!(
        raw.send_hello(&short).await,
        Some(volna_proto::Frame::Welcome(_))
    ));
    let closed = within("the expiry", async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw.close_code().await
    })
    .await;
    assert_eq!(closed, Some(CloseCode::UNAUTHORIZED.0.into()));
}
