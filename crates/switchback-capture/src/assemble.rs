//! Turns decoded pgoutput messages into queue transactions.
//!
//! Changes go to the queue in chunks of about `chunk_bytes` as they arrive, so memory
//! does not grow with a transaction's size. A transaction becomes visible at its
//! Commit (or Stream Commit); a streamed transaction's chunks are dropped at Stream
//! Abort, and a sub-transaction's at its own Stream Abort.
//!
//! Each stored transaction is self-contained: before the first change of a relation
//! in it, it holds the relation's definition (and the user types it uses).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use switchback_core::{
    Change, Column, Lsn, OldRow, OldRowKind, Record, Relation, ReplicaIdentity, TxnHeader,
    TypeInfo, Value,
};
use switchback_pgoutput::{Message, OldKind, TupleData, TupleValue};
use switchback_queue::{OpenId, QueueWriter};

use crate::CaptureError;

/// What one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to acknowledge yet.
    Continue,
    /// A transaction ended at `end_lsn`: stored (`stored`), or dropped because it was
    /// empty or already in the queue. Either way the slot may move to `end_lsn` once
    /// the queue is durable.
    Committed { end_lsn: Lsn, stored: bool },
}

struct Txn {
    open: Option<OpenId>,
    xid: u32,
    /// The transaction is already in the queue (sent again after a restart), or it
    /// is an echo (its origin is the other direction's apply): nothing is stored.
    duplicate: bool,
    echo: bool,
    origin: Option<String>,
    buf: Vec<Record>,
    buf_bytes: usize,
    buf_subxid: u32,
    rels: HashSet<u32>,
    changes: u64,
}

impl Txn {
    fn new(xid: u32, duplicate: bool) -> Txn {
        Txn {
            open: None,
            xid,
            duplicate,
            echo: false,
            origin: None,
            buf: Vec::new(),
            buf_bytes: 0,
            buf_subxid: xid,
            rels: HashSet::new(),
            changes: 0,
        }
    }
}

/// The per-session assembly state.
pub struct Assembler {
    relations: HashMap<u32, Arc<Relation>>,
    types: HashMap<u32, TypeInfo>,
    current: Option<Txn>,
    streams: HashMap<u32, Txn>,
    stream_xid: Option<u32>,
    chunk_bytes: usize,
    /// Transactions whose Origin is this one are echoes of the other direction.
    echo_origin: Option<String>,
    /// Stats for metrics.
    pub echoes: u64,
    pub stored_txns: u64,
    pub stored_changes: u64,
    pub duplicates: u64,
}

fn value(v: TupleValue) -> Value {
    match v {
        TupleValue::Null => Value::Null,
        TupleValue::UnchangedToast => Value::Unchanged,
        TupleValue::Text(t) => Value::Text(t),
        TupleValue::Binary(b) => Value::Binary(b),
    }
}

fn row(t: TupleData) -> Vec<Value> {
    t.into_iter().map(value).collect()
}

fn old_row(kind: OldKind, t: TupleData) -> OldRow {
    OldRow {
        kind: match kind {
            OldKind::Key => OldRowKind::Key,
            OldKind::Old => OldRowKind::Full,
        },
        values: row(t),
    }
}

fn approx_size(c: &Change) -> usize {
    let vals = |r: &[Value]| {
        r.iter()
            .map(|v| match v {
                Value::Text(t) | Value::Binary(t) => t.len() + 4,
                _ => 1,
            })
            .sum::<usize>()
    };
    16 + match c {
        Change::Insert { new, .. } => vals(new),
        Change::Update { old, new, .. } => vals(new) + old.as_ref().map_or(0, |o| vals(&o.values)),
        Change::Delete { old, .. } => vals(&old.values),
        Change::Truncate { rels, .. } => rels.len() * 4,
        Change::Message { prefix, content } => prefix.len() + content.len(),
    }
}

impl Assembler {
    pub fn new(chunk_bytes: usize) -> Assembler {
        Assembler {
            relations: HashMap::new(),
            types: HashMap::new(),
            current: None,
            streams: HashMap::new(),
            stream_xid: None,
            chunk_bytes: chunk_bytes.max(1024),
            echo_origin: None,
            echoes: 0,
            stored_txns: 0,
            stored_changes: 0,
            duplicates: 0,
        }
    }

    /// Drops (without storing, still acknowledging) every transaction whose Origin
    /// message names `origin`: on PG15 this is how a direction recognises what the
    /// other direction's apply wrote, so nothing returns to where it came from.
    pub fn with_echo_filter(mut self, origin: Option<String>) -> Assembler {
        self.echo_origin = origin;
        self
    }

    /// True when no transaction is being assembled (plain or streamed).
    pub fn idle(&self) -> bool {
        self.current.is_none() && self.streams.is_empty()
    }

    /// Drops every transaction in progress (the stream broke): their chunks are
    /// removed from the queue.
    pub fn abandon<Q: QueueWriter>(&mut self, q: &mut Q) -> Result<(), CaptureError> {
        let mut txns: Vec<Txn> = self.current.take().into_iter().collect();
        txns.extend(self.streams.drain().map(|(_, t)| t));
        for t in txns {
            if let Some(id) = t.open {
                q.discard(id)?;
            }
        }
        self.stream_xid = None;
        Ok(())
    }

    fn txn_for(&mut self, xid: Option<u32>) -> Result<&mut Txn, CaptureError> {
        match (xid, self.stream_xid) {
            (Some(_), Some(top)) => self.streams.get_mut(&top).ok_or_else(|| {
                CaptureError::Decode(format!("change for unknown streamed transaction {top}"))
            }),
            _ => self
                .current
                .as_mut()
                .ok_or_else(|| CaptureError::Decode("row change outside a transaction".into())),
        }
    }

    fn relation_records(&self, oid: u32) -> Result<Vec<Record>, CaptureError> {
        let rel = self.relations.get(&oid).ok_or_else(|| {
            CaptureError::Decode(format!(
                "change for relation {oid} before its Relation message"
            ))
        })?;
        let mut out: Vec<Record> = rel
            .columns
            .iter()
            .filter_map(|c| self.types.get(&c.type_oid))
            .map(|t| Record::Type(t.clone()))
            .collect();
        out.push(Record::Relation(rel.clone()));
        Ok(out)
    }

    fn push<Q: QueueWriter>(
        &mut self,
        q: &mut Q,
        xid: Option<u32>,
        rels: &[u32],
        change: Change,
    ) -> Result<(), CaptureError> {
        let mut pre = Vec::new();
        {
            let t = self.txn_for(xid)?;
            if t.duplicate {
                return Ok(());
            }
            let missing: Vec<u32> = rels
                .iter()
                .copied()
                .filter(|r| !t.rels.contains(r))
                .collect();
            let _ = t;
            for r in missing {
                pre.extend(self.relation_records(r)?);
            }
        }
        let chunk_bytes = self.chunk_bytes;
        let t = self.txn_for(xid)?;
        let subxid = xid.unwrap_or(t.xid);
        if subxid != t.buf_subxid && !t.buf.is_empty() {
            Self::spill(q, t)?;
        }
        t.buf_subxid = subxid;
        for r in &pre {
            if let Record::Relation(rel) = r {
                t.rels.insert(rel.oid);
            }
        }
        t.buf.extend(pre);
        t.buf_bytes += approx_size(&change);
        t.buf.push(Record::Change(change));
        t.changes += 1;
        if t.buf_bytes >= chunk_bytes {
            Self::spill(q, t)?;
        }
        Ok(())
    }

    fn spill<Q: QueueWriter>(q: &mut Q, t: &mut Txn) -> Result<(), CaptureError> {
        if t.buf.is_empty() {
            return Ok(());
        }
        let id = match t.open {
            Some(id) => id,
            None => {
                let id = q.open();
                t.open = Some(id);
                id
            }
        };
        let records = std::mem::replace(&mut t.buf, Vec::with_capacity(8));
        q.append_owned(id, t.buf_subxid, records)?;
        t.buf_bytes = 0;
        Ok(())
    }

    fn finish<Q: QueueWriter>(
        &mut self,
        q: &mut Q,
        mut t: Txn,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    ) -> Result<Step, CaptureError> {
        if t.echo {
            if let Some(id) = t.open {
                q.discard(id)?;
            }
            self.echoes += 1;
            return Ok(Step::Committed {
                end_lsn,
                stored: false,
            });
        }
        let already = q.last_end_lsn().is_some_and(|last| end_lsn <= last);
        if t.duplicate || already {
            if let Some(id) = t.open {
                q.discard(id)?;
            }
            self.duplicates += 1;
            return Ok(Step::Committed {
                end_lsn,
                stored: false,
            });
        }
        if t.changes == 0 {
            if let Some(id) = t.open {
                q.discard(id)?;
            }
            return Ok(Step::Committed {
                end_lsn,
                stored: false,
            });
        }
        Self::spill(q, &mut t)?;
        let id = t.open.expect("spill opened the transaction");
        q.commit(
            id,
            TxnHeader {
                xid: t.xid,
                commit_lsn,
                end_lsn,
                commit_time,
                origin: t.origin.take(),
                records: 0,
                bytes: 0,
            },
        )?;
        self.stored_txns += 1;
        self.stored_changes += t.changes;
        Ok(Step::Committed {
            end_lsn,
            stored: true,
        })
    }

    /// Handles one message.
    pub fn handle<Q: QueueWriter>(
        &mut self,
        q: &mut Q,
        msg: Message,
    ) -> Result<Step, CaptureError> {
        match msg {
            Message::Begin { final_lsn, xid, .. } => {
                if self.current.is_some() {
                    return Err(CaptureError::Decode("Begin inside a transaction".into()));
                }
                // A transaction whose commit is at or before the last stored end
                // was stored before a restart: drop it without writing.
                let duplicate = q.last_end_lsn().is_some_and(|last| Lsn(final_lsn) < last);
                self.current = Some(Txn::new(xid, duplicate));
            }
            Message::Origin { name, .. } => {
                let echo = self.echo_origin.as_deref() == Some(name.as_str());
                // A streamed transaction's Origin follows its first Stream Start.
                let t = match (self.current.as_mut(), self.stream_xid) {
                    (Some(t), _) => Some(t),
                    (None, Some(top)) => self.streams.get_mut(&top),
                    (None, None) => None,
                };
                if let Some(t) = t {
                    if echo {
                        t.echo = true;
                        t.duplicate = true;
                    }
                    t.origin = Some(name);
                }
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let t = self
                    .current
                    .take()
                    .ok_or_else(|| CaptureError::Decode("Commit without Begin".into()))?;
                return self.finish(q, t, Lsn(commit_lsn), Lsn(end_lsn), commit_time);
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
                ..
            } => {
                let rel = Relation {
                    oid,
                    schema: if namespace.is_empty() {
                        "pg_catalog".into()
                    } else {
                        namespace
                    },
                    table: name,
                    replica_identity: ReplicaIdentity::from_byte(replica_identity)
                        .unwrap_or(ReplicaIdentity::Default),
                    columns: columns
                        .into_iter()
                        .map(|c| Column {
                            name: c.name,
                            type_oid: c.type_oid,
                            type_modifier: c.type_modifier,
                            is_key: c.flags & 1 == 1,
                        })
                        .collect(),
                };
                // A changed definition (ALTER TABLE) must be re-sent inside every
                // open transaction that uses the relation after this point.
                if self.relations.get(&oid).map(|r| &**r) != Some(&rel) {
                    if let Some(t) = self.current.as_mut() {
                        t.rels.remove(&oid);
                    }
                    for t in self.streams.values_mut() {
                        t.rels.remove(&oid);
                    }
                }
                self.relations.insert(oid, Arc::new(rel));
            }
            Message::Type {
                oid,
                namespace,
                name,
                ..
            } => {
                self.types.insert(
                    oid,
                    TypeInfo {
                        oid,
                        schema: namespace,
                        name,
                    },
                );
            }
            Message::Insert { xid, oid, new } => {
                self.push(
                    q,
                    xid,
                    &[oid],
                    Change::Insert {
                        rel: oid,
                        new: row(new),
                    },
                )?;
            }
            Message::Update { xid, oid, old, new } => {
                let change = Change::Update {
                    rel: oid,
                    old: old.map(|(k, t)| old_row(k, t)),
                    new: row(new),
                };
                self.push(q, xid, &[oid], change)?;
            }
            Message::Delete { xid, oid, old } => {
                self.push(
                    q,
                    xid,
                    &[oid],
                    Change::Delete {
                        rel: oid,
                        old: old_row(old.0, old.1),
                    },
                )?;
            }
            Message::Truncate { xid, options, oids } => {
                let change = Change::Truncate {
                    rels: oids.clone(),
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                };
                self.push(q, xid, &oids, change)?;
            }
            Message::Message {
                xid,
                flags,
                prefix,
                content,
                ..
            } => {
                if flags & 1 == 1 {
                    self.push(q, xid, &[], Change::Message { prefix, content })?;
                }
                // Non-transactional messages are not part of any transaction: not replicated.
            }
            Message::StreamStart { xid, first_segment } => {
                if first_segment || !self.streams.contains_key(&xid) {
                    self.streams
                        .entry(xid)
                        .or_insert_with(|| Txn::new(xid, false));
                }
                self.stream_xid = Some(xid);
            }
            Message::StreamStop => {
                if let Some(xid) = self.stream_xid.take() {
                    if let Some(t) = self.streams.get_mut(&xid) {
                        Self::spill(q, t)?;
                    }
                }
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let t = self.streams.remove(&xid).ok_or_else(|| {
                    CaptureError::Decode(format!("Stream Commit of unknown transaction {xid}"))
                })?;
                return self.finish(q, t, Lsn(commit_lsn), Lsn(end_lsn), commit_time);
            }
            Message::StreamAbort { xid, subxid, .. } => {
                if xid == subxid {
                    if let Some(t) = self.streams.remove(&xid) {
                        if let Some(id) = t.open {
                            q.discard(id)?;
                        }
                    }
                } else if let Some(t) = self.streams.get_mut(&xid) {
                    // Only the sub-transaction's records go: buffered ones first.
                    if t.buf_subxid == subxid {
                        t.buf.clear();
                        t.buf_bytes = 0;
                    }
                    Self::spill(q, t)?;
                    if let Some(id) = t.open {
                        q.discard_subxact(id, subxid)?;
                    }
                    // Relation records that were in dropped chunks must be sent again.
                    t.rels.clear();
                }
            }
            Message::BeginPrepare { .. }
            | Message::Prepare { .. }
            | Message::CommitPrepared { .. }
            | Message::RollbackPrepared { .. }
            | Message::StreamPrepare { .. } => {
                return Err(CaptureError::Decode(
                    "two-phase messages arrived but switchback does not enable two_phase".into(),
                ));
            }
        }
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use switchback_pgoutput::RelationColumn;
    use switchback_queue::QueueError;

    use super::*;

    /// Counts what reaches the queue.
    #[derive(Default)]
    struct Counting {
        next: OpenId,
        committed: Vec<TxnHeader>,
        discarded: usize,
    }

    impl QueueWriter for Counting {
        fn open(&mut self) -> OpenId {
            self.next += 1;
            self.next
        }
        fn append(&mut self, _: OpenId, _: u32, _: &[Record]) -> Result<(), QueueError> {
            Ok(())
        }
        fn discard(&mut self, _: OpenId) -> Result<(), QueueError> {
            self.discarded += 1;
            Ok(())
        }
        fn discard_subxact(&mut self, _: OpenId, _: u32) -> Result<(), QueueError> {
            Ok(())
        }
        fn commit(&mut self, _: OpenId, header: TxnHeader) -> Result<u64, QueueError> {
            self.committed.push(header);
            Ok(self.committed.len() as u64)
        }
        async fn flush(&mut self) -> Result<(), QueueError> {
            Ok(())
        }
        fn last_end_lsn(&self) -> Option<Lsn> {
            self.committed.last().map(|h| h.end_lsn)
        }
    }

    fn txn(a: &mut Assembler, q: &mut Counting, xid: u32, lsn: u64, origin: Option<&str>) -> Step {
        let mut msgs = vec![Message::Begin {
            final_lsn: lsn,
            commit_time: 0,
            xid,
        }];
        if let Some(o) = origin {
            msgs.push(Message::Origin {
                commit_lsn: lsn,
                name: o.into(),
            });
        }
        msgs.push(Message::Relation {
            xid: None,
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![RelationColumn {
                flags: 1,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            }],
        });
        msgs.push(Message::Insert {
            xid: None,
            oid: 1,
            new: vec![TupleValue::Text(b"1".to_vec())],
        });
        msgs.push(Message::Commit {
            flags: 0,
            commit_lsn: lsn,
            end_lsn: lsn + 8,
            commit_time: 0,
        });
        let mut last = Step::Continue;
        for m in msgs {
            last = a.handle(q, m).unwrap();
        }
        last
    }

    #[test]
    fn echoes_are_dropped_but_acknowledged() {
        let mut q = Counting::default();
        let mut a = Assembler::new(16 * 1024).with_echo_filter(Some("switchback_p_rev".into()));
        // Written by the other direction's apply: dropped, its end still acknowledgeable.
        assert_eq!(
            txn(&mut a, &mut q, 10, 100, Some("switchback_p_rev")),
            Step::Committed {
                end_lsn: Lsn(108),
                stored: false
            }
        );
        assert_eq!(a.echoes, 1);
        assert!(q.committed.is_empty());
        // Another origin, and none: stored, the origin recorded.
        assert_eq!(
            txn(&mut a, &mut q, 11, 200, Some("someone_else")),
            Step::Committed {
                end_lsn: Lsn(208),
                stored: true
            }
        );
        assert_eq!(
            txn(&mut a, &mut q, 12, 300, None),
            Step::Committed {
                end_lsn: Lsn(308),
                stored: true
            }
        );
        assert_eq!(q.committed.len(), 2);
        assert_eq!(q.committed[0].origin.as_deref(), Some("someone_else"));
        assert_eq!(a.echoes, 1);
    }
}
