//! The durable queue between capture and apply.
//!
//! # Contract
//!
//! * **Visibility.** A transaction's records are appended while it is in progress
//!   (memory stays bounded whatever its size) and become visible to readers only
//!   when the writer commits it. Discarded (aborted) transactions never become
//!   visible.
//! * **Order.** Committed transactions are read in the order they were committed to
//!   the queue, which capture guarantees is the hub's commit order; each gets a
//!   sequence number (`seq`) that only grows.
//! * **Durability.** [`QueueWriter::flush`] returns once everything committed before
//!   it survives a crash (kill -9, power loss). Only then may capture acknowledge the
//!   hub's slot up to those transactions' `end_lsn`.
//! * **No duplicates from the writer.** [`QueueWriter::last_end_lsn`] is the end LSN of
//!   the last committed transaction; capture drops any transaction at or below it
//!   that the hub sends again after a restart.
//! * **Redelivery.** A reader may see a transaction again after a crash (its
//!   acknowledgement was not durable yet): apply deduplicates by `end_lsn` against
//!   the progress it keeps in the member.
//! * **Acknowledgement and retention.** [`QueueReader::ack`] marks every transaction up
//!   to `seq` as applied; the queue may then delete them. Acknowledging never moves
//!   backwards.
//! * **Gaps.** Every transaction carries its `seq` and `prev_end_lsn` (the end LSN
//!   of the one committed before it). A reader, told where the member stands
//!   ([`QueueReader::resume`]), proves each transaction follows the previous one
//!   and stops with [`QueueError::Gap`] otherwise (see [`continuity`]).

pub mod continuity;
pub mod sled_log;

use switchback_core::{Lsn, Record, TxnHeader};

pub use continuity::Continuity;
pub use sled_log::SledLog;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue storage at {path}: {message}")]
    Storage { path: String, message: String },
    #[error("queue at {path} is in use by another switchback process (only one process can open an embedded sled log; stop it or use `switchback status`)")]
    Locked { path: String },
    #[error("queue record: {0}")]
    Format(#[from] switchback_core::record::FormatError),
    #[error("queue is corrupt: {0}")]
    Corrupt(String),
    #[error("unknown in-progress transaction {0} in queue writer")]
    UnknownOpen(u64),
    #[error("the queue has a gap: the hub transactions ending after {after} and up to {upto} are missing{} (next stored transaction: seq {next_seq}); a broker lost data or the topic was truncated. Nothing after the gap was applied. Re-seed the member, or restore the missing messages and restart", missing_seqs.map(|(a, b)| format!(" (seq {a}..={b})")).unwrap_or_default())]
    Gap {
        after: Lsn,
        upto: Lsn,
        next_seq: u64,
        missing_seqs: Option<(u64, u64)>,
    },
    /// The broker cannot be reached or refused a request; retrying may help.
    #[error("queue broker: {0}")]
    Broker(String),
}

impl switchback_core::Classify for QueueError {
    fn class(&self) -> switchback_core::ErrorClass {
        match self {
            QueueError::Broker(_) => switchback_core::ErrorClass::Transient,
            _ => switchback_core::ErrorClass::Definite,
        }
    }
}

/// The records of a transaction, chunk by chunk.
pub type RecordChunks<'a> = Box<dyn Iterator<Item = Result<Vec<Record>, QueueError>> + Send + 'a>;

/// A flush running in the background (see [`QueueWriter::flush_in_background`]).
pub type BackgroundFlush =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), QueueError>> + Send + 'static>>;

/// Identifies a transaction that is being written and is not visible yet.
pub type OpenId = u64;

/// A committed transaction as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedTxn {
    pub seq: u64,
    /// End LSN of the transaction committed to the queue just before this one
    /// (for the first: the slot position capture started from, when known).
    pub prev_end_lsn: Option<Lsn>,
    pub header: TxnHeader,
}

/// Depth of the queue: what is committed and not acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Depth {
    pub transactions: u64,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_end_lsn: Option<Lsn>,
}

/// The capture side.
pub trait QueueWriter {
    /// Starts a transaction that is not visible until [`commit`](Self::commit).
    fn open(&mut self) -> OpenId;
    /// Appends records to an open transaction. `subxid` tags them so that a
    /// sub-transaction abort can drop exactly its own (use the top xid otherwise).
    fn append(&mut self, id: OpenId, subxid: u32, records: &[Record]) -> Result<(), QueueError>;
    /// As [`append`](Self::append), handing the records over: a queue may keep
    /// them for a reader of this process (see `SledLog::keep_decoded`).
    fn append_owned(
        &mut self,
        id: OpenId,
        subxid: u32,
        records: Vec<Record>,
    ) -> Result<(), QueueError> {
        self.append(id, subxid, &records)
    }
    /// Drops an open transaction and everything appended to it.
    fn discard(&mut self, id: OpenId) -> Result<(), QueueError>;
    /// Drops the records of one sub-transaction of an open transaction.
    fn discard_subxact(&mut self, id: OpenId, subxid: u32) -> Result<(), QueueError>;
    /// Makes an open transaction visible, after every transaction committed before.
    /// Not durable until [`flush`](Self::flush).
    fn commit(&mut self, id: OpenId, header: TxnHeader) -> Result<u64, QueueError>;
    /// Waits until everything committed so far is durable.
    fn flush(&mut self) -> impl std::future::Future<Output = Result<(), QueueError>> + Send;
    /// Starts a flush that runs while the writer goes on: the returned future
    /// completes once everything committed before this call is durable (what
    /// [`flush`](Self::flush) promises), whatever is committed meanwhile. `None`: this
    /// queue cannot flush in the background (use `flush`).
    fn flush_in_background(&mut self) -> Option<Result<BackgroundFlush, QueueError>> {
        None
    }
    /// End LSN of the last committed transaction.
    fn last_end_lsn(&self) -> Option<Lsn>;
    /// Tells an empty queue where the hub's stream starts (the slot's confirmed
    /// position): the first transaction then records it as its `prev_end_lsn`, so
    /// a reader can prove nothing was lost before it. Ignored once the queue
    /// holds a transaction.
    fn start_at(&mut self, _lsn: Lsn) {}
}

/// The apply side.
pub trait QueueReader {
    /// The first committed transaction with `seq >= from`, if any.
    fn next_from(&self, from: u64) -> Result<Option<QueuedTxn>, QueueError>;
    /// The records of a committed transaction, in order, chunk by chunk.
    fn records(&self, txn: &QueuedTxn) -> Result<RecordChunks<'_>, QueueError>;
    /// Acknowledges every transaction with `seq <= upto`; they may be deleted.
    fn ack(&self, upto: u64) -> Result<(), QueueError>;
    /// The highest acknowledged seq.
    fn acked(&self) -> Result<Option<u64>, QueueError>;
    /// What is committed and not acknowledged.
    fn depth(&self) -> Result<Depth, QueueError>;
    /// The reader (re)starts after `applied`, the member's progress: from now on
    /// every transaction handed out must provably follow it (see [`continuity`]).
    fn resume(&self, applied: Lsn) -> Result<(), QueueError>;
}
