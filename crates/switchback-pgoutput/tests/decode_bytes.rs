//! Hand-written byte sequences, laid out field by field from PostgreSQL's "Logical
//! Replication Message Formats" and "Streaming Replication Protocol" pages. Each case
//! is decoded and also re-encoded to the same bytes, so the encoder is checked against
//! the spec too, not only against the decoder.

use switchback_pgoutput::*;

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const PLAIN: DecodeContext = DecodeContext {
    proto_version: 1,
    in_stream: false,
    parallel_streaming: false,
};
const STREAM: DecodeContext = DecodeContext {
    proto_version: 2,
    in_stream: true,
    parallel_streaming: false,
};
const PARALLEL: DecodeContext = DecodeContext {
    proto_version: 4,
    in_stream: false,
    parallel_streaming: true,
};

/// Decodes `bytes`, compares with `expected`, and checks that encoding gives `bytes` back.
#[track_caller]
fn check(bytes: &[u8], ctx: DecodeContext, expected: Message) {
    assert_eq!(decode(bytes, ctx), Ok(expected.clone()));
    assert_eq!(encode(&expected, ctx), bytes);
}

// Int64 LSN 0/16B3748 and a timestamp, reused below.
const LSN: &[u8] = &[0, 0, 0, 0, 0x01, 0x6b, 0x37, 0x48];
const LSN2: &[u8] = &[0, 0, 0, 1, 0, 0, 0, 0x10];
const TS: &[u8] = &[0, 0x02, 0xb8, 0x1f, 0x5a, 0x3c, 0x41, 0x00];
const XID: &[u8] = &[0, 0, 0x02, 0xe4]; // 740

#[test]
fn begin() {
    check(
        &cat(&[b"B", LSN, TS, XID]),
        PLAIN,
        Message::Begin {
            final_lsn: 0x016b_3748,
            commit_time: 0x0002_b81f_5a3c_4100,
            xid: 740,
        },
    );
}

#[test]
fn logical_message_plain_and_streamed() {
    let expected = |xid| Message::Message {
        xid,
        flags: 1,
        lsn: 0x016b_3748,
        prefix: "pfx".into(),
        content: b"hello".to_vec(),
    };
    check(
        &cat(&[b"M", &[1], LSN, b"pfx\0", &[0, 0, 0, 5], b"hello"]),
        PLAIN,
        expected(None),
    );
    check(
        &cat(&[b"M", XID, &[1], LSN, b"pfx\0", &[0, 0, 0, 5], b"hello"]),
        STREAM,
        expected(Some(740)),
    );
}

#[test]
fn commit() {
    check(
        &cat(&[b"C", &[0], LSN, LSN2, TS]),
        PLAIN,
        Message::Commit {
            flags: 0,
            commit_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            commit_time: 0x0002_b81f_5a3c_4100,
        },
    );
}

#[test]
fn origin() {
    check(
        &cat(&[b"O", LSN, b"node_a\0"]),
        PLAIN,
        Message::Origin {
            commit_lsn: 0x016b_3748,
            name: "node_a".into(),
        },
    );
}

#[test]
fn relation() {
    let bytes = cat(&[
        b"R",
        &[0, 0, 0x40, 0x01], // oid 16385
        b"public\0",
        b"t\xc3\xa9\0", // "té"
        b"d",
        &[0, 2], // two columns
        &[1],
        b"id\0",
        &[0, 0, 0, 23],            // int4
        &[0xff, 0xff, 0xff, 0xff], // typmod -1
        &[0],
        b"name\0",
        &[0, 0, 0x04, 0x13], // varchar (1043)
        &[0, 0, 0, 0x24],    // typmod 36
    ]);
    check(
        &bytes,
        PLAIN,
        Message::Relation {
            xid: None,
            oid: 16385,
            namespace: "public".into(),
            name: "té".into(),
            replica_identity: b'd',
            columns: vec![
                RelationColumn {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "name".into(),
                    type_oid: 1043,
                    type_modifier: 36,
                },
            ],
        },
    );
}

#[test]
fn relation_in_pg_catalog_has_empty_namespace() {
    check(
        &cat(&[b"R", &[0, 0, 0, 1], b"\0", b"x\0", b"n", &[0, 0]]),
        PLAIN,
        Message::Relation {
            xid: None,
            oid: 1,
            namespace: String::new(),
            name: "x".into(),
            replica_identity: b'n',
            columns: vec![],
        },
    );
}

#[test]
fn type_message() {
    check(
        &cat(&[b"Y", XID, &[0, 0, 0x40, 0x10], b"public\0", b"mood\0"]),
        STREAM,
        Message::Type {
            xid: Some(740),
            oid: 16400,
            namespace: "public".into(),
            name: "mood".into(),
        },
    );
}

#[test]
fn insert_with_every_tuple_kind() {
    let bytes = cat(&[
        b"I",
        &[0, 0, 0x40, 0x01],
        b"N",
        &[0, 4],
        b"t",
        &[0, 0, 0, 2],
        b"42",
        b"n",
        b"u",
        b"b",
        &[0, 0, 0, 3],
        &[0xde, 0xad, 0x00],
    ]);
    check(
        &bytes,
        PLAIN,
        Message::Insert {
            xid: None,
            oid: 16385,
            new: vec![
                TupleValue::Text(b"42".to_vec()),
                TupleValue::Null,
                TupleValue::UnchangedToast,
                TupleValue::Binary(vec![0xde, 0xad, 0x00]),
            ],
        },
    );
}

#[test]
fn update_without_old_tuple() {
    check(
        &cat(&[
            b"U",
            &[0, 0, 0x40, 0x01],
            b"N",
            &[0, 1],
            b"t",
            &[0, 0, 0, 1],
            b"7",
        ]),
        PLAIN,
        Message::Update {
            xid: None,
            oid: 16385,
            old: None,
            new: vec![TupleValue::Text(b"7".to_vec())],
        },
    );
}

#[test]
fn update_with_key_and_with_old() {
    for (marker, kind) in [(b"K", OldKind::Key), (b"O", OldKind::Old)] {
        let bytes = cat(&[
            b"U",
            &[0, 0, 0x40, 0x01],
            marker,
            &[0, 2],
            b"t",
            &[0, 0, 0, 1],
            b"1",
            b"n",
            b"N",
            &[0, 2],
            b"t",
            &[0, 0, 0, 1],
            b"2",
            b"u",
        ]);
        check(
            &bytes,
            PLAIN,
            Message::Update {
                xid: None,
                oid: 16385,
                old: Some((
                    kind,
                    vec![TupleValue::Text(b"1".to_vec()), TupleValue::Null],
                )),
                new: vec![TupleValue::Text(b"2".to_vec()), TupleValue::UnchangedToast],
            },
        );
    }
}

#[test]
fn delete_key_and_old() {
    for (marker, kind) in [(b"K", OldKind::Key), (b"O", OldKind::Old)] {
        check(
            &cat(&[b"D", XID, &[0, 0, 0x40, 0x01], marker, &[0, 1], b"n"]),
            STREAM,
            Message::Delete {
                xid: Some(740),
                oid: 16385,
                old: (kind, vec![TupleValue::Null]),
            },
        );
    }
}

#[test]
fn truncate() {
    check(
        &cat(&[
            b"T",
            &[0, 0, 0, 2],
            &[3],
            &[0, 0, 0x40, 0x01],
            &[0, 0, 0x40, 0x02],
        ]),
        PLAIN,
        Message::Truncate {
            xid: None,
            options: 3,
            oids: vec![16385, 16386],
        },
    );
}

#[test]
fn stream_start_stop_commit() {
    check(
        &cat(&[b"S", XID, &[1]]),
        PLAIN,
        Message::StreamStart {
            xid: 740,
            first_segment: true,
        },
    );
    check(
        &cat(&[b"S", XID, &[0]]),
        PLAIN,
        Message::StreamStart {
            xid: 740,
            first_segment: false,
        },
    );
    check(b"E", STREAM, Message::StreamStop);
    check(
        &cat(&[b"c", XID, &[0], LSN, LSN2, TS]),
        PLAIN,
        Message::StreamCommit {
            xid: 740,
            flags: 0,
            commit_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            commit_time: 0x0002_b81f_5a3c_4100,
        },
    );
}

#[test]
fn stream_abort_with_and_without_parallel_info() {
    check(
        &cat(&[b"A", XID, &[0, 0, 0x02, 0xe5]]),
        PLAIN,
        Message::StreamAbort {
            xid: 740,
            subxid: 741,
            abort_lsn: None,
            abort_time: None,
        },
    );
    check(
        &cat(&[b"A", XID, &[0, 0, 0x02, 0xe5], LSN, TS]),
        PARALLEL,
        Message::StreamAbort {
            xid: 740,
            subxid: 741,
            abort_lsn: Some(0x016b_3748),
            abort_time: Some(0x0002_b81f_5a3c_4100),
        },
    );
    // Without parallel streaming the LSN and time are trailing garbage.
    assert!(matches!(
        decode(&cat(&[b"A", XID, XID, LSN, TS]), PLAIN),
        Err(DecodeError::TrailingBytes { count: 16, .. })
    ));
}

#[test]
fn two_phase_messages() {
    let ctx = DecodeContext {
        proto_version: 3,
        ..PLAIN
    };
    check(
        &cat(&[b"b", LSN, LSN2, TS, XID, b"gid-1\0"]),
        ctx,
        Message::BeginPrepare {
            prepare_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            prepare_time: 0x0002_b81f_5a3c_4100,
            xid: 740,
            gid: "gid-1".into(),
        },
    );
    check(
        &cat(&[b"P", &[0], LSN, LSN2, TS, XID, b"gid-1\0"]),
        ctx,
        Message::Prepare {
            flags: 0,
            prepare_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            prepare_time: 0x0002_b81f_5a3c_4100,
            xid: 740,
            gid: "gid-1".into(),
        },
    );
    check(
        &cat(&[b"K", &[0], LSN, LSN2, TS, XID, b"gid-1\0"]),
        ctx,
        Message::CommitPrepared {
            flags: 0,
            commit_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            commit_time: 0x0002_b81f_5a3c_4100,
            xid: 740,
            gid: "gid-1".into(),
        },
    );
    let ts2: &[u8] = &[0, 0x02, 0xb8, 0x1f, 0x5a, 0x3c, 0x41, 0x01];
    check(
        &cat(&[b"r", &[0], LSN, LSN2, TS, ts2, XID, b"gid-1\0"]),
        ctx,
        Message::RollbackPrepared {
            flags: 0,
            prepare_end_lsn: 0x016b_3748,
            rollback_end_lsn: 0x1_0000_0010,
            prepare_time: 0x0002_b81f_5a3c_4100,
            rollback_time: 0x0002_b81f_5a3c_4101,
            xid: 740,
            gid: "gid-1".into(),
        },
    );
    check(
        &cat(&[b"p", &[0], LSN, LSN2, TS, XID, b"gid-1\0"]),
        ctx,
        Message::StreamPrepare {
            flags: 0,
            prepare_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            prepare_time: 0x0002_b81f_5a3c_4100,
            xid: 740,
            gid: "gid-1".into(),
        },
    );
}

#[test]
fn decoder_tracks_stream_blocks() {
    let mut decoder = Decoder::new(2, false);
    let insert_plain = cat(&[b"I", &[0, 0, 0x40, 0x01], b"N", &[0, 1], b"n"]);
    let insert_streamed = cat(&[b"I", XID, &[0, 0, 0x40, 0x01], b"N", &[0, 1], b"n"]);

    assert_eq!(
        decoder.decode(&insert_plain),
        Ok(Message::Insert {
            xid: None,
            oid: 16385,
            new: vec![TupleValue::Null]
        })
    );
    assert!(!decoder.in_stream());

    assert_eq!(
        decoder.decode(&cat(&[b"S", XID, &[1]])),
        Ok(Message::StreamStart {
            xid: 740,
            first_segment: true
        })
    );
    assert!(decoder.in_stream());
    assert_eq!(
        decoder.decode(&insert_streamed),
        Ok(Message::Insert {
            xid: Some(740),
            oid: 16385,
            new: vec![TupleValue::Null]
        })
    );
    // A failed decode inside the block does not leave it.
    assert!(decoder.decode(&insert_plain).is_err());
    assert!(decoder.in_stream());

    assert_eq!(decoder.decode(b"E"), Ok(Message::StreamStop));
    assert!(!decoder.in_stream());
    assert_eq!(
        decoder.decode(&insert_plain),
        Ok(Message::Insert {
            xid: None,
            oid: 16385,
            new: vec![TupleValue::Null]
        })
    );
    assert_eq!(
        decoder.decode(&cat(&[b"c", XID, &[0], LSN, LSN2, TS])),
        Ok(Message::StreamCommit {
            xid: 740,
            flags: 0,
            commit_lsn: 0x016b_3748,
            end_lsn: 0x1_0000_0010,
            commit_time: 0x0002_b81f_5a3c_4100,
        })
    );
}

#[test]
fn in_stream_under_protocol_1_has_no_xid() {
    let ctx = DecodeContext {
        proto_version: 1,
        in_stream: true,
        parallel_streaming: false,
    };
    check(
        &cat(&[b"I", &[0, 0, 0x40, 0x01], b"N", &[0, 0]]),
        ctx,
        Message::Insert {
            xid: None,
            oid: 16385,
            new: vec![],
        },
    );
}

#[test]
fn frames() {
    let bytes = cat(&[b"w", LSN, LSN2, TS, b"E"]);
    let frame = ReplicationFrame::XLogData {
        wal_start: 0x016b_3748,
        wal_end: 0x1_0000_0010,
        send_time: 0x0002_b81f_5a3c_4100,
        data: b"E".to_vec(),
    };
    assert_eq!(decode_frame(&bytes), Ok(frame.clone()));
    assert_eq!(encode_frame(&frame), bytes);

    // XLogData with an empty payload is well formed.
    assert!(matches!(
        decode_frame(&cat(&[b"w", LSN, LSN2, TS])),
        Ok(ReplicationFrame::XLogData { data, .. }) if data.is_empty()
    ));

    for (byte, requested) in [(1u8, true), (0, false)] {
        let bytes = cat(&[b"k", LSN2, TS, &[byte]]);
        let frame = ReplicationFrame::Keepalive {
            wal_end: 0x1_0000_0010,
            send_time: 0x0002_b81f_5a3c_4100,
            reply_requested: requested,
        };
        assert_eq!(decode_frame(&bytes), Ok(frame.clone()));
        assert_eq!(encode_frame(&frame), bytes);
    }
}

// ---- errors ----

#[test]
fn empty_input_and_unknown_tags() {
    assert!(matches!(
        decode(b"", PLAIN),
        Err(DecodeError::UnexpectedEof {
            what: "message tag",
            ..
        })
    ));
    assert_eq!(
        decode(b"Z", PLAIN),
        Err(DecodeError::UnknownTag { tag: b'Z' })
    );
    assert_eq!(
        decode_frame(b"r"),
        Err(DecodeError::UnknownFrameTag { tag: b'r' })
    );
    assert!(matches!(
        decode_frame(b""),
        Err(DecodeError::UnexpectedEof { .. })
    ));
}

#[test]
fn truncated_messages() {
    let full = cat(&[b"B", LSN, TS, XID]);
    for len in 0..full.len() {
        assert!(
            matches!(
                decode(&full[..len], PLAIN),
                Err(DecodeError::UnexpectedEof { .. })
            ),
            "prefix of {len} bytes"
        );
    }
    assert_eq!(
        decode(&cat(&[b"O", LSN, b"abc"]), PLAIN),
        Err(DecodeError::UnterminatedString {
            what: "Origin name"
        })
    );
    assert!(matches!(
        decode_frame(&cat(&[b"k", LSN2, TS])),
        Err(DecodeError::UnexpectedEof { .. })
    ));
}

#[test]
fn trailing_bytes() {
    assert_eq!(
        decode(b"EE", PLAIN),
        Err(DecodeError::TrailingBytes {
            what: "Stream Stop",
            count: 1
        })
    );
    assert_eq!(
        decode_frame(&cat(&[b"k", LSN2, TS, &[0, 0]])),
        Err(DecodeError::TrailingBytes {
            what: "Keepalive",
            count: 1
        })
    );
}

#[test]
fn bad_tuple_and_old_kinds() {
    assert_eq!(
        decode(&cat(&[b"I", &[0, 0, 0, 1], b"N", &[0, 1], b"x"]), PLAIN),
        Err(DecodeError::UnknownTupleKind { kind: b'x' })
    );
    assert_eq!(
        decode(&cat(&[b"I", &[0, 0, 0, 1], b"K", &[0, 0]]), PLAIN),
        Err(DecodeError::ExpectedNewTuple {
            message: "Insert",
            found: b'K'
        })
    );
    assert_eq!(
        decode(&cat(&[b"U", &[0, 0, 0, 1], b"X", &[0, 0]]), PLAIN),
        Err(DecodeError::UnknownOldTupleKind {
            message: "Update",
            kind: b'X'
        })
    );
    assert_eq!(
        decode(
            &cat(&[b"U", &[0, 0, 0, 1], b"K", &[0, 0], b"K", &[0, 0]]),
            PLAIN
        ),
        Err(DecodeError::ExpectedNewTuple {
            message: "Update",
            found: b'K'
        })
    );
    assert_eq!(
        decode(&cat(&[b"D", &[0, 0, 0, 1], b"N", &[0, 0]]), PLAIN),
        Err(DecodeError::UnknownOldTupleKind {
            message: "Delete",
            kind: b'N'
        })
    );
}

#[test]
fn invalid_utf8_is_an_error() {
    assert_eq!(
        decode(&cat(&[b"O", LSN, b"ab\xff\0"]), PLAIN),
        Err(DecodeError::InvalidUtf8 {
            what: "Origin name",
            valid_up_to: 2
        })
    );
}

#[test]
fn negative_and_absurd_lengths_fail_fast() {
    // A text value claiming 2^31 - 1 bytes with a handful left.
    assert_eq!(
        decode(
            &cat(&[
                b"I",
                &[0, 0, 0, 1],
                b"N",
                &[0, 1],
                b"t",
                &[0x7f, 0xff, 0xff, 0xff],
                b"0123456789"
            ]),
            PLAIN
        ),
        Err(DecodeError::LengthExceedsInput {
            what: "TupleData text value",
            declared: 0x7fff_ffff,
            remaining: 10
        })
    );
    // 2^31 as Int32 is negative.
    assert_eq!(
        decode(
            &cat(&[b"M", &[0], LSN, b"p\0", &[0x80, 0, 0, 0], b"0123456789"]),
            PLAIN
        ),
        Err(DecodeError::NegativeLength {
            what: "Message content",
            value: i32::MIN
        })
    );
    assert_eq!(
        decode(
            &cat(&[
                b"I",
                &[0, 0, 0, 1],
                b"N",
                &[0, 1],
                b"b",
                &[0xff, 0xff, 0xff, 0xff]
            ]),
            PLAIN
        ),
        Err(DecodeError::NegativeLength {
            what: "TupleData binary value",
            value: -1
        })
    );
    assert_eq!(
        decode(
            &cat(&[b"T", &[0x7f, 0xff, 0xff, 0xff], &[0], &[0; 8]]),
            PLAIN
        ),
        Err(DecodeError::LengthExceedsInput {
            what: "Truncate relation count",
            declared: 0x7fff_ffff,
            remaining: 8
        })
    );
    assert_eq!(
        decode(&cat(&[b"T", &[0xff, 0xff, 0xff, 0xfe], &[0]]), PLAIN),
        Err(DecodeError::NegativeLength {
            what: "Truncate relation count",
            value: -2
        })
    );
    // 65535 columns, 3 bytes left.
    assert!(matches!(
        decode(
            &cat(&[b"I", &[0, 0, 0, 1], b"N", &[0xff, 0xff], b"nnn"]),
            PLAIN
        ),
        Err(DecodeError::LengthExceedsInput {
            declared: 65535,
            ..
        })
    ));
    assert!(matches!(
        decode(
            &cat(&[
                b"R",
                &[0, 0, 0, 1],
                b"\0",
                b"x\0",
                b"d",
                &[0xff, 0xff],
                &[0; 20]
            ]),
            PLAIN
        ),
        Err(DecodeError::LengthExceedsInput {
            declared: 65535,
            ..
        })
    ));
}

#[test]
fn errors_display() {
    assert_eq!(
        DecodeError::UnknownTag { tag: b'Z' }.to_string(),
        "unknown pgoutput message tag 'Z' (0x5a)"
    );
    assert_eq!(
        DecodeError::UnknownTupleKind { kind: 0 }.to_string(),
        "unknown TupleData column kind 0x00"
    );
}

#[test]
#[should_panic(expected = "xid must be Some")]
fn encode_rejects_missing_streamed_xid() {
    encode(
        &Message::Insert {
            xid: None,
            oid: 1,
            new: vec![],
        },
        STREAM,
    );
}

#[test]
#[should_panic(expected = "NUL")]
fn encode_rejects_nul_in_string() {
    encode(
        &Message::Origin {
            commit_lsn: 0,
            name: "a\0b".into(),
        },
        PLAIN,
    );
}
