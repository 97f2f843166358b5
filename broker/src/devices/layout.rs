//! The byte layout of device state in the `cursors` column family, and the
//! pure rules over it (how a stored position merges with a newer one, what
//! an unread count is).
//!
//! ```text
//! a ‖ user ‖ ""                → devices u64               (the user's device count)
//! a ‖ user ‖ device            → last_seen_ms u64          (the registry)
//! c ‖ user ‖ device ‖ channel  → Mark                      (a device's cursor)
//! m ‖ user ‖ channel           → Mark                      (the user's read marker)
//!
//! user    = u16 length ‖ bytes        device = u8 length ‖ bytes
//! channel = the name's bytes (last, so it needs no length)
//! Mark    = offset u64 ‖ channel_id u64 ‖ updated_ms u64  (big-endian)
//! ```
//!
//! Registry entries sort first, so a sweep meets a user's devices before
//! anything else of theirs, the count (an empty device id, which no device
//! has) before the devices it counts: registering a device reads one key,
//! however many the user has; one device's cursors are one contiguous range
//! (removed with one range delete), and so are one user's markers.
//!
//! A mark names the channel's incarnation ([`Incarnation`]): on a single
//! node its numeric id, in a cluster its epoch (ids are each node's own,
//! epochs are replicated). A channel deleted and created again gets a new
//! one, so marks of the old one stop counting at once (and a single node's
//! next sweep removes them).
//!
//! In a cluster, each partition keeps the device state of its users under
//! its own prefix, so that its snapshot and its discard are one key range:
//!
//! ```text
//! p ‖ partition u32 ‖ (a key above)
//! ```

use volna_proto::{ChannelName, Offset};

use crate::store::{ChannelId, ChannelMeta};

const REGISTRY: u8 = b'a';
const CURSOR: u8 = b'c';
const MARKER: u8 = b'm';
const PARTITIONED: u8 = b'p';

/// The longest device id (bytes).
pub const MAX_DEVICE_ID: usize = 128;

/// A device id as `Hello` named it: 1–128 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Checks `id`; the reason it is refused otherwise.
    pub fn new(id: &str) -> Result<Self, &'static str> {
        if id.is_empty() || id.len() > MAX_DEVICE_ID {
            return Err("a device id is 1 to 128 bytes");
        }
        if id.chars().any(char::is_control) {
            return Err("a device id has no control characters");
        }
        Ok(Self(id.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored position: a cursor or a read marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The last offset acknowledged (cursor) or read (marker).
    pub offset: Offset,
    /// The incarnation of the channel it belongs to ([`Incarnation`]).
    pub channel_id: ChannelId,
    /// When it last moved, ms since the Unix epoch.
    pub updated_ms: u64,
}

impl Mark {
    /// Encoded size.
    pub const LEN: usize = 24;

    /// The value bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.offset.get().to_be_bytes());
        out.extend_from_slice(&self.channel_id.to_be_bytes());
        out.extend_from_slice(&self.updated_ms.to_be_bytes());
        out
    }

    /// Reads value bytes; `None` when they are not a mark.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Some(Self {
            offset: Offset::new(word(0)),
            channel_id: word(1),
            updated_ms: word(2),
        })
    }

    /// `newer` applied over `self`: within one incarnation of the channel
    /// the larger offset wins (a position never moves backwards); a newer
    /// incarnation (a larger id: ids are never reused) replaces an older
    /// one, and an update for an older incarnation changes nothing.
    pub fn merge(self, newer: Mark) -> Mark {
        let key = |m: &Mark| (m.channel_id, m.offset.get());
        if key(&newer) > key(&self) {
            newer
        } else {
            Mark {
                updated_ms: self.updated_ms.max(newer.updated_ms),
                ..self
            }
        }
    }

    /// The offset this mark stands for in the channel as it is now (`meta`),
    /// `None` when it belongs to another incarnation or the channel is gone.
    pub fn offset_in(&self, meta: Option<&ChannelMeta>, by: Incarnation) -> Option<Offset> {
        meta.filter(|m| by.of(m) == self.channel_id)
            .map(|_| self.offset)
    }
}

/// What names one incarnation of a channel in a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incarnation {
    /// The channel's numeric id (a single node): ids grow, so a larger one
    /// is a newer incarnation.
    ChannelId,
    /// The channel's epoch (a cluster, where ids are each node's own):
    /// epochs are random, so of two incarnations the one that comes later
    /// wins (in the partition's log: the same order on every replica,
    /// whatever the nodes' clocks say).
    Epoch,
}

impl Incarnation {
    /// The incarnation of the channel as it is now.
    pub fn of(self, meta: &ChannelMeta) -> u64 {
        match self {
            Incarnation::ChannelId => meta.id,
            Incarnation::Epoch => meta.epoch.0,
        }
    }

    /// `newer` applied over `stored` (`newer` came later): within one
    /// incarnation the larger offset wins (a position never moves
    /// backwards).
    pub fn merge(self, stored: Mark, newer: Mark) -> Mark {
        match self {
            Incarnation::ChannelId => stored.merge(newer),
            Incarnation::Epoch if newer.channel_id == stored.channel_id => {
                if newer.offset > stored.offset {
                    newer
                } else {
                    Mark {
                        updated_ms: stored.updated_ms.max(newer.updated_ms),
                        ..stored
                    }
                }
            }
            Incarnation::Epoch => newer,
        }
    }
}

/// One channel's unread count as `Unread` answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unread {
    /// The channel's last offset (0: no message yet).
    pub head: u64,
    /// The read marker (0: none).
    pub read: u64,
    /// Stored messages after the marker, at most `cap`.
    pub unread: u64,
}

/// The unread count of a channel (`meta`, `None` when it does not exist)
/// for a user whose marker is `marker`: the messages after the marker that
/// are still stored, computed from the head and the marker alone.
pub fn unread(
    meta: Option<&ChannelMeta>,
    marker: Option<&Mark>,
    cap: u64,
    by: Incarnation,
) -> Unread {
    let Some(meta) = meta else {
        return Unread {
            head: 0,
            read: 0,
            unread: 0,
        };
    };
    let head = meta.next_offset.get().saturating_sub(1);
    let read = marker
        .and_then(|m| m.offset_in(Some(meta), by))
        .map_or(0, Offset::get)
        .min(head);
    // What retention removed is not unread any more: it cannot be read.
    let from = read.max(meta.first_offset.get().saturating_sub(1));
    Unread {
        head,
        read,
        unread: head.saturating_sub(from).min(cap),
    }
}

fn user_prefix(tag: u8, user: &str) -> Vec<u8> {
    // Users are token subjects; longer than u16::MAX they are cut (such a
    // token is refused by the transport's frame limits long before).
    let user = &user.as_bytes()[..user.len().min(usize::from(u16::MAX))];
    let mut key = Vec::with_capacity(3 + user.len() + 1 + MAX_DEVICE_ID + 64);
    key.push(tag);
    key.extend_from_slice(&(user.len() as u16).to_be_bytes());
    key.extend_from_slice(user);
    key
}

fn push_device(key: &mut Vec<u8>, device: &DeviceId) {
    // At most MAX_DEVICE_ID (128) bytes by construction.
    key.push(device.0.len() as u8);
    key.extend_from_slice(device.0.as_bytes());
}

/// The registry key of a device.
pub fn device_key(user: &str, device: &DeviceId) -> Vec<u8> {
    let mut key = user_prefix(REGISTRY, user);
    push_device(&mut key, device);
    key
}

/// The key of `user`'s device count.
pub fn device_count_key(user: &str) -> Vec<u8> {
    let mut key = user_prefix(REGISTRY, user);
    key.push(0);
    key
}

/// The range holding every registered device.
pub fn all_devices() -> (Vec<u8>, Vec<u8>) {
    prefix_range(vec![REGISTRY])
}

/// The cursor key of a device on a channel.
pub fn cursor_key(user: &str, device: &DeviceId, channel: &ChannelName) -> Vec<u8> {
    let mut key = user_prefix(CURSOR, user);
    push_device(&mut key, device);
    key.extend_from_slice(channel.as_str().as_bytes());
    key
}

/// The range holding every cursor of a device.
pub fn device_cursors(user: &str, device: &DeviceId) -> (Vec<u8>, Vec<u8>) {
    let mut key = user_prefix(CURSOR, user);
    push_device(&mut key, device);
    prefix_range(key)
}

/// The read-marker key of a user on a channel.
pub fn marker_key(user: &str, channel: &ChannelName) -> Vec<u8> {
    let mut key = user_prefix(MARKER, user);
    key.extend_from_slice(channel.as_str().as_bytes());
    key
}

/// The range holding every read marker of a user.
pub fn user_markers(user: &str) -> (Vec<u8>, Vec<u8>) {
    prefix_range(user_prefix(MARKER, user))
}

/// The range of every cursor and marker (everything but the registry).
pub fn all_marks() -> (Vec<u8>, Vec<u8>) {
    (vec![CURSOR], vec![MARKER + 1])
}

/// What a stored key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A user's device count.
    DeviceCount {
        /// Its user.
        user: String,
    },
    /// A registry entry.
    Device {
        /// Its user.
        user: String,
        /// The device.
        device: String,
    },
    /// A device's cursor or a user's read marker on a channel.
    Mark {
        /// Its user.
        user: String,
        /// The channel.
        channel: ChannelName,
    },
}

/// Reads a stored key; `None` for bytes that are no key of this layout.
pub fn parse_key(key: &[u8]) -> Option<Key> {
    let (&tag, rest) = key.split_first()?;
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let user = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
    let rest = &rest[2 + len..];
    let device = |rest: &[u8]| -> Option<(String, usize)> {
        let len = usize::from(*rest.first()?);
        let device = std::str::from_utf8(rest.get(1..1 + len)?).ok()?.to_owned();
        Some((device, 1 + len))
    };
    match tag {
        REGISTRY => {
            let (device, used) = device(rest)?;
            (used == rest.len()).then_some(if device.is_empty() {
                Key::DeviceCount { user }
            } else {
                Key::Device { user, device }
            })
        }
        CURSOR => {
            let (_, used) = device(rest)?;
            let channel = ChannelName::from_bytes(&rest[used..]).ok()?;
            Some(Key::Mark { user, channel })
        }
        MARKER => Some(Key::Mark {
            user,
            channel: ChannelName::from_bytes(rest).ok()?,
        }),
        _ => None,
    }
}

/// The channel named at the end of a marker key of `user` (as
/// [`marker_key`] builds it).
pub fn marker_channel(user: &str, key: &[u8]) -> Option<ChannelName> {
    let prefix = user_prefix(MARKER, user);
    key.strip_prefix(prefix.as_slice())
        .and_then(|name| ChannelName::from_bytes(name).ok())
}

/// `key` as partition `partition` keeps it (cluster).
pub fn in_partition(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + key.len());
    out.push(PARTITIONED);
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The partition and the key of a partition's key ([`in_partition`]).
pub fn split_partition(key: &[u8]) -> Option<(u32, &[u8])> {
    let rest = key.strip_prefix(&[PARTITIONED])?;
    let partition = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    Some((partition, &rest[4..]))
}

/// `range` within partition `partition`'s keys.
pub fn partition_range_of(partition: u32, range: (Vec<u8>, Vec<u8>)) -> (Vec<u8>, Vec<u8>) {
    (
        in_partition(partition, &range.0),
        in_partition(partition, &range.1),
    )
}

/// Every key partition `partition` keeps.
pub fn partition_range(partition: u32) -> (Vec<u8>, Vec<u8>) {
    prefix_range(in_partition(partition, &[]))
}

/// `[prefix, the first key after every key starting with prefix)`.
fn prefix_range(prefix: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.clone();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return (prefix, end);
        }
    }
    // All 0xff: nothing sorts after it but longer keys; the layout never
    // builds such a prefix (it starts with a tag below 0xff).
    (prefix, vec![u8::MAX; 4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use volna_proto::Epoch;

    fn channel(name: &str) -> ChannelName {
        ChannelName::new(name).expect("valid")
    }

    fn mark(offset: u64, channel_id: u64) -> Mark {
        Mark {
            offset: Offset::new(offset),
            channel_id,
            updated_ms: offset,
        }
    }

    #[test]
    fn a_mark_never_moves_backwards_within_its_channel() {
        assert_eq!(mark(5, 1).merge(mark(3, 1)).offset.get(), 5);
        assert_eq!(mark(5, 1).merge(mark(9, 1)).offset.get(), 9);
        // A newer incarnation replaces, an older one is ignored.
        assert_eq!(mark(5, 1).merge(mark(2, 7)), mark(2, 7));
        assert_eq!(mark(2, 7).merge(mark(50, 1)).offset.get(), 2);
        let m = mark(5, 1);
        assert_eq!(Mark::decode(&m.encode()), Some(m));
        assert_eq!(Mark::decode(&[1, 2, 3]), None);
    }

    const BY_ID: Incarnation = Incarnation::ChannelId;

    #[test]
    fn epochs_merge_by_offset_within_one_and_by_order_across() {
        let by = Incarnation::Epoch;
        let at = |offset: u64, epoch: u64, ms: u64| Mark {
            offset: Offset::new(offset),
            channel_id: epoch,
            updated_ms: ms,
        };
        assert_eq!(by.merge(at(5, 77, 10), at(3, 77, 20)).offset.get(), 5);
        assert_eq!(by.merge(at(5, 77, 10), at(9, 77, 5)).offset.get(), 9);
        // Another incarnation: what came later wins, whatever the (random)
        // epochs and whatever clock stamped it.
        assert_eq!(by.merge(at(5, 77, 10), at(2, 3, 20)), at(2, 3, 20));
        assert_eq!(by.merge(at(2, 3, 20), at(50, 77, 10)), at(50, 77, 10));
    }

    #[test]
    fn partition_keys_split_back_and_stay_in_their_range() {
        let key = marker_key("alice", &channel("chat.1"));
        let kept = in_partition(7, &key);
        assert_eq!(split_partition(&kept), Some((7, key.as_slice())));
        let (from, until) = partition_range(7);
        assert!(from <= kept && kept < until);
        assert!(!(from <= in_partition(8, &key) && in_partition(8, &key) < until));
        let (from, until) = partition_range_of(7, user_markers("alice"));
        assert!(from <= kept && kept < until);
        assert_eq!(split_partition(&key), None);
    }

    #[test]
    fn unread_counts_from_the_head_the_marker_and_retention() {
        let mut meta = ChannelMeta::new(4, Epoch(9));
        meta.next_offset = Offset::new(101);
        let none = unread(Some(&meta), None, 1000, BY_ID);
        assert_eq!((none.head, none.read, none.unread), (100, 0, 100));
        let read = unread(Some(&meta), Some(&mark(60, 4)), 1000, BY_ID);
        assert_eq!((read.read, read.unread), (60, 40));
        assert_eq!(
            unread(Some(&meta), Some(&mark(60, 4)), 10, BY_ID).unread,
            10
        );
        // A marker of a deleted incarnation does not count.
        assert_eq!(
            unread(Some(&meta), Some(&mark(60, 3)), 1000, BY_ID).unread,
            100
        );
        // In a cluster the epoch names the incarnation.
        let by_epoch = unread(Some(&meta), Some(&mark(60, 9)), 1000, Incarnation::Epoch);
        assert_eq!(by_epoch.read, 60);
        // Retention removed 1..=79: only what can still be read counts.
        meta.first_offset = Offset::new(80);
        assert_eq!(unread(Some(&meta), None, 1000, BY_ID).unread, 21);
        assert_eq!(
            unread(Some(&meta), Some(&mark(90, 4)), 1000, BY_ID).unread,
            10
        );
        assert_eq!(unread(None, Some(&mark(90, 4)), 1000, BY_ID).unread, 0);
    }

    #[test]
    fn keys_parse_back_and_ranges_hold_exactly_their_keys() {
        let phone = DeviceId::new("phone").expect("valid");
        let user = "alice";
        let c = cursor_key(user, &phone, &channel("chat.1"));
        assert_eq!(
            parse_key(&c),
            Some(Key::Mark {
                user: user.into(),
                channel: channel("chat.1")
            })
        );
        let (from, until) = device_cursors(user, &phone);
        assert!(from <= c && c < until);
        // Another device whose id extends this one's is outside the range.
        let other = cursor_key(
            user,
            &DeviceId::new("phone2").expect("valid"),
            &channel("a"),
        );
        assert!(!(from <= other && other < until));
        let m = marker_key(user, &channel("chat.1"));
        assert_eq!(marker_channel(user, &m), Some(channel("chat.1")));
        assert_eq!(marker_channel("alic", &m), None);
        let (from, until) = user_markers(user);
        assert!(from <= m && m < until);
        assert!(!(from <= c && c < until));
        let d = device_key(user, &phone);
        assert_eq!(
            parse_key(&d),
            Some(Key::Device {
                user: user.into(),
                device: "phone".into()
            })
        );
        let (from, until) = all_devices();
        assert!(from <= d && d < until && until <= all_marks().0);
        let count = device_count_key(user);
        assert!(count < d, "a user's count sorts before their devices");
        assert_eq!(
            parse_key(&count),
            Some(Key::DeviceCount { user: user.into() })
        );
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("a\nb").is_err());
        assert!(DeviceId::new(&"x".repeat(129)).is_err());
        assert_eq!(parse_key(b"zz"), None);
    }
}
