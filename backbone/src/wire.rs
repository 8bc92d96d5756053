//! Backbone frames on the wire: the core's [`Frame`] ↔ `tern.backbone.v1.BackboneFrame`,
//! and the length-delimited framing used on QUIC streams.

use bytes::Bytes;
use prost::Message as _;
use tern_proto::backbone::{self as pb, backbone_frame::Kind};
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::{Frame, Have, Want};

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
            Frame::Heartbeat { epoch, greeted } => {
                Kind::Heartbeat(pb::Heartbeat { epoch: epoch.0, greeted: *greeted })
            }
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
            Kind::Heartbeat(h) => Frame::Heartbeat { epoch: Epoch(h.epoch), greeted: h.greeted },
            Kind::Data(d) => Frame::Data {
                origin: NodeId::parse(&d.origin).map_err(|e| WireError::Name(e.to_string()))?,
                epoch: Epoch(d.epoch),
                channel: channel(d.channel)?,
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
        })
    }
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

/// Reads one length-delimited frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode(&body).map(Some)
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
            Frame::Heartbeat { epoch: Epoch(5), greeted: true },
            Frame::Data {
                origin,
                epoch: Epoch(5),
                channel: ch.clone(),
                seq: Seq(3),
                payload: Bytes::from_static(b"hi"),
            },
            Frame::Ack { channel: ch.clone(), epoch: Epoch(5), seq: Seq(3) },
            Frame::Nack { channel: ch.clone(), epoch: Epoch(5), from: Seq(1), to: Seq(2) },
            Frame::Gone { channel: ch, epoch: Epoch(5), through: Seq(7) },
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
        assert!(matches!(decode(&[0xff, 0xff]), Err(WireError::Decode(_))));
    }
}
