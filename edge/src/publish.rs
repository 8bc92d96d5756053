//! Publishing, shared by the WebSocket session and the HTTP API: parse → apply, with the
//! errors mapped to the wire in one place.

use tern_proto::client::{self, ErrorCode, OriginPosition, message, publish};
use tern_proto::types::{ChannelName, ChannelNameError, check_event_name, check_message_id};

use crate::channel::{Accepted, NewMessage};
use crate::node::Node;

/// A publish as received, before validation.
#[derive(Debug, Default)]
pub struct PublishRequest {
    /// Channel name as sent.
    pub channel: String,
    /// Client-chosen id, or empty.
    pub id: String,
    /// Event name.
    pub name: String,
    /// Payload.
    pub data: Option<publish::Data>,
    /// The publisher's previous message on the channel (`Publish.after`), if it sent one.
    pub after: Option<OriginPosition>,
}

/// Why a publish was refused. Always the publisher's fault; retrying unchanged won't help.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel name breaks the grammar.
    #[error("invalid channel: {0}")]
    InvalidChannel(#[from] ChannelNameError),
    /// The message id or event name is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The node holds `limits.max_channels` channels; this would be a new one.
    #[error("the node holds its limit of {0} channels; publish to an existing channel")]
    TooManyChannels(usize),
    /// This node cannot do what the publish asks (a replicated publish without a backbone).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The payload is over the limit.
    #[error("payload is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl PublishError {
    /// The protocol error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidChannel(_) => ErrorCode::InvalidChannel,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::TooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::TooManyChannels(_) => ErrorCode::TooManyChannels,
            Self::Unsupported(_) => ErrorCode::Unsupported,
        }
    }

    /// The HTTP status for the HTTP API.
    pub fn http_status(&self) -> http::StatusCode {
        match self {
            Self::TooLarge { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyChannels(_) => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a publish as sent, whatever the surface, before anything else is asked of it:
/// the channel name (`INVALID_CHANNEL`), then the message id, event name, `after`, and
/// durability (`INVALID_ARGUMENT`), then the payload's size (`MESSAGE_TOO_LARGE`). Only
/// then come the token's capabilities, what this node supports ([`supported`]), the rate
/// limits and the publish itself.
pub fn check(node: &Node, p: &client::Publish) -> Result<(), PublishError> {
    ChannelName::validate(&p.channel)?;
    check_message_id(&p.id).map_err(PublishError::InvalidArgument)?;
    check_event_name(&p.name).map_err(PublishError::InvalidArgument)?;
    check_after(p.after.as_ref()).map_err(PublishError::InvalidArgument)?;
    if client::Durability::try_from(p.durability).is_err() {
        // A durability this node does not know is refused, not weakened to the default.
        let reason = format!("durability {} is not one this node knows", p.durability);
        return Err(PublishError::InvalidArgument(reason));
    }
    let max = node.settings().config.limits.max_message_bytes_for(&p.channel);
    let len = match &p.data {
        Some(publish::Data::Text(t)) => t.len(),
        Some(publish::Data::Binary(b)) => b.len(),
        None => 0,
    };
    if len > max {
        return Err(PublishError::TooLarge { len, max });
    }
    Ok(())
}

/// Whether this node can publish with `durability` (after [`check`] and the capabilities).
pub fn supported(node: &Node, durability: i32) -> Result<(), PublishError> {
    if durability == client::Durability::Replicated as i32 && !node.hub().replicates() {
        return Err(PublishError::Unsupported(
            "this node has no backbone: no other region can hold the message",
        ));
    }
    Ok(())
}

/// Checks a `Publish.after`: an origin that is a node id (or empty: none).
pub fn check_after(after: Option<&OriginPosition>) -> Result<(), String> {
    match after {
        Some(a) if !a.origin.is_empty() => tern_proto::types::NodeId::parse(&a.origin)
            .map(|_| ())
            .map_err(|e| format!("after.origin: {e}")),
        _ => Ok(()),
    }
}

/// Publishes a request that passed [`check`] (both surfaces check it first, in the one
/// order of checks). Returns the ack contents.
pub fn publish(
    node: &Node,
    req: PublishRequest,
    client_id: &str,
) -> Result<Accepted, PublishError> {
    let data = match req.data {
        Some(publish::Data::Text(t)) => Some(message::Data::Text(t)),
        Some(publish::Data::Binary(b)) => Some(message::Data::Binary(b)),
        None => None,
    };
    // Resolved before the channel name moves into the hub.
    let counted = node.metrics().publishes_of(tern_proto::types::namespace_of(&req.channel));
    let msg = NewMessage {
        id: (!req.id.is_empty()).then_some(req.id),
        name: req.name,
        data,
        client_id: client_id.to_owned(),
        after: req.after.filter(|a| !a.origin.is_empty()),
    };
    let accepted = node
        .hub()
        .publish(req.channel, msg)
        .ok_or_else(|| PublishError::TooManyChannels(node.settings().config.limits.max_channels))?;
    if let Some(c) = counted.filter(|_| !accepted.duplicate) {
        c.inc();
    }
    Ok(accepted)
}
