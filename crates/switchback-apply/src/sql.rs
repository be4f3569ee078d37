//! Statements for each change, hub wins.
//!
//! Each change maps to a statement **shape** (table, kind, which columns are
//! unchanged TOAST values) prepared once on the member and executed with the hub's
//! values as **text-format parameters**: the member parses them with its own input
//! functions, so user types match by name, never by OID, and a value is never
//! reinterpreted on the way. Parameters in VALUES, SET and WHERE are typed by the
//! target column (assignment rules apply: a too-long varchar is an error, never
//! truncated); parameters in SELECT lists are cast to the member's type.
//!
//! Each shape comes with an [`Expect`]: how its outcome reveals a hub-wins conflict.

use std::fmt::Write;

use switchback_core::{quote_ident, Change, OldRow, OldRowKind, Value};

use crate::target::{Matching, Target};
use crate::ApplyError;

/// Hub-wins conflicts, each counted and logged (table and key columns, never values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// An INSERT found the row: it was updated to the hub's values.
    InsertExisting,
    /// An UPDATE found no row: the full row was inserted.
    UpdateMissing,
    /// An UPDATE found no row and could not insert it (unchanged TOASTed values unknown).
    UpdateMissingSkipped,
    /// A DELETE found no row: nothing to do.
    DeleteMissing,
}

impl Conflict {
    pub fn as_str(self) -> &'static str {
        match self {
            Conflict::InsertExisting => "insert_existing",
            Conflict::UpdateMissing => "update_missing",
            Conflict::UpdateMissingSkipped => "update_missing_skipped",
            Conflict::DeleteMissing => "delete_missing",
        }
    }
}

/// How to read a statement's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Not a row change, or a change that cannot conflict.
    Nothing,
    /// `RETURNING (xmax = 0)` of an INSERT written as upsert: `false` means the row existed.
    UpsertInsert,
    /// `INSERT ... ON CONFLICT DO NOTHING`: 0 rows means the row existed.
    InsertOrNothing,
    /// `RETURNING (xmax = 0)` of an UPDATE written as upsert: `true` means it was missing.
    UpsertUpdate,
    /// `WITH u AS (UPDATE ...) INSERT ... WHERE NOT EXISTS` (or an all-key upsert):
    /// for an UPDATE, 1 row inserted means the row was missing; for an INSERT
    /// (`for_insert`), 0 rows inserted means it existed and was updated.
    UpdateOrInsert { for_insert: bool },
    /// Plain UPDATE: 0 rows means missing (and skipped).
    Update,
    /// DELETE: 0 rows means missing.
    Delete,
    /// Fast path: a plain UPDATE that must find its row; 0 rows sends the group to
    /// the careful replay, where the conflict is resolved and counted.
    MustMatch,
    /// Fast path: a multi-row UPDATE that must update exactly this many rows.
    MustMatchN(u64),
}

impl Expect {
    /// The conflict revealed by the affected-row count and the returned boolean.
    pub fn conflict(self, rows: u64, returned: Option<bool>) -> Option<Conflict> {
        match self {
            Expect::Nothing => None,
            Expect::UpsertInsert => (returned == Some(false)).then_some(Conflict::InsertExisting),
            Expect::InsertOrNothing => (rows == 0).then_some(Conflict::InsertExisting),
            Expect::UpsertUpdate => (returned == Some(true)).then_some(Conflict::UpdateMissing),
            Expect::UpdateOrInsert { for_insert: false } => {
                (rows == 1).then_some(Conflict::UpdateMissing)
            }
            Expect::UpdateOrInsert { for_insert: true } => {
                (rows == 0).then_some(Conflict::InsertExisting)
            }
            Expect::Update => (rows == 0).then_some(Conflict::UpdateMissingSkipped),
            Expect::Delete => (rows == 0).then_some(Conflict::DeleteMissing),
            Expect::MustMatch | Expect::MustMatchN(_) => None,
        }
    }
}

/// Where a parameter's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    /// Column of the new row (unchanged TOAST filled from a full old row).
    New(usize),
    /// Column of the old row (key or full).
    Old(usize),
}

/// The statement kinds; with the masks they identify a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Fast path: a plain INSERT (a unique violation sends the group to the careful replay).
    InsertFast,
    /// Fast path: many plain INSERTs into one table as one statement, each column
    /// passed as a text array (`unnest`).
    InsertMany,
    /// Fast path: many UPDATEs by distinct keys on one table as one statement; it
    /// must update exactly as many rows, else the group is replayed carefully.
    UpdateMany,
    /// Fast path: a plain UPDATE by key that must find its row.
    UpdateFast,
    Insert,
    /// Update with every column known and the same key: an upsert.
    UpdateUpsert,
    /// Update with every column known: update by old key (or one row), else insert.
    UpdateOrInsert,
    /// Update with unchanged TOAST columns: update what changed, by old key/one row.
    UpdatePlain,
    Delete,
    /// Active-active, member → hub: `INSERT ... ON CONFLICT DO NOTHING` (the hub's
    /// row wins).
    InsertNothing,
    /// Active-active, member → hub: UPDATE only the row that still equals the
    /// member's old row (all columns); otherwise the hub changed it and wins.
    UpdateIfOld,
    /// Active-active, member → hub: DELETE only a row that still equals the old row.
    DeleteIfOld,
}

/// Cache key of a prepared statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    pub rel: u32,
    pub kind: Kind,
    /// The row to find is identified by the old row (not the new one).
    pub by_old: bool,
    /// Columns left out: unchanged TOAST in the new row (updates) or in the old row
    /// (matching by all columns).
    pub skip_new: Vec<bool>,
    pub skip_old: Vec<bool>,
}

/// SQL text with `$n` placeholders and where each parameter comes from.
#[derive(Debug, Clone)]
pub struct Shape {
    pub sql: String,
    pub params: Vec<Src>,
    pub expect: Expect,
}

struct Builder<'a> {
    t: &'a Target,
    sql: String,
    params: Vec<Src>,
}

impl<'a> Builder<'a> {
    fn p(&mut self, src: Src) -> String {
        self.params.push(src);
        format!("${}", self.params.len())
    }
    /// The member column hub column `i` is written to (mapping resolved in target.rs).
    fn col(&self, i: usize) -> String {
        match &self.t.columns[i] {
            Some(c) => quote_ident(&c.name),
            None => quote_ident(&self.t.hub.columns[i].name),
        }
    }
    /// Member-only constant columns appended to an INSERT: (", names", ", values").
    fn constants(&self) -> (String, String) {
        let mut names = String::new();
        let mut values = String::new();
        for (c, v) in &self.t.constants {
            let _ = write!(names, ", {c}");
            let _ = write!(values, ", {v}");
        }
        (names, values)
    }
}

/// The new row with unchanged TOASTed values filled from a full old row when possible.
fn effective_new(mut new: Vec<Value>, old: Option<&OldRow>) -> Vec<Value> {
    if let Some(o) = old.filter(|o| o.kind == OldRowKind::Full) {
        for (i, v) in new.iter_mut().enumerate() {
            if v.is_unchanged() {
                if let Some(ov @ (Value::Text(_) | Value::Null)) = o.values.get(i) {
                    *v = ov.clone();
                }
            }
        }
    }
    new
}

/// A change ready to execute: its shape key and its row images.
pub struct Planned {
    pub key: ShapeKey,
    pub new: Vec<Value>,
    pub old: Vec<Value>,
    pub op: &'static str,
}

/// Decides the shape of a row change on `t`. Without `careful`, inserts and
/// same-key updates on tables with a unique key take the fast path.
pub fn plan(t: &Target, change: Change, careful: bool) -> Result<Planned, ApplyError> {
    let n = t.hub.columns.len();
    let none = vec![false; n];
    let (kind, by_old, new, old, op) = match change {
        Change::Insert { new, .. } => (Kind::Insert, false, new, Vec::new(), "insert"),
        Change::Update { old, new, .. } => {
            let new = effective_new(new, old.as_ref());
            let complete = !new.iter().any(Value::is_unchanged);
            let key_changed = match (&t.matching, &old) {
                (Matching::Key(k) | Matching::KeyNoIndex(k), Some(o)) => {
                    k.iter().any(|&i| o.values.get(i) != new.get(i))
                }
                _ => false,
            };
            if matches!(t.matching, Matching::AllColumns) && old.is_none() {
                return Err(ApplyError::Data(format!(
                    "table {}: an UPDATE arrived without its old row, and the member has no key to find the row by. \
                     Fix: give the table a primary key on the member, or REPLICA IDENTITY FULL on the hub",
                    t.display
                )));
            }
            let by_old =
                old.is_some() && (key_changed || matches!(t.matching, Matching::AllColumns));
            let kind = if !complete {
                Kind::UpdatePlain
            } else if matches!(t.matching, Matching::Key(_)) && !key_changed {
                Kind::UpdateUpsert
            } else {
                Kind::UpdateOrInsert
            };
            let old_vals = old.map(|o| o.values).unwrap_or_default();
            (kind, by_old, new, old_vals, "update")
        }
        Change::Delete { old, .. } => (Kind::Delete, true, Vec::new(), old.values, "delete"),
        Change::Truncate { .. } | Change::Message { .. } => {
            return Err(ApplyError::Data("internal: not a row change".into()))
        }
    };
    let has_non_key = match &t.matching {
        Matching::Key(k) => t.replicated().any(|(i, _)| !k.contains(&i)),
        _ => false,
    };
    let kind = match kind {
        Kind::Insert if !careful && matches!(t.matching, Matching::Key(_)) => Kind::InsertFast,
        Kind::UpdateUpsert if !careful && has_non_key => Kind::UpdateFast,
        k => k,
    };
    let skip_new = if kind == Kind::UpdatePlain {
        (0..n)
            .map(|i| new.get(i).is_some_and(Value::is_unchanged))
            .collect()
    } else {
        none.clone()
    };
    let skip_old = if matches!(t.matching, Matching::AllColumns) && by_old {
        (0..n)
            .map(|i| old.get(i).is_some_and(Value::is_unchanged))
            .collect()
    } else {
        none
    };
    Ok(Planned {
        key: ShapeKey {
            rel: t.hub.oid,
            kind,
            by_old,
            skip_new,
            skip_old,
        },
        new,
        old,
        op,
    })
}

/// Active-active, member → hub ("the hub wins"): a member change is applied only
/// where the hub's row is still what the member changed; anything else is a
/// conflict the hub wins (counted, skipped), and the hub's own change reaches the
/// member through the other direction. Needs the member's old rows whole
/// (REPLICA IDENTITY FULL, set by capture in active-active mode).
pub fn plan_hub_wins_reverse(t: &Target, change: Change) -> Result<Planned, ApplyError> {
    let n = t.hub.columns.len();
    let full_old = |old: Option<OldRow>, op: &str| -> Result<Vec<Value>, ApplyError> {
        match old {
            Some(o) if o.kind == OldRowKind::Full => Ok(o.values),
            _ => Err(ApplyError::Data(format!(
                "table {}: an active-active {op} arrived without the whole old row, so a conflict \
                 cannot be detected. Fix: ALTER TABLE {} REPLICA IDENTITY FULL on the member \
                 (switchback run does it at start in active-active mode)",
                t.display, t.display
            ))),
        }
    };
    let unchanged = |v: &[Value]| -> Vec<bool> {
        (0..n)
            .map(|i| v.get(i).is_some_and(Value::is_unchanged))
            .collect()
    };
    let (kind, new, old, op) = match change {
        Change::Insert { new, .. } => (Kind::InsertNothing, new, Vec::new(), "insert"),
        Change::Update { old, new, .. } => {
            let old = full_old(old, "update")?;
            (Kind::UpdateIfOld, new, old, "update")
        }
        Change::Delete { old, .. } => (
            Kind::DeleteIfOld,
            Vec::new(),
            full_old(Some(old), "delete")?,
            "delete",
        ),
        Change::Truncate { .. } | Change::Message { .. } => {
            return Err(ApplyError::Data("internal: not a row change".into()))
        }
    };
    Ok(Planned {
        key: ShapeKey {
            rel: t.hub.oid,
            kind,
            by_old: kind != Kind::InsertNothing,
            skip_new: if kind == Kind::UpdateIfOld {
                unchanged(&new)
            } else {
                vec![false; n]
            },
            skip_old: unchanged(&old),
        },
        new,
        old,
        op,
    })
}

/// Builds the SQL of a shape.
pub fn build(t: &Target, key: &ShapeKey) -> Shape {
    let mut b = Builder {
        t,
        sql: String::new(),
        params: Vec::new(),
    };
    let expect = match key.kind {
        Kind::InsertMany => {
            let cols: Vec<(usize, String)> = t
                .replicated()
                .map(|(i, mc)| (i, mc.cast_type.clone()))
                .collect();
            let names: Vec<String> = cols.iter().map(|(i, _)| b.col(*i)).collect();
            let mut arrays = Vec::new();
            let mut casts = Vec::new();
            for (n, (i, ty)) in cols.iter().enumerate() {
                let p = b.p(Src::New(*i));
                arrays.push(format!("{p}::text[]"));
                casts.push(format!("u.c{n}::{ty}"));
            }
            let aliases: Vec<String> = (0..cols.len()).map(|n| format!("c{n}")).collect();
            let (cnames, cvalues) = b.constants();
            let _ = write!(
                b.sql,
                "INSERT INTO {} ({}{cnames}) SELECT {}{cvalues} FROM unnest({}) AS u({})",
                t.qualified,
                names.join(", "),
                casts.join(", "),
                arrays.join(", "),
                aliases.join(", ")
            );
            Expect::Nothing
        }
        Kind::UpdateMany => {
            let Matching::Key(keys) = &t.matching else {
                unreachable!("fast updates need a unique key")
            };
            let cols: Vec<(usize, String)> = t
                .replicated()
                .map(|(i, mc)| (i, mc.cast_type.clone()))
                .collect();
            let mut arrays = Vec::new();
            let mut aliases = Vec::new();
            let mut sets = Vec::new();
            let mut preds = Vec::new();
            for (n, (i, ty)) in cols.iter().enumerate() {
                let p = b.p(Src::New(*i));
                arrays.push(format!("{p}::text[]"));
                aliases.push(format!("c{n}"));
                let c = b.col(*i);
                if keys.contains(i) {
                    preds.push(format!("t.{c} = u.c{n}::{ty}"));
                } else {
                    sets.push(format!("{c} = u.c{n}::{ty}"));
                }
            }
            let _ = write!(
                b.sql,
                "UPDATE {} AS t SET {} FROM unnest({}) AS u({}) WHERE {}",
                t.qualified,
                sets.join(", "),
                arrays.join(", "),
                aliases.join(", "),
                preds.join(" AND ")
            );
            Expect::MustMatch
        }
        Kind::InsertFast => {
            insert_values(&mut b);
            Expect::Nothing
        }
        Kind::UpdateFast => {
            let Matching::Key(keys) = &t.matching else {
                unreachable!("fast updates need a unique key")
            };
            let skip: Vec<bool> = (0..t.hub.columns.len())
                .map(|i| keys.contains(&i))
                .collect();
            let _ = write!(b.sql, "UPDATE {} SET ", t.qualified);
            set_list(&mut b, &skip);
            b.sql.push_str(" WHERE ");
            predicate(&mut b, key, Pred::Keys(keys.clone()));
            Expect::MustMatch
        }
        Kind::Insert => match &t.matching {
            Matching::Key(keys) => {
                insert_values(&mut b);
                let nothing = on_conflict(&mut b, keys);
                if nothing {
                    Expect::InsertOrNothing
                } else {
                    b.sql.push_str(" RETURNING (xmax = 0)");
                    Expect::UpsertInsert
                }
            }
            Matching::KeyNoIndex(keys) => {
                update_or_insert(&mut b, key, keys_pred(keys.clone()), None);
                Expect::UpdateOrInsert { for_insert: true }
            }
            Matching::AllColumns => {
                insert_values(&mut b);
                Expect::Nothing
            }
        },
        Kind::UpdateUpsert => {
            let Matching::Key(keys) = &t.matching else {
                unreachable!("upsert shapes need a unique key")
            };
            insert_values(&mut b);
            if on_conflict(&mut b, keys) {
                Expect::UpdateOrInsert { for_insert: false }
            } else {
                b.sql.push_str(" RETURNING (xmax = 0)");
                Expect::UpsertUpdate
            }
        }
        Kind::UpdateOrInsert => {
            let upsert = match &t.matching {
                Matching::Key(k) => Some(k.clone()),
                _ => None,
            };
            update_or_insert(&mut b, key, pred_for(t), upsert);
            Expect::UpdateOrInsert { for_insert: false }
        }
        Kind::UpdatePlain => {
            let _ = write!(b.sql, "UPDATE {} SET ", t.qualified);
            set_list(&mut b, &key.skip_new);
            b.sql.push_str(" WHERE ");
            predicate(&mut b, key, pred_for(t));
            Expect::Update
        }
        Kind::Delete => {
            let _ = write!(b.sql, "DELETE FROM {} WHERE ", t.qualified);
            predicate(&mut b, key, pred_for(t));
            Expect::Delete
        }
        Kind::InsertNothing => {
            insert_values(&mut b);
            b.sql.push_str(" ON CONFLICT DO NOTHING");
            Expect::InsertOrNothing
        }
        Kind::UpdateIfOld => {
            let _ = write!(b.sql, "UPDATE {} SET ", t.qualified);
            set_list(&mut b, &key.skip_new);
            b.sql.push_str(" WHERE ");
            predicate(&mut b, key, Pred::OneRow);
            Expect::Update
        }
        Kind::DeleteIfOld => {
            let _ = write!(b.sql, "DELETE FROM {} WHERE ", t.qualified);
            predicate(&mut b, key, Pred::OneRow);
            Expect::Delete
        }
    };
    Shape {
        sql: b.sql,
        params: b.params,
        expect,
    }
}

enum Pred {
    Keys(Vec<usize>),
    OneRow,
}

fn keys_pred(k: Vec<usize>) -> Pred {
    Pred::Keys(k)
}

fn pred_for(t: &Target) -> Pred {
    match &t.matching {
        Matching::Key(k) | Matching::KeyNoIndex(k) => Pred::Keys(k.clone()),
        Matching::AllColumns => Pred::OneRow,
    }
}

fn insert_values(b: &mut Builder) {
    let cols: Vec<usize> = b.t.replicated().map(|(i, _)| i).collect();
    let names: Vec<String> = cols.iter().map(|&i| b.col(i)).collect();
    let (cnames, cvalues) = b.constants();
    let _ = write!(
        b.sql,
        "INSERT INTO {} ({}{cnames}) VALUES (",
        b.t.qualified,
        names.join(", ")
    );
    for (n, &i) in cols.iter().enumerate() {
        if n > 0 {
            b.sql.push_str(", ");
        }
        let p = b.p(Src::New(i));
        b.sql.push_str(&p);
    }
    b.sql.push_str(&cvalues);
    b.sql.push(')');
}

/// Appends `ON CONFLICT (...) DO UPDATE SET ...`; returns true when it is DO NOTHING.
fn on_conflict(b: &mut Builder, keys: &[usize]) -> bool {
    let key_cols: Vec<String> = keys.iter().map(|&k| b.col(k)).collect();
    let sets: Vec<String> =
        b.t.replicated()
            .filter(|(i, _)| !keys.contains(i))
            .map(|(i, _)| format!("{c} = EXCLUDED.{c}", c = b.col(i)))
            .collect();
    if sets.is_empty() {
        let _ = write!(b.sql, " ON CONFLICT ({}) DO NOTHING", key_cols.join(", "));
        true
    } else {
        let _ = write!(
            b.sql,
            " ON CONFLICT ({}) DO UPDATE SET {}",
            key_cols.join(", "),
            sets.join(", ")
        );
        false
    }
}

fn set_list(b: &mut Builder, skip: &[bool]) {
    let cols: Vec<usize> =
        b.t.replicated()
            .map(|(i, _)| i)
            .filter(|&i| !skip.get(i).copied().unwrap_or(false))
            .collect();
    for (n, &i) in cols.iter().enumerate() {
        if n > 0 {
            b.sql.push_str(", ");
        }
        let c = b.col(i);
        let p = b.p(Src::New(i));
        let _ = write!(b.sql, "{c} = {p}");
    }
}

fn predicate(b: &mut Builder, key: &ShapeKey, pred: Pred) {
    let src = |i| if key.by_old { Src::Old(i) } else { Src::New(i) };
    match pred {
        Pred::Keys(keys) => {
            for (n, &k) in keys.iter().enumerate() {
                if n > 0 {
                    b.sql.push_str(" AND ");
                }
                let c = b.col(k);
                let p = b.p(src(k));
                let _ = write!(b.sql, "{c} = {p}");
            }
        }
        Pred::OneRow => {
            // Exactly one row, even among duplicates; compared through the member's
            // text output so types without equality (json, xml, point) work too.
            let cols: Vec<(usize, String)> =
                b.t.replicated()
                    .filter(|(i, _)| !key.skip_old.get(*i).copied().unwrap_or(false))
                    .map(|(i, mc)| (i, mc.cast_type.clone()))
                    .collect();
            let _ = write!(b.sql, "ctid = (SELECT ctid FROM {} WHERE ", b.t.qualified);
            // Conditional shapes (active-active) also compare the key with `=` first,
            // so the member's index finds the row.
            let mut n0 = 0;
            if matches!(key.kind, Kind::UpdateIfOld | Kind::DeleteIfOld) {
                if let Matching::Key(k) | Matching::KeyNoIndex(k) = &b.t.matching {
                    for &i in k {
                        if n0 > 0 {
                            b.sql.push_str(" AND ");
                        }
                        let c = b.col(i);
                        let p = b.p(src(i));
                        let _ = write!(b.sql, "{c} = {p}");
                        n0 += 1;
                    }
                }
            }
            if cols.is_empty() && n0 == 0 {
                b.sql.push_str("true");
            }
            for (n, (i, ty)) in cols.iter().enumerate() {
                if n + n0 > 0 {
                    b.sql.push_str(" AND ");
                }
                let c = b.col(*i);
                let p = b.p(src(*i));
                let _ = write!(b.sql, "{c}::text IS NOT DISTINCT FROM ({p}::{ty})::text");
            }
            b.sql.push_str(" LIMIT 1)");
        }
    }
}

/// `WITH u AS (UPDATE t SET ... WHERE pred RETURNING 1) INSERT INTO t (...) SELECT ... WHERE NOT EXISTS (SELECT 1 FROM u)`
fn update_or_insert(b: &mut Builder, key: &ShapeKey, pred: Pred, upsert: Option<Vec<usize>>) {
    let _ = write!(b.sql, "WITH u AS (UPDATE {} SET ", b.t.qualified);
    set_list(b, &key.skip_new);
    b.sql.push_str(" WHERE ");
    predicate(b, key, pred);
    let cols: Vec<(usize, String)> =
        b.t.replicated()
            .map(|(i, mc)| (i, mc.cast_type.clone()))
            .collect();
    let names: Vec<String> = cols.iter().map(|(i, _)| b.col(*i)).collect();
    let (cnames, cvalues) = b.constants();
    let _ = write!(
        b.sql,
        " RETURNING 1) INSERT INTO {} ({}{cnames}) SELECT ",
        b.t.qualified,
        names.join(", ")
    );
    for (n, (i, ty)) in cols.iter().enumerate() {
        if n > 0 {
            b.sql.push_str(", ");
        }
        let p = b.p(Src::New(*i));
        let _ = write!(b.sql, "{p}::{ty}");
    }
    b.sql.push_str(&cvalues);
    b.sql.push_str(" WHERE NOT EXISTS (SELECT 1 FROM u)");
    if let Some(k) = upsert {
        on_conflict(b, &k);
    }
}

/// The parameters of a planned change for a shape.
pub fn params(t: &Target, shape: &Shape, p: &Planned) -> Result<Vec<Option<Vec<u8>>>, ApplyError> {
    shape
        .params
        .iter()
        .map(|src| {
            let (row, i) = match *src {
                Src::New(i) => (&p.new, i),
                Src::Old(i) => (&p.old, i),
            };
            match row.get(i).unwrap_or(&Value::Null) {
                Value::Null => Ok(None),
                Value::Text(b) => Ok(Some(b.clone())),
                Value::Binary(_) => Err(ApplyError::Data(format!(
                    "table {}: column {} arrived in binary format, which switchback does not request",
                    t.display, t.hub.columns[i].name
                ))),
                Value::Unchanged => Err(ApplyError::Data(format!(
                    "table {}: column {} is an unchanged TOASTed value where a value is needed",
                    t.display, t.hub.columns[i].name
                ))),
            }
        })
        .collect()
}

/// The parameters of an `InsertMany` or `UpdateMany` shape: one `text[]` per column
/// in binary format, holding that column of every row as text (`NULL` elements for
/// NULLs); the statement casts each element to the member's type.
pub fn many_params(
    t: &Target,
    shape: &Shape,
    rows: &[&Planned],
) -> Result<Vec<Option<Vec<u8>>>, ApplyError> {
    shape
        .params
        .iter()
        .map(|src| {
            let Src::New(i) = *src else {
                return Err(ApplyError::Data(
                    "internal: InsertMany takes new rows only".into(),
                ));
            };
            let mut values = Vec::with_capacity(rows.len());
            for p in rows {
                values.push(match p.new.get(i).unwrap_or(&Value::Null) {
                    Value::Null => None,
                    Value::Text(v) => Some(v.as_slice()),
                    _ => {
                        return Err(ApplyError::Data(format!(
                            "table {}: column {} has no text value to insert",
                            t.display, t.hub.columns[i].name
                        )))
                    }
                });
            }
            Ok(Some(switchback_pg::pipeline::binary_text_array(&values)))
        })
        .collect()
}

/// `TRUNCATE a, b [RESTART IDENTITY] [CASCADE]`
pub fn truncate(targets: &[&Target], cascade: bool, restart_identity: bool) -> String {
    let names: Vec<&str> = targets.iter().map(|t| t.qualified.as_str()).collect();
    let mut s = format!("TRUNCATE {}", names.join(", "));
    if restart_identity {
        s.push_str(" RESTART IDENTITY");
    }
    if cascade {
        s.push_str(" CASCADE");
    }
    s
}
