//! `volna pub` / `volna sub` as a person or a script uses them, against a
//! real broker: two processes pass messages through it.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use volna_broker::{Broker, Config};

const DEADLINE: Duration = Duration::from_secs(60);

/// The command succeeded and printed exactly `expected`.
fn assert_printed(out: &std::process::Output, expected: &str) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

/// A broker on loopback ports over `dir`, its admin API open to `token`.
async fn broker_with_admin(dir: &std::path::Path, token: &str) -> Broker {
    let mut config = Config {
        data_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.admin.token = Some(token.into());
    Broker::start(config).await.unwrap()
}

fn volna(broker: &Broker, cert: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_volna"));
    cmd.arg("--server")
        .arg(broker.quic_addr().to_string())
        .arg("--ca")
        .arg(cert)
        .kill_on_drop(true);
    cmd
}

/// 200 runs of `volna pub` in a row as one user (a JWT for `alice`), under
/// the default limits (32 connections and 64 producer windows per user):
/// each exiting run tells the broker, and the user's producers beyond the
/// limit make room, so every one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_runs_of_one_user_all_publish() {
    const SECRET: &str = "cli-runs-hs256-secret-of-32-bytes-at-least";
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hs256.key");
    std::fs::write(&key, SECRET).unwrap();
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.auth.mode = volna_broker::auth::AuthMode::Jwt;
    config.auth.hs256_secret_files = vec![key];
    let broker = Broker::start(config).await.unwrap();
    let cert = broker.dev_cert().unwrap().clone();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "alice", "publish": ["chat.>"], "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for run in 1..=200 {
        let out = tokio::time::timeout(
            DEADLINE,
            volna(&broker, &cert)
                .args(["--token", &token, "pub", "chat.runs", &format!("run {run}")])
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{run}\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_pass_messages_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    })
    .await
    .unwrap();
    let cert = broker.dev_cert().unwrap().clone();

    // History first, so `sub --from 1` replays it and then goes live.
    let out = volna(&broker, &cert)
        .args(["pub", "chat.cli", "hello"])
        .output()
        .await
        .unwrap();
    assert_printed(&out, "1\n");

    // Several --server: the first that answers is used.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_volna"))
        .args(["--server", &nobody.to_string(), "--connect-timeout", "1"])
        .args(["--server", &broker.quic_addr().to_string()])
        .arg("--ca")
        .arg(&cert)
        .args(["pub", "chat.cli.seeds", "x"])
        .output()
        .await
        .unwrap();
    assert_printed(&out, "1\n");

    let mut sub = volna(&broker, &cert)
        .args(["sub", "chat.cli", "--from", "1", "--count", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("1\thello"));

    for (text, offset) in [("second", "2\n"), ("third", "3\n")] {
        let out = volna(&broker, &cert)
            .args(["pub", "chat.cli", text])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), offset);
    }
    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        rest.push(line);
    }
    assert_eq!(rest, ["2\tsecond", "3\tthird"]);
    let status = tokio::time::timeout(DEADLINE, sub.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "sub exits 0 after --count messages");

    // A refused publish exits non-zero with the error code in its message.
    let mut publish = volna(&broker, &cert)
        .args(["pub", "chat.cli", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publish.stdin.take().unwrap();
    let big = "x".repeat(2 * 1024 * 1024) + "\n";
    stdin.write_all(big.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(DEADLINE, publish.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the broker's limit"));

    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommands_show_tables_and_json() {
    const TOKEN: &str = "cli-admin-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_admin(dir.path(), TOKEN).await;
    let cert = broker.dev_cert().unwrap().clone();
    let admin = |args: &[&str]| {
        let mut cmd = volna(&broker, &cert);
        cmd.arg("--http")
            .arg(broker.http_addr().to_string())
            .arg("--admin-token")
            .arg(TOKEN)
            .args(args);
        cmd
    };
    for _ in 0..2 {
        let out = volna(&broker, &cert)
            .args(["pub", "news.cli", "x"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
    }

    let out = admin(&["channels"]).output().await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("news.cli") && table.contains("next_offset"),
        "{table}"
    );

    let out = admin(&["channel", "info", "news.cli", "--json"])
        .output()
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["next_offset"], 3);
    assert_eq!(info["messages"], 2);

    let out = admin(&["retention", "news", "--max-messages", "10", "--json"])
        .output()
        .await
        .unwrap();
    let retention: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(retention["max_messages"], 10);

    let out = admin(&["kick", "nobody", "--json"]).output().await.unwrap();
    let kicked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(kicked["disconnected"], 0);

    let out = admin(&["channel", "delete", "news.cli", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(deleted["messages"], 2);
    let out = admin(&["channel", "info", "news.cli"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "deleted, so unknown");

    let out = admin(&["channel", "info", "news.none"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    let out = volna(&broker, &cert)
        .args(["--http", &broker.http_addr().to_string(), "sessions"])
        .env_remove("VOLNA_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token"));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bench_scenario_runs_and_checks_its_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "bench-test-admin-token";
    let broker = broker_with_admin(dir.path(), admin).await;
    let cert = broker.dev_cert().unwrap().clone();
    let http = broker.http_addr().to_string();
    let scenarios: [&[&str]; 8] = [
        &[
            "fanout",
            "--subscribers",
            "5",
            "--publishers",
            "2",
            "--messages",
            "300",
        ],
        &[
            "chats",
            "--channels",
            "3",
            "--subscribers",
            "2",
            "--messages",
            "40",
            "--ack",
        ],
        &[
            "fanout",
            "--subscribers",
            "3",
            "--messages",
            "200",
            "--rate",
            "2000",
        ],
        &[
            "chats",
            "--channels",
            "5",
            "--subscribers",
            "2",
            "--messages",
            "50",
        ],
        &["catchup", "--subscribers", "3", "--messages", "500"],
        &["connections", "--connections", "20", "--hold-secs", "0"],
        &["storm", "--connections", "10", "--messages", "100"],
        &["ceiling", "--subscribers", "5", "--messages", "300"],
    ];
    for args in scenarios {
        let out = tokio::time::timeout(
            DEADLINE,
            volna(&broker, &cert)
                .args(["--http", &http, "--admin-token", admin, "bench"])
                .args(args)
                .arg("--json")
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["scenario"], args[0], "{report}");
        assert_eq!(report["lost"], 0, "{report}");
        assert_eq!(
            report["deliveries_received"], report["deliveries_expected"],
            "{report}"
        );
        assert!(
            report["latency_us"]["p99"].as_u64().unwrap() > 0,
            "{report}"
        );
        if args.contains(&"--ack") {
            // Every subscriber acknowledged what it took: at least one
            // `Ack` each, and their cursors written.
            let acks = report["extra"]["acks"].as_f64().unwrap();
            assert!(acks >= 6.0, "{report}");
            assert!(
                report["extra"]["cursor_writes"].as_f64().unwrap() >= 6.0,
                "{report}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_is_one_readable_error_with_a_hint_not_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed_cert(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_volna"))
        .args(["--server", "127.0.0.1:9", "--ca"])
        .arg(&cert)
        .args(["--connect-timeout", "1", "pub", "chat.nobody", "hello"])
        .env("RUST_BACKTRACE", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no QUIC answer from 127.0.0.1:9 within 1 s"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: is the broker running"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert!(stderr.lines().count() <= 3, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_comparison_is_refused_for_scenarios_it_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed_cert(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_volna"))
        .args(["--server", "127.0.0.1:9", "--ca"])
        .arg(&cert)
        .args(["bench", "--nats", "nats://127.0.0.1:9", "catchup"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--nats runs only the fanout and chats scenarios"),
        "{stderr}"
    );
}

/// A self-signed certificate in `dir`: enough for a CLI run that nothing
/// answers (port 9) or that fails before connecting.
fn self_signed_cert(dir: &std::path::Path) -> std::path::PathBuf {
    let cert = dir.join("none.pem");
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&cert, key.cert.pem()).unwrap();
    cert
}

/// A device's session as a script drives it: `sub --resume` prints where
/// the device left off and stores its acknowledgements before exiting;
/// `read` moves the user's marker; `unread` and `admin unread` count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_reads_and_counts_from_the_command_line() {
    const ADMIN: &str = "cli-devices-admin-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_admin(dir.path(), ADMIN).await;
    let cert = broker.dev_cert().unwrap().clone();
    let run = |args: &[&str]| {
        let mut cmd = volna(&broker, &cert);
        cmd.args(["--token", "hana"]).args(args);
        async move {
            tokio::time::timeout(DEADLINE, cmd.output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    for i in 1..=5 {
        assert_printed(
            &run(&["pub", "chat.dev", &format!("m{i}")]).await,
            &format!("{i}\n"),
        );
    }
    // No cursor yet: from offset 1; three printed and acknowledged.
    let out = run(&[
        "--device", "phone", "sub", "chat.dev", "--resume", "--count", "3",
    ])
    .await;
    assert_printed(&out, "1\tm1\n2\tm2\n3\tm3\n");
    // The next run goes on after them.
    let out = run(&[
        "--device", "phone", "sub", "chat.dev", "--resume", "--count", "2",
    ])
    .await;
    assert_printed(&out, "4\tm4\n5\tm5\n");
    // Without a device there is nothing to resume from.
    let out = run(&["sub", "chat.dev", "--resume"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));

    assert_printed(&run(&["unread", "chat.dev"]).await, "chat.dev\t5\n");
    assert_printed(
        &run(&["--device", "phone", "read", "chat.dev", "2"]).await,
        "chat.dev\t2\n",
    );
    assert_printed(&run(&["unread"]).await, "chat.dev\t3\n");
    let out = run(&["--device", "phone", "read", "chat.dev", "9"]).await;
    assert!(!out.status.success(), "past the channel's end");
    assert!(String::from_utf8_lossy(&out.stderr).contains("BadRequest"));

    let http = broker.http_addr().to_string();
    let out = run(&[
        "--http",
        &http,
        "--admin-token",
        ADMIN,
        "--json",
        "admin",
        "unread",
        "hana",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows,
        serde_json::json!([{"channel": "chat.dev", "head": 5, "read": 2, "unread": 3}])
    );
    broker.shutdown().await;
}
