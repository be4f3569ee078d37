//! Encoder of pgoutput messages and walsender frames: the exact inverse of
//! [`decode`](crate::decode) and [`decode_frame`](crate::decode_frame), for tests and
//! for replaying hand-made streams.

use crate::message::{DecodeContext, Message, OldKind, ReplicationFrame, TupleData, TupleValue};

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn string(&mut self, s: &str, what: &str) {
        assert!(
            !s.as_bytes().contains(&0),
            "cannot encode {what}: a pgoutput String cannot contain a NUL byte"
        );
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn len32(&mut self, len: usize, what: &str) {
        let len = i32::try_from(len)
            .unwrap_or_else(|_| panic!("cannot encode {what}: {len} does not fit an Int32"));
        self.i32(len);
    }

    fn len_prefixed(&mut self, bytes: &[u8], what: &str) {
        self.len32(bytes.len(), what);
        self.buf.extend_from_slice(bytes);
    }

    fn count16(&mut self, count: usize, what: &str) {
        let count = u16::try_from(count)
            .unwrap_or_else(|_| panic!("cannot encode {what}: {count} does not fit an Int16"));
        self.u16(count);
    }

    fn tuple(&mut self, tuple: &TupleData) {
        self.count16(tuple.len(), "TupleData column count");
        for value in tuple {
            match value {
                TupleValue::Null => self.u8(b'n'),
                TupleValue::UnchangedToast => self.u8(b'u'),
                TupleValue::Text(bytes) => {
                    self.u8(b't');
                    self.len_prefixed(bytes, "TupleData text value length");
                }
                TupleValue::Binary(bytes) => {
                    self.u8(b'b');
                    self.len_prefixed(bytes, "TupleData binary value length");
                }
            }
        }
    }

    fn old_tuple(&mut self, (kind, tuple): &(OldKind, TupleData)) {
        self.u8(match kind {
            OldKind::Key => b'K',
            OldKind::Old => b'O',
        });
        self.tuple(tuple);
    }

    fn streamed_xid(&mut self, xid: Option<u32>, ctx: DecodeContext, message: &str) {
        match (ctx.has_streamed_xid(), xid) {
            (true, Some(xid)) => self.u32(xid),
            (false, None) => {}
            (true, None) => panic!(
                "cannot encode {message}: the context is in a streaming block, so the xid must be Some"
            ),
            (false, Some(_)) => panic!(
                "cannot encode {message}: the context is not in a streaming block (protocol 2+), so the xid must be None"
            ),
        }
    }
}

/// Encodes one pgoutput message (tag byte first) as a server would send it under
/// `ctx`, so that `decode(&encode(msg, ctx), ctx) == Ok(msg.clone())`.
///
/// # Panics
///
/// When `msg` cannot be represented on the wire under `ctx`: a streamed `xid` that is
/// `Some` outside a streaming block or `None` inside one (see
/// [`DecodeContext::has_streamed_xid`]); Stream Abort `abort_lsn`/`abort_time` not both
/// `Some` with `ctx.parallel_streaming` or not both `None` without; a String holding a
/// NUL byte; more than 65535 columns; a value or Truncate list longer than `i32::MAX`.
pub fn encode(msg: &Message, ctx: DecodeContext) -> Vec<u8> {
    let mut w = Writer { buf: Vec::new() };
    match msg {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            w.u8(b'B');
            w.u64(*final_lsn);
            w.i64(*commit_time);
            w.u32(*xid);
        }
        Message::Message {
            xid,
            flags,
            lsn,
            prefix,
            content,
        } => {
            w.u8(b'M');
            w.streamed_xid(*xid, ctx, "Message");
            w.u8(*flags);
            w.u64(*lsn);
            w.string(prefix, "Message prefix");
            w.len_prefixed(content, "Message content length");
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            w.u8(b'C');
            w.u8(*flags);
            w.u64(*commit_lsn);
            w.u64(*end_lsn);
            w.i64(*commit_time);
        }
        Message::Origin { commit_lsn, name } => {
            w.u8(b'O');
            w.u64(*commit_lsn);
            w.string(name, "Origin name");
        }
        Message::Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } => {
            w.u8(b'R');
            w.streamed_xid(*xid, ctx, "Relation");
            w.u32(*oid);
            w.string(namespace, "Relation namespace");
            w.string(name, "Relation name");
            w.u8(*replica_identity);
            w.count16(columns.len(), "Relation column count");
            for column in columns {
                w.u8(column.flags);
                w.string(&column.name, "Relation column name");
                w.u32(column.type_oid);
                w.i32(column.type_modifier);
            }
        }
        Message::Type {
            xid,
            oid,
            namespace,
            name,
        } => {
            w.u8(b'Y');
            w.streamed_xid(*xid, ctx, "Type");
            w.u32(*oid);
            w.string(namespace, "Type namespace");
            w.string(name, "Type name");
        }
        Message::Insert { xid, oid, new } => {
            w.u8(b'I');
            w.streamed_xid(*xid, ctx, "Insert");
            w.u32(*oid);
            w.u8(b'N');
            w.tuple(new);
        }
        Message::Update { xid, oid, old, new } => {
            w.u8(b'U');
            w.streamed_xid(*xid, ctx, "Update");
            w.u32(*oid);
            if let Some(old) = old {
                w.old_tuple(old);
            }
            w.u8(b'N');
            w.tuple(new);
        }
        Message::Delete { xid, oid, old } => {
            w.u8(b'D');
            w.streamed_xid(*xid, ctx, "Delete");
            w.u32(*oid);
            w.old_tuple(old);
        }
        Message::Truncate { xid, options, oids } => {
            w.u8(b'T');
            w.streamed_xid(*xid, ctx, "Truncate");
            w.len32(oids.len(), "Truncate relation count");
            w.u8(*options);
            for oid in oids {
                w.u32(*oid);
            }
        }
        Message::StreamStart { xid, first_segment } => {
            w.u8(b'S');
            w.u32(*xid);
            w.u8(u8::from(*first_segment));
        }
        Message::StreamStop => w.u8(b'E'),
        Message::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            w.u8(b'c');
            w.u32(*xid);
            w.u8(*flags);
            w.u64(*commit_lsn);
            w.u64(*end_lsn);
            w.i64(*commit_time);
        }
        Message::StreamAbort {
            xid,
            subxid,
            abort_lsn,
            abort_time,
        } => {
            w.u8(b'A');
            w.u32(*xid);
            w.u32(*subxid);
            match (ctx.has_abort_info(), abort_lsn, abort_time) {
                (true, Some(lsn), Some(time)) => {
                    w.u64(*lsn);
                    w.i64(*time);
                }
                (false, None, None) => {}
                (true, ..) => panic!(
                    "cannot encode Stream Abort: with parallel streaming abort_lsn and abort_time must be Some"
                ),
                (false, ..) => panic!(
                    "cannot encode Stream Abort: without parallel streaming abort_lsn and abort_time must be None"
                ),
            }
        }
        Message::BeginPrepare {
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        } => {
            w.u8(b'b');
            w.u64(*prepare_lsn);
            w.u64(*end_lsn);
            w.i64(*prepare_time);
            w.u32(*xid);
            w.string(gid, "Begin Prepare gid");
        }
        Message::Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        } => {
            w.u8(b'P');
            w.u8(*flags);
            w.u64(*prepare_lsn);
            w.u64(*end_lsn);
            w.i64(*prepare_time);
            w.u32(*xid);
            w.string(gid, "Prepare gid");
        }
        Message::CommitPrepared {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
            xid,
            gid,
        } => {
            w.u8(b'K');
            w.u8(*flags);
            w.u64(*commit_lsn);
            w.u64(*end_lsn);
            w.i64(*commit_time);
            w.u32(*xid);
            w.string(gid, "Commit Prepared gid");
        }
        Message::RollbackPrepared {
            flags,
            prepare_end_lsn,
            rollback_end_lsn,
            prepare_time,
            rollback_time,
            xid,
            gid,
        } => {
            w.u8(b'r');
            w.u8(*flags);
            w.u64(*prepare_end_lsn);
            w.u64(*rollback_end_lsn);
            w.i64(*prepare_time);
            w.i64(*rollback_time);
            w.u32(*xid);
            w.string(gid, "Rollback Prepared gid");
        }
        Message::StreamPrepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        } => {
            w.u8(b'p');
            w.u8(*flags);
            w.u64(*prepare_lsn);
            w.u64(*end_lsn);
            w.i64(*prepare_time);
            w.u32(*xid);
            w.string(gid, "Stream Prepare gid");
        }
    }
    w.buf
}

/// Encodes a walsender CopyData payload, the inverse of
/// [`decode_frame`](crate::decode_frame). A keepalive's reply-requested byte is 1 or 0.
pub fn encode_frame(frame: &ReplicationFrame) -> Vec<u8> {
    let mut w = Writer { buf: Vec::new() };
    match frame {
        ReplicationFrame::XLogData {
            wal_start,
            wal_end,
            send_time,
            data,
        } => {
            w.buf.reserve(25 + data.len());
            w.u8(b'w');
            w.u64(*wal_start);
            w.u64(*wal_end);
            w.i64(*send_time);
            w.buf.extend_from_slice(data);
        }
        ReplicationFrame::Keepalive {
            wal_end,
            send_time,
            reply_requested,
        } => {
            w.u8(b'k');
            w.u64(*wal_end);
            w.i64(*send_time);
            w.u8(u8::from(*reply_requested));
        }
    }
    w.buf
}
