//! `volna bench ceiling`: the same fan-out through bare quinn in this
//! process, without a broker: no log, no sessions, no shared encoding —
//! one server connection per subscriber writing length-prefixed,
//! timestamped messages to one stream, batched like the broker's delivery
//! frames. What this machine's QUIC stack can do at best, measured with the
//! same generator (one UDP socket per subscriber, same payloads, same
//! checks) so that Volna's figures can be read as a fraction of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::{Buf, BufMut, BytesMut};
use futures_util::future::try_join_all;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde_json::{Value, json};

use super::workload::{self, Shape, Totals};
use super::{BenchArgs, Scenario, summary};

/// Messages written per stream write, as the broker batches deliveries.
const BATCH: u64 = 128;
const ALPN: &[u8] = b"volna-ceiling";

pub async fn run(args: &BenchArgs, json_out: bool) -> anyhow::Result<Value> {
    let (server, server_addr, client_config) = endpoints(args.socket_buffer)?;
    let subscribers = args.subscribers;
    let bar = workload::progress(json_out);
    bar.set_message("connecting");
    bar.set_length(subscribers as u64);

    // The "broker": accept every subscriber, then write to all at once.
    let messages = args.messages;
    let payload = args.payload;
    let start = Arc::new(tokio::sync::Notify::new());
    let accept = {
        let start = start.clone();
        tokio::spawn(async move {
            let mut writers = Vec::with_capacity(subscribers);
            for _ in 0..subscribers {
                let incoming = server.accept().await.context("the endpoint closed")?;
                let conn = incoming.await.context("a handshake failed")?;
                let stream = conn.open_uni().await.context("opening a stream")?;
                writers.push((conn, stream));
            }
            start.notify_one();
            let writes = writers.into_iter().map(|(conn, mut stream)| {
                tokio::spawn(async move {
                    let mut seq = 0;
                    while seq < messages {
                        let mut batch = BytesMut::with_capacity(BATCH as usize * (payload + 4));
                        let end = (seq + BATCH).min(messages);
                        for s in seq..end {
                            batch.put_u32(payload as u32);
                            batch.put_slice(&workload::payload(s, payload));
                        }
                        seq = end;
                        stream.write_chunk(batch.freeze()).await?;
                    }
                    stream.finish()?;
                    let _ = stream.stopped().await;
                    drop(conn);
                    anyhow::Ok(())
                })
            });
            for write in try_join_all(writes).await? {
                write?;
            }
            anyhow::Ok(server)
        })
    };

    // The subscribers, spread over the same shared sockets as against a broker.
    let endpoints = workload::bind_endpoints(&server_addr.to_string(), args)?;
    let connect_started = Instant::now();
    let mut conns = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let endpoint = endpoints[i % endpoints.len()].as_quinn().clone();
        let conn = endpoint
            .connect_with(client_config.clone(), server_addr, "localhost")?
            .await
            .context("connecting to the ceiling server")?;
        conns.push((endpoint, conn));
        bar.inc(1);
    }
    let connect_rate = subscribers as f64 / connect_started.elapsed().as_secs_f64().max(1e-9);
    let delivered = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    start.notified().await;
    let cpu = workload::CpuMeter::start(None).await;
    let started = Instant::now();
    bar.set_message("delivering");
    bar.set_length(messages * subscribers as u64);
    bar.set_position(0);
    let ticker = workload::follow(&bar, &delivered);
    let latencies = workload::Latencies::new();
    let readers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (endpoint, conn))| {
            let delivered = delivered.clone();
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let read = read_stream(conn, &delivered, &latencies, i);
                let result = tokio::time::timeout_at(deadline, read).await;
                drop(endpoint);
                // Out of time: what was not seen counts as lost.
                result.unwrap_or(Ok(Seen::default()))
            })
        })
        .collect();
    let mut totals = Totals {
        published: messages,
        expected: messages * subscribers as u64,
        received: 0,
        duplicates: 0,
        out_of_order: 0,
        latency_us: workload::new_histogram(),
    };
    for reader in readers {
        let seen = reader.await.context("a subscriber task failed")??;
        totals.received += seen.messages;
        totals.out_of_order += seen.out_of_order;
    }
    totals.latency_us = latencies.merged()?;
    let duration = started.elapsed().as_secs_f64();
    let cpu = cpu.finish().await;
    ticker.abort();
    bar.finish_and_clear();
    let server = accept.await.context("the server task failed")??;
    server.close(0u32.into(), b"done");
    let shape = Shape {
        connections: subscribers,
        subscribers,
        publishers: 1,
        channels: 1,
    };
    Ok(summary(
        Scenario::Ceiling,
        shape,
        payload,
        &totals,
        duration,
        duration,
        connect_rate,
        None,
        cpu,
        json!({ "note": "bare quinn in this process, no broker" }),
    ))
}

#[derive(Debug, Default)]
struct Seen {
    messages: u64,
    out_of_order: u64,
}

async fn read_stream(
    conn: quinn::Connection,
    delivered: &AtomicU64,
    latencies: &workload::Latencies,
    shard: usize,
) -> anyhow::Result<Seen> {
    let mut stream = conn.accept_uni().await.context("accepting the stream")?;
    let mut seen = Seen::default();
    let mut buf = BytesMut::new();
    let mut expected = 0;
    while let Some(chunk) = stream.read_chunk(1 << 20, true).await? {
        buf.extend_from_slice(&chunk.bytes);
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            buf.advance(4);
            let message = buf.split_to(len);
            let seq = message.get(8..16).map_or(u64::MAX, |s| {
                u64::from_be_bytes(s.try_into().unwrap_or([0xff; 8]))
            });
            if seq != expected {
                seen.out_of_order += 1;
            }
            expected = seq + 1;
            seen.messages += 1;
            delivered.fetch_add(1, Ordering::Relaxed);
            latencies.record(shard, &message);
        }
    }
    Ok(seen)
}

/// A server endpoint on loopback with a fresh self-signed certificate, and a
/// client configuration trusting it; transport settings and socket buffers
/// as the broker's.
fn endpoints(
    socket_buffer: usize,
) -> anyhow::Result<(quinn::Endpoint, SocketAddr, quinn::ClientConfig)> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der())
        .map_err(|e| anyhow!("the generated key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.send_window(8 * 1024 * 1024);
    server_config.transport_config(Arc::new(transport));
    let server = volna_client::Endpoint::bind_with_buffers(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(socket_buffer),
    )?
    .as_quinn()
    .clone();
    server.set_server_config(Some(server_config));
    let addr = server.local_addr()?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let client_config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    Ok((server, addr, client_config))
}
