//! Backbone frames on the wire: the core's [`Frame`] ↔ `tern.backbone.v1.BackboneFrame`,
//! and the length-delimited framing used on QUIC streams.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message as _;
use tern_proto::backbone::{self as pb, backbone_frame::Kind};
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::{Change, Frame, Have, MemberKey, PresenceFrame, Want};

/// Largest backbone frame accepted, in bytes.
pub const MAX_FRAME: usize = 1 << 20;

/// Why a backbone frame was refused. The peer's fault; the link is closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not a valid protobuf frame.
    #[error("malformed backbone frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Empty or unknown frame type.
    #[error("unknown backbone frame type")]
    Unknown,
    /// A channel or node id breaks its grammar.
    #[error("invalid name in backbone frame: {0}")]
    Name(String),
    /// Larger than [`MAX_FRAME`].
    #[error("backbone frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The stream failed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

fn channel(s: String) -> Result<ChannelName, WireError> {
    ChannelName::parse(&s).map_err(|e| WireError::Name(e.to_string()))
}

/// The names a lane's last data frame carried: a run of one channel's messages from one
/// origin (the common case on a lane) is parsed and validated once, and shares one
/// allocation per name.
#[derive(Debug, Default)]
struct Names {
    origin: Option<NodeId>,
    channel: Option<ChannelName>,
}

impl Names {
    fn origin(&mut self, s: &str) -> Result<NodeId, WireError> {
        if let Some(o) = self.origin.as_ref().filter(|o| o.as_str() == s) {
            return Ok(o.clone());
        }
        let o = NodeId::parse(s).map_err(|e| WireError::Name(e.to_string()))?;
        self.origin = Some(o.clone());
        Ok(o)
    }

    fn channel(&mut self, s: String) -> Result<ChannelName, WireError> {
        if let Some(c) = self.channel.as_ref().filter(|c| c.as_str() == s) {
            return Ok(c.clone());
        }
        let c = channel(s)?;
        self.channel = Some(c.clone());
        Ok(c)
    }
}

impl From<&Frame> for pb::BackboneFrame {
    fn from(f: &Frame) -> Self {
        let kind = match f {
            Frame::Hello { epoch, have, want } => Kind::Hello(pb::Hello {
                epoch: epoch.0,
                have: have
                    .iter()
                    .map(|h| pb::Have {
                        channel: h.channel.to_string(),
                        epoch: h.epoch.0,
                        delivered: h.delivered.0,
                        generation: h.generation,
                    })
                    .collect(),
                want: want
                    .iter()
                    .map(|w| pb::Want { channel: w.channel.to_string(), generation: w.generation })
                    .collect(),
            }),
            Frame::Interest { channel, generation, withdraw } => Kind::Interest(pb::Interest {
                channel: channel.to_string(),
                generation: *generation,
                withdraw: *withdraw,
            }),
            Frame::Start { channel, epoch, after, generation } => Kind::Start(pb::Start {
                channel: channel.to_string(),
                epoch: epoch.0,
                after: after.0,
                generation: *generation,
            }),
            Frame::Heartbeat { epoch, greeted, caught_up } => Kind::Heartbeat(pb::Heartbeat {
                epoch: epoch.0,
                greeted: *greeted,
                caught_up: *caught_up,
            }),
            Frame::HeadRequest { channel, nonce } => {
                Kind::HeadRequest(pb::HeadRequest { channel: channel.to_string(), nonce: *nonce })
            }
            Frame::Head { channel, epoch, seq, nonce } => Kind::Head(pb::Head {
                channel: channel.to_string(),
                epoch: epoch.0,
                seq: seq.0,
                nonce: *nonce,
            }),
            Frame::End { channel, epoch, last, next } => Kind::End(pb::End {
                channel: channel.to_string(),
                epoch: epoch.0,
                last: last.map(|s| s.0),
                next: next.0,
            }),
            Frame::Data { origin, epoch, channel, seq, payload } => Kind::Data(pb::Data {
                origin: origin.to_string(),
                epoch: epoch.0,
                channel: channel.to_string(),
                seq: seq.0,
                payload: payload.clone(),
            }),
            Frame::Ack { channel, epoch, seq } => {
                Kind::Ack(pb::Ack { channel: channel.to_string(), epoch: epoch.0, seq: seq.0 })
            }
            Frame::Nack { channel, epoch, from, to } => Kind::Nack(pb::Nack {
                channel: channel.to_string(),
                epoch: epoch.0,
                from: from.0,
                to: to.0,
            }),
            Frame::Presence(p) => Kind::Presence(presence_to_pb(p)),
            Frame::Gone { channel, epoch, through } => Kind::Gone(pb::Gone {
                channel: channel.to_string(),
                epoch: epoch.0,
                through: through.0,
            }),
        };
        pb::BackboneFrame { kind: Some(kind) }
    }
}

impl TryFrom<pb::BackboneFrame> for Frame {
    type Error = WireError;
    fn try_from(f: pb::BackboneFrame) -> Result<Self, WireError> {
        convert(f, &mut Names::default())
    }
}

fn convert(f: pb::BackboneFrame, names: &mut Names) -> Result<Frame, WireError> {
    Ok(match f.kind.ok_or(WireError::Unknown)? {
        Kind::Hello(h) => Frame::Hello {
            epoch: Epoch(h.epoch),
            have: h
                .have
                .into_iter()
                .map(|h| {
                    Ok(Have {
                        channel: channel(h.channel)?,
                        epoch: Epoch(h.epoch),
                        delivered: Seq(h.delivered),
                        generation: h.generation,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            want: h
                .want
                .into_iter()
                .map(|w| Ok(Want { channel: channel(w.channel)?, generation: w.generation }))
                .collect::<Result<_, WireError>>()?,
        },
        Kind::Interest(i) => Frame::Interest {
            channel: channel(i.channel)?,
            generation: i.generation,
            withdraw: i.withdraw,
        },
        Kind::Start(s) => Frame::Start {
            channel: channel(s.channel)?,
            epoch: Epoch(s.epoch),
            after: Seq(s.after),
            generation: s.generation,
        },
        Kind::Heartbeat(h) => {
            Frame::Heartbeat { epoch: Epoch(h.epoch), greeted: h.greeted, caught_up: h.caught_up }
        }
        Kind::HeadRequest(h) => Frame::HeadRequest { channel: channel(h.channel)?, nonce: h.nonce },
        Kind::Head(h) => Frame::Head {
            channel: channel(h.channel)?,
            epoch: Epoch(h.epoch),
            seq: Seq(h.seq),
            nonce: h.nonce,
        },
        Kind::End(e) => Frame::End {
            channel: channel(e.channel)?,
            epoch: Epoch(e.epoch),
            last: e.last.map(Seq),
            next: Epoch(e.next),
        },
        Kind::Data(d) => Frame::Data {
            origin: names.origin(&d.origin)?,
            epoch: Epoch(d.epoch),
            channel: names.channel(d.channel)?,
            seq: Seq(d.seq),
            payload: d.payload,
        },
        Kind::Ack(a) => {
            Frame::Ack { channel: channel(a.channel)?, epoch: Epoch(a.epoch), seq: Seq(a.seq) }
        }
        Kind::Nack(n) => Frame::Nack {
            channel: channel(n.channel)?,
            epoch: Epoch(n.epoch),
            from: Seq(n.from),
            to: Seq(n.to),
        },
        Kind::Gone(g) => Frame::Gone {
            channel: channel(g.channel)?,
            epoch: Epoch(g.epoch),
            through: Seq(g.through),
        },
        Kind::Presence(p) => Frame::Presence(presence_from_pb(p)?),
    })
}

fn member_to_pb(key: &MemberKey, data: &Bytes) -> pb::PresenceMember {
    pb::PresenceMember {
        client_id: key.client_id.clone(),
        connection_id: key.connection_id.clone(),
        data: data.clone(),
    }
}

fn member_from_pb(m: pb::PresenceMember) -> (MemberKey, Bytes) {
    (MemberKey { client_id: m.client_id, connection_id: m.connection_id }, m.data)
}

fn presence_to_pb(f: &PresenceFrame) -> pb::PresenceFrame {
    use pb::presence_frame::Kind as P;
    let kind = match f {
        PresenceFrame::Digest { epoch, as_of, channels, after, until } => {
            P::Digest(pb::PresenceDigest {
                epoch: epoch.0,
                as_of: *as_of,
                channels: channels
                    .iter()
                    .map(|(c, v)| pb::PresenceChannelVersion {
                        channel: c.to_string(),
                        version: *v,
                    })
                    .collect(),
                after: after.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                until: until.as_ref().map(|c| c.to_string()).unwrap_or_default(),
            })
        }
        PresenceFrame::Delta { epoch, as_of, channel, prev, version, changes } => {
            P::Delta(pb::PresenceDelta {
                epoch: epoch.0,
                as_of: *as_of,
                channel: channel.to_string(),
                prev: *prev,
                version: *version,
                changes: changes
                    .iter()
                    .map(|c| match c {
                        Change::Put { key, data } => pb::PresenceChange {
                            member: Some(member_to_pb(key, data)),
                            leave: false,
                        },
                        Change::Leave { key } => pb::PresenceChange {
                            member: Some(member_to_pb(key, &Bytes::new())),
                            leave: true,
                        },
                    })
                    .collect(),
            })
        }
        PresenceFrame::State { epoch, as_of, channel, version, members, part, parts } => {
            P::State(pb::PresenceState {
                epoch: epoch.0,
                as_of: *as_of,
                channel: channel.to_string(),
                version: *version,
                members: members.iter().map(|(k, d)| member_to_pb(k, d)).collect(),
                part: *part,
                parts: *parts,
            })
        }
        PresenceFrame::StateRequest { channel } => {
            P::StateRequest(pb::PresenceStateRequest { channel: channel.to_string() })
        }
    };
    pb::PresenceFrame { kind: Some(kind) }
}

/// A digest's range bound: empty for none.
fn bound(c: String) -> Result<Option<ChannelName>, WireError> {
    if c.is_empty() { Ok(None) } else { channel(c).map(Some) }
}

fn presence_from_pb(f: pb::PresenceFrame) -> Result<PresenceFrame, WireError> {
    use pb::presence_frame::Kind as P;
    Ok(match f.kind.ok_or(WireError::Unknown)? {
        P::Digest(d) => PresenceFrame::Digest {
            epoch: Epoch(d.epoch),
            as_of: d.as_of,
            channels: d
                .channels
                .into_iter()
                .map(|c| Ok((channel(c.channel)?, c.version)))
                .collect::<Result<_, WireError>>()?,
            after: bound(d.after)?,
            until: bound(d.until)?,
        },
        P::Delta(d) => PresenceFrame::Delta {
            epoch: Epoch(d.epoch),
            as_of: d.as_of,
            channel: channel(d.channel)?,
            prev: d.prev,
            version: d.version,
            changes: d
                .changes
                .into_iter()
                .map(|c| {
                    let (key, data) = member_from_pb(c.member.ok_or(WireError::Unknown)?);
                    Ok(if c.leave { Change::Leave { key } } else { Change::Put { key, data } })
                })
                .collect::<Result<_, WireError>>()?,
        },
        P::State(s) => PresenceFrame::State {
            epoch: Epoch(s.epoch),
            as_of: s.as_of,
            channel: channel(s.channel)?,
            version: s.version,
            members: s.members.into_iter().map(member_from_pb).collect(),
            part: s.part,
            parts: s.parts,
        },
        P::StateRequest(r) => PresenceFrame::StateRequest { channel: channel(r.channel)? },
    })
}

/// Encodes a frame with its 4-byte big-endian length prefix.
pub fn encode(frame: &Frame) -> Bytes {
    let pb = pb::BackboneFrame::from(frame);
    let len = pb.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    pb.encode_raw(&mut buf);
    buf.into()
}

/// Decodes one frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
    Frame::try_from(pb::BackboneFrame::decode(body)?)
}

/// Reads length-delimited frames from a stream. Frames are cut from one growing buffer and
/// decoded in place: a message's payload is a slice of what was read (no copy), and a run
/// of one channel's data frames parses its names once ([`Names`]).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    names: Names,
    /// Bytes of the frames read so far, length prefixes included.
    read: u64,
}

/// Bytes asked of the stream per read, at least.
const READ_CHUNK: usize = 16 * 1024;

impl<R: AsyncReadExt + Unpin> FrameReader<R> {
    /// Reads frames from `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, buf: BytesMut::with_capacity(READ_CHUNK), names: Names::default(), read: 0 }
    }

    /// Bytes of the frames read so far, length prefixes included.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// The next frame; `Ok(None)` at a clean end of stream (between frames).
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(WireError::TooLarge(len));
                }
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    self.read += 4 + len as u64;
                    let body = self.buf.split_to(len).freeze();
                    let pb = pb::BackboneFrame::decode(body)?;
                    return convert(pb, &mut self.names).map(Some);
                }
                self.buf.reserve((4 + len - self.buf.len()).max(READ_CHUNK));
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
                };
            }
        }
    }
}

/// Writes encoded frames (one, or several back to back).
pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::types::RegionId;

    #[test]
    fn frames_round_trip_and_bad_names_are_refused() {
        let member = |client: &str, conn: &str| MemberKey {
            client_id: client.into(),
            connection_id: conn.into(),
        };
        let origin = NodeId::new(&RegionId::parse("eu").unwrap(), "a").unwrap();
        let ch = ChannelName::parse("chat:x").unwrap();
        let frames = [
            Frame::Hello {
                epoch: Epoch(5),
                have: vec![Have {
                    channel: ch.clone(),
                    epoch: Epoch(1),
                    delivered: Seq(9),
                    generation: 4,
                }],
                want: vec![Want { channel: ch.clone(), generation: 6 }],
            },
            Frame::Interest { channel: ch.clone(), generation: 6, withdraw: true },
            Frame::Start { channel: ch.clone(), epoch: Epoch(5), after: Seq(11), generation: 6 },
            Frame::Heartbeat { epoch: Epoch(5), greeted: true, caught_up: true },
            Frame::End { channel: ch.clone(), epoch: Epoch(4), last: Some(Seq(9)), next: Epoch(5) },
            Frame::End { channel: ch.clone(), epoch: Epoch(3), last: None, next: Epoch(5) },
            Frame::HeadRequest { channel: ch.clone(), nonce: 7 },
            Frame::Head { channel: ch.clone(), epoch: Epoch(5), seq: Seq(8), nonce: 7 },
            Frame::Data {
                origin,
                epoch: Epoch(5),
                channel: ch.clone(),
                seq: Seq(3),
                payload: Bytes::from_static(b"hi"),
            },
            Frame::Ack { channel: ch.clone(), epoch: Epoch(5), seq: Seq(3) },
            Frame::Nack { channel: ch.clone(), epoch: Epoch(5), from: Seq(1), to: Seq(2) },
            Frame::Gone { channel: ch.clone(), epoch: Epoch(5), through: Seq(7) },
            Frame::Presence(PresenceFrame::Digest {
                epoch: Epoch(5),
                as_of: 40,
                channels: vec![(ch.clone(), 39)],
                after: None,
                until: None,
            }),
            Frame::Presence(PresenceFrame::Digest {
                epoch: Epoch(5),
                as_of: 40,
                channels: vec![],
                after: Some(ChannelName::parse("a").unwrap()),
                until: Some(ch.clone()),
            }),
            Frame::Presence(PresenceFrame::Delta {
                epoch: Epoch(5),
                as_of: 40,
                channel: ch.clone(),
                prev: 37,
                version: 39,
                changes: vec![
                    Change::Put { key: member("alice", "7"), data: Bytes::from_static(b"{}") },
                    Change::Leave { key: member("bob", "8") },
                ],
            }),
            Frame::Presence(PresenceFrame::State {
                epoch: Epoch(5),
                as_of: 40,
                channel: ch.clone(),
                version: 39,
                members: vec![(member("alice", "7"), Bytes::from_static(b"{}"))],
                part: 1,
                parts: 3,
            }),
            Frame::Presence(PresenceFrame::StateRequest { channel: ch }),
        ];
        for f in frames {
            let bytes = encode(&f);
            assert_eq!(decode(&bytes[4..]).unwrap(), f);
        }
        let bad = pb::BackboneFrame {
            kind: Some(Kind::Ack(pb::Ack { channel: "bad name".into(), epoch: 1, seq: 1 })),
        };
        assert!(matches!(decode(&bad.encode_to_vec()), Err(WireError::Name(_))));
        assert!(matches!(decode(&[]), Err(WireError::Unknown)));
        let empty_presence =
            pb::BackboneFrame { kind: Some(Kind::Presence(pb::PresenceFrame { kind: None })) };
        assert!(matches!(decode(&empty_presence.encode_to_vec()), Err(WireError::Unknown)));
        assert!(matches!(decode(&[0xff, 0xff]), Err(WireError::Decode(_))));
    }

    /// Hands out its bytes `step` at a time, as a stream delivers them.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl tokio::io::AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len() - self.pos).min(buf.remaining());
            let pos = self.pos;
            buf.put_slice(&self.data[pos..pos + n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn read_all(data: Vec<u8>, step: usize) -> (Vec<Frame>, Result<(), WireError>) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = FrameReader::new(Chunked { data, pos: 0, step });
            let mut frames = Vec::new();
            loop {
                match r.next().await {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => return (frames, Ok(())),
                    Err(e) => return (frames, Err(e)),
                }
            }
        })
    }

    #[test]
    fn the_frame_reader_cuts_frames_wherever_the_reads_end() {
        let origin = NodeId::new(&RegionId::parse("eu").unwrap(), "a").unwrap();
        let ch = ChannelName::parse("chat:x").unwrap();
        let frames: Vec<Frame> = (1..=50)
            .map(|seq| Frame::Data {
                origin: origin.clone(),
                epoch: Epoch(5),
                channel: ch.clone(),
                seq: Seq(seq),
                payload: Bytes::from(vec![seq as u8; seq as usize * 100]),
            })
            .chain([Frame::Heartbeat { epoch: Epoch(5), greeted: true, caught_up: false }])
            .collect();
        let wire: Vec<u8> = frames.iter().flat_map(|f| encode(f).to_vec()).collect();
        for step in [1, 3, 7, 4096, 1 << 20] {
            let (got, end) = read_all(wire.clone(), step);
            assert!(end.is_ok(), "step {step}: {end:?}");
            assert_eq!(got, frames, "step {step}");
        }
        // A stream that ends inside a frame is an error, not a clean end.
        let (got, end) = read_all(wire[..wire.len() - 3].to_vec(), 64);
        assert_eq!(got.len(), frames.len() - 1);
        assert!(matches!(end, Err(WireError::Io(_))), "{end:?}");
        // A length over the limit is refused before anything is read into memory.
        let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(&[0; 16]);
        assert!(matches!(read_all(big, 64).1, Err(WireError::TooLarge(_))));
        // A bad name in a run is refused even after good frames of another name.
        let bad = pb::BackboneFrame {
            kind: Some(Kind::Data(pb::Data {
                origin: "eu/a".into(),
                epoch: 5,
                channel: "bad name".into(),
                seq: 51,
                payload: Bytes::new(),
            })),
        };
        let mut wire = wire;
        let body = bad.encode_to_vec();
        wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
        wire.extend_from_slice(&body);
        assert!(matches!(read_all(wire, 512).1, Err(WireError::Name(_))));
    }
}
