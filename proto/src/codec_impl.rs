//! Length-prefixed framing and the byte layout of every frame.
//!
//! ```text
//! ┌──────────────┬────────┬──────────────────────┐
//! │ len: u32 BE  │ type u8│ body (len - 1 bytes) │
//! └──────────────┴────────┴──────────────────────┘
//! ```
//!
//! Integers are big-endian. Strings are `u16` length + UTF-8, channel names
//! `u8` length + name, payloads `u32` length + bytes.
//!
//! Invariants: the decoder checks a frame's length against [`Limits`] before
//! it waits for (let alone allocates) the body; every field read checks the
//! bytes remaining; a frame with bytes left over after its last field is an
//! error, never ignored. Payloads are slices of the input buffer, not copies.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::frame::Welcome;
use crate::frame::{Deliver, DeliveredMessage, ErrorFrame, Frame, FrameType, Hello, Position};
use crate::frame::{Fallback, MAX_UNREAD_CHANNELS, ProducerSeq, Publish, Subscribe, UnreadCount};
use crate::{ChannelName, Epoch, ErrorCode, InvalidChannelName, Offset, SubscriptionId};

/// Bytes before a frame's type byte: the `u32` length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// The first protocol version whose `Hello` carries a device id.
const HELLO_DEVICE_VERSION: u16 = 3;

/// Sizes a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame, length prefix included.
    pub max_frame: u32,
}

impl Limits {
    /// Limits for a connection that has not finished its handshake: enough
    /// for `Hello` with a large token, not for payloads.
    pub const HANDSHAKE: Limits = Limits {
        max_frame: 64 * 1024,
    };
}

/// Why bytes did not decode to a frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length prefix announces more than [`Limits::max_frame`].
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The announced frame length, prefix included.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The length prefix is zero: not even a type byte.
    #[error("empty frame")]
    EmptyFrame,
    /// The type byte names no frame.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A field runs past the end of its frame.
    #[error("{frame:?} frame truncated while reading {field}")]
    Truncated {
        /// The frame being decoded.
        frame: FrameType,
        /// The field that did not fit.
        field: &'static str,
    },
    /// The frame has bytes after its last field.
    #[error("{frame:?} frame has {extra} trailing bytes")]
    TrailingBytes {
        /// The frame being decoded.
        frame: FrameType,
        /// How many bytes were left.
        extra: usize,
    },
    /// A channel name field is not a valid channel name.
    #[error("invalid channel name: {0}")]
    InvalidChannel(#[from] InvalidChannelName),
    /// A string field is not UTF-8.
    #[error("{field} is not UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A field holds a value outside its domain (a bad tag, a zero count).
    #[error("invalid value for {field}")]
    InvalidValue {
        /// The field.
        field: &'static str,
    },
}

impl DecodeError {
    /// The wire error code a peer is told.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::UnknownFrameType(_) => ErrorCode::UnknownFrame,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// Takes one whole frame off the front of `buf`.
///
/// Returns `Ok(None)` while `buf` holds less than a whole frame (read more
/// and call again). On `Err` the stream is out of step and should be closed.
pub fn decode(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let total = u64::from(len) + FRAME_HEADER_LEN as u64;
    if total > u64::from(limits.max_frame) {
        return Err(DecodeError::FrameTooLarge {
            len: total,
            max: limits.max_frame,
        });
    }
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    // `total` is at most `max_frame`, a u32, so it fits in usize here.
    let total = total as usize;
    if buf.len() < total {
        // Make room for the rest of this frame only: a length it has checked.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut body = buf.split_to(total).freeze();
    body.advance(FRAME_HEADER_LEN);
    decode_body(body).map(Some)
}

/// Appends `frame`, length prefix included, to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(frame.frame_type() as u8);
    match frame {
        Frame::Hello(h) => {
            out.put_u16(h.protocol);
            put_str(out, &h.token);
            put_str(out, &h.client);
            if h.protocol >= HELLO_DEVICE_VERSION {
                put_str(out, h.device.as_deref().unwrap_or(""));
            }
        }
        Frame::Publish(p) => {
            out.put_u64(p.request_id);
            put_channel(out, &p.channel);
            // 0: no producer; 1: producer; 2: producer and `after`.
            match (p.producer, p.after) {
                (None, _) => out.put_u8(0),
                (
                    Some(ProducerSeq {
                        producer_id,
                        sequence,
                    }),
                    after,
                ) => {
                    out.put_u8(if after.is_some() { 2 } else { 1 });
                    out.put_u64(producer_id);
                    out.put_u64(sequence);
                    if let Some(after) = after {
                        out.put_u64(after);
                    }
                }
            }
            put_payload(out, &p.payload);
        }
        Frame::Subscribe(s) => {
            out.put_u64(s.request_id);
            put_channel(out, &s.channel);
            match s.position {
                Position::Latest => out.put_u8(0),
                Position::From { offset, epoch } => {
                    out.put_u8(1);
                    out.put_u64(offset.get());
                    match epoch {
                        None => out.put_u8(0),
                        Some(e) => {
                            out.put_u8(1);
                            out.put_u64(e.0);
                        }
                    }
                }
                Position::Last(n) => {
                    out.put_u8(2);
                    out.put_u64(n);
                }
                Position::Cursor { otherwise } => {
                    out.put_u8(3);
                    match otherwise {
                        Fallback::Latest => out.put_u8(0),
                        Fallback::From(offset) => {
                            out.put_u8(1);
                            out.put_u64(offset.get());
                        }
                        Fallback::Last(n) => {
                            out.put_u8(2);
                            out.put_u64(n);
                        }
                    }
                }
            }
        }
        Frame::Ack {
            request_id,
            channel,
            offset,
        }
        | Frame::MarkRead {
            request_id,
            channel,
            offset,
        } => {
            out.put_u64(*request_id);
            put_channel(out, channel);
            out.put_u64(offset.get());
        }
        Frame::Unread {
            request_id,
            channels,
        } => {
            out.put_u64(*request_id);
            // At most MAX_UNREAD_CHANNELS are sent: the decoder refuses more.
            let channels = &channels[..channels.len().min(MAX_UNREAD_CHANNELS)];
            out.put_u16(channels.len() as u16);
            for channel in channels {
                put_channel(out, channel);
            }
        }
        Frame::Stored { request_id } | Frame::FlushAcks { request_id } => out.put_u64(*request_id),
        Frame::InitProducer {
            request_id,
            producer_id,
        } => {
            out.put_u64(*request_id);
            out.put_u64(*producer_id);
        }
        Frame::ProducerReady {
            request_id,
            last_sequence,
        } => {
            out.put_u64(*request_id);
            out.put_u64(*last_sequence);
        }
        Frame::UnreadCounts { request_id, counts } => {
            out.put_u64(*request_id);
            let counts = &counts[..counts.len().min(MAX_UNREAD_CHANNELS)];
            out.put_u16(counts.len() as u16);
            for count in counts {
                put_channel(out, &count.channel);
                out.put_u64(count.head);
                out.put_u64(count.read);
                out.put_u64(count.unread);
            }
        }
        Frame::ReadMarker { channel, offset } => {
            put_channel(out, channel);
            out.put_u64(offset.get());
        }
        Frame::Unsubscribe {
            request_id,
            subscription,
        } => {
            out.put_u64(*request_id);
            out.put_u64(subscription.0);
        }
        Frame::Ping { request_id }
        | Frame::Pong { request_id }
        | Frame::Unsubscribed { request_id } => out.put_u64(*request_id),
        Frame::Refresh { request_id, token } => {
            out.put_u64(*request_id);
            put_str(out, token);
        }
        Frame::Refreshed {
            request_id,
            expires_at,
        } => {
            out.put_u64(*request_id);
            out.put_u64(*expires_at);
        }
        Frame::TokenExpiring { expires_at } => out.put_u64(*expires_at),
        Frame::SubscriptionEnded {
            subscription,
            code,
            message,
        } => {
            out.put_u64(subscription.0);
            out.put_u16(code.to_u16());
            put_str(out, message);
        }
        Frame::Welcome(w) => {
            out.put_u64(w.session_id);
            out.put_u16(w.protocol);
            out.put_u32(w.max_frame);
            out.put_u32(w.max_payload);
            out.put_u32(w.max_subscriptions);
        }
        Frame::Published {
            request_id,
            offset,
            epoch,
            duplicate,
        } => {
            out.put_u64(*request_id);
            out.put_u64(offset.get());
            out.put_u64(epoch.0);
            out.put_u8(u8::from(*duplicate));
        }
        Frame::Subscribed {
            request_id,
            subscription,
            epoch,
            start,
        } => {
            out.put_u64(*request_id);
            out.put_u64(subscription.0);
            out.put_u64(epoch.0);
            out.put_u64(start.get());
        }
        Frame::Error(e) => {
            out.put_u64(e.request_id);
            out.put_u16(e.code.to_u16());
            put_str(out, &e.message);
        }
        Frame::StreamHeader { subscription } => out.put_u64(subscription.0),
        Frame::Deliver(d) => put_deliver_body(
            out,
            &d.channel,
            d.epoch,
            d.first_offset,
            d.messages
                .iter()
                .map(|m| (m.timestamp_ms, m.payload.as_ref())),
        ),
        Frame::Truncated {
            channel,
            requested,
            first_available,
        } => {
            put_channel(out, channel);
            out.put_u64(requested.get());
            out.put_u64(first_available.get());
        }
        Frame::EpochChanged {
            channel,
            previous,
            current,
            start,
        } => {
            put_channel(out, channel);
            out.put_u64(previous.0);
            out.put_u64(current.0);
            out.put_u64(start.get());
        }
    }
    patch_len(out, start);
}

/// Appends a `Deliver` frame built from borrowed messages, so that the broker
/// can encode a committed batch once without first building a [`Deliver`].
///
/// `messages` yields `(timestamp_ms, payload)` for offsets `first_offset`,
/// `first_offset + 1`, …; it must yield at least one message.
pub fn encode_deliver<'a>(
    channel: &ChannelName,
    epoch: Epoch,
    first_offset: Offset,
    messages: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
    out: &mut BytesMut,
) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(FrameType::Deliver as u8);
    put_deliver_body(out, channel, epoch, first_offset, messages);
    patch_len(out, start);
}

/// The number of bytes [`encode`] appends for `frame`.
pub fn encoded_len(frame: &Frame) -> usize {
    let body = match frame {
        Frame::Hello(h) => {
            2 + 2
                + h.token.len()
                + 2
                + h.client.len()
                + if h.protocol >= HELLO_DEVICE_VERSION {
                    2 + h.device.as_deref().map_or(0, str::len)
                } else {
                    0
                }
        }
        Frame::Publish(p) => {
            8 + 1
                + p.channel.as_str().len()
                + 1
                + match (p.producer, p.after) {
                    (None, _) => 0,
                    (Some(_), None) => 16,
                    (Some(_), Some(_)) => 24,
                }
                + 4
                + p.payload.len()
        }
        Frame::Subscribe(s) => {
            8 + 1
                + s.channel.as_str().len()
                + match s.position {
                    Position::Latest => 1,
                    Position::From { epoch: None, .. } => 1 + 8 + 1,
                    Position::From { epoch: Some(_), .. } => 1 + 8 + 1 + 8,
                    Position::Last(_) => 1 + 8,
                    Position::Cursor {
                        otherwise: Fallback::Latest,
                    } => 1 + 1,
                    Position::Cursor { .. } => 1 + 1 + 8,
                }
        }
        Frame::Ack { channel, .. } | Frame::MarkRead { channel, .. } => {
            8 + 1 + channel.as_str().len() + 8
        }
        Frame::Unread { channels, .. } => {
            8 + 2
                + channels
                    .iter()
                    .take(MAX_UNREAD_CHANNELS)
                    .map(|c| 1 + c.as_str().len())
                    .sum::<usize>()
        }
        Frame::Stored { .. } | Frame::FlushAcks { .. } => 8,
        Frame::InitProducer { .. } | Frame::ProducerReady { .. } => 16,
        Frame::UnreadCounts { counts, .. } => {
            8 + 2
                + counts
                    .iter()
                    .take(MAX_UNREAD_CHANNELS)
                    .map(|c| 1 + c.channel.as_str().len() + 24)
                    .sum::<usize>()
        }
        Frame::ReadMarker { channel, .. } => 1 + channel.as_str().len() + 8,
        Frame::Unsubscribe { .. } => 16,
        Frame::Refresh { token, .. } => 8 + 2 + token.len(),
        Frame::Refreshed { .. } => 16,
        Frame::TokenExpiring { .. } => 8,
        Frame::SubscriptionEnded { message, .. } => 8 + 2 + 2 + message.len(),
        Frame::Ping { .. } | Frame::Pong { .. } | Frame::Unsubscribed { .. } => 8,
        Frame::Welcome(_) => 8 + 2 + 4 + 4 + 4,
        Frame::Published { .. } => 8 + 8 + 8 + 1,
        Frame::Subscribed { .. } => 32,
        Frame::Error(e) => 8 + 2 + 2 + e.message.len(),
        Frame::StreamHeader { .. } => 8,
        Frame::Deliver(d) => {
            1 + d.channel.as_str().len()
                + 8
                + 8
                + 4
                + d.messages
                    .iter()
                    .map(|m| 8 + 4 + m.payload.len())
                    .sum::<usize>()
        }
        Frame::Truncated { channel, .. } => 1 + channel.as_str().len() + 16,
        Frame::EpochChanged { channel, .. } => 1 + channel.as_str().len() + 24,
    };
    FRAME_HEADER_LEN + 1 + body
}

fn put_deliver_body<'a>(
    out: &mut BytesMut,
    channel: &ChannelName,
    epoch: Epoch,
    first_offset: Offset,
    messages: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) {
    put_channel(out, channel);
    out.put_u64(epoch.0);
    out.put_u64(first_offset.get());
    out.put_u32(u32::try_from(messages.len()).unwrap_or(u32::MAX));
    for (timestamp_ms, payload) in messages {
        out.put_u64(timestamp_ms);
        put_payload(out, payload);
    }
}

fn patch_len(out: &mut BytesMut, start: usize) {
    let len = out.len() - start - FRAME_HEADER_LEN;
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Strings longer than u16::MAX are cut at a char boundary: they are
    // human-readable text (messages, client names), never data.
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.put_slice(&s.as_bytes()[..end]);
}

fn put_channel(out: &mut BytesMut, channel: &ChannelName) {
    // A ChannelName is at most 255 bytes by construction.
    out.put_u8(channel.as_str().len() as u8);
    out.put_slice(channel.as_str().as_bytes());
}

fn put_payload(out: &mut BytesMut, payload: &[u8]) {
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
}

/// Reads the fields of one frame body, each read checked against the bytes
/// left.
struct Reader {
    buf: Bytes,
    frame: FrameType,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated {
                frame: self.frame,
                field,
            });
        }
        Ok(())
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64())
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidValue { field }),
        }
    }

    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(len, field)?;
        Ok(self.buf.split_to(len))
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        let raw = self.bytes(len, field)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    fn channel(&mut self) -> Result<ChannelName, DecodeError> {
        let len = usize::from(self.u8("channel")?);
        let raw = self.bytes(len, "channel")?;
        Ok(ChannelName::from_bytes(&raw)?)
    }

    fn payload(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32("payload")? as usize;
        self.bytes(len, "payload")
    }

    /// A `u16` element count, checked against [`MAX_UNREAD_CHANNELS`] and
    /// against the bytes left (each element takes at least `min_len`)
    /// before anything is reserved for the elements.
    fn count(&mut self, field: &'static str, min_len: usize) -> Result<usize, DecodeError> {
        let count = usize::from(self.u16(field)?);
        if count > MAX_UNREAD_CHANNELS {
            return Err(DecodeError::InvalidValue { field });
        }
        self.need(count * min_len, field)?;
        Ok(count)
    }

    fn offset(&mut self, field: &'static str) -> Result<Offset, DecodeError> {
        Ok(Offset::new(self.u64(field)?))
    }

    fn finish(self, frame: Frame) -> Result<Frame, DecodeError> {
        if self.buf.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                frame: self.frame,
                extra: self.buf.remaining(),
            });
        }
        Ok(frame)
    }
}

fn decode_body(mut body: Bytes) -> Result<Frame, DecodeError> {
    let type_byte = body.get_u8();
    let frame = FrameType::from_u8(type_byte).ok_or(DecodeError::UnknownFrameType(type_byte))?;
    let mut r = Reader { buf: body, frame };
    let decoded = match frame {
        FrameType::Hello => {
            let protocol = r.u16("protocol")?;
            let token = r.string("token")?;
            let client = r.string("client")?;
            let device = if protocol >= HELLO_DEVICE_VERSION {
                Some(r.string("device")?).filter(|d| !d.is_empty())
            } else {
                None
            };
            Frame::Hello(Hello {
                protocol,
                token,
                client,
                device,
            })
        }
        FrameType::Publish => {
            let request_id = r.u64("request_id")?;
            let channel = r.channel()?;
            let (producer, after) = match r.u8("producer")? {
                0 => (None, None),
                flag @ (1 | 2) => {
                    let producer = ProducerSeq {
                        producer_id: r.u64("producer_id")?,
                        sequence: r.u64("sequence")?,
                    };
                    let after = if flag == 2 {
                        Some(r.u64("after")?)
                    } else {
                        None
                    };
                    (Some(producer), after)
                }
                _ => return Err(DecodeError::InvalidValue { field: "producer" }),
            };
            Frame::Publish(Publish {
                request_id,
                channel,
                producer,
                after,
                payload: r.payload()?,
            })
        }
        FrameType::Subscribe => {
            let request_id = r.u64("request_id")?;
            let channel = r.channel()?;
            let position = match r.u8("position")? {
                0 => Position::Latest,
                1 => {
                    let offset = r.offset("offset")?;
                    let epoch = if r.bool("epoch")? {
                        Some(Epoch(r.u64("epoch")?))
                    } else {
                        None
                    };
                    Position::From { offset, epoch }
                }
                2 => Position::Last(r.u64("last")?),
                3 => Position::Cursor {
                    otherwise: match r.u8("otherwise")? {
                        0 => Fallback::Latest,
                        1 => Fallback::From(r.offset("otherwise")?),
                        2 => Fallback::Last(r.u64("otherwise")?),
                        _ => return Err(DecodeError::InvalidValue { field: "otherwise" }),
                    },
                },
                _ => return Err(DecodeError::InvalidValue { field: "position" }),
            };
            Frame::Subscribe(Subscribe {
                request_id,
                channel,
                position,
            })
        }
        FrameType::Unsubscribe => Frame::Unsubscribe {
            request_id: r.u64("request_id")?,
            subscription: SubscriptionId(r.u64("subscription")?),
        },
        FrameType::Ping => Frame::Ping {
            request_id: r.u64("request_id")?,
        },
        FrameType::Refresh => Frame::Refresh {
            request_id: r.u64("request_id")?,
            token: r.string("token")?,
        },
        FrameType::Ack => Frame::Ack {
            request_id: r.u64("request_id")?,
            channel: r.channel()?,
            offset: r.offset("offset")?,
        },
        FrameType::MarkRead => Frame::MarkRead {
            request_id: r.u64("request_id")?,
            channel: r.channel()?,
            offset: r.offset("offset")?,
        },
        FrameType::Unread => {
            let request_id = r.u64("request_id")?;
            let count = r.count("channels", 2)?;
            let mut channels = Vec::with_capacity(count);
            for _ in 0..count {
                channels.push(r.channel()?);
            }
            Frame::Unread {
                request_id,
                channels,
            }
        }
        FrameType::Stored => Frame::Stored {
            request_id: r.u64("request_id")?,
        },
        FrameType::FlushAcks => Frame::FlushAcks {
            request_id: r.u64("request_id")?,
        },
        FrameType::InitProducer => Frame::InitProducer {
            request_id: r.u64("request_id")?,
            producer_id: r.u64("producer_id")?,
        },
        FrameType::ProducerReady => Frame::ProducerReady {
            request_id: r.u64("request_id")?,
            last_sequence: r.u64("last_sequence")?,
        },
        FrameType::UnreadCounts => {
            let request_id = r.u64("request_id")?;
            let count = r.count("counts", 2 + 24)?;
            let mut counts = Vec::with_capacity(count);
            for _ in 0..count {
                counts.push(UnreadCount {
                    channel: r.channel()?,
                    head: r.u64("head")?,
                    read: r.u64("read")?,
                    unread: r.u64("unread")?,
                });
            }
            Frame::UnreadCounts { request_id, counts }
        }
        FrameType::ReadMarker => Frame::ReadMarker {
            channel: r.channel()?,
            offset: r.offset("offset")?,
        },
        FrameType::Refreshed => Frame::Refreshed {
            request_id: r.u64("request_id")?,
            expires_at: r.u64("expires_at")?,
        },
        FrameType::TokenExpiring => Frame::TokenExpiring {
            expires_at: r.u64("expires_at")?,
        },
        FrameType::SubscriptionEnded => Frame::SubscriptionEnded {
            subscription: SubscriptionId(r.u64("subscription")?),
            code: ErrorCode::from_u16(r.u16("code")?),
            message: r.string("message")?,
        },
        FrameType::Welcome => Frame::Welcome(Welcome {
            session_id: r.u64("session_id")?,
            protocol: r.u16("protocol")?,
            max_frame: r.u32("max_frame")?,
            max_payload: r.u32("max_payload")?,
            max_subscriptions: r.u32("max_subscriptions")?,
        }),
        FrameType::Published => Frame::Published {
            request_id: r.u64("request_id")?,
            offset: r.offset("offset")?,
            epoch: Epoch(r.u64("epoch")?),
            duplicate: r.bool("duplicate")?,
        },
        FrameType::Subscribed => Frame::Subscribed {
            request_id: r.u64("request_id")?,
            subscription: SubscriptionId(r.u64("subscription")?),
            epoch: Epoch(r.u64("epoch")?),
            start: r.offset("start")?,
        },
        FrameType::Unsubscribed => Frame::Unsubscribed {
            request_id: r.u64("request_id")?,
        },
        FrameType::Pong => Frame::Pong {
            request_id: r.u64("request_id")?,
        },
        FrameType::Error => Frame::Error(ErrorFrame {
            request_id: r.u64("request_id")?,
            code: ErrorCode::from_u16(r.u16("code")?),
            message: r.string("message")?,
        }),
        FrameType::StreamHeader => Frame::StreamHeader {
            subscription: SubscriptionId(r.u64("subscription")?),
        },
        FrameType::Deliver => {
            let channel = r.channel()?;
            let epoch = Epoch(r.u64("epoch")?);
            let first_offset = r.offset("first_offset")?;
            let count = r.u32("count")? as usize;
            if count == 0 {
                return Err(DecodeError::InvalidValue { field: "count" });
            }
            // Each message takes at least 12 bytes: refuse counts the frame
            // cannot hold before reserving memory for them.
            r.need(count.saturating_mul(12), "messages")?;
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                messages.push(DeliveredMessage {
                    timestamp_ms: r.u64("timestamp")?,
                    payload: r.payload()?,
                });
            }
            Frame::Deliver(Deliver {
                channel,
                epoch,
                first_offset,
                messages,
            })
        }
        FrameType::Truncated => Frame::Truncated {
            channel: r.channel()?,
            requested: r.offset("requested")?,
            first_available: r.offset("first_available")?,
        },
        FrameType::EpochChanged => Frame::EpochChanged {
            channel: r.channel()?,
            previous: Epoch(r.u64("previous")?),
            current: Epoch(r.u64("current")?),
            start: r.offset("start")?,
        },
    };
    r.finish(decoded)
}
