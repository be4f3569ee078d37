//! Property tests: encode/decode roundtrips for every message variant under every valid
//! context, and "never panics" on arbitrary and mutated input.

use proptest::collection::vec;
use proptest::prelude::*;
use switchback_pgoutput::*;

/// Valid contexts: protocol 1-4, streaming blocks only from protocol 2, parallel
/// streaming only with protocol 4.
fn context() -> impl Strategy<Value = DecodeContext> {
    (1u32..=4, any::<bool>(), any::<bool>()).prop_map(|(proto_version, in_stream, parallel)| {
        DecodeContext {
            proto_version,
            in_stream: in_stream && proto_version >= 2,
            parallel_streaming: parallel && proto_version >= 4,
        }
    })
}

/// Any context at all, including nonsensical ones; the decoder must not care.
fn any_context() -> impl Strategy<Value = DecodeContext> {
    (any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
        |(proto_version, in_stream, parallel_streaming)| DecodeContext {
            proto_version,
            in_stream,
            parallel_streaming,
        },
    )
}

/// Strings without NUL bytes, non-ASCII included.
fn string() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..24)
}

fn tuple_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        bytes().prop_map(TupleValue::Text),
        bytes().prop_map(TupleValue::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = TupleData> {
    vec(tuple_value(), 0..6)
}

fn old_kind() -> impl Strategy<Value = OldKind> {
    prop_oneof![Just(OldKind::Key), Just(OldKind::Old)]
}

fn relation_column() -> impl Strategy<Value = RelationColumn> {
    (any::<u8>(), string(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

/// Every variant, with the optional fields filled exactly as `ctx` puts them on the wire.
fn message(ctx: DecodeContext) -> impl Strategy<Value = Message> {
    let xid = move || -> BoxedStrategy<Option<u32>> {
        if ctx.has_streamed_xid() {
            any::<u32>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        }
    };
    let abort_info: BoxedStrategy<(Option<u64>, Option<i64>)> = if ctx.has_abort_info() {
        (any::<u64>(), any::<i64>())
            .prop_map(|(l, t)| (Some(l), Some(t)))
            .boxed()
    } else {
        Just((None, None)).boxed()
    };
    // (flags, lsn, end lsn, time, xid, gid) shared by the two-phase messages.
    let two_phase = || {
        (
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            any::<i64>(),
            any::<u32>(),
            string(),
        )
    };

    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            }
        }),
        (xid(), any::<u8>(), any::<u64>(), string(), bytes()).prop_map(
            |(xid, flags, lsn, prefix, content)| Message::Message {
                xid,
                flags,
                lsn,
                prefix,
                content,
            }
        ),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            }
        ),
        (any::<u64>(), string())
            .prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
        (
            xid(),
            any::<u32>(),
            string(),
            string(),
            any::<u8>(),
            vec(relation_column(), 0..5)
        )
            .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                Message::Relation {
                    xid,
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                }
            }),
        (xid(), any::<u32>(), string(), string()).prop_map(|(xid, oid, namespace, name)| {
            Message::Type {
                xid,
                oid,
                namespace,
                name,
            }
        }),
        (xid(), any::<u32>(), tuple()).prop_map(|(xid, oid, new)| Message::Insert {
            xid,
            oid,
            new
        }),
        (
            xid(),
            any::<u32>(),
            proptest::option::of((old_kind(), tuple())),
            tuple()
        )
            .prop_map(|(xid, oid, old, new)| Message::Update { xid, oid, old, new }),
        (xid(), any::<u32>(), (old_kind(), tuple())).prop_map(|(xid, oid, old)| Message::Delete {
            xid,
            oid,
            old
        }),
        (xid(), any::<u8>(), vec(any::<u32>(), 0..6))
            .prop_map(|(xid, options, oids)| Message::Truncate { xid, options, oids }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(xid, first_segment)| Message::StreamStart { xid, first_segment }),
        Just(Message::StreamStop),
        (
            any::<u32>(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            any::<i64>()
        )
            .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_time)| {
                Message::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                }
            }),
        (any::<u32>(), any::<u32>(), abort_info).prop_map(
            |(xid, subxid, (abort_lsn, abort_time))| Message::StreamAbort {
                xid,
                subxid,
                abort_lsn,
                abort_time,
            }
        ),
        two_phase().prop_map(|(_, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
            Message::BeginPrepare {
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            }
        }),
        two_phase().prop_map(|(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
            Message::Prepare {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            }
        }),
        two_phase().prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
            Message::CommitPrepared {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
                xid,
                gid,
            }
        }),
        (two_phase(), any::<i64>()).prop_map(
            |(
                (flags, prepare_end_lsn, rollback_end_lsn, prepare_time, xid, gid),
                rollback_time,
            )| {
                Message::RollbackPrepared {
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_time,
                    rollback_time,
                    xid,
                    gid,
                }
            }
        ),
        two_phase().prop_map(|(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
            Message::StreamPrepare {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            }
        }),
    ]
}

fn context_and_message() -> impl Strategy<Value = (DecodeContext, Message)> {
    context().prop_flat_map(|ctx| (Just(ctx), message(ctx)))
}

fn frame() -> impl Strategy<Value = ReplicationFrame> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            any::<i64>(),
            vec(any::<u8>(), 0..64)
        )
            .prop_map(
                |(wal_start, wal_end, send_time, data)| ReplicationFrame::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data,
                }
            ),
        (any::<u64>(), any::<i64>(), any::<bool>()).prop_map(
            |(wal_end, send_time, reply_requested)| ReplicationFrame::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            }
        ),
    ]
}

/// One edit of an encoded buffer.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Remove),
            any::<usize>().prop_map(Mutation::Truncate),
        ],
        1..4,
    )
}

fn mutate(mut buf: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = buf.len();
        match *m {
            Mutation::Set(i, b) if len > 0 => buf[i % len] = b,
            Mutation::Insert(i, b) => buf.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                buf.remove(i % len);
            }
            Mutation::Truncate(i) => buf.truncate(i % (len + 1)),
            _ => {}
        }
    }
    buf
}

proptest! {
    #[test]
    fn message_roundtrip((ctx, msg) in context_and_message()) {
        let bytes = encode(&msg, ctx);
        prop_assert_eq!(decode(&bytes, ctx), Ok(msg));
    }

    #[test]
    fn frame_roundtrip(frame in frame()) {
        let bytes = encode_frame(&frame);
        prop_assert_eq!(decode_frame(&bytes), Ok(frame));
    }

    /// A message is exactly its bytes: every strict prefix fails to decode, and so
    /// does any extra byte.
    #[test]
    fn prefixes_and_extensions_fail((ctx, msg) in context_and_message(), extra in any::<u8>()) {
        let bytes = encode(&msg, ctx);
        for len in 0..bytes.len() {
            prop_assert!(decode(&bytes[..len], ctx).is_err(), "prefix {} of {:?}", len, msg);
        }
        let mut longer = bytes;
        longer.push(extra);
        let is_trailing = matches!(
            decode(&longer, ctx),
            Err(DecodeError::TrailingBytes { count: 1, .. })
        );
        prop_assert!(is_trailing);
    }

    /// The Decoder follows stream blocks: a sequence of blocks decodes to what was
    /// encoded with the matching context.
    #[test]
    fn decoder_follows_stream_blocks(
        proto_version in 2u32..=4,
        blocks in vec((any::<u32>(), vec(any::<u32>(), 0..4)), 0..4),
    ) {
        let mut decoder = Decoder::new(proto_version, false);
        let outside = DecodeContext { proto_version, in_stream: false, parallel_streaming: false };
        let inside = DecodeContext { in_stream: true, ..outside };
        for (xid, oids) in blocks {
            let start = Message::StreamStart { xid, first_segment: true };
            prop_assert_eq!(decoder.decode(&encode(&start, outside)), Ok(start));
            for oid in oids {
                let insert = Message::Insert { xid: Some(xid), oid, new: vec![TupleValue::Null] };
                prop_assert_eq!(decoder.decode(&encode(&insert, inside)), Ok(insert));
            }
            prop_assert_eq!(decoder.decode(&encode(&Message::StreamStop, inside)), Ok(Message::StreamStop));
            let origin = Message::Origin { commit_lsn: u64::from(xid), name: "o".into() };
            prop_assert_eq!(decoder.decode(&encode(&origin, outside)), Ok(origin));
        }
    }

    #[test]
    fn decode_never_panics(buf in vec(any::<u8>(), 0..128), ctx in any_context()) {
        let _ = decode(&buf, ctx);
        let _ = decode_frame(&buf);
    }

    /// Arbitrary bytes after a valid tag reach deeper into each message's decoder.
    #[test]
    fn decode_never_panics_after_a_valid_tag(
        tag in proptest::sample::select(b"BMCORYIUDTSEcAbPKrp".to_vec()),
        rest in vec(any::<u8>(), 0..128),
        ctx in any_context(),
    ) {
        let mut buf = vec![tag];
        buf.extend_from_slice(&rest);
        if let Ok(msg) = decode(&buf, ctx) {
            prop_assert_eq!(decode(&encode(&msg, ctx), ctx), Ok(msg));
        }
    }

    #[test]
    fn decode_never_panics_on_mutated_messages(
        (ctx, msg) in context_and_message(),
        mutations in mutations(),
        other_ctx in any_context(),
    ) {
        let bytes = mutate(encode(&msg, ctx), &mutations);
        for ctx in [ctx, other_ctx] {
            // Whatever still decodes must roundtrip.
            if let Ok(msg) = decode(&bytes, ctx) {
                prop_assert_eq!(decode(&encode(&msg, ctx), ctx), Ok(msg));
            }
        }
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn decode_frame_never_panics_on_mutated_frames(frame in frame(), mutations in mutations()) {
        let bytes = mutate(encode_frame(&frame), &mutations);
        if let Ok(frame) = decode_frame(&bytes) {
            prop_assert_eq!(decode_frame(&encode_frame(&frame)), Ok(frame));
        }
    }
}
