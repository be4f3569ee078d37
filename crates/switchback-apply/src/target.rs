//! The member's side of a replicated table: its columns, types and key, and how
//! each hub column maps onto it. The mapping (target table, renames, exclusions,
//! constants) is resolved here once per relation, so the statements of sql.rs
//! carry it precomputed and the apply loop does not look at it.

use std::sync::Arc;

use switchback_config::Tables;
use switchback_core::{quote_ident, quote_literal, Relation, ReplicaIdentity};
use switchback_mapping::{catalog, model, ColumnTarget};
use tokio_postgres::Client;

use crate::ApplyError;

#[derive(Debug, Clone)]
pub struct MemberColumn {
    pub name: String,
    /// `format_type(atttypid, NULL)`, used to type literals in SELECT lists.
    pub cast_type: String,
    pub not_null: bool,
    pub has_default: bool,
    pub generated: bool,
}

/// How rows of the table are found on the member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matching {
    /// By these hub column indexes, which a unique index of the member covers
    /// exactly (upserts with ON CONFLICT are possible).
    Key(Vec<usize>),
    /// By these hub column indexes, without a unique index on the member (no upsert).
    KeyNoIndex(Vec<usize>),
    /// By all columns of the old row (REPLICA IDENTITY FULL and no key on the member):
    /// exactly one matching row is changed per change.
    AllColumns,
}

/// A hub relation resolved against the member.
#[derive(Debug, Clone)]
pub struct Target {
    pub hub: Arc<Relation>,
    /// `"schema"."table"` on the member.
    pub qualified: String,
    /// `schema.table` for messages.
    pub display: String,
    /// For each hub column: its member column (None: not replicated).
    pub columns: Vec<Option<MemberColumn>>,
    /// Member-only columns set on insert: (quoted column, typed SQL literal).
    pub constants: Vec<(String, String)>,
    pub matching: Matching,
}

impl Target {
    /// Hub column indexes that are replicated.
    pub fn replicated(&self) -> impl Iterator<Item = (usize, &MemberColumn)> {
        self.columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().filter(|c| !c.generated).map(|c| (i, c)))
    }

    pub fn key_names(&self) -> String {
        match &self.matching {
            Matching::Key(k) | Matching::KeyNoIndex(k) => k
                .iter()
                .map(|&i| self.hub.columns[i].name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            Matching::AllColumns => "(all columns)".into(),
        }
    }
}

/// Resolves the hub relation `rel` against the member through the table's
/// mapping ([tables] rules): target table, renamed and excluded columns, constants,
/// and the drift policy for hub columns the member lacks (`add-columns` adds them
/// here, before anything of the relation is applied).
pub async fn resolve(
    member: &Client,
    rel: Arc<Relation>,
    tables: &Tables,
) -> Result<Target, ApplyError> {
    let display = rel.display_name();
    let rule = tables.rule(&rel.schema, &rel.table);
    let (ts, tn) = rule.target();
    let hub_names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    let load = || async {
        catalog::load_table(member, ts, tn)
            .await
            .map_err(ApplyError::member)?
            .ok_or_else(|| {
                ApplyError::Schema(format!(
                    "table {display}: its target table {ts}.{tn} does not exist on the member. Fix: create it on \
                     the member, set target_schema/target_name in [[tables.table]], or exclude it with [tables] \
                     exclude = [\"{display}\"]; nothing past this point was applied"
                ))
            })
    };
    let mut mt = load().await?;
    let (mut map, mut problems) = model::map_table(&rule, tables.drift, &hub_names, &mt);
    let to_add: Vec<usize> = map
        .columns
        .iter()
        .enumerate()
        .filter(|(_, (_, t))| *t == ColumnTarget::ToAdd)
        .map(|(i, _)| i)
        .collect();
    if problems.is_empty() && !to_add.is_empty() {
        for i in to_add {
            let c = &rel.columns[i];
            let Some((ty, _, _)) = catalog::builtin_type(member, c.type_oid, c.type_modifier)
                .await
                .map_err(ApplyError::member)?
            else {
                return Err(ApplyError::Schema(format!(
                    "table {display}: new hub column {} has a user-defined type, which drift = \"add-columns\" \
                     cannot add. Fix: add the column on the member yourself, then start again; nothing past this \
                     point was applied",
                    c.name
                )));
            };
            let sql = format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {ty}",
                mt.qualified(),
                quote_ident(&c.name)
            );
            // The apply session may hold a lock on the table from earlier changes of
            // the same group: give up quickly and let apply regroup instead of
            // waiting for itself.
            let r = member
                .batch_execute(&format!(
                    "SET lock_timeout = '3s'; {sql}; RESET lock_timeout"
                ))
                .await;
            if let Err(e) = r {
                let _ = member.batch_execute("RESET lock_timeout").await;
                if e.code().map(|c| c.code()) == Some("55P03") {
                    return Err(ApplyError::Regroup);
                }
                return Err(ApplyError::member(e));
            }
            tracing::warn!(table = %rel.display_name(), column = %c.name, member_type = %ty,
                "schema drift: added the hub's new column on the member (drift = add-columns)");
        }
        mt = load().await?;
        (map, problems) = model::map_table(&rule, tables.drift, &hub_names, &mt);
    }
    // Types: built-in hub types are known by OID on the member too. The lookups
    // are pipelined on the one connection.
    let mapped: Vec<(usize, &String, &String)> = map
        .columns
        .iter()
        .enumerate()
        .filter_map(|(i, (h, t))| match t {
            ColumnTarget::Member(m) => Some((i, h, m)),
            _ => None,
        })
        .collect();
    let types = futures_util::future::join_all(mapped.iter().map(|&(i, _, _)| {
        let c = &rel.columns[i];
        catalog::builtin_type(member, c.type_oid, c.type_modifier)
    }))
    .await;
    for (&(_, h, m), ty) in mapped.iter().zip(types) {
        if let (Some((full, base, cat)), Some(mc)) = (ty.map_err(ApplyError::member)?, mt.column(m))
        {
            problems.extend(
                model::type_problem(&display, h, (&base, cat), mc)
                    .or_else(|| model::length_problem(&display, h, &full, mc)),
            );
        }
    }
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        return Err(ApplyError::Schema(format!(
            "table {display} cannot be applied (schema drift or mapping): {}; nothing past this point was \
             applied, the queue keeps it: fix the member or the mapping and start again",
            list.join("; ")
        )));
    }

    let member_col = |name: &str| {
        let c = mt.column(name).expect("mapped columns exist");
        MemberColumn {
            name: c.name.clone(),
            cast_type: c.cast_type.clone(),
            not_null: c.not_null,
            has_default: c.has_default,
            generated: c.generated,
        }
    };
    let columns: Vec<Option<MemberColumn>> = map
        .columns
        .iter()
        .map(|(_, t)| match t {
            ColumnTarget::Member(m) | ColumnTarget::Generated(m) => Some(member_col(m)),
            _ => None,
        })
        .collect();
    let constants = map
        .constants()
        .map(|(m, v)| {
            let ty = mt
                .column(m)
                .map(|c| c.cast_type.clone())
                .unwrap_or_default();
            (quote_ident(m), format!("{}::{ty}", quote_literal(v)))
        })
        .collect();

    // Rows are found by member columns; indexes are hub column positions.
    let written = |i: usize| columns[i].as_ref().filter(|c| !c.generated);
    let hub_index = |member_name: &str| {
        (0..columns.len()).find(|&i| written(i).is_some_and(|c| c.name == member_name))
    };
    let covers = |keys: &[usize]| {
        let mut names: Vec<&str> = keys
            .iter()
            .filter_map(|&i| written(i).map(|c| c.name.as_str()))
            .collect();
        names.sort_unstable();
        names.len() == keys.len()
            && mt.unique_keys.iter().any(|(_, cols)| {
                let mut c: Vec<&str> = cols.iter().map(String::as_str).collect();
                c.sort_unstable();
                c == names
            })
    };
    let hub_keys: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
    let keys_written = hub_keys.iter().all(|&i| written(i).is_some());
    let from_member = || {
        mt.unique_keys.iter().find_map(|(_, cols)| {
            cols.iter()
                .map(|n| hub_index(n))
                .collect::<Option<Vec<usize>>>()
        })
    };
    let matching = if rel.replica_identity == ReplicaIdentity::Full {
        // Prefer the member's primary key (or any unique index) if the hub has its columns.
        match from_member() {
            Some(k) => Matching::Key(k),
            None => Matching::AllColumns,
        }
    } else if !hub_keys.is_empty() && covers(&hub_keys) {
        Matching::Key(hub_keys)
    } else if !hub_keys.is_empty() && keys_written {
        Matching::KeyNoIndex(hub_keys)
    } else if !hub_keys.is_empty() {
        return Err(ApplyError::Schema(format!(
            "table {display}: a replica identity column of the hub is excluded or not written on the member, so \
             rows cannot be found. Fix: map the key columns; nothing past this point was applied"
        )));
    } else {
        Matching::AllColumns
    };
    Ok(Target {
        qualified: mt.qualified(),
        display,
        hub: rel,
        columns,
        constants,
        matching,
    })
}
