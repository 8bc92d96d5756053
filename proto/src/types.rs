//! Domain types that wire values become through `TryFrom`.

use std::fmt;
use std::sync::Arc;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 200;
/// Longest namespace (the part before the first `:`), in bytes.
pub const MAX_NAMESPACE_LEN: usize = 32;
/// Longest message id (idempotency key), in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 128;
/// Longest event name, in bytes.
pub const MAX_EVENT_NAME_LEN: usize = 128;

/// A validated channel name such as `chat:room-42`.
///
/// Grammar: 1 to 200 bytes of `A-Z a-z 0-9 _ - . : @ = , /`. When the name holds a `:`,
/// the part before the first one is the namespace: 1 to 32 bytes of `a-z 0-9 _ -`, and the
/// rest must not be empty. `*` and `>` are kept for capability patterns.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_CHANNEL_LEN`].
    #[error("channel name is {len} bytes; the limit is {MAX_CHANNEL_LEN}")]
    TooLong {
        /// Length of the refused name.
        len: usize,
    },
    /// The name holds a character outside the grammar.
    #[error("channel name has {ch:?} at byte {index}; allowed are A-Z a-z 0-9 _ - . : @ = , /")]
    InvalidChar {
        /// The refused character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
    /// The namespace before the `:` is empty or malformed.
    #[error("namespace {0:?} must be 1-{MAX_NAMESPACE_LEN} bytes of a-z 0-9 _ -")]
    InvalidNamespace(String),
    /// Nothing follows the namespace's `:`.
    #[error("channel name has nothing after its namespace")]
    EmptyName,
}

impl ChannelName {
    /// Parses and validates a channel name.
    pub fn parse(s: &str) -> Result<Self, ChannelNameError> {
        Self::validate(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// Checks a channel name against the grammar without allocating.
    pub fn validate(s: &str) -> Result<(), ChannelNameError> {
        if s.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if s.len() > MAX_CHANNEL_LEN {
            return Err(ChannelNameError::TooLong { len: s.len() });
        }
        if let Some((index, ch)) = s.char_indices().find(|&(_, c)| !is_channel_char(c)) {
            return Err(ChannelNameError::InvalidChar { ch, index });
        }
        if let Some((ns, rest)) = s.split_once(':') {
            validate_namespace(ns)?;
            if rest.is_empty() {
                return Err(ChannelNameError::EmptyName);
            }
        }
        Ok(())
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace (the part before the first `:`), or `""` for the default namespace.
    pub fn namespace(&self) -> &str {
        namespace_of(&self.0)
    }
}

/// Checks a namespace as configuration names it (`chat`, the part of `chat:room` before the
/// `:`): 1 to 32 bytes of `a-z 0-9 _ -`, the only namespaces a channel name can have.
pub fn validate_namespace(ns: &str) -> Result<(), ChannelNameError> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(ChannelNameError::InvalidNamespace(ns.to_owned())) }
}

/// The namespace of a channel name given as a string (the part before the first `:`, or
/// `""`).
pub fn namespace_of(channel: &str) -> &str {
    channel.split_once(':').map_or("", |(ns, _)| ns)
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '=' | ',' | '/')
}

/// Lets maps keyed by channel name be searched with a `&str` (same hash and equality).
impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ChannelName {
    type Error = ChannelNameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A node id: `region/name`, e.g. `eu-west/edge-1`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

/// A region id such as `eu-west`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(Arc<str>);

/// Why a region or node name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} must be 1-63 bytes of a-z 0-9 - and start with a letter or digit")]
pub struct NameError {
    what: &'static str,
    value: String,
}

fn check_label(what: &'static str, s: &str) -> Result<(), NameError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-');
    if ok { Ok(()) } else { Err(NameError { what, value: s.to_owned() }) }
}

impl RegionId {
    /// Parses a region id (a DNS-label-like name).
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_label("region", s)?;
        Ok(Self(Arc::from(s)))
    }
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl NodeId {
    /// Builds a node id from its region and a node name (a DNS-label-like name).
    pub fn new(region: &RegionId, name: &str) -> Result<Self, NameError> {
        check_label("node name", name)?;
        Ok(Self(Arc::from(format!("{}/{}", region.as_str(), name))))
    }
    /// Parses `region/name`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let Some((region, name)) = s.split_once('/') else {
            return Err(NameError { what: "node id (region/name)", value: s.to_owned() });
        };
        // Checked in place: every backbone frame names its origin.
        check_label("region", region)?;
        check_label("node name", name)?;
        Ok(Self(Arc::from(s)))
    }

    /// The region part.
    pub fn region(&self) -> &str {
        self.0.split_once('/').map_or("", |(r, _)| r)
    }

    /// The name part.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, n)| n)
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "{:?}", &*self.0) }
        }
    )*};
}
display_str!(NodeId, RegionId);

macro_rules! number {
    ($($(#[$doc:meta])* $t:ident),*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
        pub struct $t(pub u64);
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { self.0.fmt(f) }
        }
    )*};
}
number!(
    /// Id of one connection on a node.
    ConnectionId,
    /// A node's log epoch: changes when the node's log is lost.
    Epoch,
    /// An origin sequence number: 1, 2, 3… per (origin, channel, epoch).
    Seq,
    /// An offset in a node's channel log: 1, 2, 3… per (channel, epoch).
    Offset
);

/// Checks a client-chosen message id: 1 to [`MAX_MESSAGE_ID_LEN`] bytes, no control characters.
pub fn check_message_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_MESSAGE_ID_LEN {
        return Err(format!("message id is {} bytes; the limit is {MAX_MESSAGE_ID_LEN}", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err("message id holds a control character".into());
    }
    Ok(())
}

/// Checks an event name: at most [`MAX_EVENT_NAME_LEN`] bytes, no control characters.
pub fn check_event_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_EVENT_NAME_LEN {
        return Err(format!(
            "event name is {} bytes; the limit is {MAX_EVENT_NAME_LEN}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("event name holds a control character".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_grammar() {
        for ok in ["a", "chat:room-42", "x:y:z", "live/scores@v2", "ns_1-2:a.b=c,d"] {
            ChannelName::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(ChannelName::parse(""), Err(ChannelNameError::Empty));
        assert!(matches!(
            ChannelName::parse("a b"),
            Err(ChannelNameError::InvalidChar { ch: ' ', index: 1 })
        ));
        assert!(matches!(
            ChannelName::parse("chat:*"),
            Err(ChannelNameError::InvalidChar { ch: '*', .. })
        ));
        assert!(matches!(ChannelName::parse(":x"), Err(ChannelNameError::InvalidNamespace(_))));
        assert!(matches!(ChannelName::parse("Chat:x"), Err(ChannelNameError::InvalidNamespace(_))));
        assert_eq!(ChannelName::parse("chat:"), Err(ChannelNameError::EmptyName));
        assert!(matches!(
            ChannelName::parse(&"a".repeat(201)),
            Err(ChannelNameError::TooLong { len: 201 })
        ));
        assert_eq!(ChannelName::parse("chat:room").unwrap().namespace(), "chat");
        assert_eq!(ChannelName::parse("room").unwrap().namespace(), "");
    }

    #[test]
    fn node_ids() {
        let r = RegionId::parse("eu-west").unwrap();
        assert_eq!(NodeId::new(&r, "edge-1").unwrap().as_str(), "eu-west/edge-1");
        assert!(RegionId::parse("EU").is_err());
        assert!(NodeId::new(&r, "a/b").is_err());
        let parsed = NodeId::parse("eu-west/edge-1").unwrap();
        assert_eq!(parsed, NodeId::new(&r, "edge-1").unwrap());
        assert_eq!((parsed.region(), parsed.name()), ("eu-west", "edge-1"));
        for bad in ["eu-west", "/edge-1", "eu-west/", "EU/edge-1", "eu-west/a/b", "-x/y", "x/-y"] {
            assert!(NodeId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
