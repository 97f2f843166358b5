//! The wire codec: encoding and decoding `Deliver` batches.

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use volna_proto::{ChannelName, Epoch, Frame, Limits, Offset};

const BATCH: usize = 64;

fn deliver_frame(payload_len: usize) -> (ChannelName, Vec<(u64, Bytes)>) {
    let channel = ChannelName::new("chat.8812").expect("valid channel");
    let messages = (0..BATCH)
        .map(|i| {
            (
                1_700_000_000_000 + i as u64,
                Bytes::from(vec![b'x'; payload_len]),
            )
        })
        .collect();
    (channel, messages)
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver");
    for payload_len in [64usize, 1024] {
        let (channel, messages) = deliver_frame(payload_len);
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_with_input(
            BenchmarkId::new("encode", payload_len),
            &payload_len,
            |b, _| {
                let mut buf = BytesMut::with_capacity(BATCH * (payload_len + 16) + 64);
                b.iter(|| {
                    buf.clear();
                    volna_proto::encode_deliver(
                        &channel,
                        Epoch(7),
                        Offset::new(1),
                        messages.iter().map(|(t, p)| (*t, p.as_ref())),
                        &mut buf,
                    );
                    buf.len()
                });
            },
        );
        let mut encoded = BytesMut::new();
        volna_proto::encode_deliver(
            &channel,
            Epoch(7),
            Offset::new(1),
            messages.iter().map(|(t, p)| (*t, p.as_ref())),
            &mut encoded,
        );
        let encoded = encoded.freeze();
        let limits = Limits {
            max_frame: 16 << 20,
        };
        group.bench_with_input(
            BenchmarkId::new("decode", payload_len),
            &payload_len,
            |b, _| {
                b.iter(|| {
                    let mut buf = BytesMut::from(encoded.as_ref());
                    match volna_proto::decode(&mut buf, &limits) {
                        Ok(Some(Frame::Deliver(d))) => d.messages.len(),
                        other => panic!("decode failed: {other:?}"),
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
