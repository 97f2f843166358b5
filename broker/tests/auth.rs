//! Token authentication: HMAC and public-key JWTs, key rotation, channel
//! grants, and the token's lifetime (expiry notice, refresh, expiry).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{RawConnection, SECRET, TestBroker, channel, eventually, within};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use volna_client::{Client, ClientError, ErrorCode, Position, TokenSource};
use volna_proto::{CloseCode, ErrorFrame, Frame, Subscribe, SubscriptionId};

fn now() -> u64 {
    common::now_secs()
}

fn token(secret: &str, claims: serde_json::Value) -> String {
    common::sign(secret, claims)
}

async fn jwt_broker() -> TestBroker {
    common::jwt_broker(|_| {}).await
}

async fn connect(broker: &TestBroker, token: &str) -> Result<Client, ClientError> {
    common::connect_as(broker, token).await
}

fn signed(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn test_key(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_of_every_family_verify_tokens_and_keys_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let retired_ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ed_pub = dir.path().join("ed.pub.pem");
    let ec_pub = dir.path().join("ec.pub.pem");
    std::fs::write(&ed_pub, ed.public_key_pem()).unwrap();
    std::fs::write(&ec_pub, ec.public_key_pem()).unwrap();
    let second_secret = dir.path().join("next.key");
    let next = "the-next-hs256-secret-after-rotation!!";
    std::fs::write(&second_secret, next).unwrap();
    let broker = common::jwt_broker(|c| {
        c.auth.public_key_files = vec![test_key("rsa-test-public.pem"), ec_pub, ed_pub];
        c.auth.hs256_secret_files.push(second_secret);
    })
    .await;

    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(test_key("rsa-test-private.pem")).unwrap())
        .unwrap();
    let ec_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let ed_key = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    let claims = |sub: &str| json!({"sub": sub, "exp": now() + 600});
    let accepted = [
        ("RS256", signed(Algorithm::RS256, &rsa, claims("rs"))),
        ("PS384", signed(Algorithm::PS384, &rsa, claims("ps"))),
        ("ES256", signed(Algorithm::ES256, &ec_key, claims("es"))),
        ("EdDSA", signed(Algorithm::EdDSA, &ed_key, claims("ed"))),
        ("HS256 old", token(SECRET, claims("hs-old"))),
        ("HS256 new", token(next, claims("hs-new"))),
    ];
    for (what, token) in accepted {
        let client = connect(&broker, &token)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let inbox = channel(&format!("user.{}.inbox", &claims_sub(&token)));
        client.publish(&inbox, what).await.unwrap();
    }

    let retired = EncodingKey::from_ec_pem(retired_ec.serialize_pem().as_bytes()).unwrap();
    let refused = [
        (
            "unknown ECDSA key",
            signed(Algorithm::ES256, &retired, claims("x")),
        ),
        (
            "RSA token claiming HS256 with the public key as secret",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims("x"),
                &EncodingKey::from_secret(&std::fs::read(test_key("rsa-test-public.pem")).unwrap()),
            )
            .unwrap(),
        ),
    ];
    for (what, token) in refused {
        let err = connect(&broker, &token).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{what}: {err}");
    }
}

/// The `sub` claim of a token (without verifying it).
fn claims_sub(token: &str) -> String {
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token).unwrap();
    claims.claims["sub"].as_str().unwrap().to_owned()
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
    // Less than the notice period is left: the notice comes at once.
    assert!(matches!(
        raw.next_frame().await,
        Some(Frame::TokenExpiring { expires_at }) if expires_at > now() - 5
    ));
    let closed = within("the expiry", async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw.close_code().await
    })
    .await;
    assert_eq!(closed, Some(CloseCode::UNAUTHORIZED.0.into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_source_keeps_the_session_alive_past_the_first_tokens_expiry() {
    let broker = common::jwt_broker(|c| c.auth.expiry_notice_secs = 2).await;
    let fetched = Arc::new(AtomicUsize::new(0));
    let mut config = broker.client_config();
    config.token = token(SECRET, json!({"sub": "9", "exp": now() + 3}));
    config.token_source = Some(TokenSource::new({
        let fetched = fetched.clone();
        move || {
            fetched.fetch_add(1, Ordering::SeqCst);
            async move { Ok(token(SECRET, json!({"sub": "9", "exp": now() + 3600}))) }
        }
    }));
    let client = Client::connect(config).await.unwrap();
    let inbox = channel("user.9.inbox");
    let mut sub = client.subscribe(&inbox, Position::Latest).await.unwrap();
    eventually("the token to be refreshed", || async {
        fetched.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Past the first token's expiry: the same session goes on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.publish(&inbox, "still here").await.unwrap();
    let got = within("the delivery", sub.next()).await.unwrap().unwrap();
    assert_eq!(got.payload, "still here");
    let metrics = common::metrics_text(&broker).await;
    assert!(
        metrics.contains("volna_connections_opened_total 1\n"),
        "the client never reconnected:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_the_user_and_replaces_the_rights() {
    let broker = jwt_broker().await;
    let first = token(
        SECRET,
        json!({"sub": "5", "exp": now() + 600, "subscribe": ["chat.a", "chat.b"]}),
    );
    let mut raw = RawConnection::connect(&broker).await;
    assert!(matches!(
        raw.send_hello(&first).await,
        Some(Frame::Welcome(_))
    ));
    for (request_id, name) in [(1, "chat.a"), (2, "chat.b")] {
        raw.send_frame(&Frame::Subscribe(Subscribe {
            request_id,
            channel: channel(name),
            position: volna_proto::Position::Latest,
        }))
        .await;
        assert!(matches!(
            raw.next_frame().await,
            Some(Frame::Subscribed { .. })
        ));
    }
    // Another user's token, a bad token: refused, the session goes on.
    let mallory = token(SECRET, json!({"sub": "6", "exp": now() + 600}));
    for (request_id, token) in [(3, mallory), (4, "garbage".to_owned())] {
        raw.send_frame(&Frame::Refresh { request_id, token }).await;
        assert!(matches!(
            raw.next_frame().await,
            Some(Frame::Error(ErrorFrame { request_id: id, code: ErrorCode::Unauthorized, .. })) if id == request_id
        ));
    }
    // A narrower token: the subscription it no longer grants ends.
    let narrower = token(
        SECRET,
        json!({"sub": "5", "exp": now() + 1200, "subscribe": ["chat.a"]}),
    );
    raw.send_frame(&Frame::Refresh {
        request_id: 5,
        token: narrower,
    })
    .await;
    assert!(matches!(
        raw.next_frame().await,
        Some(Frame::SubscriptionEnded { subscription: SubscriptionId(2), code: ErrorCode::Forbidden, ref message }) if message.contains("chat.b")
    ));
    assert!(matches!(
        raw.next_frame().await,
        Some(Frame::Refreshed { request_id: 5, expires_at }) if expires_at > now() + 600
    ));
    raw.send_frame(&Frame::Subscribe(Subscribe {
        request_id: 6,
        channel: channel("chat.b"),
        position: volna_proto::Position::Latest,
    }))
    .await;
    assert!(matches!(
        raw.next_frame().await,
        Some(Frame::Error(ErrorFrame {
            request_id: 6,
            code: ErrorCode::Forbidden,
            ..
        }))
    ));
    raw.send_frame(&Frame::Ping { request_id: 7 }).await;
    assert_eq!(raw.next_frame().await, Some(Frame::Pong { request_id: 7 }));
}
