//! Frame encoding and decoding for both wire formats.
//!
//! Decoding reports [`DecodeError`]s that map to the protocol's error codes, so a node can
//! answer a bad frame with an `Error` frame and keep the connection. [`EncodedMessage`] and
//! [`deliver_frame`] implement the fan-out rule "encode once per wire format, share the
//! bytes": a message is serialised once per format, and a `Deliver` frame carrying one or
//! many messages is assembled from those shared pieces without re-encoding.

use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::client::{ClientFrame, ErrorCode, Message, ServerFrame, client_frame, server_frame};

/// The two wire formats of the client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Proto3 canonical JSON in WebSocket text frames.
    Json,
    /// Protobuf in WebSocket binary frames.
    Protobuf,
}

impl Format {
    /// Parses `json` / `proto` / `protobuf` (as used in the `format` query parameter).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "proto" | "protobuf" => Some(Self::Protobuf),
            _ => None,
        }
    }
}

/// Why a frame could not be decoded. Both are the peer's fault; the connection survives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not valid JSON / protobuf for the frame schema.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Well-formed, but of a frame type this node does not know.
    #[error("unknown frame type {0:?}")]
    UnknownFrame(String),
}

impl DecodeError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) => ErrorCode::BadFrame,
            Self::UnknownFrame(_) => ErrorCode::UnknownFrame,
        }
    }
}

const CLIENT_KINDS: &[&str] =
    &["connect", "subscribe", "unsubscribe", "publish", "heartbeat", "history", "auth"];
const SERVER_KINDS: &[&str] = &[
    "connected",
    "subscribed",
    "unsubscribed",
    "ack",
    "nack",
    "deliver",
    "heartbeat",
    "error",
    "history",
    "discontinuity",
    "authRenewed",
];

/// The client frames that are requests (they carry `requestId`, field 1 of each, and most
/// a `channel`, field 2).
const REQUEST_KINDS: &[&str] = &["subscribe", "unsubscribe", "publish", "history", "auth"];

/// The `requestId` and `channel` of a client request that did not decode, as far as they can
/// be read, so that the `Error` answering it names the request (every request gets its one
/// answer, even a malformed one). `None` when the frame is not recognisably a request or its
/// `requestId` cannot be read.
pub fn request_of(payload: &[u8], text: bool) -> Option<(u32, String)> {
    if text {
        let serde_json::Value::Object(frame) = serde_json::from_slice(payload).ok()? else {
            return None;
        };
        let (kind, body) = frame.iter().next().filter(|_| frame.len() == 1)?;
        if !REQUEST_KINDS.contains(&kind.as_str()) {
            return None;
        }
        let id = match body.get("requestId")? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        };
        let id = u32::try_from(id?).ok().filter(|&id| id != 0)?;
        let channel = match (kind.as_str(), body.get("channel")) {
            ("auth", _) => String::new(),
            (_, Some(serde_json::Value::String(c))) => c.clone(),
            _ => String::new(),
        };
        Some((id, channel))
    } else {
        // The same frame read leniently: the request as bytes, then only its first two fields.
        let frame = RawClientFrame::decode(payload).ok()?;
        let (body, channel) = [
            (&frame.subscribe, true),
            (&frame.unsubscribe, true),
            (&frame.publish, true),
            (&frame.history, true),
            (&frame.auth, false),
        ]
        .into_iter()
        .find_map(|(b, channel)| b.as_ref().map(|b| (b, channel)))?;
        let head = RequestHead::decode(body.as_slice()).ok()?;
        let id = Some(head.request_id).filter(|&id| id != 0)?;
        let channel = if channel {
            String::from_utf8(head.channel).unwrap_or_default()
        } else {
            String::new()
        };
        Some((id, channel))
    }
}

/// [`ClientFrame`] with its requests left undecoded.
#[derive(Clone, PartialEq, prost::Message)]
struct RawClientFrame {
    #[prost(bytes = "vec", optional, tag = "2")]
    subscribe: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    unsubscribe: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "4")]
    publish: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "6")]
    history: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "8")]
    auth: Option<Vec<u8>>,
}

/// The fields every request starts with.
#[derive(Clone, PartialEq, prost::Message)]
struct RequestHead {
    #[prost(uint32, tag = "1")]
    request_id: u32,
    #[prost(bytes = "vec", tag = "2")]
    channel: Vec<u8>,
}

fn decode_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    kinds: &[&str],
) -> Result<T, DecodeError> {
    serde_json::from_slice::<T>(bytes).map_err(|err| {
        // Tell an unknown frame type apart from a malformed known one.
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(bytes) {
            if let Some(k) = map.keys().find(|k| !kinds.contains(&k.as_str())) {
                return DecodeError::UnknownFrame(k.clone());
            }
        }
        DecodeError::Malformed(err.to_string())
    })
}

/// Decodes a client frame. `text` says whether it came in a text (JSON) or binary
/// (protobuf) WebSocket frame.
pub fn decode_client(payload: &[u8], text: bool) -> Result<client_frame::Kind, DecodeError> {
    let frame: ClientFrame = if text {
        decode_json(payload, CLIENT_KINDS)?
    } else {
        ClientFrame::decode(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?
    };
    frame.kind.ok_or_else(|| DecodeError::UnknownFrame("(none)".into()))
}

/// Decodes a server frame (used by clients).
pub fn decode_server(payload: &[u8], text: bool) -> Result<server_frame::Kind, DecodeError> {
    let frame: ServerFrame = if text {
        decode_json(payload, SERVER_KINDS)?
    } else {
        ServerFrame::decode(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?
    };
    frame.kind.ok_or_else(|| DecodeError::UnknownFrame("(none)".into()))
}

/// Encodes a server frame in `format`.
pub fn encode_server(kind: server_frame::Kind, format: Format) -> Bytes {
    encode(&ServerFrame { kind: Some(kind) }, format)
}

/// Encodes a client frame in `format`.
pub fn encode_client(kind: client_frame::Kind, format: Format) -> Bytes {
    encode(&ClientFrame { kind: Some(kind) }, format)
}

fn encode<T: prost::Message + serde::Serialize>(frame: &T, format: Format) -> Bytes {
    match format {
        Format::Protobuf => frame.encode_to_vec().into(),
        // Serialising generated types into a Vec cannot fail.
        Format::Json => serde_json::to_vec(frame).map(Bytes::from).unwrap_or_default(),
    }
}

/// A message encoded at most once per wire format, shared by every subscriber.
///
/// Each form is computed on first use, so a node with only protobuf subscribers never
/// builds JSON.
#[derive(Debug)]
pub struct EncodedMessage {
    message: Message,
    /// `Deliver.messages` entry: field tag, length, message bytes.
    proto_entry: OnceLock<Bytes>,
    /// The message as a JSON object.
    json: OnceLock<Bytes>,
}

/// Protobuf key of `ServerFrame.deliver` (field 6, length-delimited).
const DELIVER_KEY: u8 = (6 << 3) | 2;
/// Protobuf key of `Deliver.messages` (field 1, length-delimited).
const MESSAGES_KEY: u8 = (1 << 3) | 2;
const JSON_DELIVER_HEAD: &[u8] = br#"{"deliver":{"messages":["#;
const JSON_DELIVER_TAIL: &[u8] = b"]}}";

impl EncodedMessage {
    /// Wraps a message for encoding.
    pub fn new(message: Message) -> Self {
        Self { message, proto_entry: OnceLock::new(), json: OnceLock::new() }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message's piece of a `Deliver` frame in `format`.
    pub fn piece(&self, format: Format) -> &Bytes {
        match format {
            Format::Protobuf => self.proto_entry.get_or_init(|| {
                let len = self.message.encoded_len();
                let mut buf = BytesMut::with_capacity(1 + 10 + len);
                buf.put_u8(MESSAGES_KEY);
                prost::encoding::encode_varint(len as u64, &mut buf);
                self.message.encode_raw(&mut buf);
                buf.freeze()
            }),
            Format::Json => self.json.get_or_init(|| {
                serde_json::to_vec(&self.message).map(Bytes::from).unwrap_or_default()
            }),
        }
    }

    /// The message alone, protobuf-encoded: a slice of the cached `Deliver` piece, so
    /// replication shares the bytes fan-out already made.
    pub fn protobuf(&self) -> Bytes {
        let piece = self.piece(Format::Protobuf);
        piece.slice(piece.len() - self.message.encoded_len()..)
    }

    /// Size of the message's piece in `format` (encodes it if needed).
    pub fn piece_len(&self, format: Format) -> usize {
        self.piece(format).len()
    }
}

/// Builds one `Deliver` frame carrying `messages` in order, from their shared pieces.
pub fn deliver_frame<'a, I>(messages: I, format: Format) -> Bytes
where
    I: IntoIterator<Item = &'a EncodedMessage>,
    I::IntoIter: Clone,
{
    let iter = messages.into_iter();
    match format {
        Format::Protobuf => {
            let body: usize = iter.clone().map(|m| m.piece_len(format)).sum();
            let mut buf = BytesMut::with_capacity(1 + 10 + body);
            buf.put_u8(DELIVER_KEY);
            prost::encoding::encode_varint(body as u64, &mut buf);
            for m in iter {
                buf.put_slice(m.piece(format));
            }
            buf.freeze()
        }
        Format::Json => {
            let body: usize = iter.clone().map(|m| m.piece_len(format) + 1).sum();
            let mut buf =
                BytesMut::with_capacity(JSON_DELIVER_HEAD.len() + body + JSON_DELIVER_TAIL.len());
            buf.put_slice(JSON_DELIVER_HEAD);
            for (i, m) in iter.enumerate() {
                if i > 0 {
                    buf.put_u8(b',');
                }
                buf.put_slice(m.piece(format));
            }
            buf.put_slice(JSON_DELIVER_TAIL);
            buf.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::*;

    #[test]
    fn unknown_and_malformed_json() {
        assert_eq!(
            decode_client(br#"{"frobnicate":{}}"#, true),
            Err(DecodeError::UnknownFrame("frobnicate".into()))
        );
        assert!(matches!(decode_client(b"{nope", true), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode_client(br#"{"subscribe":{"channel":5}}"#, true),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode_client(b"{}", true), Err(DecodeError::UnknownFrame(_))));
        let ok = decode_client(br#"{"subscribe":{"requestId":3,"channel":"a:b"}}"#, true);
        assert_eq!(
            ok,
            Ok(client_frame::Kind::Subscribe(Subscribe {
                request_id: 3,
                channel: "a:b".into(),
                rewind: None,
                resume: None
            }))
        );
    }

    #[test]
    fn protobuf_slice_is_the_message() {
        let m = Message { channel: "c".into(), origin_seq: 300, ..Default::default() };
        let e = EncodedMessage::new(m.clone());
        assert_eq!(Message::decode(e.protobuf()).unwrap(), m);
    }

    #[test]
    fn unknown_protobuf_field_is_unknown_frame() {
        // Field 7 (reserved for presence), empty length-delimited.
        assert_eq!(
            decode_client(&[0x3a, 0x00], false),
            Err(DecodeError::UnknownFrame("(none)".into()))
        );
        assert!(matches!(
            decode_client(&[0xff, 0xff, 0xff], false),
            Err(DecodeError::Malformed(_))
        ));
    }
}
