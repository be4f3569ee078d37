//! The event model: committed hub transactions and their row changes.
//!
//! A stored transaction is a header ([`TxnHeader`]) and an ordered list of
//! [`Record`]s. The records are self-contained: before the first change of a
//! relation in a transaction, the transaction holds that relation's [`Relation`]
//! record, so any reader can interpret any transaction alone (after a restart, on
//! another machine, from Kafka).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

/// One committed hub transaction, without its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnHeader {
    /// The hub's transaction id (top-level).
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position acknowledged to the slot and
    /// recorded as progress on the member. Strictly increasing in commit order.
    pub end_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Replication origin of the session that committed it on the hub, if any.
    pub origin: Option<String>,
    /// Number of records (relations + changes + messages).
    pub records: u64,
    /// Encoded size of the records, in bytes.
    pub bytes: u64,
}

/// Replica identity of a relation, as pgoutput reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': nothing; UPDATE/DELETE carry no old tuple.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': a unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'd' => Self::Default,
            b'n' => Self::Nothing,
            b'f' => Self::Full,
            b'i' => Self::Index,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The hub's type OID. Only meaningful on the hub: user types are matched by name.
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub is_key: bool,
}

/// A hub table as the stream describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    /// The hub's OID of the table (stable while the table exists).
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

impl Relation {
    /// `"schema"."table"`, quoted for SQL.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// `schema.table` for messages and logs (not for SQL).
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    pub fn key_columns(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key)
    }
}

/// One column value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value: not sent; the target keeps what it has.
    Unchanged,
    /// Text output of the type (UTF-8 on the hubs switchback accepts).
    Text(Vec<u8>),
    /// Binary send format (not requested by switchback; kept for completeness).
    Binary(Vec<u8>),
}

impl Value {
    pub fn is_unchanged(&self) -> bool {
        matches!(self, Value::Unchanged)
    }
}

pub type Row = Vec<Value>;

/// Which old row an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OldRowKind {
    /// Only the key columns are meaningful (the others are Null).
    Key,
    /// The full old row (REPLICA IDENTITY FULL).
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldRow {
    pub kind: OldRowKind,
    pub values: Row,
}

/// One row-level change or a logical message. Relations are referenced by the hub OID
/// of a [`Relation`] record that precedes the change in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Insert {
        rel: u32,
        new: Row,
    },
    /// `old` is present when the key changed (DEFAULT/INDEX identity) or always (FULL).
    Update {
        rel: u32,
        old: Option<OldRow>,
        new: Row,
    },
    Delete {
        rel: u32,
        old: OldRow,
    },
    Truncate {
        rels: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A transactional logical message (`pg_logical_emit_message(true, ...)`).
    Message {
        prefix: String,
        content: Vec<u8>,
    },
}

/// A user-defined type used by a relation ('Y' message): matched by name on the member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
}

/// One element of a stored transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Relation(Arc<Relation>),
    Type(TypeInfo),
    Change(Change),
}

/// Resolves relation OIDs while reading a transaction's records in order.
#[derive(Debug, Default)]
pub struct RelationSet {
    rels: HashMap<u32, Arc<Relation>>,
}

impl RelationSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers a relation; returns the previous definition if it differed.
    pub fn insert(&mut self, rel: impl Into<Arc<Relation>>) -> Option<Arc<Relation>> {
        let new: Arc<Relation> = rel.into();
        let oid = new.oid;
        match self.rels.insert(oid, new.clone()) {
            Some(old) if *old != *new => Some(old),
            _ => None,
        }
    }

    pub fn get(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.rels.get(&oid)
    }
}

/// Quotes an SQL identifier the way PostgreSQL's `quote_ident` does, always.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes an SQL string literal (standard_conforming_strings = on).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("Order"), "\"Order\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
