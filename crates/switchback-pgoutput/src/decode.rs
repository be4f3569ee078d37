//! Decoder of pgoutput messages and of the walsender frames that carry them.
//!
//! Every read is bounds-checked and every declared length or count is checked against
//! the bytes that remain before anything is allocated for it, so no input can make the
//! decoder panic or allocate more than a small multiple of the input size.

// Enforce the no-panic rule statically, on top of the fuzzer and the property tests.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::unreachable,
    clippy::as_conversions,
    clippy::arithmetic_side_effects
)]

use std::fmt;

use crate::message::{
    DecodeContext, Message, OldKind, RelationColumn, ReplicationFrame, TupleData, TupleValue,
};

/// Why a buffer is not a valid pgoutput message or walsender frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends inside a fixed-size field or a length-prefixed value.
    #[error("unexpected end of input reading {what}: {needed} bytes needed, {remaining} left")]
    UnexpectedEof {
        what: &'static str,
        needed: usize,
        remaining: usize,
    },
    /// The input ends inside a String (no terminating NUL byte).
    #[error("unexpected end of input reading {what}: string has no terminating NUL")]
    UnterminatedString { what: &'static str },
    /// The first byte is not a known pgoutput message tag.
    #[error("unknown pgoutput message tag {}", ByteDisplay(*tag))]
    UnknownTag { tag: u8 },
    /// The first byte of a CopyData payload is neither 'w' nor 'k'.
    #[error("unknown replication frame tag {}", ByteDisplay(*tag))]
    UnknownFrameTag { tag: u8 },
    /// A TupleData column kind other than 'n', 'u', 't' or 'b'.
    #[error("unknown TupleData column kind {}", ByteDisplay(*kind))]
    UnknownTupleKind { kind: u8 },
    /// An Update or Delete whose old-tuple marker is neither 'K' nor 'O'
    /// (nor 'N' for an Update without old tuple).
    #[error("unknown old tuple kind {} in {message}", ByteDisplay(*kind))]
    UnknownOldTupleKind { message: &'static str, kind: u8 },
    /// An Insert or Update where the new-tuple marker 'N' was expected.
    #[error("expected new tuple marker 'N' in {message}, found {}", ByteDisplay(*found))]
    ExpectedNewTuple { message: &'static str, found: u8 },
    /// A String that is not valid UTF-8.
    #[error("{what} is not valid UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 {
        what: &'static str,
        valid_up_to: usize,
    },
    /// Bytes left over after a complete message.
    #[error("{count} trailing bytes after a complete {what}")]
    TrailingBytes { what: &'static str, count: usize },
    /// A length or count field holding a negative number.
    #[error("negative length {value} for {what}")]
    NegativeLength { what: &'static str, value: i32 },
    /// A length or count field larger than the rest of the input can possibly hold.
    #[error("{what} declares {declared}, more than the {remaining} bytes left can hold")]
    LengthExceedsInput {
        what: &'static str,
        declared: usize,
        remaining: usize,
    },
}

/// Shows a tag byte as `'B' (0x42)`, or as `0x00` when not printable.
struct ByteDisplay(u8);

impl fmt::Display for ByteDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// A cursor over the input. It only ever shrinks `rest` through checked splits.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(DecodeError::UnexpectedEof {
                what,
                needed: N,
                remaining: self.rest.len(),
            }),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(head)
            }
            None => Err(DecodeError::UnexpectedEof {
                what,
                needed: n,
                remaining: self.rest.len(),
            }),
        }
    }

    /// Everything that is left.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// An Int32 length or count, rejected when negative.
    fn len32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength { what, value })
    }

    /// Int32 length followed by that many bytes. Nothing is allocated here, and the
    /// length is checked against the input before the caller copies the bytes.
    fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.len32(what)?;
        if len > self.rest.len() {
            return Err(DecodeError::LengthExceedsInput {
                what,
                declared: len,
                remaining: self.rest.len(),
            });
        }
        self.bytes(len, what)
    }

    /// Fails unless `count` items of at least `min_item_size` bytes each can fit in
    /// what is left; called before reserving room for `count` items.
    fn ensure_room(
        &self,
        count: usize,
        min_item_size: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        match count.checked_mul(min_item_size) {
            Some(n) if n <= self.rest.len() => Ok(()),
            _ => Err(DecodeError::LengthExceedsInput {
                what,
                declared: count,
                remaining: self.rest.len(),
            }),
        }
    }

    /// A NUL-terminated UTF-8 String.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString { what });
        };
        let raw = self.bytes(nul, what)?;
        self.u8(what)?; // the NUL itself
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(DecodeError::InvalidUtf8 {
                what,
                valid_up_to: e.valid_up_to(),
            }),
        }
    }

    /// TupleData: Int16 column count, then per column a kind byte and for 't'/'b' an
    /// Int32 length and the bytes. The count is unsigned on the wire, as PostgreSQL
    /// itself reads it.
    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let what = "TupleData column count";
        let count = usize::from(self.u16(what)?);
        // Every column takes at least its kind byte.
        self.ensure_room(count, 1, what)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let value = match self.u8("TupleData column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => TupleValue::Text(self.len_prefixed("TupleData text value")?.to_vec()),
                b'b' => TupleValue::Binary(self.len_prefixed("TupleData binary value")?.to_vec()),
                kind => return Err(DecodeError::UnknownTupleKind { kind }),
            };
            values.push(value);
        }
        Ok(values)
    }

    fn streamed_xid(
        &mut self,
        ctx: DecodeContext,
        what: &'static str,
    ) -> Result<Option<u32>, DecodeError> {
        if ctx.has_streamed_xid() {
            self.u32(what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Fails if anything is left after a complete `what`.
    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                what,
                count: self.rest.len(),
            })
        }
    }
}

/// Decodes one pgoutput message; `buf` starts with the tag byte and must hold exactly
/// one message.
///
/// `ctx` says what the bytes cannot: whether data messages carry the streamed xid
/// (`in_stream` and protocol 2+) and whether Stream Abort carries its LSN and time
/// (`parallel_streaming`). Messages are not rejected for being newer than
/// `ctx.proto_version` (e.g. Stream Start under protocol 1): the server decides what it
/// sends and the layout of every message is the same in every version.
pub fn decode(buf: &[u8], ctx: DecodeContext) -> Result<Message, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message tag")?;
    let (msg, name) = match tag {
        b'B' => (
            Message::Begin {
                final_lsn: r.u64("Begin final_lsn")?,
                commit_time: r.i64("Begin commit_time")?,
                xid: r.u32("Begin xid")?,
            },
            "Begin",
        ),
        b'M' => (
            Message::Message {
                xid: r.streamed_xid(ctx, "Message xid")?,
                flags: r.u8("Message flags")?,
                lsn: r.u64("Message lsn")?,
                prefix: r.string("Message prefix")?,
                content: r.len_prefixed("Message content")?.to_vec(),
            },
            "Message",
        ),
        b'C' => (
            Message::Commit {
                flags: r.u8("Commit flags")?,
                commit_lsn: r.u64("Commit commit_lsn")?,
                end_lsn: r.u64("Commit end_lsn")?,
                commit_time: r.i64("Commit commit_time")?,
            },
            "Commit",
        ),
        b'O' => (
            Message::Origin {
                commit_lsn: r.u64("Origin commit_lsn")?,
                name: r.string("Origin name")?,
            },
            "Origin",
        ),
        b'R' => {
            let xid = r.streamed_xid(ctx, "Relation xid")?;
            let oid = r.u32("Relation oid")?;
            let namespace = r.string("Relation namespace")?;
            let name = r.string("Relation name")?;
            let replica_identity = r.u8("Relation replica_identity")?;
            let what = "Relation column count";
            let count = usize::from(r.u16(what)?);
            // flags (1) + name (at least its NUL) + type oid (4) + type modifier (4)
            r.ensure_room(count, 10, what)?;
            let mut columns = Vec::with_capacity(count);
            for _ in 0..count {
                columns.push(RelationColumn {
                    flags: r.u8("Relation column flags")?,
                    name: r.string("Relation column name")?,
                    type_oid: r.u32("Relation column type_oid")?,
                    type_modifier: r.i32("Relation column type_modifier")?,
                });
            }
            (
                Message::Relation {
                    xid,
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
                "Relation",
            )
        }
        b'Y' => (
            Message::Type {
                xid: r.streamed_xid(ctx, "Type xid")?,
                oid: r.u32("Type oid")?,
                namespace: r.string("Type namespace")?,
                name: r.string("Type name")?,
            },
            "Type",
        ),
        b'I' => {
            let xid = r.streamed_xid(ctx, "Insert xid")?;
            let oid = r.u32("Insert relation oid")?;
            let marker = r.u8("Insert new tuple marker")?;
            if marker != b'N' {
                return Err(DecodeError::ExpectedNewTuple {
                    message: "Insert",
                    found: marker,
                });
            }
            let new = r.tuple()?;
            (Message::Insert { xid, oid, new }, "Insert")
        }
        b'U' => {
            let xid = r.streamed_xid(ctx, "Update xid")?;
            let oid = r.u32("Update relation oid")?;
            let (old, marker) = match r.u8("Update tuple marker")? {
                b'N' => (None, b'N'),
                b'K' => (
                    Some((OldKind::Key, r.tuple()?)),
                    r.u8("Update new tuple marker")?,
                ),
                b'O' => (
                    Some((OldKind::Old, r.tuple()?)),
                    r.u8("Update new tuple marker")?,
                ),
                kind => {
                    return Err(DecodeError::UnknownOldTupleKind {
                        message: "Update",
                        kind,
                    })
                }
            };
            if marker != b'N' {
                return Err(DecodeError::ExpectedNewTuple {
                    message: "Update",
                    found: marker,
                });
            }
            let new = r.tuple()?;
            (Message::Update { xid, oid, old, new }, "Update")
        }
        b'D' => {
            let xid = r.streamed_xid(ctx, "Delete xid")?;
            let oid = r.u32("Delete relation oid")?;
            let kind = match r.u8("Delete old tuple marker")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Old,
                kind => {
                    return Err(DecodeError::UnknownOldTupleKind {
                        message: "Delete",
                        kind,
                    })
                }
            };
            let old = (kind, r.tuple()?);
            (Message::Delete { xid, oid, old }, "Delete")
        }
        b'T' => {
            let xid = r.streamed_xid(ctx, "Truncate xid")?;
            let what = "Truncate relation count";
            let count = r.len32(what)?;
            let options = r.u8("Truncate options")?;
            r.ensure_room(count, 4, what)?;
            let mut oids = Vec::with_capacity(count);
            for _ in 0..count {
                oids.push(r.u32("Truncate relation oid")?);
            }
            (Message::Truncate { xid, options, oids }, "Truncate")
        }
        b'S' => (
            Message::StreamStart {
                xid: r.u32("Stream Start xid")?,
                // PostgreSQL's own reader treats only 1 as true.
                first_segment: r.u8("Stream Start first_segment")? == 1,
            },
            "Stream Start",
        ),
        b'E' => (Message::StreamStop, "Stream Stop"),
        b'c' => (
            Message::StreamCommit {
                xid: r.u32("Stream Commit xid")?,
                flags: r.u8("Stream Commit flags")?,
                commit_lsn: r.u64("Stream Commit commit_lsn")?,
                end_lsn: r.u64("Stream Commit end_lsn")?,
                commit_time: r.i64("Stream Commit commit_time")?,
            },
            "Stream Commit",
        ),
        b'A' => {
            let xid = r.u32("Stream Abort xid")?;
            let subxid = r.u32("Stream Abort subxid")?;
            let (abort_lsn, abort_time) = if ctx.has_abort_info() {
                (
                    Some(r.u64("Stream Abort abort_lsn")?),
                    Some(r.i64("Stream Abort abort_time")?),
                )
            } else {
                (None, None)
            };
            (
                Message::StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time,
                },
                "Stream Abort",
            )
        }
        b'b' => (
            Message::BeginPrepare {
                prepare_lsn: r.u64("Begin Prepare prepare_lsn")?,
                end_lsn: r.u64("Begin Prepare end_lsn")?,
                prepare_time: r.i64("Begin Prepare prepare_time")?,
                xid: r.u32("Begin Prepare xid")?,
                gid: r.string("Begin Prepare gid")?,
            },
            "Begin Prepare",
        ),
        b'P' => (
            Message::Prepare {
                flags: r.u8("Prepare flags")?,
                prepare_lsn: r.u64("Prepare prepare_lsn")?,
                end_lsn: r.u64("Prepare end_lsn")?,
                prepare_time: r.i64("Prepare prepare_time")?,
                xid: r.u32("Prepare xid")?,
                gid: r.string("Prepare gid")?,
            },
            "Prepare",
        ),
        b'K' => (
            Message::CommitPrepared {
                flags: r.u8("Commit Prepared flags")?,
                commit_lsn: r.u64("Commit Prepared commit_lsn")?,
                end_lsn: r.u64("Commit Prepared end_lsn")?,
                commit_time: r.i64("Commit Prepared commit_time")?,
                xid: r.u32("Commit Prepared xid")?,
                gid: r.string("Commit Prepared gid")?,
            },
            "Commit Prepared",
        ),
        b'r' => (
            Message::RollbackPrepared {
                flags: r.u8("Rollback Prepared flags")?,
                prepare_end_lsn: r.u64("Rollback Prepared prepare_end_lsn")?,
                rollback_end_lsn: r.u64("Rollback Prepared rollback_end_lsn")?,
                prepare_time: r.i64("Rollback Prepared prepare_time")?,
                rollback_time: r.i64("Rollback Prepared rollback_time")?,
                xid: r.u32("Rollback Prepared xid")?,
                gid: r.string("Rollback Prepared gid")?,
            },
            "Rollback Prepared",
        ),
        b'p' => (
            Message::StreamPrepare {
                flags: r.u8("Stream Prepare flags")?,
                prepare_lsn: r.u64("Stream Prepare prepare_lsn")?,
                end_lsn: r.u64("Stream Prepare end_lsn")?,
                prepare_time: r.i64("Stream Prepare prepare_time")?,
                xid: r.u32("Stream Prepare xid")?,
                gid: r.string("Stream Prepare gid")?,
            },
            "Stream Prepare",
        ),
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish(name)?;
    Ok(msg)
}

/// Decodes one CopyData payload of the walsender stream: XLogData ('w', whose `data`
/// is everything after the header) or primary keepalive ('k').
///
/// Any non-zero reply-requested byte of a keepalive counts as a request.
pub fn decode_frame(buf: &[u8]) -> Result<ReplicationFrame, DecodeError> {
    let mut r = Reader::new(buf);
    match r.u8("replication frame tag")? {
        b'w' => Ok(ReplicationFrame::XLogData {
            wal_start: r.u64("XLogData wal_start")?,
            wal_end: r.u64("XLogData wal_end")?,
            send_time: r.i64("XLogData send_time")?,
            data: r.rest().to_vec(),
        }),
        b'k' => {
            let frame = ReplicationFrame::Keepalive {
                wal_end: r.u64("Keepalive wal_end")?,
                send_time: r.i64("Keepalive send_time")?,
                reply_requested: r.u8("Keepalive reply_requested")? != 0,
            };
            r.finish("Keepalive")?;
            Ok(frame)
        }
        tag => Err(DecodeError::UnknownFrameTag { tag }),
    }
}

/// A stateful decoder for a sequence of pgoutput messages of one replication
/// connection: it follows Stream Start / Stream Stop to know when data messages carry
/// the streamed xid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    ctx: DecodeContext,
}

impl Decoder {
    /// A decoder for the negotiated `proto_version`, outside any streaming block.
    /// `parallel_streaming` is true when the subscription asked for `streaming = parallel`.
    pub fn new(proto_version: u32, parallel_streaming: bool) -> Self {
        Decoder {
            ctx: DecodeContext {
                proto_version,
                in_stream: false,
                parallel_streaming,
            },
        }
    }

    /// Decodes the next message. A successful Stream Start enters a streaming block,
    /// a successful Stream Stop leaves it; errors leave the state unchanged.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Message, DecodeError> {
        let msg = decode(buf, self.ctx)?;
        match msg {
            Message::StreamStart { .. } => self.ctx.in_stream = true,
            Message::StreamStop => self.ctx.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    /// The context the next message will be decoded with.
    pub fn context(&self) -> DecodeContext {
        self.ctx
    }

    /// Whether the decoder is inside a streaming block.
    pub fn in_stream(&self) -> bool {
        self.ctx.in_stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_big_endian_and_reports_eof() {
        let mut r = Reader::new(&[0, 0, 0, 1, 0xff]);
        assert_eq!(r.u32("x"), Ok(1));
        assert_eq!(
            r.u16("y"),
            Err(DecodeError::UnexpectedEof {
                what: "y",
                needed: 2,
                remaining: 1
            })
        );
        // A failed read consumes nothing.
        assert_eq!(r.u8("z"), Ok(0xff));
        assert_eq!(r.finish("m"), Ok(()));
    }

    #[test]
    fn ensure_room_handles_overflow() {
        let r = Reader::new(&[0; 8]);
        assert!(r.ensure_room(usize::MAX, 10, "n").is_err());
        assert!(r.ensure_room(2, 4, "n").is_ok());
        assert!(r.ensure_room(3, 4, "n").is_err());
    }

    #[test]
    fn byte_display() {
        assert_eq!(ByteDisplay(b'B').to_string(), "'B' (0x42)");
        assert_eq!(ByteDisplay(0).to_string(), "0x00");
    }
}
