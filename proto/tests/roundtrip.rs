//! Property tests: every protocol frame round-trips through JSON and protobuf, and the
//! fan-out batch encoding equals the generated encoders' output.

use bytes::Bytes;
use proptest::prelude::*;
use tern_proto::client::*;
use tern_proto::codec::{self, EncodedMessage, Format};

fn s() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z:0-9-]{1,12}", any::<String>()]
}
fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}
fn position() -> impl Strategy<Value = Option<Position>> {
    proptest::option::of(
        (any::<u64>(), any::<u64>()).prop_map(|(epoch, offset)| Position { epoch, offset }),
    )
}
fn code() -> impl Strategy<Value = i32> {
    (0i32..=13).prop_map(|c| c)
}
fn message_data() -> impl Strategy<Value = Option<message::Data>> {
    prop_oneof![
        Just(None),
        s().prop_map(|t| Some(message::Data::Text(t))),
        bin().prop_map(|b| Some(message::Data::Binary(b)))
    ]
}
fn message() -> impl Strategy<Value = Message> {
    (
        (s(), s(), s(), message_data(), s(), s()),
        (any::<u64>(), any::<u64>(), position(), any::<u64>(), after()),
    )
        .prop_map(
            |(
                (channel, id, name, data, client_id, origin),
                (origin_epoch, origin_seq, position, timestamp_ms, after),
            )| Message {
                channel,
                id,
                name,
                data,
                client_id,
                origin,
                origin_epoch,
                origin_seq,
                position,
                timestamp_ms,
                after,
            },
        )
}

fn origin() -> impl Strategy<Value = OriginPosition> {
    (s(), any::<u64>(), any::<u64>()).prop_map(|(origin, epoch, seq)| OriginPosition {
        origin,
        epoch,
        seq,
    })
}

fn after() -> impl Strategy<Value = Option<OriginPosition>> {
    prop_oneof![Just(None), origin().prop_map(Some)]
}

fn origins() -> impl Strategy<Value = Vec<OriginPosition>> {
    proptest::collection::vec(origin(), 0..3)
}

fn presence_request_data() -> impl Strategy<Value = Option<presence_request::Data>> {
    prop_oneof![
        Just(None),
        s().prop_map(|t| Some(presence_request::Data::Text(t))),
        bin().prop_map(|b| Some(presence_request::Data::Binary(b)))
    ]
}

fn member() -> impl Strategy<Value = PresenceMember> {
    let data = prop_oneof![
        Just(None),
        s().prop_map(|t| Some(presence_member::Data::Text(t))),
        bin().prop_map(|b| Some(presence_member::Data::Binary(b)))
    ];
    (s(), s(), s(), data).prop_map(|(client_id, connection_id, node, data)| PresenceMember {
        client_id,
        connection_id,
        node,
        data,
    })
}

fn client_kind() -> impl Strategy<Value = client_frame::Kind> {
    use client_frame::Kind;
    let publish_data = prop_oneof![
        Just(None),
        s().prop_map(|t| Some(publish::Data::Text(t))),
        bin().prop_map(|b| Some(publish::Data::Binary(b)))
    ];
    prop_oneof![
        (any::<u32>(), s(), s(), s(), s(), s()).prop_map(
            |(protocol, client_id, token, resume_token, agent, recover)| {
                Kind::Connect(Connect { protocol, client_id, token, resume_token, agent, recover })
            }
        ),
        (
            any::<u32>(),
            s(),
            proptest::option::of((any::<u32>(), any::<u64>())),
            proptest::option::of((s(), position(), origins())),
            any::<bool>()
        )
            .prop_map(|(request_id, channel, rewind, resume, presence)| Kind::Subscribe(
                Subscribe {
                    request_id,
                    channel,
                    rewind: rewind.map(|(count, since_ms)| Rewind { count, since_ms }),
                    resume: resume.map(|(node, position, origins)| Resume {
                        node,
                        position,
                        origins
                    }),
                    presence,
                }
            )),
        (any::<u32>(), s(), 0..5i32, presence_request_data(), any::<u32>(), s()).prop_map(
            |(request_id, channel, action, data, limit, after)| {
                Kind::Presence(PresenceRequest { request_id, channel, action, data, limit, after })
            }
        ),
        (
            (any::<u32>(), s(), any::<u32>(), any::<bool>()),
            (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>())),
            (any::<u64>(), any::<u64>())
        )
            .prop_map(
                |((request_id, channel, limit, forwards), (from, to), (since_ms, until_ms))| {
                    Kind::History(HistoryRequest {
                        request_id,
                        channel,
                        limit,
                        forwards,
                        from,
                        to,
                        since_ms,
                        until_ms,
                    })
                }
            ),
        (any::<u32>(), s()).prop_map(|(request_id, channel)| Kind::Unsubscribe(Unsubscribe {
            request_id,
            channel
        })),
        (any::<u32>(), s(), s(), s(), publish_data, 0..2i32, after()).prop_map(
            |(request_id, channel, id, name, data, durability, after)| {
                Kind::Publish(Publish { request_id, channel, id, name, data, durability, after })
            }
        ),
        any::<u64>().prop_map(|nonce| Kind::Heartbeat(Heartbeat { nonce })),
        (any::<u32>(), s()).prop_map(|(request_id, token)| Kind::Auth(Auth { request_id, token })),
    ]
}

fn server_kind() -> impl Strategy<Value = server_frame::Kind> {
    use server_frame::Kind;
    let namespace = (s(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(namespace, publish_rate, publish_burst, max_message_bytes)| NamespaceLimits {
            namespace,
            publish_rate,
            publish_burst,
            max_message_bytes,
        },
    );
    let limits = proptest::option::of(
        (
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            proptest::collection::vec(namespace, 0..3),
        )
            .prop_map(
                |(
                    (max_message_bytes, max_frame_bytes, max_channels, send_queue),
                    (publish_rate, publish_burst, frame_rate, frame_burst),
                    namespaces,
                )| Limits {
                    max_message_bytes,
                    max_frame_bytes,
                    max_channels,
                    send_queue,
                    publish_rate,
                    publish_burst,
                    frame_rate,
                    frame_burst,
                    namespaces,
                },
            ),
    );
    prop_oneof![
        ((s(), s(), s(), any::<u32>(), any::<u32>(), limits), (s(), any::<u32>(), any::<u32>()))
            .prop_map(
                |(
                    (connection_id, node, region, hb, idle, limits),
                    (client_id, protocol, resume_window_ms),
                )| {
                    Kind::Connected(Connected {
                        connection_id,
                        node,
                        region,
                        heartbeat_interval_ms: hb,
                        idle_timeout_ms: idle,
                        limits,
                        client_id,
                        protocol,
                        resume_window_ms,
                    })
                }
            ),
        (any::<u32>(), s(), position(), origins(), any::<bool>()).prop_map(
            |(request_id, channel, position, origins, resumed)| {
                Kind::Subscribed(Subscribed { request_id, channel, position, origins, resumed })
            }
        ),
        (s(), s(), origins()).prop_map(|(channel, reason, origins)| {
            Kind::Discontinuity(Discontinuity { channel, reason, origins })
        }),
        (any::<u32>(), s(), any::<u64>()).prop_map(|(request_id, client_id, expires_at_ms)| {
            Kind::AuthRenewed(AuthRenewed { request_id, client_id, expires_at_ms })
        }),
        (any::<u32>(), s()).prop_map(|(request_id, channel)| Kind::Unsubscribed(Unsubscribed {
            request_id,
            channel
        })),
        (s(), proptest::collection::vec((1..4i32, member()), 0..3)).prop_map(
            |(channel, events)| {
                let events = events
                    .into_iter()
                    .map(|(action, member)| PresenceEvent { action, member: Some(member) })
                    .collect();
                Kind::Presence(PresenceEvents { channel, events })
            }
        ),
        (any::<u32>(), s(), proptest::collection::vec(member(), 0..3), s()).prop_map(
            |(request_id, channel, members, next)| {
                Kind::PresenceReply(PresenceReply { request_id, channel, members, next })
            }
        ),
        (s(), proptest::collection::vec(s(), 0..3), any::<u32>()).prop_map(
            |(reason, urls, close_in_ms)| Kind::Draining(Draining { reason, urls, close_in_ms })
        ),
        (
            (any::<u32>(), s(), s(), any::<u64>(), position()),
            (any::<u64>(), any::<bool>(), s(), any::<u64>())
        )
            .prop_map(
                |(
                    (request_id, channel, message_id, origin_seq, position),
                    (timestamp_ms, duplicate, origin, origin_epoch),
                )| {
                    Kind::Ack(Ack {
                        request_id,
                        channel,
                        message_id,
                        origin_seq,
                        position,
                        timestamp_ms,
                        duplicate,
                        origin,
                        origin_epoch,
                    })
                }
            ),
        (any::<u32>(), s(), s(), code(), s(), any::<u32>()).prop_map(
            |(request_id, channel, message_id, code, reason, retry_after_ms)| {
                Kind::Nack(Nack { request_id, channel, message_id, code, reason, retry_after_ms })
            }
        ),
        proptest::collection::vec(message(), 0..4)
            .prop_map(|messages| Kind::Deliver(Deliver { messages })),
        any::<u64>().prop_map(|nonce| Kind::Heartbeat(Heartbeat { nonce })),
        (any::<u32>(), code(), s(), s()).prop_map(|(request_id, code, reason, channel)| {
            Kind::Error(Error { request_id, code, reason, channel })
        }),
    ]
}

proptest! {
    #[test]
    fn client_frames_round_trip(kind in client_kind()) {
        for format in [Format::Json, Format::Protobuf] {
            let bytes = codec::encode_client(kind.clone(), format);
            let back = codec::decode_client(&bytes, format == Format::Json).unwrap();
            prop_assert_eq!(&back, &kind);
        }
    }

    #[test]
    fn server_frames_round_trip(kind in server_kind()) {
        for format in [Format::Json, Format::Protobuf] {
            let bytes = codec::encode_server(kind.clone(), format);
            let back = codec::decode_server(&bytes, format == Format::Json).unwrap();
            prop_assert_eq!(&back, &kind);
        }
    }

    #[test]
    fn shared_batch_encoding_matches_generated(messages in proptest::collection::vec(message(), 1..5)) {
        let encoded: Vec<EncodedMessage> = messages.iter().cloned().map(EncodedMessage::new).collect();
        let kind = server_frame::Kind::Deliver(Deliver { messages });
        for format in [Format::Json, Format::Protobuf] {
            let batch = codec::deliver_frame(encoded.iter(), format);
            prop_assert_eq!(&batch, &codec::encode_server(kind.clone(), format));
        }
    }
}
