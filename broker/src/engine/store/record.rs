//! Byte layout of what the store keeps: message keys and records, channel
//! metadata (producer windows: `producers.rs`).
//!
//! Keys are big-endian so that RocksDB's byte order is offset order. Every
//! value starts with a format version byte so the layout can evolve.

// Only the RocksDB store writes these layouts; builds without it (the fuzz
// targets) keep just the error type.
#![cfg_attr(not(feature = "rocksdb"), allow(dead_code))]

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use volna_proto::{Epoch, Offset, ProducerSeq};

use super::{ChannelId, ChannelMeta, StoredMessage};

const VERSION: u8 = 1;

/// A stored value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    /// The value is shorter than its layout.
    #[error("{what} record is truncated")]
    Truncated {
        /// The kind of record.
        what: &'static str,
    },
    /// The value's fields contradict each other.
    #[error("{what} record is malformed")]
    Malformed {
        /// The kind of record.
        what: &'static str,
    },
    /// The value has a format version this build does not read.
    #[error("{what} record has unknown format version {version}")]
    UnknownVersion {
        /// The kind of record.
        what: &'static str,
        /// The version byte.
        version: u8,
    },
}

/// `channel_id ‖ offset`, both big-endian.
pub fn message_key(channel: ChannelId, offset: Offset) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&channel.to_be_bytes());
    key[8..].copy_from_slice(&offset.get().to_be_bytes());
    key
}

/// Splits a message key; `None` when it is not 16 bytes.
pub fn parse_message_key(key: &[u8]) -> Option<(ChannelId, Offset)> {
    let channel = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    let offset = u64::from_be_bytes(key.get(8..16)?.try_into().ok()?);
    Some((channel, Offset::new(offset)))
}

/// `version ‖ timestamp ‖ has_producer ‖ [producer_id ‖ sequence] ‖ payload`.
pub fn encode_message(message: &StoredMessage, out: &mut BytesMut) {
    out.put_u8(VERSION);
    out.put_u64(message.timestamp_ms);
    match message.producer {
        None => out.put_u8(0),
        Some(p) => {
            out.put_u8(1);
            out.put_u64(p.producer_id);
            out.put_u64(p.sequence);
        }
    }
    out.put_slice(&message.payload);
}

/// Decodes a message record; the payload is a slice of `value`.
pub fn decode_message(offset: Offset, mut value: Bytes) -> Result<StoredMessage, RecordError> {
    const WHAT: &str = "message";
    check_version(&mut value, WHAT)?;
    need(&value, 9, WHAT)?;
    let timestamp_ms = value.get_u64();
    let producer = match value.get_u8() {
        0 => None,
        _ => {
            need(&value, 16, WHAT)?;
            Some(ProducerSeq {
                producer_id: value.get_u64(),
                sequence: value.get_u64(),
            })
        }
    };
    Ok(StoredMessage {
        offset,
        timestamp_ms,
        producer,
        payload: value,
    })
}

/// `version ‖ id ‖ epoch ‖ first ‖ next ‖ bytes`.
pub fn encode_meta(meta: &ChannelMeta) -> [u8; META_LEN] {
    let mut out = [0u8; META_LEN];
    out[0] = VERSION;
    let fields = [
        meta.id,
        meta.epoch.0,
        meta.first_offset.get(),
        meta.next_offset.get(),
        meta.bytes,
        meta.oldest_ms,
        meta.generation,
        meta.previous_epoch.0,
        meta.epoch_start.get(),
    ];
    for (i, field) in fields.iter().enumerate() {
        out[1 + 8 * i..9 + 8 * i].copy_from_slice(&field.to_be_bytes());
    }
    out
}

/// Channel metadata: the version byte and nine big-endian `u64` fields.
pub const META_LEN: usize = 1 + 9 * 8;

/// Decodes channel metadata. Records of the first layout end after
/// `bytes`; the fields added since read as "unknown" (`oldest_ms` 0,
/// generation 0, no previous epoch).
pub fn decode_meta(mut value: &[u8]) -> Result<ChannelMeta, RecordError> {
    const WHAT: &str = "channel";
    check_version(&mut value, WHAT)?;
    need(&value, 40, WHAT)?;
    let id = value.get_u64();
    let epoch = Epoch(value.get_u64());
    let mut meta = ChannelMeta {
        id,
        epoch,
        first_offset: Offset::new(value.get_u64()),
        next_offset: Offset::new(value.get_u64()),
        bytes: value.get_u64(),
        ..ChannelMeta::new(id, epoch)
    };
    if value.has_remaining() {
        need(&value, 32, WHAT)?;
        meta.oldest_ms = value.get_u64();
        meta.generation = value.get_u64();
        meta.previous_epoch = Epoch(value.get_u64());
        meta.epoch_start = Offset::new(value.get_u64());
    }
    Ok(meta)
}

fn check_version(value: &mut impl Buf, what: &'static str) -> Result<(), RecordError> {
    need(value, 1, what)?;
    match value.get_u8() {
        VERSION => Ok(()),
        version => Err(RecordError::UnknownVersion { what, version }),
    }
}

fn need(value: &impl Buf, n: usize, what: &'static str) -> Result<(), RecordError> {
    if value.remaining() < n {
        return Err(RecordError::Truncated { what });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_channel_then_offset() {
        let a = message_key(1, Offset::new(255));
        let b = message_key(1, Offset::new(256));
        let c = message_key(2, Offset::new(1));
        assert!(a < b && b < c);
        assert_eq!(parse_message_key(&b), Some((1, Offset::new(256))));
        assert_eq!(parse_message_key(&b[..15]), None);
    }

    #[test]
    fn records_round_trip() {
        let m = StoredMessage {
            offset: Offset::new(3),
            timestamp_ms: 99,
            producer: Some(ProducerSeq {
                producer_id: 5,
                sequence: 6,
            }),
            payload: Bytes::from_static(b"payload"),
        };
        let mut buf = BytesMut::new();
        encode_message(&m, &mut buf);
        assert_eq!(decode_message(Offset::new(3), buf.freeze()), Ok(m));

        let meta = ChannelMeta {
            id: 1,
            epoch: Epoch(2),
            first_offset: Offset::new(3),
            next_offset: Offset::new(4),
            bytes: 5,
            oldest_ms: 6,
            generation: 7,
            previous_epoch: Epoch(8),
            epoch_start: Offset::new(9),
        };
        assert_eq!(decode_meta(&encode_meta(&meta)), Ok(meta));
        // A record of the first layout (41 bytes) still reads.
        let old = &encode_meta(&meta)[..41];
        let read = decode_meta(old).expect("layout 1");
        assert_eq!((read.bytes, read.oldest_ms, read.generation), (5, 0, 0));
        assert_eq!(read.previous_epoch, Epoch(2));
    }

    #[test]
    fn damaged_records_are_errors() {
        assert_eq!(
            decode_meta(&[1, 2, 3]),
            Err(RecordError::Truncated { what: "channel" })
        );
        assert_eq!(
            decode_meta(&[9; 41]),
            Err(RecordError::UnknownVersion {
                what: "channel",
                version: 9
            })
        );
        assert!(decode_message(Offset::FIRST, Bytes::from_static(&[1, 0])).is_err());
    }
}
