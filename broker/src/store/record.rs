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
pub fn encode_meta(meta: &ChannelMeta) -> [u8; 41] {
    let mut out = [0u8; 41];
    out[0] = VERSION;
    out[1..9].copy_from_slice(&meta.id.to_be_bytes());
    out[9..17].copy_from_slice(&meta.epoch.0.to_be_bytes());
    out[17..25].copy_from_slice(&meta.first_offset.get().to_be_bytes());
    out[25..33].copy_from_slice(&meta.next_offset.get().to_be_bytes());
    out[33..41].copy_from_slice(&meta.bytes.to_be_bytes());
    out
}

/// Decodes channel metadata.
pub fn decode_meta(mut value: &[u8]) -> Result<ChannelMeta, RecordError> {
    const WHAT: &str = "channel";
    check_version(&mut value, WHAT)?;
    need(&value, 40, WHAT)?;
    Ok(ChannelMeta {
        id: value.get_u64(),
        epoch: Epoch(value.get_u64()),
        first_offset: Offset::new(value.get_u64()),
        next_offset: Offset::new(value.get_u64()),
        bytes: value.get_u64(),
    })
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
        };
        assert_eq!(decode_meta(&encode_meta(&meta)), Ok(meta));
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
