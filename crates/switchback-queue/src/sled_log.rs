//! The embedded sled log: the default queue when capture and apply run in one
//! process (`switchback run`).
//!
//! # Layout
//!
//! Two sled trees in one database directory:
//!
//! * `txns`: key `seq (u64 BE)` → `header length (u32 BE) ++ envelope of`
//!   [`StoredHeader`] (with `prev_end_lsn`, the end LSN of the transaction committed
//!   before, for gap detection) `++ inline chunk`. A transaction whose records fit in one
//!   chunk (most OLTP transactions) is stored *inline*: its only chunk (a record
//!   envelope of `Vec<Record>`) follows the header in the same value, so it costs
//!   one sled write. Meta keys live in the same tree behind the prefix `FF×8` (they
//!   sort after every seq): `last_end_lsn`, `acked`, `next_seq`.
//! * `data`: key `data_id (u64 BE) ++ chunk (u32 BE)` → `subxid (u32 BE) ++ record
//!   envelope of Vec<Record>`, for transactions of more than one chunk. The writer
//!   keeps a transaction's first chunk in memory; from the second chunk on, chunks
//!   are written as they arrive (memory stays bounded: one chunk per open
//!   transaction). A `data_id` is only reachable from a header once the transaction
//!   commits.
//!
//! # Durability point
//!
//! A commit is one single-key write: the header (with its inline chunk, or after its
//! chunks). The meta keys only ever grow and summarise headers that retention
//! deletes (they are raised before the headers go), so recovery takes the maximum
//! of each meta key and what the remaining headers show. [`SledLog::flush`] flushes
//! the whole database (sled's flush covers every tree); capture acknowledges the hub
//! only after it returns. sled recovers a prefix of its write log, so a header that
//! survived a crash has its chunks.
//!
//! No multi-key `apply_batch` is used anywhere: in sled 0.34 it takes a global write
//! lock and can deadlock against the background flusher when a node split needs a
//! new segment (seen here under `switchback run`). Every step is a single-key write
//! ordered so that a crash between two steps leaves a state recovery understands.
//! Hot paths use point reads (`get`), not range scans: a sled iterator copies the
//! leaf node it starts in.
//!
//! # Retention
//!
//! [`QueueReader::ack`] records `acked` (one write); readers never look at or
//! below it again. Deleting the acknowledged transactions is deferred so that a
//! catch-up spends its time applying: they are deleted when the reader has caught
//! up with the writer, when [`RETAIN_TXNS`] of them have piled up, or
//! [`RETAIN_FOR`] after the last deletion, whichever comes first. Each header is
//! deleted before its chunks (a crash in between leaves orphaned chunks, which
//! recovery deletes).
//!
//! # Recovery
//!
//! On open, chunks whose `data_id` no header references are the remains of a
//! transaction that was in progress at a crash: they are deleted. `next_seq` and the
//! next `data_id` continue after everything found.

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
    /// End LSN of the transaction committed before this one.
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
    // reader state
    continuity: Mutex<Continuity>,
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
        remove_unfinished_snapshots(path);
        let db = sled::Config::new()
            .path(path)
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
            })?;
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
            }),
            latest_relations: HashMap::new(),
            next_seq: 1,
            next_data_id: 1,
            open: Default::default(),
            last_end: None,
            start: None,
            continuity: Default::default(),
        };
        log.recover()?;
        Ok(log)
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

    /// Headers with seq at or above `from`, in order.
    fn headers_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, StoredHeader), QueueError>> + '_ {
        self.txns.range(be64(from)..META_PREFIX).map(move |kv| {
            let (k, v) = kv.map_err(|e| self.storage(e))?;
            Ok((read_u64(&k)?, decode_entry(&v)?.0))
        })
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
        for h in self.headers_from(0) {
            let (seq, h) = h?;
            first_seq.get_or_insert(seq);
            next_seq = next_seq.max(seq + 1);
            last_end = last_end.max(Some(h.header.end_lsn));
            referenced.insert(h.data_id);
            max_data = max_data.max(h.data_id);
        }
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
        self.headers_from(from)
            .map(|r| {
                r.map(|(seq, h)| QueuedTxn {
                    seq,
                    prev_end_lsn: h.prev_end_lsn,
                    header: h.header,
                })
            })
            .collect()
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

    /// Deletes the acknowledged transactions `from..=upto`.
    fn delete_acked(&self, from: u64, upto: u64) -> Result<(), QueueError> {
        let mut doomed = Vec::new();
        let mut last_end = 0;
        for h in self.headers_from(from) {
            let (seq, h) = h?;
            if seq > upto {
                break;
            }
            last_end = last_end.max(h.header.end_lsn.0);
            doomed.push((seq, h.data_id, h.chunk_end));
        }
        // What recovery would read from the headers goes to the meta keys first.
        if last_end > 0 {
            self.raise_meta(META_LAST_END, last_end)?;
        }
        for (seq, data_id, chunk_end) in doomed {
            // Header before chunks: no header ever points at missing chunks.
            self.txns.remove(be64(seq)).map_err(|e| self.storage(e))?;
            for c in 0..chunk_end {
                self.data
                    .remove(chunk_key(data_id, c))
                    .map_err(|e| self.storage(e))?;
            }
        }
        Ok(())
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
        let t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
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
        // The header is the commit point. The meta keys summarise headers only once
        // they are deleted (see retention); until then recovery reads the headers.
        let value = encode_entry(&stored, inline.as_deref())?;
        self.txns
            .insert(be64(seq), value)
            .map_err(|e| self.storage(e))?;
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
        Ok(seq)
    }

    async fn flush(&mut self) -> Result<(), QueueError> {
        self.db.flush_async().await.map_err(|e| self.storage(e))?;
        Ok(())
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
        // The next transaction is almost always `from` itself: a point read.
        let found = match self.txns.get(be64(from)).map_err(|e| self.storage(e))? {
            Some(v) => Some((from, decode_entry(&v)?.0)),
            None => self.headers_from(from).next().transpose()?,
        };
        let Some((seq, h)) = found else {
            return Ok(None);
        };
        let t = QueuedTxn {
            seq,
            prev_end_lsn: h.prev_end_lsn,
            header: h.header,
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
        let v = self
            .txns
            .get(be64(seq))
            .map_err(|e| self.storage(e))?
            .ok_or_else(|| {
                QueueError::Corrupt(format!("transaction seq {seq} is not in the queue"))
            })?;
        let (h, inline) = decode_entry(&v)?;
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
        let deleted = self.shared.deleted_upto.load(Ordering::SeqCst);
        if upto <= deleted {
            return Ok(());
        }
        let caught_up = upto >= self.shared.committed.load(Ordering::SeqCst);
        let mut last = self.shared.last_deletion.lock().expect("not poisoned");
        if caught_up || upto - deleted >= RETAIN_TXNS || last.elapsed() >= RETAIN_FOR {
            self.delete_acked(deleted + 1, upto)?;
            self.shared.deleted_upto.store(upto, Ordering::SeqCst);
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
        if let Some(kv) = self.txns.range(..META_PREFIX).next_back() {
            let (_, v) = kv.map_err(|e| self.storage(e))?;
            d.last_end_lsn = d.last_end_lsn.max(Some(decode_entry(&v)?.0.header.end_lsn));
        }
        let from = self.acked()?.map_or(0, |a| a + 1);
        for h in self.headers_from(from) {
            let (seq, h) = h?;
            d.transactions += 1;
            d.bytes += h.header.bytes;
            d.last_end_lsn = d.last_end_lsn.max(Some(h.header.end_lsn));
            d.first_seq.get_or_insert(seq);
            d.last_seq = Some(seq);
        }
        Ok(d)
    }
}
