//! The embedded sled log: the default queue when capture and apply run in one
//! process (`switchback run`).
//!
//! # Layout
//!
//! Two sled trees in one database directory:
//!
//! * `data`: key `data_id (u64 BE) ++ chunk (u32 BE)` → `subxid (u32 BE) ++ record
//!   envelope of Vec<Record>`. Chunks of in-progress transactions are written as they
//!   arrive (bounded memory); a `data_id` is only reachable from a header once the
//!   transaction commits.
//! * `txns`: key `seq (u64 BE)` → envelope of [`StoredHeader`] (the transaction header,
//!   its `data_id`, chunk count and `prev_end_lsn` for gap detection). Meta keys live in the same tree behind the prefix
//!   `FF×8` (they sort after every seq): `last_end_lsn`, `acked`, `next_seq`.
//!
//! # Durability point
//!
//! A commit is one single-key write: the header, after its chunks. The meta keys
//! only ever grow and summarise headers that acknowledgement deletes (they are
//! raised before the headers go), so recovery takes the maximum of each meta key
//! and what the remaining headers show. [`SledLog::flush`] flushes the whole
//! database (sled's flush covers every tree); capture acknowledges the hub only
//! after it returns. sled recovers a prefix of its write log, so a header that
//! survived a crash has its chunks.
//!
//! No multi-key `apply_batch` is used anywhere: in sled 0.34 it takes a global write
//! lock and can deadlock against the background flusher when a node split needs a
//! new segment (seen here under `switchback run`). Every step is a single-key write
//! ordered so that a crash between two steps leaves a state recovery understands.
//!
//! # Retention
//!
//! [`QueueReader::ack`] records `acked`, then deletes headers up to it, each before
//! its chunks (a crash in between leaves orphaned chunks, which recovery deletes).
//!
//! # Recovery
//!
//! On open, chunks whose `data_id` no header references are the remains of a
//! transaction that was in progress at a crash: they are deleted. `next_seq` and the
//! next `data_id` continue after everything found.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use switchback_core::record;
use switchback_core::{Lsn, Record, TxnHeader};

use crate::{Continuity, Depth, OpenId, QueueError, QueueReader, QueueWriter, QueuedTxn};

const META_PREFIX: [u8; 8] = [0xff; 8];
const META_LAST_END: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xfflast_end_lsn";
const META_ACKED: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xffacked";
const META_NEXT_SEQ: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xffnext_seq";

/// A committed transaction's entry in the `txns` tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredHeader {
    pub header: TxnHeader,
    pub data_id: u64,
    pub chunks: u32,
    /// End LSN of the transaction committed before this one.
    pub prev_end_lsn: Option<Lsn>,
}

struct OpenTxn {
    data_id: u64,
    next_chunk: u32,
    /// Chunks, records and bytes stored (after sub-transaction aborts).
    chunks: u32,
    records: u64,
    bytes: u64,
}

/// The sled log. Clone it to share between a writer task and a reader task of one
/// process; only one value should be used as the writer.
pub struct SledLog {
    db: sled::Db,
    data: sled::Tree,
    txns: sled::Tree,
    path: PathBuf,
    // writer state
    next_seq: u64,
    next_data_id: u64,
    open: std::collections::HashMap<OpenId, OpenTxn>,
    last_end: Option<Lsn>,
    start: Option<Lsn>,
    // reader state
    continuity: std::sync::Mutex<Continuity>,
}

impl Clone for SledLog {
    /// A handle on the same database, for reading. Writer state is not shared.
    fn clone(&self) -> Self {
        SledLog {
            db: self.db.clone(),
            data: self.data.clone(),
            txns: self.txns.clone(),
            path: self.path.clone(),
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
        let mut log = SledLog {
            db,
            data,
            txns,
            path: path.to_path_buf(),
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

    fn headers(&self) -> impl Iterator<Item = Result<(u64, StoredHeader), QueueError>> + '_ {
        self.txns.range(..META_PREFIX).map(move |kv| {
            let (k, v) = kv.map_err(|e| self.storage(e))?;
            Ok((read_u64(&k)?, record::decode::<StoredHeader>(&v)?))
        })
    }

    fn recover(&mut self) -> Result<(), QueueError> {
        self.last_end = self.meta_u64(META_LAST_END)?.map(Lsn);
        let mut next_seq = self.meta_u64(META_NEXT_SEQ)?.unwrap_or(1);
        if let Some(acked) = self.meta_u64(META_ACKED)? {
            next_seq = next_seq.max(acked + 1);
        }
        let mut referenced = HashSet::new();
        let mut max_data = 0;
        let mut last_end = self.last_end;
        for h in self.headers() {
            let (seq, h) = h?;
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
        Ok(())
    }

    /// Every header, for `queue dump` and tests.
    pub fn all(&self) -> Result<Vec<QueuedTxn>, QueueError> {
        self.headers()
            .map(|r| {
                r.map(|(seq, h)| QueuedTxn {
                    seq,
                    prev_end_lsn: h.prev_end_lsn,
                    header: h.header,
                })
            })
            .collect()
    }

    fn stored_header(&self, seq: u64) -> Result<StoredHeader, QueueError> {
        let v = self
            .txns
            .get(be64(seq))
            .map_err(|e| self.storage(e))?
            .ok_or_else(|| {
                QueueError::Corrupt(format!("transaction seq {seq} is not in the queue"))
            })?;
        Ok(record::decode(&v)?)
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
                chunks: 0,
                records: 0,
                bytes: 0,
            },
        );
        id
    }

    fn append(&mut self, id: OpenId, subxid: u32, records: &[Record]) -> Result<(), QueueError> {
        if records.is_empty() {
            return Ok(());
        }
        let enc = record::encode(&records)?;
        let t = self.open.get_mut(&id).ok_or(QueueError::UnknownOpen(id))?;
        let mut value = Vec::with_capacity(4 + enc.len());
        value.extend_from_slice(&subxid.to_be_bytes());
        value.extend_from_slice(&enc);
        let key = chunk_key(t.data_id, t.next_chunk);
        t.next_chunk += 1;
        t.chunks += 1;
        t.records += records.len() as u64;
        t.bytes += enc.len() as u64;
        self.data
            .insert(key, value)
            .map_err(|e| QueueError::Storage {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    fn discard(&mut self, id: OpenId) -> Result<(), QueueError> {
        let t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        self.remove_prefix(t.data_id)?;
        Ok(())
    }

    fn discard_subxact(&mut self, id: OpenId, subxid: u32) -> Result<(), QueueError> {
        let t = self.open.get_mut(&id).ok_or(QueueError::UnknownOpen(id))?;
        let prefix = be64(t.data_id);
        let mut doomed = Vec::new();
        for kv in self.data.scan_prefix(prefix) {
            let (k, v) = kv.map_err(|e| QueueError::Storage {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?;
            if v.len() >= 4 && v[..4] == subxid.to_be_bytes() {
                let n = record::decode::<Vec<Record>>(&v[4..])?.len() as u64;
                t.records = t.records.saturating_sub(n);
                t.bytes = t.bytes.saturating_sub((v.len() - 4) as u64);
                t.chunks = t.chunks.saturating_sub(1);
                doomed.push(k);
            }
        }
        for k in doomed {
            self.data.remove(k).map_err(|e| self.storage(e))?;
        }
        Ok(())
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
        header.records = t.records;
        header.bytes = t.bytes;
        let seq = self.next_seq;
        let stored = StoredHeader {
            header: header.clone(),
            data_id: t.data_id,
            chunks: t.chunks,
            prev_end_lsn: self.last_end.or(self.start),
        };
        // The header is the commit point. The meta keys summarise headers only once
        // they are deleted (see ack); until then recovery reads the headers.
        self.txns
            .insert(be64(seq), record::encode(&stored)?)
            .map_err(|e| self.storage(e))?;
        self.next_seq += 1;
        self.last_end = Some(header.end_lsn);
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
        match self.txns.range(be64(from)..META_PREFIX).next() {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv.map_err(|e| self.storage(e))?;
                let h: StoredHeader = record::decode(&v)?;
                let t = QueuedTxn {
                    seq: read_u64(&k)?,
                    prev_end_lsn: h.prev_end_lsn,
                    header: h.header,
                };
                self.continuity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .check(&t)?;
                Ok(Some(t))
            }
        }
    }

    fn records(
        &self,
        txn: &QueuedTxn,
    ) -> Result<Box<dyn Iterator<Item = Result<Vec<Record>, QueueError>> + Send + '_>, QueueError>
    {
        let h = self.stored_header(txn.seq)?;
        let expected = h.chunks;
        let seq = txn.seq;
        let mut seen = 0u32;
        let mut iter = self.data.scan_prefix(be64(h.data_id));
        Ok(Box::new(std::iter::from_fn(move || match iter.next() {
            Some(Ok((_, v))) => {
                seen += 1;
                if v.len() < 4 {
                    return Some(Err(QueueError::Corrupt(
                        "chunk shorter than its tag".into(),
                    )));
                }
                Some(record::decode::<Vec<Record>>(&v[4..]).map_err(QueueError::from))
            }
            Some(Err(e)) => Some(Err(QueueError::Storage {
                path: String::new(),
                message: e.to_string(),
            })),
            None if seen != expected => {
                let msg = format!("transaction seq {seq} has {seen} of its {expected} chunks");
                seen = expected;
                Some(Err(QueueError::Corrupt(msg)))
            }
            None => None,
        })))
    }

    fn ack(&self, upto: u64) -> Result<(), QueueError> {
        let mut doomed = Vec::new();
        let mut last_end = 0;
        for kv in self.txns.range(..=be64(upto)) {
            let (k, v) = kv.map_err(|e| self.storage(e))?;
            let h = record::decode::<StoredHeader>(&v)?;
            last_end = last_end.max(h.header.end_lsn.0);
            doomed.push((k, h.data_id));
        }
        // What recovery would read from the headers goes to the meta keys before the
        // headers go; `acked` first: a reader never goes back before it.
        if last_end > 0 {
            self.raise_meta(META_LAST_END, last_end)?;
        }
        self.raise_meta(META_NEXT_SEQ, upto + 1)?;
        self.raise_meta(META_ACKED, upto)?;
        for (k, data_id) in doomed {
            // Header before chunks: no header ever points at missing chunks.
            self.txns.remove(k).map_err(|e| self.storage(e))?;
            self.remove_prefix(data_id)?;
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
        for h in self.headers() {
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
