//! JSON rendering of stored transactions (`switchback queue dump --json`).
//!
//! One object per transaction: `seq`, `xid`, `commit_lsn`, `end_lsn` (`X/Y`),
//! `commit_time` (RFC 3339), `origin` (null or name) and `changes`, a list of
//! `{"op", "schema", "table", "new", "old", "unchanged"}` (truncate: `tables`,
//! `cascade`, `restart_identity`; message: `prefix`, `content`). Values are the
//! hub's text output; `null` is SQL NULL; unchanged TOASTed columns are absent from
//! `new` and listed in `unchanged`.

use serde_json::{json, Map, Value as Json};

use crate::event::{Change, OldRow, OldRowKind, Record, RelationSet, TxnHeader, Value};
use crate::time::format_pg_timestamp;

fn text(v: &[u8]) -> Json {
    Json::String(String::from_utf8_lossy(v).into_owned())
}

fn values(rel: &crate::event::Relation, row: &[Value], only_keys: bool) -> (Json, Vec<Json>) {
    let mut obj = Map::new();
    let mut unchanged = Vec::new();
    for (c, v) in rel.columns.iter().zip(row) {
        if only_keys && !c.is_key {
            continue;
        }
        match v {
            Value::Null => {
                obj.insert(c.name.clone(), Json::Null);
            }
            Value::Unchanged => unchanged.push(Json::String(c.name.clone())),
            Value::Text(t) | Value::Binary(t) => {
                obj.insert(c.name.clone(), text(t));
            }
        }
    }
    (Json::Object(obj), unchanged)
}

fn old_json(rel: &crate::event::Relation, old: &OldRow) -> Json {
    values(rel, &old.values, old.kind == OldRowKind::Key).0
}

/// Renders one change; `None` for records that are not changes.
pub fn change_json(rels: &mut RelationSet, rec: Record) -> Option<Json> {
    let change = match rec {
        Record::Relation(r) => {
            rels.insert(r);
            return None;
        }
        Record::Type(_) => return None,
        Record::Change(c) => c,
    };
    let unknown = |oid: u32| json!({"op": "unknown", "relation_oid": oid});
    Some(match change {
        Change::Insert { rel, new } => match rels.get(rel) {
            Some(r) => {
                let (n, u) = values(r, &new, false);
                json!({"op": "insert", "schema": r.schema, "table": r.table, "new": n, "old": null, "unchanged": u})
            }
            None => unknown(rel),
        },
        Change::Update { rel, old, new } => match rels.get(rel) {
            Some(r) => {
                let (n, u) = values(r, &new, false);
                let o = old.as_ref().map(|o| old_json(r, o)).unwrap_or(Json::Null);
                json!({"op": "update", "schema": r.schema, "table": r.table, "new": n, "old": o, "unchanged": u})
            }
            None => unknown(rel),
        },
        Change::Delete { rel, old } => match rels.get(rel) {
            Some(r) => {
                json!({"op": "delete", "schema": r.schema, "table": r.table, "new": null, "old": old_json(r, &old), "unchanged": []})
            }
            None => unknown(rel),
        },
        Change::Truncate {
            rels: oids,
            cascade,
            restart_identity,
        } => {
            let tables: Vec<Json> = oids
                .iter()
                .map(|o| match rels.get(*o) {
                    Some(r) => json!({"schema": r.schema, "table": r.table}),
                    None => json!({"relation_oid": o}),
                })
                .collect();
            json!({"op": "truncate", "tables": tables, "cascade": cascade, "restart_identity": restart_identity})
        }
        Change::Message { prefix, content } => {
            json!({"op": "message", "prefix": prefix, "content": text(&content)})
        }
    })
}

/// The header part of a transaction's JSON object (without `changes`).
pub fn header_json(seq: u64, h: &TxnHeader) -> Map<String, Json> {
    let mut m = Map::new();
    m.insert("seq".into(), json!(seq));
    m.insert("xid".into(), json!(h.xid));
    m.insert("commit_lsn".into(), json!(h.commit_lsn.to_string()));
    m.insert("end_lsn".into(), json!(h.end_lsn.to_string()));
    m.insert(
        "commit_time".into(),
        json!(format_pg_timestamp(h.commit_time)),
    );
    m.insert("origin".into(), json!(h.origin));
    m
}
