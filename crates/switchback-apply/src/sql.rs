//! SQL for each change, hub wins.
//!
//! Values travel as the hub's text output inside quoted literals
//! (`standard_conforming_strings = on` on the apply session): the member parses them
//! with its own input functions, so user types match by name, never by OID.
//! Literals are untyped where the target column types them (VALUES, SET, WHERE) so
//! assignment rules apply (a too-long varchar is an error, never truncated), and
//! cast to the member's type where nothing else would (SELECT lists).
//!
//! Each statement comes with an [`Expect`]: how its command tag or returned row
//! reveals a hub-wins conflict.

use std::fmt::Write;

use switchback_core::{quote_ident, quote_literal, Change, OldRow, OldRowKind, Value};

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
    /// Not a row change (BEGIN, COMMIT, progress, TRUNCATE).
    Nothing,
    /// `RETURNING (xmax = 0)`: `f` means the row existed.
    UpsertInsert,
    /// `INSERT ... ON CONFLICT DO NOTHING`: 0 rows means the row existed.
    InsertOrNothing,
    /// `RETURNING (xmax = 0)` of an update written as upsert: `t` means the row was missing.
    UpsertUpdate,
    /// `WITH u AS (UPDATE ...) INSERT ... WHERE NOT EXISTS` (or an all-key upsert):
    /// for an UPDATE, 1 row inserted means the row was missing; for an INSERT
    /// (`for_insert`), 0 rows inserted means it existed and was updated.
    UpdateOrInsert { for_insert: bool },
    /// Plain UPDATE: 0 rows means missing (and skipped).
    Update,
    /// DELETE: 0 rows means missing.
    Delete,
}

impl Expect {
    /// The conflict revealed by `rows` (command tag count) and the first column of
    /// the last returned row.
    pub fn conflict(self, rows: u64, returned: Option<&str>) -> Option<Conflict> {
        match self {
            Expect::Nothing => None,
            Expect::UpsertInsert => (returned == Some("f")).then_some(Conflict::InsertExisting),
            Expect::InsertOrNothing => (rows == 0).then_some(Conflict::InsertExisting),
            Expect::UpsertUpdate => (returned == Some("t")).then_some(Conflict::UpdateMissing),
            Expect::UpdateOrInsert { for_insert: false } => {
                (rows == 1).then_some(Conflict::UpdateMissing)
            }
            Expect::UpdateOrInsert { for_insert: true } => {
                (rows == 0).then_some(Conflict::InsertExisting)
            }
            Expect::Update => (rows == 0).then_some(Conflict::UpdateMissingSkipped),
            Expect::Delete => (rows == 0).then_some(Conflict::DeleteMissing),
        }
    }
}

fn literal(t: &Target, col: usize, v: &Value) -> Result<String, ApplyError> {
    match v {
        Value::Null => Ok("NULL".into()),
        Value::Text(b) => match std::str::from_utf8(b) {
            Ok(s) => Ok(quote_literal(s)),
            Err(_) => Err(ApplyError::Data(format!(
                "table {}: column {} holds bytes that are not UTF-8; the hub must be a UTF8 database",
                t.display, t.hub.columns[col].name
            ))),
        },
        Value::Binary(_) => Err(ApplyError::Data(format!(
            "table {}: column {} arrived in binary format, which switchback does not request",
            t.display, t.hub.columns[col].name
        ))),
        Value::Unchanged => Err(ApplyError::Data(format!(
            "table {}: column {} is an unchanged TOASTed value where a value is needed",
            t.display, t.hub.columns[col].name
        ))),
    }
}

fn col(t: &Target, i: usize) -> String {
    quote_ident(&t.hub.columns[i].name)
}

/// `"k1" = 'v1' AND "k2" IS NULL`
fn key_predicate(t: &Target, keys: &[usize], row: &[Value]) -> Result<String, ApplyError> {
    let mut out = String::new();
    for (n, &k) in keys.iter().enumerate() {
        if n > 0 {
            out.push_str(" AND ");
        }
        let v = row.get(k).unwrap_or(&Value::Null);
        match v {
            Value::Null => write!(out, "{} IS NULL", col(t, k)).unwrap(),
            _ => write!(out, "{} = {}", col(t, k), literal(t, k, v)?).unwrap(),
        }
    }
    Ok(out)
}

/// `ctid = (SELECT ctid FROM t WHERE <every column equal> LIMIT 1)`: exactly one row,
/// even among duplicates. Compared through the member's text output, so types
/// without an equality operator (json, xml, point) work too.
fn one_row_predicate(t: &Target, old: &[Value]) -> Result<String, ApplyError> {
    let mut conds = Vec::new();
    for (i, mc) in t.replicated() {
        match old.get(i).unwrap_or(&Value::Null) {
            Value::Unchanged => continue,
            Value::Null => conds.push(format!("{} IS NULL", col(t, i))),
            v => conds.push(format!(
                "{}::text = ({}::{})::text",
                col(t, i),
                literal(t, i, v)?,
                mc.cast_type
            )),
        }
    }
    if conds.is_empty() {
        conds.push("true".into());
    }
    Ok(format!(
        "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
        t.qualified,
        conds.join(" AND ")
    ))
}

/// The new row with unchanged TOASTed values filled from a full old row when possible.
fn effective_new(new: &[Value], old: Option<&OldRow>) -> Vec<Value> {
    new.iter()
        .enumerate()
        .map(|(i, v)| match (v, old) {
            (Value::Unchanged, Some(o)) if o.kind == OldRowKind::Full => match o.values.get(i) {
                Some(ov @ Value::Text(_)) | Some(ov @ Value::Null) => ov.clone(),
                _ => Value::Unchanged,
            },
            _ => v.clone(),
        })
        .collect()
}

fn insert_prefix(t: &Target) -> String {
    let cols: Vec<String> = t.replicated().map(|(i, _)| col(t, i)).collect();
    format!("INSERT INTO {} ({})", t.qualified, cols.join(", "))
}

fn values_list(t: &Target, row: &[Value]) -> Result<String, ApplyError> {
    let mut vals = Vec::new();
    for (i, _) in t.replicated() {
        vals.push(literal(t, i, row.get(i).unwrap_or(&Value::Null))?);
    }
    Ok(vals.join(", "))
}

fn typed_select_list(t: &Target, row: &[Value]) -> Result<String, ApplyError> {
    let mut vals = Vec::new();
    for (i, mc) in t.replicated() {
        let v = row.get(i).unwrap_or(&Value::Null);
        vals.push(format!("{}::{}", literal(t, i, v)?, mc.cast_type));
    }
    Ok(vals.join(", "))
}

fn on_conflict(t: &Target, keys: &[usize]) -> String {
    let key_cols: Vec<String> = keys.iter().map(|&k| col(t, k)).collect();
    let sets: Vec<String> = t
        .replicated()
        .filter(|(i, _)| !keys.contains(i))
        .map(|(i, _)| format!("{c} = EXCLUDED.{c}", c = col(t, i)))
        .collect();
    if sets.is_empty() {
        format!(" ON CONFLICT ({}) DO NOTHING", key_cols.join(", "))
    } else {
        format!(
            " ON CONFLICT ({}) DO UPDATE SET {}",
            key_cols.join(", "),
            sets.join(", ")
        )
    }
}

fn set_list(t: &Target, row: &[Value]) -> Result<String, ApplyError> {
    let mut sets = Vec::new();
    for (i, _) in t.replicated() {
        let v = row.get(i).unwrap_or(&Value::Null);
        if v.is_unchanged() {
            continue;
        }
        sets.push(format!("{} = {}", col(t, i), literal(t, i, v)?));
    }
    Ok(sets.join(", "))
}

/// `WITH u AS (UPDATE t SET ... WHERE pred RETURNING 1) INSERT INTO t (...) SELECT ... WHERE NOT EXISTS (SELECT 1 FROM u)`
fn update_or_insert(
    t: &Target,
    pred: &str,
    row: &[Value],
    upsert_keys: Option<&[usize]>,
) -> Result<String, ApplyError> {
    let mut s = format!(
        "WITH u AS (UPDATE {} SET {} WHERE {} RETURNING 1) {} SELECT {} WHERE NOT EXISTS (SELECT 1 FROM u)",
        t.qualified,
        set_list(t, row)?,
        pred,
        insert_prefix(t),
        typed_select_list(t, row)?
    );
    if let Some(k) = upsert_keys {
        s.push_str(&on_conflict(t, k));
    }
    Ok(s)
}

/// SQL for one row change on `t`.
pub fn row_change(t: &Target, change: &Change) -> Result<(String, Expect), ApplyError> {
    match change {
        Change::Insert { new, .. } => match &t.matching {
            Matching::Key(keys) => {
                let oc = on_conflict(t, keys);
                let returning = !oc.ends_with("DO NOTHING");
                let mut s = format!(
                    "{} VALUES ({}){}",
                    insert_prefix(t),
                    values_list(t, new)?,
                    oc
                );
                if returning {
                    s.push_str(" RETURNING (xmax = 0)");
                    Ok((s, Expect::UpsertInsert))
                } else {
                    Ok((s, Expect::InsertOrNothing))
                }
            }
            Matching::KeyNoIndex(keys) => {
                let pred = key_predicate(t, keys, new)?;
                Ok((
                    update_or_insert(t, &pred, new, None)?,
                    Expect::UpdateOrInsert { for_insert: true },
                ))
            }
            Matching::AllColumns => Ok((
                format!("{} VALUES ({})", insert_prefix(t), values_list(t, new)?),
                Expect::Nothing,
            )),
        },
        Change::Update { old, new, .. } => {
            let new = effective_new(new, old.as_ref());
            let complete = !new.iter().any(Value::is_unchanged);
            match &t.matching {
                Matching::Key(keys) | Matching::KeyNoIndex(keys) => {
                    let with_index = matches!(t.matching, Matching::Key(_));
                    // The row is found by its old key when the key changed, else by the new.
                    let key_src: &[Value] = match old {
                        Some(o) => &o.values,
                        None => &new,
                    };
                    let key_changed = old
                        .as_ref()
                        .is_some_and(|o| keys.iter().any(|&k| o.values.get(k) != new.get(k)));
                    if complete && with_index && !key_changed {
                        // Same key: an upsert is the update, or the insert of a missing row.
                        let oc = on_conflict(t, keys);
                        let base = format!(
                            "{} VALUES ({}){oc}",
                            insert_prefix(t),
                            values_list(t, &new)?
                        );
                        if oc.ends_with("DO NOTHING") {
                            // Every column is key: 1 row inserted means it was missing.
                            return Ok((base, Expect::UpdateOrInsert { for_insert: false }));
                        }
                        return Ok((format!("{base} RETURNING (xmax = 0)"), Expect::UpsertUpdate));
                    }
                    let pred = key_predicate(t, keys, key_src)?;
                    if complete {
                        Ok((
                            update_or_insert(
                                t,
                                &pred,
                                &new,
                                with_index.then_some(keys.as_slice()),
                            )?,
                            Expect::UpdateOrInsert { for_insert: false },
                        ))
                    } else {
                        Ok((
                            format!(
                                "UPDATE {} SET {} WHERE {}",
                                t.qualified,
                                set_list(t, &new)?,
                                pred
                            ),
                            Expect::Update,
                        ))
                    }
                }
                Matching::AllColumns => {
                    let Some(old) = old else {
                        return Err(ApplyError::Data(format!(
                            "table {}: an UPDATE arrived without its old row, and the member has no key to find the row by. \
                             Fix: give the table a primary key on the member, or REPLICA IDENTITY FULL on the hub",
                            t.display
                        )));
                    };
                    let pred = one_row_predicate(t, &old.values)?;
                    if complete {
                        Ok((
                            update_or_insert(t, &pred, &new, None)?,
                            Expect::UpdateOrInsert { for_insert: false },
                        ))
                    } else {
                        Ok((
                            format!(
                                "UPDATE {} SET {} WHERE {}",
                                t.qualified,
                                set_list(t, &new)?,
                                pred
                            ),
                            Expect::Update,
                        ))
                    }
                }
            }
        }
        Change::Delete { old, .. } => {
            let pred = match &t.matching {
                Matching::Key(keys) | Matching::KeyNoIndex(keys) => {
                    key_predicate(t, keys, &old.values)?
                }
                Matching::AllColumns => one_row_predicate(t, &old.values)?,
            };
            Ok((
                format!("DELETE FROM {} WHERE {}", t.qualified, pred),
                Expect::Delete,
            ))
        }
        Change::Truncate { .. } | Change::Message { .. } => {
            Err(ApplyError::Data("internal: not a row change".into()))
        }
    }
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
