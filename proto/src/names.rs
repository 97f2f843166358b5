//! Newtypes for the values the protocol is about, validated where they enter.
//!
//! A [`ChannelName`] that exists has already been checked: 1–255 bytes of
//! UTF-8, dot-separated non-empty segments, no whitespace, control characters
//! or the wildcard characters `*` and `>` (reserved for grant patterns).

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

/// The longest channel name, in bytes.
pub const MAX_CHANNEL_NAME_LEN: usize = 255;

/// A validated channel name such as `chat.8812` or `user.42.inbox`.
///
/// Shared, not owned: every message delivered to an application carries
/// its channel's name, and a clone is a reference count, not an allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidChannelName {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than `MAX_CHANNEL_NAME_LEN` (255) bytes.
    #[error("channel name is {len} bytes, the limit is {MAX_CHANNEL_NAME_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A segment between dots is empty (`a..b`, `.a`, `a.`).
    #[error("channel name has an empty segment")]
    EmptySegment,
    /// The name holds a character that may not appear in a channel name.
    #[error("channel name contains the forbidden character {0:?}")]
    ForbiddenChar(char),
    /// The bytes are not UTF-8.
    #[error("channel name is not UTF-8")]
    NotUtf8,
}

impl ChannelName {
    /// Validates `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidChannelName> {
        let name = name.into();
        validate(&name)?;
        Ok(Self(name.into()))
    }

    /// Validates raw bytes from the wire.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidChannelName> {
        let s = std::str::from_utf8(bytes).map_err(|_| InvalidChannelName::NotUtf8)?;
        Self::new(s)
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first segment, which selects the namespace's configuration.
    pub fn namespace(&self) -> &str {
        self.0.split('.').next().unwrap_or(&self.0)
    }
}

fn validate(name: &str) -> Result<(), InvalidChannelName> {
    if name.is_empty() {
        return Err(InvalidChannelName::Empty);
    }
    if name.len() > MAX_CHANNEL_NAME_LEN {
        return Err(InvalidChannelName::TooLong { len: name.len() });
    }
    if name.split('.').any(str::is_empty) {
        return Err(InvalidChannelName::EmptySegment);
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'))
    {
        return Err(InvalidChannelName::ForbiddenChar(c));
    }
    Ok(())
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelName({:?})", self.0)
    }
}

impl std::str::FromStr for ChannelName {
    type Err = InvalidChannelName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A message's position in its channel. The first message of a channel is
/// offset 1; offset 0 never names a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offset(u64);

impl Offset {
    /// The offset of a channel's first message.
    pub const FIRST: Offset = Offset(1);

    /// Wraps a raw offset.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The offset after this one.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }

    /// This offset moved forward by `n`.
    pub const fn add(self, n: u64) -> Self {
        Self(self.0.saturating_add(n))
    }

    /// How many offsets lie in `[self, end)`; zero when `end <= self`.
    pub const fn distance_to(self, end: Offset) -> u64 {
        end.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One incarnation of a channel's log. A client resuming with another epoch
/// than the channel's current one is told the log was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Names one subscription within one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["chat.8812", "user.42.inbox", "news", "a-b_c:d@e.f"] {
            assert!(ChannelName::new(name).is_ok(), "{name}");
        }
        assert_eq!(
            ChannelName::new("user.42.inbox").map(|c| c.namespace().to_owned()),
            Ok("user".to_owned())
        );
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(ChannelName::new(""), Err(InvalidChannelName::Empty));
        assert_eq!(
            ChannelName::new("a".repeat(256)),
            Err(InvalidChannelName::TooLong { len: 256 })
        );
        assert_eq!(
            ChannelName::new("a..b"),
            Err(InvalidChannelName::EmptySegment)
        );
        assert_eq!(
            ChannelName::new(".a"),
            Err(InvalidChannelName::EmptySegment)
        );
        assert_eq!(
            ChannelName::new("a."),
            Err(InvalidChannelName::EmptySegment)
        );
        assert_eq!(
            ChannelName::new("a b"),
            Err(InvalidChannelName::ForbiddenChar(' '))
        );
        assert_eq!(
            ChannelName::new("news.>"),
            Err(InvalidChannelName::ForbiddenChar('>'))
        );
        assert_eq!(
            ChannelName::from_bytes(&[0xff, 0xfe]),
            Err(InvalidChannelName::NotUtf8)
        );
    }

    #[test]
    fn offsets_count_from_one() {
        assert_eq!(Offset::FIRST.get(), 1);
        assert_eq!(Offset::new(5).next(), Offset::new(6));
        assert_eq!(Offset::new(5).distance_to(Offset::new(9)), 4);
        assert_eq!(Offset::new(9).distance_to(Offset::new(5)), 0);
    }
}
