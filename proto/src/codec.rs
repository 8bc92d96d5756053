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
    &["connect", "subscribe", "unsubscribe", "publish", "heartbeat", "history", "auth", "presence"];
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
    "session",
    "close",
    "presence",
    "presenceReply",
    "draining",
];

/// The client frames that are requests (they carry `requestId`, field 1 of each, and most
/// a `channel`, field 2).
const REQUEST_KINDS: &[&str] =
    &["subscribe", "unsubscribe", "publish", "history", "auth", "presence"];

/// What can be read of a client request that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestOf {
    /// The request's kind as the JSON key names it (`publish`, `subscribe`, …).
    pub kind: &'static str,
    /// Its `requestId` (never 0).
    pub request_id: u32,
    /// Empty when unreadable, and for `auth`.
    pub channel: String,
}

/// The kind, `requestId` and `channel` of a client request that did not decode, as far as
/// they can be read, so that the answer names the request (every request gets its one
/// answer, even a malformed one). `None` when the frame is not recognisably a request or
/// its `requestId` cannot be read.
///
/// JSON is read without decoding the request's other values (a lone surrogate escape in a
/// text, say, does not hide its `requestId`); both `requestId` and `request_id` are read.
pub fn request_of(payload: &[u8], text: bool) -> Option<RequestOf> {
    use serde_json::value::RawValue;
    type Fields<'a> = std::collections::BTreeMap<&'a str, &'a RawValue>;
    if text {
        let frame: Fields<'_> = serde_json::from_slice(payload).ok()?;
        let (kind, body) = frame.iter().next().filter(|_| frame.len() == 1)?;
        let kind = *REQUEST_KINDS.iter().find(|k| *k == kind)?;
        let body: Fields<'_> = serde_json::from_str(body.get()).ok()?;
        let raw = body.get("requestId").or_else(|| body.get("request_id"))?;
        let id = match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        };
        let request_id = u32::try_from(id?).ok().filter(|&id| id != 0)?;
        let channel = match (kind, body.get("channel")) {
            ("auth", _) | (_, None) => String::new(),
            (_, Some(c)) => serde_json::from_str::<String>(c.get()).unwrap_or_default(),
        };
        Some(RequestOf { kind, request_id, channel })
    } else {
        // The same frame read leniently: the request as bytes, then only its first two fields.
        let frame = RawClientFrame::decode(payload).ok()?;
        let (body, kind) = [
            (&frame.subscribe, "subscribe"),
            (&frame.unsubscribe, "unsubscribe"),
            (&frame.publish, "publish"),
            (&frame.history, "history"),
            (&frame.auth, "auth"),
            (&frame.presence, "presence"),
        ]
        .into_iter()
        .find_map(|(b, kind)| b.as_ref().map(|b| (b, kind)))?;
        let head = RequestHead::decode(body.as_slice()).ok()?;
        let request_id = Some(head.request_id).filter(|&id| id != 0)?;
        let channel = if kind == "auth" {
            String::new()
        } else {
            String::from_utf8(head.channel).unwrap_or_default()
        };
        Some(RequestOf { kind, request_id, channel })
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
    #[prost(bytes = "vec", optional, tag = "7")]
    presence: Option<Vec<u8>>,
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

/// The bytes `message` takes as one entry of a frame's message list in `format` (as in
/// `Deliver.messages` or `HistoryPage.messages`), separator included.
pub fn message_entry_len(message: &Message, format: Format) -> usize {
    match format {
        Format::Protobuf => {
            let len = message.encoded_len();
            1 + prost::encoding::encoded_len_varint(len as u64) + len
        }
        Format::Json => {
            /// Counts what serialising writes, keeping none of it.
            struct Count(usize);
            impl std::io::Write for Count {
                fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                    self.0 += buf.len();
                    Ok(buf.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            let mut count = Count(0);
            let _ = serde_json::to_writer(&mut count, message);
            count.0 + 1
        }
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

    /// The schema as compiled by the build script.
    fn schema() -> prost_types::FileDescriptorSet {
        let bytes = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
        prost_types::FileDescriptorSet::decode(&bytes[..]).unwrap()
    }

    /// The frame kinds of `message` (its `kind` oneof) as the JSON mapping names them, each
    /// with its message type.
    fn kinds_of(set: &prost_types::FileDescriptorSet, message: &str) -> Vec<(String, String)> {
        let m = set
            .file
            .iter()
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == message)
            .unwrap_or_else(|| panic!("{message} in the schema"));
        let kind = m.oneof_decl.iter().position(|o| o.name() == "kind").unwrap() as i32;
        m.field
            .iter()
            .filter(|f| f.oneof_index == Some(kind))
            .map(|f| (f.json_name().to_owned(), f.type_name().rsplit('.').next().unwrap().into()))
            .collect()
    }

    fn sorted(names: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut n: Vec<String> = names.into_iter().collect();
        n.sort();
        n
    }

    /// The frame-kind lists the decoder consults are the schema's, every kind of them: a
    /// kind missing from them reads as UNKNOWN_FRAME, or leaves a malformed request
    /// unanswered by name.
    #[test]
    fn the_decoder_knows_every_frame_kind_of_the_schema() {
        let set = schema();
        let listed = |l: &[&str]| sorted(l.iter().map(|k| (*k).to_owned()));
        let client = kinds_of(&set, "ClientFrame");
        assert_eq!(sorted(client.iter().map(|(k, _)| k.clone())), listed(CLIENT_KINDS));
        let server = kinds_of(&set, "ServerFrame");
        assert_eq!(sorted(server.iter().map(|(k, _)| k.clone())), listed(SERVER_KINDS));
        // Requests are the client kinds whose message starts with `request_id`; a malformed
        // one names itself in both encodings.
        let starts_with_id = |ty: &str| {
            set.file.iter().flat_map(|f| &f.message_type).any(|m| {
                m.name() == ty
                    && m.field.iter().any(|f| f.number() == 1 && f.name() == "request_id")
            })
        };
        let requests: Vec<String> =
            client.into_iter().filter(|(_, ty)| starts_with_id(ty)).map(|(k, _)| k).collect();
        assert_eq!(sorted(requests.clone()), listed(REQUEST_KINDS));
        for kind in &requests {
            let json = format!(r#"{{"{kind}":{{"requestId":7,"channel":"chat:a","frob":1}}}}"#);
            assert!(decode_client(json.as_bytes(), true).is_err(), "{kind}: malformed");
            let of = request_of(json.as_bytes(), true).unwrap_or_else(|| panic!("{kind}: JSON"));
            assert_eq!((of.kind, of.request_id), (kind.as_str(), 7));
            // The same request in protobuf, read through the lenient reader.
            let valid = format!(r#"{{"{kind}":{{"requestId":7}}}}"#);
            let frame = decode_client(valid.as_bytes(), true).unwrap();
            let proto = encode_client(frame, Format::Protobuf);
            let of = request_of(&proto, false).unwrap_or_else(|| panic!("{kind}: protobuf"));
            assert_eq!((of.kind, of.request_id), (kind.as_str(), 7));
        }
    }

    #[test]
    fn a_malformed_request_still_names_itself() {
        let of = |p: &[u8], text| request_of(p, text);
        // A lone surrogate (a cut emoji) makes the frame undecodable, not its id unreadable.
        let lone = br#"{"publish":{"requestId":7,"channel":"chat:a","text":"\ud83d"}}"#;
        assert!(decode_client(lone, true).is_err());
        let want = RequestOf { kind: "publish", request_id: 7, channel: "chat:a".into() };
        assert_eq!(of(lone, true), Some(want));
        let snake = br#"{"subscribe":{"request_id":"8","channel":5}}"#;
        let want = RequestOf { kind: "subscribe", request_id: 8, channel: String::new() };
        assert_eq!(of(snake, true), Some(want));
        assert_eq!(of(br#"{"heartbeat":{"requestId":3}}"#, true), None, "not a request");
        assert_eq!(of(br#"{"history":{"requestId":0}}"#, true), None, "0 names no request");
        assert_eq!(of(br#"{"history":{"requestId":4294967296}}"#, true), None);
        assert_eq!(of(b"{nope", true), None);
        // Protobuf: a publish whose text is not valid UTF-8.
        let mut body = RequestHead { request_id: 9, channel: b"log:x".to_vec() }.encode_to_vec();
        body.extend([(5 << 3) | 2, 2, 0xff, 0xfe]);
        let frame = RawClientFrame { publish: Some(body), ..RawClientFrame::default() };
        let bytes = frame.encode_to_vec();
        assert!(decode_client(&bytes, false).is_err());
        let want = RequestOf { kind: "publish", request_id: 9, channel: "log:x".into() };
        assert_eq!(of(&bytes, false), Some(want));
    }

    #[test]
    fn a_message_entry_is_what_it_adds_to_a_page() {
        let page = |messages: Vec<Message>, format| {
            let page =
                HistoryPage { request_id: 7, channel: "log:a".into(), messages, next_from: None };
            encode_server(server_frame::Kind::History(page), format).len()
        };
        let m = Message {
            channel: "log:a".into(),
            id: "x-1".into(),
            data: Some(message::Data::Text("\u{1F600}\"\n".repeat(300))),
            origin_seq: 12_345,
            ..Message::default()
        };
        for format in [Format::Json, Format::Protobuf] {
            let one = page(vec![m.clone()], format);
            let two = page(vec![m.clone(), m.clone()], format);
            assert_eq!(two - one, message_entry_len(&m, format), "{format:?}");
            // The first one also brings the list's key (JSON omits an empty list).
            let first = one - page(Vec::new(), format);
            assert!(first <= message_entry_len(&m, format) + 16, "{format:?}: {first}");
        }
    }

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
                resume: None,
                presence: false
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
        // Field 15, unknown, empty length-delimited.
        assert_eq!(
            decode_client(&[0x7a, 0x00], false),
            Err(DecodeError::UnknownFrame("(none)".into()))
        );
        assert!(matches!(
            decode_client(&[0xff, 0xff, 0xff], false),
            Err(DecodeError::Malformed(_))
        ));
    }
}
