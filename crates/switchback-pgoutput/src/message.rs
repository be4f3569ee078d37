//! Typed pgoutput messages (PostgreSQL docs, "Logical Replication Message Formats")
//! and the two walsender frames that carry them (XLogData and primary keepalive).
//!
//! LSNs and timestamps are kept as the raw integers of the wire: an LSN is a `u64`,
//! a timestamp is microseconds since 2000-01-01 00:00:00 UTC (`i64`).

/// One column value of a TupleData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// 'n': SQL NULL.
    Null,
    /// 'u': an unchanged TOASTed value; its data is not sent.
    UnchangedToast,
    /// 't': the value in the type's text output format.
    Text(Vec<u8>),
    /// 'b': the value in the type's binary send format.
    Binary(Vec<u8>),
}

/// TupleData: one value per column of the relation, in column order.
pub type TupleData = Vec<TupleValue>;

/// Which old tuple an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only the replica identity (key) columns are meaningful; the others are null.
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Old,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags; bit 1 means the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Replication protocol messages of pgoutput, protocol versions 1 to 4.
///
/// `xid` fields marked "streamed" are present on the wire only inside a streaming
/// block (between Stream Start and Stream Stop, protocol 2+); they are `None` otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 'B'
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    /// 'M' (transactional flag = bit 1 of flags)
    Message {
        xid: Option<u32>,
        flags: u8,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
    /// 'C'
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    /// 'O'
    Origin { commit_lsn: u64, name: String },
    /// 'R'. `namespace` is empty for pg_catalog.
    Relation {
        xid: Option<u32>,
        oid: u32,
        namespace: String,
        name: String,
        replica_identity: u8,
        columns: Vec<RelationColumn>,
    },
    /// 'Y'
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: String,
        name: String,
    },
    /// 'I'
    Insert {
        xid: Option<u32>,
        oid: u32,
        new: TupleData,
    },
    /// 'U'
    Update {
        xid: Option<u32>,
        oid: u32,
        old: Option<(OldKind, TupleData)>,
        new: TupleData,
    },
    /// 'D'
    Delete {
        xid: Option<u32>,
        oid: u32,
        old: (OldKind, TupleData),
    },
    /// 'T'. options: bit 1 = CASCADE, bit 2 = RESTART IDENTITY.
    Truncate {
        xid: Option<u32>,
        options: u8,
        oids: Vec<u32>,
    },
    /// 'S'
    StreamStart { xid: u32, first_segment: bool },
    /// 'E'
    StreamStop,
    /// 'c'
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    /// 'A'. `abort_lsn`/`abort_time` are present only with streaming = parallel (protocol 4).
    StreamAbort {
        xid: u32,
        subxid: u32,
        abort_lsn: Option<u64>,
        abort_time: Option<i64>,
    },
    /// 'b'
    BeginPrepare {
        prepare_lsn: u64,
        end_lsn: u64,
        prepare_time: i64,
        xid: u32,
        gid: String,
    },
    /// 'P'
    Prepare {
        flags: u8,
        prepare_lsn: u64,
        end_lsn: u64,
        prepare_time: i64,
        xid: u32,
        gid: String,
    },
    /// 'K'
    CommitPrepared {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
        xid: u32,
        gid: String,
    },
    /// 'r'
    RollbackPrepared {
        flags: u8,
        prepare_end_lsn: u64,
        rollback_end_lsn: u64,
        prepare_time: i64,
        rollback_time: i64,
        xid: u32,
        gid: String,
    },
    /// 'p'
    StreamPrepare {
        flags: u8,
        prepare_lsn: u64,
        end_lsn: u64,
        prepare_time: i64,
        xid: u32,
        gid: String,
    },
}

/// What the decoder must know that the bytes do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeContext {
    /// Negotiated proto_version (1..=4).
    pub proto_version: u32,
    /// True between Stream Start and Stream Stop: data messages carry an xid.
    pub in_stream: bool,
    /// True when `streaming = parallel` (protocol 4): Stream Abort carries lsn and time.
    pub parallel_streaming: bool,
}

impl DecodeContext {
    /// Whether Relation, Type, Insert, Update, Delete, Truncate and Message carry the
    /// streamed xid: inside a streaming block, and only from protocol version 2 on
    /// (streaming does not exist before).
    pub fn has_streamed_xid(&self) -> bool {
        self.in_stream && self.proto_version >= 2
    }

    /// Whether Stream Abort carries `abort_lsn` and `abort_time` (`streaming = parallel`).
    pub fn has_abort_info(&self) -> bool {
        self.parallel_streaming
    }
}

/// A CopyData payload of the walsender stream (START_REPLICATION ... LOGICAL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationFrame {
    /// 'w': WAL data, here one pgoutput message.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        send_time: i64,
        data: Vec<u8>,
    },
    /// 'k': primary keepalive.
    Keepalive {
        wal_end: u64,
        send_time: i64,
        reply_requested: bool,
    },
}
