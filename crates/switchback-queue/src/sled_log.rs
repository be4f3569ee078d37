//! The embedded sled log: the default queue when capture and apply run in one
//! process (`switchback run`).
//!
//! # Layout
//!
//! Three sled trees in one database directory:
//!
//! * `txns`: committed transactions in *batches* (group commit). Key `first seq
//!   (u64 BE)` → `count (u32 BE) ++ count × (length (u32 BE) ++ entry)`: the entries
//!   of seqs `first..first + count`, consecutive. A batch never spans a gap and
//!   batches never overlap. An entry is `header length (u32 BE) ++ envelope of`
//!   [`StoredHeader`] `++ inline chunk`. A transaction whose records fit in one
//!   chunk (most OLTP transactions) is stored *inline*: its only chunk (a record
//!   envelope of `Vec<Record>`) follows the header in the entry. Meta keys live in
//!   the same tree behind the prefix `FF×8` (they sort after every seq):
//!   `last_end_lsn`, `acked`, `next_seq`.
//! * `data`: key `data_id (u64 BE) ++ chunk (u32 BE)` → `subxid (u32 BE) ++ record
//!   envelope of Vec<Record>`, for transactions of more than one chunk (only their
//!   entry goes into a batch). The writer keeps a transaction's first chunk in
//!   memory; from the second chunk on, chunks are written as they arrive (memory
//!   stays bounded: one chunk per open transaction). A `data_id` is only reachable
//!   from an entry once the transaction commits.
//! * `rels`: key `oid (u32 BE) ++ seq (u64 BE)` → the encoded Relation record that
//!   transaction `seq` introduced; inline chunks leave out Relation records equal to
//!   the latest version, and readers put them back.
//!
//! # Commit, flush and the durability point
//!
//! [`QueueWriter::commit`] appends the entry to the *pending batch*, held in memory
//! and shared by every handle of the process (clones share it), so readers see the
//! transaction at once; it costs no sled write. The pending batch is written to
//! sled as one value by [`SledLog::flush`] (which then flushes the whole database:
//! sled's flush covers every tree) and, without a flush, once it reaches
//! [`BATCH_BYTES`]. A batch whose every transaction is acknowledged already (apply
//! keeps up) is not written at all: only its last end LSN goes to the `last_end_lsn`
//! meta key. New relation versions go to `rels` at commit, before the batch that
//! introduces them. Capture acknowledges the hub only after a flush returns, so a
//! crash loses only what was committed after the last flush, as the queue contract
//! allows; sled recovers a prefix of its write log, so a batch that survived has its
//! chunks and relation versions. Apply may read and acknowledge transactions of
//! the pending batch, so after a crash an acknowledgement can outlive transactions
//! that were lost: seqs continue after it, capture stores what the hub sends again
//! under new seqs, and apply skips those by `end_lsn` (queue contract:
//! redelivery).
//!
//! No multi-key `apply_batch` is used anywhere: in sled 0.34 it takes a global write
//! lock and can deadlock against the background flusher when a node split needs a
//! new segment (seen here under `switchback run`). Every step is a single-key write
//! ordered so that a crash between two steps leaves a state recovery understands.
//!
//! # Reading
//!
//! A reader handle caches the last stored batch it decoded: reading a transaction
//! and its records costs no sled operation inside that batch, one point read
//! (`get` of the next batch's key) when moving on, and a range lookup only after a
//! gap. Transactions still in the pending batch are copied from memory. (A sled
//! iterator copies the leaf node it starts in, so hot paths avoid ranges.)
//!
//! # Retention
//!
//! [`QueueReader::ack`] records `acked` and `next_seq` (two small writes); readers
//! never look at or below it again. Deleting acknowledged transactions is deferred
//! so that a catch-up spends its time applying, and happens a whole batch at a time,
//! once every seq in it is acknowledged: when the reader has caught up with the
//! writer, when [`RETAIN_TXNS`] have piled up, or [`RETAIN_FOR`] after the last
//! deletion, whichever comes first. The meta keys are raised first (they summarise
//! what the deleted batches showed); each batch is deleted before its chunks (a
//! crash in between leaves orphaned chunks, which recovery deletes).
//!
//! # Recovery
//!
//! On open, `next_seq`, the last end LSN and the next `data_id` continue after the
//! maximum of the meta keys and what the stored batches show. Chunks whose
//! `data_id` no entry references are the remains of a transaction that was in
//! progress (or committed but not flushed) at a crash: they are deleted, and so are
//! relation versions with a seq at or above `next_seq`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchback_core::record;
use switchback_core::{Change, Lsn, Record, Relation, TxnHeader};

use crate::{Continuity, Depth, OpenId, QueueError, QueueReader, QueueWriter, QueuedTxn};

const META_PREFIX: [u8; 8] = [0xff; 8];
const META_LAST_END: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xfflast_end_lsn";
const META_ACKED: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xffacked";
const META_NEXT_SEQ: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xffnext_seq";

/// Acknowledged transactions kept at most before they are deleted.
pub const RETAIN_TXNS: u64 = 50_000;
/// Acknowledged transactions are deleted at least this often.
pub const RETAIN_FOR: Duration = Duration::from_secs(10);

/// A committed transaction's entry in the `txns` tree (without its inline chunk).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredHeader {
    pub header: TxnHeader,
    pub data_id: u64,
    /// Chunks stored in the `data` tree (0 when the transaction is inline or empty).
    pub chunks: u32,
    /// Chunk numbers used are below this (sub-transaction aborts leave holes).
    pub chunk_end: u32,
    /// The inline chunk left out Relation records equal to the relation's latest
    /// stored version (the `rels` tree); readers put them back.
    pub relations_elided: bool,
    /// End LSN of the transaction committed before this one (gap detection).
    pub prev_end_lsn: Option<Lsn>,
}

/// Encodes a `txns` value: header length, header envelope, inline chunk.
fn encode_entry(h: &StoredHeader, inline: Option<&[u8]>) -> Result<Vec<u8>, QueueError> {
    let head = record::encode(h)?;
    let mut v = Vec::with_capacity(4 + head.len() + inline.map_or(0, <[u8]>::len));
    v.extend_from_slice(&(head.len() as u32).to_be_bytes());
    v.extend_from_slice(&head);
    if let Some(i) = inline {
        v.extend_from_slice(i);
    }
    Ok(v)
}

/// Splits a `txns` value into its header and inline chunk (possibly empty).
fn decode_entry(v: &[u8]) -> Result<(StoredHeader, &[u8]), QueueError> {
    let corrupt = || QueueError::Corrupt("transaction entry shorter than its header".into());
    let len: [u8; 4] = v.get(..4).ok_or_else(corrupt)?.try_into().expect("4 bytes");
    let end = 4 + u32::from_be_bytes(len) as usize;
    let head = v.get(4..end).ok_or_else(corrupt)?;
    Ok((record::decode(head)?, &v[end..]))
}

/// Pending batch size at which [`QueueWriter::commit`] writes it to sled without
/// waiting for a flush (the default of [`SledLog::with_batch_bytes`]). Kept under
/// [`SLED_INLINE_MAX`] with room for one more entry, so batches stay in sled's log.
pub const BATCH_BYTES: usize = 96 * 1024;

/// sled 0.34 writes any log message larger than a quarter of its segment as a
/// separate *blob* file, and never fsyncs blob files (only its log): a power loss
/// could lose one whose log entry survived. Such messages are not only large
/// values: when sled rewrites a leaf page whole, the message holds every value of
/// the leaf (up to 17: leaves split above 16 entries). With sled's default 512 KiB
/// segments, two 96 KiB batches in one leaf made a blob.
///
/// New queues therefore use [`SEGMENT_BYTES`] segments: 17 values of up to
/// [`SLED_INLINE_MAX`] stay under a quarter of it, so pages stay in the log. When a
/// larger value is written (a huge row), the next flush fsyncs the blob files
/// first (see [`sync_blobs`]).
pub const SLED_INLINE_MAX: usize = 112 * 1024;

/// sled segment size of new queues (see [`SLED_INLINE_MAX`]); sled keeps a
/// queue's segment size for its life.
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// The segment size a queue was created with, from sled's `conf` file (`None` for
/// a new queue).
fn persisted_segment_size(path: &Path) -> Option<usize> {
    // The file ends with a binary checksum: not UTF-8 as a whole.
    let conf = std::fs::read(path.join("conf")).ok()?;
    String::from_utf8_lossy(&conf)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size:"))
        .and_then(|v| v.trim().parse().ok())
}

/// fsyncs every blob file and the blob directory (see [`SLED_INLINE_MAX`]).
fn sync_blobs(db_path: &Path) -> std::io::Result<()> {
    let dir = db_path.join("blobs");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let path = e?.path();
        match std::fs::File::open(&path) {
            Ok(f) => f.sync_all()?,
            // Deleted meanwhile by sled's own cleanup.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    std::fs::File::open(&dir)?.sync_all()
}

/// What retention needs to know about a batch stored in the `txns` tree.
struct BatchInfo {
    first: u64,
    last: u64,
    max_end: u64,
    /// `(data_id, chunk_end)` of its multi-chunk transactions.
    chunks: Vec<(u64, u32)>,
}

/// The batch being built by the writer: committed (visible to this process's
/// readers) but not yet written to sled. `buf` is the future `txns` value.
#[derive(Default)]
struct Pending {
    first: u64,
    buf: Vec<u8>,
    spans: Vec<std::ops::Range<usize>>,
    max_end: u64,
    chunks: Vec<(u64, u32)>,
}

impl Pending {
    fn push(&mut self, seq: u64, entry: &[u8], end: u64, chunks: Option<(u64, u32)>) {
        if self.spans.is_empty() {
            self.first = seq;
            self.buf.clear();
            self.buf.extend_from_slice(&[0; 4]);
        }
        debug_assert_eq!(seq, self.first + self.spans.len() as u64);
        self.buf
            .extend_from_slice(&(entry.len() as u32).to_be_bytes());
        let start = self.buf.len();
        self.buf.extend_from_slice(entry);
        self.spans.push(start..self.buf.len());
        self.max_end = self.max_end.max(end);
        self.chunks.extend(chunks);
    }

    fn last(&self) -> Option<u64> {
        (!self.spans.is_empty()).then(|| self.first + self.spans.len() as u64 - 1)
    }

    fn entry(&self, seq: u64) -> Option<&[u8]> {
        let i = seq.checked_sub(self.first)?;
        self.spans
            .get(usize::try_from(i).ok()?)
            .map(|r| &self.buf[r.clone()])
    }
}

/// A `txns` value: `count (u32 BE) ++ count × (length (u32 BE) ++ entry)`, the
/// entries of seqs `first..first + count`.
struct StoredBatch {
    first: u64,
    value: sled::IVec,
    spans: Vec<std::ops::Range<usize>>,
}

impl StoredBatch {
    fn decode(key: &[u8], value: sled::IVec) -> Result<StoredBatch, QueueError> {
        let first = read_u64(key)?;
        let corrupt = || QueueError::Corrupt(format!("transaction batch {first} is truncated"));
        let be32 = |at: usize| -> Result<usize, QueueError> {
            let b: [u8; 4] = value
                .get(at..at + 4)
                .ok_or_else(corrupt)?
                .try_into()
                .expect("4 bytes");
            Ok(u32::from_be_bytes(b) as usize)
        };
        let count = be32(0)?;
        let mut spans = Vec::with_capacity(count);
        let mut at = 4;
        for _ in 0..count {
            let len = be32(at)?;
            at += 4;
            if value.len() < at + len {
                return Err(corrupt());
            }
            spans.push(at..at + len);
            at += len;
        }
        if count == 0 || at != value.len() {
            return Err(QueueError::Corrupt(format!(
                "transaction batch {first} has a bad length"
            )));
        }
        Ok(StoredBatch {
            first,
            value,
            spans,
        })
    }

    fn last(&self) -> u64 {
        self.first + self.spans.len() as u64 - 1
    }

    fn contains(&self, seq: u64) -> bool {
        self.first <= seq && seq <= self.last()
    }

    fn entry(&self, seq: u64) -> &[u8] {
        &self.value[self.spans[(seq - self.first) as usize].clone()]
    }
}

/// A transaction's `txns` entry as a reader found it.
enum Entry {
    Stored(Arc<StoredBatch>, u64),
    Copied(Vec<u8>),
}

impl Entry {
    fn bytes(&self) -> &[u8] {
        match self {
            Entry::Stored(b, seq) => b.entry(*seq),
            Entry::Copied(v) => v,
        }
    }
}

/// A chunk written to the `data` tree for an open transaction.
struct WrittenChunk {
    chunk: u32,
    subxid: u32,
    records: u64,
    bytes: u64,
}

/// A transaction's first chunk, kept in memory: its records encoded one by one,
/// so that commit can leave out Relation records without encoding again.
struct FirstChunk {
    subxid: u32,
    body: Vec<u8>,
    count: usize,
    /// Byte ranges of the Relation records in `body`, with their OIDs.
    relations: Vec<(u32, std::ops::Range<usize>)>,
}

impl FirstChunk {
    fn envelope(&self, skip: &[usize]) -> Result<Vec<u8>, QueueError> {
        let mut parts = Vec::with_capacity(self.relations.len() * 2 + 1);
        let mut at = 0;
        for &i in skip {
            let r = &self.relations[i].1;
            parts.push(&self.body[at..r.start]);
            at = r.end;
        }
        parts.push(&self.body[at..]);
        Ok(record::encode_seq(self.count - skip.len(), parts)?)
    }
}

struct OpenTxn {
    data_id: u64,
    next_chunk: u32,
    first: Option<FirstChunk>,
    written: Vec<WrittenChunk>,
    /// The last Relation record per OID in chunks already written (encoded).
    written_relations: HashMap<u32, Vec<u8>>,
    /// The records of a single-chunk transaction as the writer handed them over
    /// (see [`SledLog::keep_decoded`]).
    decoded: Option<Vec<Record>>,
}

impl OpenTxn {
    fn records(&self) -> u64 {
        self.first.as_ref().map_or(0, |f| f.count as u64)
            + self.written.iter().map(|c| c.records).sum::<u64>()
    }
    fn bytes(&self) -> u64 {
        self.first.as_ref().map_or(0, |f| f.body.len() as u64 + 1)
            + self.written.iter().map(|c| c.bytes).sum::<u64>()
    }
}

/// The stored versions of each relation: by OID, the seq of the transaction that
/// introduced each version.
type RelationVersions = HashMap<u32, BTreeMap<u64, Arc<Relation>>>;

fn rel_key(oid: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&oid.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// State shared by the handles of one process.
struct Shared {
    /// Highest seq committed by this process's writer (or found at open).
    committed: AtomicU64,
    /// Every transaction at or below this seq has been deleted.
    deleted_upto: AtomicU64,
    last_deletion: Mutex<Instant>,
    relations: Mutex<RelationVersions>,
    /// Highest acknowledged seq (0: none), as in the `acked` meta key.
    acked: AtomicU64,
    /// Committed entries not written to sled yet. Lock order: `pending`, then
    /// `stored`.
    pending: Mutex<Pending>,
    /// The batches in the `txns` tree, in seq order.
    stored: Mutex<std::collections::VecDeque<BatchInfo>>,
    /// A value over [`SLED_INLINE_MAX`] was written since the last flush began.
    wrote_blob: std::sync::atomic::AtomicBool,
    /// Recently committed single-chunk transactions, decoded (see
    /// [`SledLog::keep_decoded`]); `None` when off.
    decoded: Mutex<Option<Decoded>>,
}

/// Transactions as the writer handed them over, in seq order, for a reader in the
/// same process: it takes them instead of decoding the stored bytes. Bounded; a
/// transaction not here is read from the stored entry, as always.
#[derive(Default)]
struct Decoded {
    txns: std::collections::VecDeque<(QueuedTxn, Vec<Record>)>,
    /// Stored (encoded) bytes of `txns`: a measure of their memory.
    bytes: u64,
}

/// Bounds of [`Decoded`]: beyond them new transactions are left out until a
/// reader takes older ones.
const DECODED_MAX_TXNS: usize = 16_384;
const DECODED_MAX_BYTES: u64 = 32 * 1024 * 1024;

impl Decoded {
    /// Takes the first transaction.
    fn pop_front(&mut self) -> Option<(QueuedTxn, Vec<Record>)> {
        let first = self.txns.pop_front()?;
        self.bytes -= first.0.header.bytes;
        Some(first)
    }

    /// Drops the transactions below `seq` (a reader has moved past them).
    fn drop_below(&mut self, seq: u64) {
        while self.txns.front().is_some_and(|(t, _)| t.seq < seq) {
            self.pop_front();
        }
    }
}

/// The sled log. Clone it to share between a writer task and a reader task of one
/// process; only one value should be used as the writer.
pub struct SledLog {
    db: sled::Db,
    data: sled::Tree,
    txns: sled::Tree,
    rels: sled::Tree,
    path: PathBuf,
    shared: Arc<Shared>,
    // writer state
    /// The latest stored version of each relation, as an encoded Record.
    latest_relations: HashMap<u32, Vec<u8>>,
    next_seq: u64,
    next_data_id: u64,
    open: std::collections::HashMap<OpenId, OpenTxn>,
    last_end: Option<Lsn>,
    start: Option<Lsn>,
    batch_bytes: usize,
    // reader state
    continuity: Mutex<Continuity>,
    retain_txns: u64,
    retain_for: Duration,
    /// The stored batch this handle read last.
    cache: Mutex<Option<Arc<StoredBatch>>>,
}

impl Clone for SledLog {
    /// A handle on the same database, for reading. Writer state is not shared.
    fn clone(&self) -> Self {
        SledLog {
            db: self.db.clone(),
            data: self.data.clone(),
            txns: self.txns.clone(),
            rels: self.rels.clone(),
            path: self.path.clone(),
            shared: self.shared.clone(),
            latest_relations: Default::default(),
            next_seq: self.next_seq,
            next_data_id: self.next_data_id,
            open: Default::default(),
            last_end: self.last_end,
            start: None,
            continuity: Default::default(),
            batch_bytes: self.batch_bytes,
            retain_txns: self.retain_txns,
            retain_for: self.retain_for,
            cache: Mutex::new(None),
        }
    }
}

/// sled 0.34 writes a snapshot as `snap.<lsn>.generating`, then renames it. A kill
/// in between leaves that file behind, and sled's next open may pick it (it does not
/// skip `.generating` files) and fail with "corrupted data" for good: the queue
/// would be lost (sled issues #1527, #1533; seen here after kill -9 during open).
/// Such a file is an unfinished snapshot by construction and the log stays
/// authoritative, so it is removed before opening.
fn remove_unfinished_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::warn!(file = %name, "removed an unfinished sled snapshot left by a crash")
                }
                Err(err) => {
                    tracing::warn!(file = %name, error = %err, "cannot remove an unfinished sled snapshot")
                }
            }
        }
    }
}

/// Opens the sled database of a queue with switchback's settings (see
/// [`SLED_INLINE_MAX`]), after removing what a crash may have left.
fn open_db(path: &Path) -> Result<sled::Db, QueueError> {
    let p = path.display().to_string();
    remove_unfinished_snapshots(path);
    let segment = match persisted_segment_size(path) {
        Some(n) if n != SEGMENT_BYTES => {
            tracing::warn!(
                queue = %p,
                segment_bytes = n,
                "this queue was created by an older switchback with small sled segments: \
                 sled may keep pages of it in blob files it does not fsync, so a power loss \
                 could lose queued transactions; give the pipeline a new queue path at its \
                 next re-seed"
            );
            n
        }
        _ => SEGMENT_BYTES,
    };
    sled::Config::new()
        .path(path)
        // Hidden in sled's docs, but stable in the pinned 0.34.7 (see SLED_INLINE_MAX).
        .segment_size(segment)
        .cache_capacity(64 * 1024 * 1024)
        .flush_every_ms(Some(500))
        .open()
        .map_err(|e| match e {
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                QueueError::Locked { path: p.clone() }
            }
            e if e.to_string().contains("lock") => QueueError::Locked { path: p.clone() },
            e => QueueError::Storage {
                path: p.clone(),
                message: e.to_string(),
            },
        })
}

fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn read_u64(v: &[u8]) -> Result<u64, QueueError> {
    let arr: [u8; 8] = v
        .try_into()
        .map_err(|_| QueueError::Corrupt(format!("expected 8 bytes, found {}", v.len())))?;
    Ok(u64::from_be_bytes(arr))
}

fn chunk_key(data_id: u64, chunk: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&data_id.to_be_bytes());
    k[8..].copy_from_slice(&chunk.to_be_bytes());
    k
}

impl SledLog {
    /// Opens (creating if needed) the log in `path` and recovers it.
    pub fn open(path: &Path) -> Result<SledLog, QueueError> {
        let p = path.display().to_string();
        let db = open_db(path)?;
        let storage = |e: sled::Error| QueueError::Storage {
            path: p.clone(),
            message: e.to_string(),
        };
        let data = db.open_tree("data").map_err(storage)?;
        let txns = db.open_tree("txns").map_err(storage)?;
        let rels = db.open_tree("rels").map_err(storage)?;
        let mut log = SledLog {
            db,
            data,
            txns,
            rels,
            path: path.to_path_buf(),
            shared: Arc::new(Shared {
                committed: AtomicU64::new(0),
                deleted_upto: AtomicU64::new(0),
                last_deletion: Mutex::new(Instant::now()),
                relations: Mutex::new(HashMap::new()),
                acked: AtomicU64::new(0),
                pending: Mutex::new(Pending::default()),
                stored: Mutex::new(Default::default()),
                wrote_blob: Default::default(),
                decoded: Mutex::new(None),
            }),
            latest_relations: HashMap::new(),
            next_seq: 1,
            next_data_id: 1,
            open: Default::default(),
            last_end: None,
            start: None,
            continuity: Default::default(),
            batch_bytes: BATCH_BYTES,
            retain_txns: RETAIN_TXNS,
            retain_for: RETAIN_FOR,
            cache: Mutex::new(None),
        };
        log.recover()?;
        Ok(log)
    }

    /// Replays the log of a closed queue once, so that sled records a snapshot of
    /// it: the next [`SledLog::open`] starts from that snapshot instead of
    /// replaying everything written since the previous open (tens of milliseconds
    /// per 10,000 queued transactions, on the critical path of a restart).
    /// Called after a clean stop, when every handle of the queue has been dropped:
    /// the stopping process pays instead of the next start. sled's flusher thread
    /// may hold the lock a moment after the last handle: a locked queue is tried
    /// again for up to 500 ms. Reads and writes no queued data; an error (the
    /// queue still open elsewhere) leaves it as it was.
    pub fn checkpoint_closed(path: &Path) -> Result<(), QueueError> {
        match persisted_segment_size(path) {
            // A new queue, or one of an older switchback (its open warns already).
            None => return Ok(()),
            Some(n) if n != SEGMENT_BYTES => return Ok(()),
            Some(_) => {}
        }
        let started = Instant::now();
        loop {
            match open_db(path) {
                Err(QueueError::Locked { .. })
                    if started.elapsed() < Duration::from_millis(500) =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                r => return r.map(drop),
            }
        }
    }

    fn storage(&self, e: sled::Error) -> QueueError {
        QueueError::Storage {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, QueueError> {
        match self.txns.get(key).map_err(|e| self.storage(e))? {
            Some(v) => Ok(Some(read_u64(&v)?)),
            None => Ok(None),
        }
    }

    /// The stored batches from the one holding `from` on, in order.
    fn batches_from(
        &self,
        from: u64,
    ) -> Result<impl Iterator<Item = Result<StoredBatch, QueueError>> + '_, QueueError> {
        let start = match self.txns.range(..=be64(from)).next_back() {
            Some(kv) => kv.map_err(|e| self.storage(e))?.0,
            None => sled::IVec::from(&be64(from)),
        };
        Ok(self
            .txns
            .range(start..sled::IVec::from(&META_PREFIX))
            .map(move |kv| {
                let (k, v) = kv.map_err(|e| self.storage(e))?;
                StoredBatch::decode(&k, v)
            }))
    }

    /// Headers with seq at or above `from`, in order: the stored batches, then the
    /// pending one.
    fn headers_from(&self, from: u64) -> Result<Vec<(u64, StoredHeader)>, QueueError> {
        // The pending batch first: entries move from it to sled, never back, so a
        // sled entry below its first seq is never read twice.
        let (pending_first, mut tail) = {
            let p = self.shared.pending.lock().expect("not poisoned");
            let mut tail = Vec::new();
            if let Some(last) = p.last() {
                for seq in p.first.max(from)..=last {
                    let e = p.entry(seq).expect("in the pending batch");
                    tail.push((seq, decode_entry(e)?.0));
                }
            }
            (p.last().map_or(u64::MAX, |_| p.first), tail)
        };
        let mut out = Vec::new();
        'batches: for b in self.batches_from(from)? {
            let b = b?;
            for seq in b.first.max(from)..=b.last() {
                if seq >= pending_first {
                    break 'batches;
                }
                out.push((seq, decode_entry(b.entry(seq))?.0));
            }
        }
        out.append(&mut tail);
        Ok(out)
    }

    fn recover(&mut self) -> Result<(), QueueError> {
        self.last_end = self.meta_u64(META_LAST_END)?.map(Lsn);
        let acked = self.meta_u64(META_ACKED)?;
        let mut next_seq = self.meta_u64(META_NEXT_SEQ)?.unwrap_or(1);
        if let Some(acked) = acked {
            next_seq = next_seq.max(acked + 1);
        }
        let mut referenced = HashSet::new();
        let mut max_data = 0;
        let mut last_end = self.last_end;
        let mut first_seq = None;
        let mut stored = std::collections::VecDeque::new();
        for b in self.batches_from(0)? {
            let b = b?;
            first_seq.get_or_insert(b.first);
            next_seq = next_seq.max(b.last() + 1);
            let mut info = BatchInfo {
                first: b.first,
                last: b.last(),
                max_end: 0,
                chunks: Vec::new(),
            };
            for seq in b.first..=b.last() {
                let h = decode_entry(b.entry(seq))?.0;
                info.max_end = info.max_end.max(h.header.end_lsn.0);
                if h.chunk_end > 0 {
                    info.chunks.push((h.data_id, h.chunk_end));
                }
                referenced.insert(h.data_id);
                max_data = max_data.max(h.data_id);
            }
            last_end = last_end.max(Some(Lsn(info.max_end)));
            stored.push_back(info);
        }
        *self.shared.stored.lock().expect("not poisoned") = stored;
        self.shared
            .acked
            .store(acked.unwrap_or(0), Ordering::SeqCst);
        self.last_end = last_end;
        // Delete chunks of transactions that never committed.
        let mut cursor = 0u64;
        let mut orphans = 0u64;
        loop {
            let Some(kv) = self
                .data
                .range(chunk_key(cursor, 0)..)
                .next()
                .transpose()
                .map_err(|e| self.storage(e))?
            else {
                break;
            };
            let id = read_u64(&kv.0[..8])?;
            max_data = max_data.max(id);
            if !referenced.contains(&id) {
                orphans += self.remove_prefix(id)?;
            }
            match id.checked_add(1) {
                Some(n) => cursor = n,
                None => break,
            }
        }
        if orphans > 0 {
            tracing::info!(
                chunks = orphans,
                "dropped the chunks of transactions in progress at the last stop"
            );
        }
        self.next_seq = next_seq;
        self.next_data_id = max_data + 1;
        let deleted = match (first_seq, acked) {
            (Some(f), _) => f - 1,
            (None, Some(a)) => a,
            (None, None) => 0,
        };
        // Relation versions: those of a transaction whose header did not survive go.
        let mut versions = RelationVersions::new();
        for kv in self.rels.iter() {
            let (k, v) = kv.map_err(|e| self.storage(e))?;
            if k.len() != 12 {
                return Err(QueueError::Corrupt(
                    "relation version key of bad length".into(),
                ));
            }
            let oid = u32::from_be_bytes(k[..4].try_into().expect("4 bytes"));
            let seq = read_u64(&k[4..])?;
            if seq >= next_seq {
                self.rels.remove(k).map_err(|e| self.storage(e))?;
                continue;
            }
            let Record::Relation(rel) = record::decode_element::<Record>(&v)? else {
                return Err(QueueError::Corrupt(format!(
                    "relation version {oid}/{seq} is not a Relation record"
                )));
            };
            versions.entry(oid).or_default().insert(seq, rel);
            self.latest_relations.insert(oid, v.to_vec());
        }
        *self.shared.relations.lock().expect("not poisoned") = versions;
        self.shared.committed.store(next_seq - 1, Ordering::SeqCst);
        self.shared.deleted_upto.store(deleted, Ordering::SeqCst);
        Ok(())
    }

    /// Every transaction not acknowledged yet, for `queue dump` and tests.
    pub fn all(&self) -> Result<Vec<QueuedTxn>, QueueError> {
        let from = self.acked()?.map_or(0, |a| a + 1);
        Ok(self
            .headers_from(from)?
            .into_iter()
            .map(|(seq, h)| QueuedTxn {
                seq,
                prev_end_lsn: h.prev_end_lsn,
                header: h.header,
            })
            .collect())
    }

    /// Writes the pending batch and returns the future that makes everything
    /// committed so far durable.
    fn start_flush(&mut self) -> Result<crate::BackgroundFlush, QueueError> {
        self.write_pending()?;
        // Blob files first (sled does not sync them), then sled's flush, which makes
        // every write issued before it durable.
        let blobs = self.shared.wrote_blob.swap(false, Ordering::SeqCst);
        let db = self.db.clone();
        let dir = self.path.clone();
        let path = self.path.display().to_string();
        Ok(Box::pin(async move {
            let storage = |message: String| QueueError::Storage {
                path: path.clone(),
                message,
            };
            if blobs {
                tokio::task::spawn_blocking(move || sync_blobs(&dir))
                    .await
                    .map_err(|e| storage(e.to_string()))?
                    .map_err(|e| storage(format!("fsync of sled blob files: {e}")))?;
            }
            db.flush_async()
                .await
                .map(|_| ())
                .map_err(|e| storage(e.to_string()))
        }))
    }

    /// Remembers that a value sled will keep as a blob file was written.
    fn note_size(&self, len: usize) {
        if len > SLED_INLINE_MAX {
            self.shared.wrote_blob.store(true, Ordering::SeqCst);
        }
    }

    /// Keeps recently committed single-chunk transactions decoded, as the writer
    /// handed them to [`QueueWriter::append_owned`], for a reader of this process
    /// (`run`: capture and apply over one queue). The reader takes them instead
    /// of decoding what is stored: the same records, less CPU. Bounded (16,384
    /// transactions, 32 MiB stored); off by default (a writer without a reader in
    /// the process would only fill it).
    pub fn keep_decoded(self) -> SledLog {
        *self.shared.decoded.lock().expect("not poisoned") = Some(Decoded::default());
        self
    }

    /// Takes the decoded records of `seq` if kept (dropping older ones: the
    /// reader has moved past them).
    fn take_decoded(&self, seq: u64) -> Option<Vec<Record>> {
        let mut d = self.shared.decoded.lock().expect("not poisoned");
        let d = d.as_mut()?;
        d.drop_below(seq);
        if d.txns.front().is_some_and(|(t, _)| t.seq == seq) {
            return d.pop_front().map(|(_, records)| records);
        }
        None
    }

    /// The header of `seq` if its decoded records are kept.
    fn decoded_header(&self, seq: u64) -> Option<QueuedTxn> {
        let d = self.shared.decoded.lock().expect("not poisoned");
        let d = d.as_ref()?;
        // A reader takes them in order: usually the first.
        let i = match d.txns.front() {
            Some((t, _)) if t.seq == seq => 0,
            _ => d.txns.binary_search_by_key(&seq, |(t, _)| t.seq).ok()?,
        };
        Some(d.txns[i].0.clone())
    }

    /// Sets the pending batch size at which a commit writes the batch to sled
    /// before a flush (default [`BATCH_BYTES`]; small values are for tests).
    pub fn with_batch_bytes(mut self, bytes: usize) -> SledLog {
        self.batch_bytes = bytes;
        self
    }

    /// Chunks in the `data` tree (multi-chunk transactions not deleted yet), for
    /// tests.
    #[doc(hidden)]
    pub fn data_chunks(&self) -> usize {
        self.data.len()
    }

    /// Sets when acknowledged transactions are deleted while the reader has not
    /// caught up (defaults [`RETAIN_TXNS`], [`RETAIN_FOR`]; for tests). Handles
    /// cloned afterwards inherit it.
    pub fn with_retention(mut self, txns: u64, every: Duration) -> SledLog {
        self.retain_txns = txns;
        self.retain_for = every;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes every chunk of `data_id`, one key at a time; returns how many.
    fn remove_prefix(&self, data_id: u64) -> Result<u64, QueueError> {
        let mut n = 0;
        for k in self.data.scan_prefix(be64(data_id)).keys() {
            self.data
                .remove(k.map_err(|e| self.storage(e))?)
                .map_err(|e| self.storage(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Raises a meta counter (never lowers it).
    fn raise_meta(&self, key: &[u8], value: u64) -> Result<(), QueueError> {
        self.txns
            .fetch_and_update(key, |old| {
                let old = old.and_then(|o| o.try_into().ok()).map(u64::from_be_bytes);
                Some(be64(old.map_or(value, |o| o.max(value))).to_vec())
            })
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Deletes the stored batches whose every seq is at or below `upto`; returns
    /// the last seq deleted.
    fn delete_acked(&self, upto: u64) -> Result<Option<u64>, QueueError> {
        let mut stored = self.shared.stored.lock().expect("not poisoned");
        let n = stored.iter().take_while(|b| b.last <= upto).count();
        if n == 0 {
            return Ok(None);
        }
        // What recovery would read from the batches goes to the meta keys first.
        let last_end = stored.iter().take(n).map(|b| b.max_end).max().unwrap_or(0);
        if last_end > 0 {
            self.raise_meta(META_LAST_END, last_end)?;
        }
        let mut deleted = None;
        for _ in 0..n {
            let b = stored.front().expect("counted");
            // Batch before chunks: no entry ever points at missing chunks.
            self.txns
                .remove(be64(b.first))
                .map_err(|e| self.storage(e))?;
            for &(data_id, chunk_end) in &b.chunks {
                for c in 0..chunk_end {
                    self.data
                        .remove(chunk_key(data_id, c))
                        .map_err(|e| self.storage(e))?;
                }
            }
            deleted = Some(b.last);
            stored.pop_front();
        }
        Ok(deleted)
    }

    /// Writes the pending batch to sled as one value (not flushed), unless every
    /// transaction in it is acknowledged already: then only what recovery would
    /// have read from it is kept (the last end LSN; `ack` raised `next_seq`).
    fn write_pending(&self) -> Result<(), QueueError> {
        let mut p = self.shared.pending.lock().expect("not poisoned");
        let Some(last) = p.last() else {
            return Ok(());
        };
        if self.shared.acked.load(Ordering::SeqCst) >= last {
            self.raise_meta(META_LAST_END, p.max_end)?;
            // No entry was written, so no entry points at these chunks.
            for &(data_id, chunk_end) in &p.chunks {
                for c in 0..chunk_end {
                    self.data
                        .remove(chunk_key(data_id, c))
                        .map_err(|e| self.storage(e))?;
                }
            }
        } else {
            let count = (p.spans.len() as u32).to_be_bytes();
            p.buf[..4].copy_from_slice(&count);
            self.note_size(p.buf.len());
            self.txns
                .insert(be64(p.first), p.buf.as_slice())
                .map_err(|e| self.storage(e))?;
            let info = BatchInfo {
                first: p.first,
                last,
                max_end: p.max_end,
                chunks: std::mem::take(&mut p.chunks),
            };
            self.shared
                .stored
                .lock()
                .expect("not poisoned")
                .push_back(info);
        }
        p.spans.clear();
        p.chunks.clear();
        p.buf.clear();
        p.max_end = 0;
        Ok(())
    }

    /// The first committed transaction with seq at or above `from` and its entry:
    /// from this handle's cached batch, the pending batch, or sled.
    fn locate(&self, from: u64) -> Result<Option<(u64, Entry)>, QueueError> {
        let mut cache = self.cache.lock().expect("not poisoned");
        if let Some(b) = cache.as_ref().filter(|b| b.contains(from)) {
            return Ok(Some((from, Entry::Stored(b.clone(), from))));
        }
        // Every seq below the pending batch's first is in sled (or deleted): the
        // writer removes entries from the pending batch only after writing them.
        let pending_first = {
            let p = self.shared.pending.lock().expect("not poisoned");
            match p.last() {
                Some(last) if from > last => return Ok(None),
                Some(_) if from >= p.first => {
                    let e = p.entry(from).expect("in the pending batch");
                    return Ok(Some((from, Entry::Copied(e.to_vec()))));
                }
                Some(_) => Some((p.first, p.entry(p.first).expect("first").to_vec())),
                None => None,
            }
        };
        // Moving to the next batch: `from` is usually its key. Otherwise the batch
        // holding `from`, or the first one after it.
        let storage = |e| self.storage(e);
        let mut found = match self.txns.get(be64(from)).map_err(storage)? {
            Some(v) => Some(StoredBatch::decode(&be64(from), v)?),
            None => None,
        };
        if found.is_none() {
            if let Some((k, v)) = self
                .txns
                .range(..be64(from))
                .next_back()
                .transpose()
                .map_err(storage)?
            {
                found = Some(StoredBatch::decode(&k, v)?).filter(|b| b.contains(from));
            }
        }
        if found.is_none() {
            let after = self.txns.range(be64(from)..META_PREFIX).next();
            if let Some((k, v)) = after.transpose().map_err(storage)? {
                found = Some(StoredBatch::decode(&k, v)?);
            }
        }
        if let Some(b) = found {
            let b = Arc::new(b);
            let seq = from.max(b.first);
            *cache = Some(b.clone());
            return Ok(Some((seq, Entry::Stored(b, seq))));
        }
        Ok(pending_first.map(|(seq, e)| (seq, Entry::Copied(e))))
    }

    /// Puts back the Relation records an inline transaction left out: before the
    /// first change of each relation that has none, its version as of `seq`.
    fn restore_relations(&self, seq: u64, records: Vec<Record>) -> Result<Vec<Record>, QueueError> {
        let versions = self.shared.relations.lock().expect("not poisoned");
        let mut known: Vec<u32> = Vec::new();
        let mut out = Vec::with_capacity(records.len() + 2);
        for r in records {
            let oids: &[u32] = match &r {
                Record::Relation(rel) => {
                    known.push(rel.oid);
                    &[]
                }
                Record::Change(Change::Insert { rel, .. })
                | Record::Change(Change::Update { rel, .. })
                | Record::Change(Change::Delete { rel, .. }) => std::slice::from_ref(rel),
                Record::Change(Change::Truncate { rels, .. }) => rels,
                _ => &[],
            };
            for &oid in oids {
                if known.contains(&oid) {
                    continue;
                }
                let rel = versions
                    .get(&oid)
                    .and_then(|v| v.range(..seq).next_back())
                    .map(|(_, r)| r.clone())
                    .ok_or_else(|| {
                        QueueError::Corrupt(format!(
                            "transaction seq {seq} uses relation {oid}, whose stored definition is missing"
                        ))
                    })?;
                out.push(Record::Relation(rel));
                known.push(oid);
            }
            out.push(r);
        }
        Ok(out)
    }

    fn write_chunk(
        &self,
        data_id: u64,
        chunk: u32,
        subxid: u32,
        enc: &[u8],
    ) -> Result<(), QueueError> {
        let mut value = Vec::with_capacity(4 + enc.len());
        value.extend_from_slice(&subxid.to_be_bytes());
        value.extend_from_slice(enc);
        self.note_size(value.len());
        self.data
            .insert(chunk_key(data_id, chunk), value)
            .map_err(|e| self.storage(e))?;
        Ok(())
    }
}

impl QueueWriter for SledLog {
    fn open(&mut self) -> OpenId {
        let id = self.next_data_id;
        self.next_data_id += 1;
        self.open.insert(
            id,
            OpenTxn {
                data_id: id,
                next_chunk: 0,
                first: None,
                written: Vec::new(),
                written_relations: HashMap::new(),
                decoded: None,
            },
        );
        id
    }

    fn append(&mut self, id: OpenId, subxid: u32, records: &[Record]) -> Result<(), QueueError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        let res = (|| {
            if t.first.is_none() && t.written.is_empty() {
                let mut first = FirstChunk {
                    subxid,
                    body: Vec::with_capacity(256),
                    count: records.len(),
                    relations: Vec::new(),
                };
                for r in records {
                    let start = first.body.len();
                    record::encode_element(r, &mut first.body)?;
                    if let Record::Relation(rel) = r {
                        first.relations.push((rel.oid, start..first.body.len()));
                    }
                }
                t.first = Some(first);
                return Ok(());
            }
            // More than one chunk: everything goes to the data tree, as it is.
            t.decoded = None;
            if let Some(first) = t.first.take() {
                let enc = first.envelope(&[])?;
                let chunk = t.next_chunk;
                t.next_chunk += 1;
                self.write_chunk(t.data_id, chunk, first.subxid, &enc)?;
                for (oid, r) in &first.relations {
                    t.written_relations
                        .insert(*oid, first.body[r.clone()].to_vec());
                }
                t.written.push(WrittenChunk {
                    chunk,
                    subxid: first.subxid,
                    records: first.count as u64,
                    bytes: enc.len() as u64,
                });
            }
            for r in records {
                if let Record::Relation(rel) = r {
                    let mut e = Vec::new();
                    record::encode_element(r, &mut e)?;
                    t.written_relations.insert(rel.oid, e);
                }
            }
            let enc = record::encode(&records)?;
            let chunk = t.next_chunk;
            t.next_chunk += 1;
            self.write_chunk(t.data_id, chunk, subxid, &enc)?;
            t.written.push(WrittenChunk {
                chunk,
                subxid,
                records: records.len() as u64,
                bytes: enc.len() as u64,
            });
            Ok(())
        })();
        self.open.insert(id, t);
        res
    }

    fn append_owned(
        &mut self,
        id: OpenId,
        subxid: u32,
        records: Vec<Record>,
    ) -> Result<(), QueueError> {
        self.append(id, subxid, &records)?;
        let keep = self.shared.decoded.lock().expect("not poisoned").is_some();
        if let Some(t) = self.open.get_mut(&id) {
            // Only a transaction whose one chunk is exactly these records.
            let single = t.written.is_empty()
                && t.decoded.is_none()
                && t.first.as_ref().is_some_and(|f| f.count == records.len());
            if keep && single {
                t.decoded = Some(records);
            }
        }
        Ok(())
    }

    fn discard(&mut self, id: OpenId) -> Result<(), QueueError> {
        let t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        for c in &t.written {
            self.data
                .remove(chunk_key(t.data_id, c.chunk))
                .map_err(|e| self.storage(e))?;
        }
        Ok(())
    }

    fn discard_subxact(&mut self, id: OpenId, subxid: u32) -> Result<(), QueueError> {
        let mut t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        if t.first.as_ref().is_some_and(|f| f.subxid == subxid) {
            t.first = None;
            t.decoded = None;
        }
        let mut res = Ok(());
        let data_id = t.data_id;
        t.written.retain(|c| {
            if c.subxid != subxid || res.is_err() {
                return true;
            }
            match self.data.remove(chunk_key(data_id, c.chunk)) {
                Ok(_) => false,
                Err(e) => {
                    res = Err(e);
                    true
                }
            }
        });
        self.open.insert(id, t);
        res.map_err(|e| self.storage(e))
    }

    fn commit(&mut self, id: OpenId, mut header: TxnHeader) -> Result<u64, QueueError> {
        let mut t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        if let Some(last) = self.last_end {
            if header.end_lsn <= last {
                return Err(QueueError::Corrupt(format!(
                    "transaction ending at {} committed after one ending at {last}: capture must drop it",
                    header.end_lsn
                )));
            }
        }
        header.records = t.records();
        header.bytes = t.bytes();
        let seq = self.next_seq;
        let end_lsn = header.end_lsn;
        // The relation versions this transaction leaves behind (the last per OID),
        // and, for an inline transaction, the Relation records it can leave out: the
        // first one of each OID when it equals the latest stored version.
        let mut finals: HashMap<u32, &[u8]> = HashMap::new();
        let mut elide = Vec::new();
        let inline = match &t.first {
            Some(f) => {
                let mut seen = HashSet::new();
                for (i, (oid, r)) in f.relations.iter().enumerate() {
                    let bytes = &f.body[r.clone()];
                    if seen.insert(*oid)
                        && self.latest_relations.get(oid).map(Vec::as_slice) == Some(bytes)
                    {
                        elide.push(i);
                    }
                    finals.insert(*oid, bytes);
                }
                Some(f.envelope(&elide)?)
            }
            None => {
                for (oid, e) in &t.written_relations {
                    finals.insert(*oid, e);
                }
                None
            }
        };
        // New versions are stored before the header that introduces them.
        let mut new_versions = Vec::new();
        for (oid, bytes) in finals {
            if self.latest_relations.get(&oid).map(Vec::as_slice) != Some(bytes) {
                self.note_size(bytes.len());
                self.rels
                    .insert(rel_key(oid, seq), bytes)
                    .map_err(|e| self.storage(e))?;
                new_versions.push((oid, bytes.to_vec()));
            }
        }
        let stored = StoredHeader {
            header,
            data_id: t.data_id,
            chunks: t.written.len() as u32,
            chunk_end: t.next_chunk,
            relations_elided: !elide.is_empty(),
            prev_end_lsn: self.last_end.or(self.start),
        };
        // The entry joins the pending batch: visible to this process's readers at
        // once, durable once a flush has written the batch. The meta keys summarise
        // batches only once they are deleted (see retention).
        let value = encode_entry(&stored, inline.as_deref())?;
        let chunks = (stored.chunk_end > 0).then_some((stored.data_id, stored.chunk_end));
        let full = {
            let mut p = self.shared.pending.lock().expect("not poisoned");
            p.push(seq, &value, end_lsn.0, chunks);
            p.buf.len() >= self.batch_bytes
        };
        if let (Some(records), Some(_)) = (t.decoded.take(), &inline) {
            let mut d = self.shared.decoded.lock().expect("not poisoned");
            if let Some(d) = d.as_mut().filter(|d| {
                d.txns.len() < DECODED_MAX_TXNS
                    && d.bytes + stored.header.bytes <= DECODED_MAX_BYTES
            }) {
                d.bytes += stored.header.bytes;
                let txn = QueuedTxn {
                    seq,
                    prev_end_lsn: stored.prev_end_lsn,
                    header: stored.header.clone(),
                };
                d.txns.push_back((txn, records));
            }
        }
        self.next_seq += 1;
        self.last_end = Some(end_lsn);
        if !new_versions.is_empty() {
            let mut versions = self.shared.relations.lock().expect("not poisoned");
            for (oid, bytes) in new_versions {
                let Record::Relation(rel) = record::decode_element::<Record>(&bytes)? else {
                    unreachable!("only Relation records are collected");
                };
                versions.entry(oid).or_default().insert(seq, rel);
                self.latest_relations.insert(oid, bytes);
            }
        }
        self.shared.committed.store(seq, Ordering::SeqCst);
        if full {
            self.write_pending()?;
        }
        Ok(seq)
    }

    async fn flush(&mut self) -> Result<(), QueueError> {
        self.start_flush()?.await
    }

    fn flush_in_background(&mut self) -> Option<Result<crate::BackgroundFlush, QueueError>> {
        Some(self.start_flush())
    }

    fn last_end_lsn(&self) -> Option<Lsn> {
        self.last_end
    }

    fn start_at(&mut self, lsn: Lsn) {
        self.start = Some(lsn);
    }
}

impl QueueReader for SledLog {
    fn next_from(&self, from: u64) -> Result<Option<QueuedTxn>, QueueError> {
        let t = match self.decoded_header(from) {
            Some(t) => t,
            None => {
                let Some((seq, e)) = self.locate(from)? else {
                    return Ok(None);
                };
                let h = decode_entry(e.bytes())?.0;
                QueuedTxn {
                    seq,
                    prev_end_lsn: h.prev_end_lsn,
                    header: h.header,
                }
            }
        };
        self.continuity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&t)?;
        Ok(Some(t))
    }

    fn records(
        &self,
        txn: &QueuedTxn,
    ) -> Result<Box<dyn Iterator<Item = Result<Vec<Record>, QueueError>> + Send + '_>, QueueError>
    {
        let seq = txn.seq;
        if let Some(records) = self.take_decoded(seq) {
            return Ok(Box::new(std::iter::once(Ok(records))));
        }
        let entry = match self.locate(seq)? {
            Some((s, e)) if s == seq => e,
            _ => {
                return Err(QueueError::Corrupt(format!(
                    "transaction seq {seq} is not in the queue"
                )))
            }
        };
        let (h, inline) = decode_entry(entry.bytes())?;
        if !inline.is_empty() {
            let mut records = record::decode::<Vec<Record>>(inline)?;
            if h.relations_elided {
                records = self.restore_relations(seq, records)?;
            }
            return Ok(Box::new(std::iter::once(Ok(records))));
        }
        let expected = h.chunks;
        let mut seen = 0u32;
        let mut chunk = 0u32;
        Ok(Box::new(std::iter::from_fn(move || loop {
            if chunk >= h.chunk_end {
                if seen != expected {
                    let msg = format!("transaction seq {seq} has {seen} of its {expected} chunks");
                    seen = expected;
                    return Some(Err(QueueError::Corrupt(msg)));
                }
                return None;
            }
            let key = chunk_key(h.data_id, chunk);
            chunk += 1;
            match self.data.get(key) {
                Ok(None) => continue, // a discarded sub-transaction's chunk
                Ok(Some(v)) => {
                    seen += 1;
                    if v.len() < 4 {
                        return Some(Err(QueueError::Corrupt(
                            "chunk shorter than its tag".into(),
                        )));
                    }
                    return Some(record::decode::<Vec<Record>>(&v[4..]).map_err(QueueError::from));
                }
                Err(e) => return Some(Err(self.storage(e))),
            }
        })))
    }

    fn ack(&self, upto: u64) -> Result<(), QueueError> {
        // `acked` first: a reader never goes back before it. Recovery derives
        // next_seq from it too.
        self.raise_meta(META_NEXT_SEQ, upto + 1)?;
        self.raise_meta(META_ACKED, upto)?;
        self.shared.acked.fetch_max(upto, Ordering::SeqCst);
        if let Some(d) = self.shared.decoded.lock().expect("not poisoned").as_mut() {
            d.drop_below(upto + 1);
        }
        let deleted = self.shared.deleted_upto.load(Ordering::SeqCst);
        if upto <= deleted {
            return Ok(());
        }
        let caught_up = upto >= self.shared.committed.load(Ordering::SeqCst);
        let mut last = self.shared.last_deletion.lock().expect("not poisoned");
        if caught_up || upto - deleted >= self.retain_txns || last.elapsed() >= self.retain_for {
            if let Some(d) = self.delete_acked(upto)? {
                self.shared.deleted_upto.fetch_max(d, Ordering::SeqCst);
            }
            *last = Instant::now();
        }
        Ok(())
    }

    fn resume(&self, applied: Lsn) -> Result<(), QueueError> {
        self.continuity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume(applied);
        Ok(())
    }

    fn acked(&self) -> Result<Option<u64>, QueueError> {
        self.meta_u64(META_ACKED)
    }

    fn depth(&self) -> Result<Depth, QueueError> {
        let mut d = Depth {
            last_end_lsn: self.meta_u64(META_LAST_END)?.map(Lsn),
            ..Default::default()
        };
        // Acknowledged transactions not deleted yet still count for the last end LSN.
        let p_end = self.shared.pending.lock().expect("not poisoned").max_end;
        if p_end > 0 {
            d.last_end_lsn = d.last_end_lsn.max(Some(Lsn(p_end)));
        }
        if let Some(kv) = self.txns.range(..META_PREFIX).next_back() {
            let (k, v) = kv.map_err(|e| self.storage(e))?;
            let b = StoredBatch::decode(&k, v)?;
            let end = decode_entry(b.entry(b.last()))?.0.header.end_lsn;
            d.last_end_lsn = d.last_end_lsn.max(Some(end));
        }
        let from = self.acked()?.map_or(0, |a| a + 1);
        for (seq, h) in self.headers_from(from)? {
            d.transactions += 1;
            d.bytes += h.header.bytes;
            d.last_end_lsn = d.last_end_lsn.max(Some(h.header.end_lsn));
            d.first_seq.get_or_insert(seq);
            d.last_seq = Some(seq);
        }
        Ok(d)
    }
}
