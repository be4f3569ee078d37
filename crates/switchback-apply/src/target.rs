//! The member's side of a replicated table: its columns, types and key, and how
//! each hub column maps onto it.

use std::sync::Arc;

use switchback_core::{quote_ident, Relation, ReplicaIdentity};
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

/// Loads the member's definition of the hub relation `rel` (same schema and name).
pub async fn resolve(member: &Client, rel: Arc<Relation>) -> Result<Target, ApplyError> {
    let display = rel.display_name();
    let oid_row = member
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&rel.schema, &rel.table],
        )
        .await
        .map_err(ApplyError::member)?;
    let Some(oid_row) = oid_row else {
        return Err(ApplyError::Schema(format!(
            "table {display} exists on the hub but not on the member. Fix: create it on the member \
             (same columns), or exclude it with [tables] exclude = [\"{display}\"]"
        )));
    };
    let oid: u32 = oid_row.get(0);
    let cols = member
        .query(
            // Casts in SELECT lists and comparisons are explicit, and an explicit
            // cast to a type with a typmod truncates silently: cast to the type
            // without typmod, except where "without typmod" still means a length
            // (bare `character` is char(1), bare `bit` is bit(1)): there use the
            // unlimited sibling and let assignment to the column check the length.
            "SELECT a.attname::text, \
                    CASE a.atttypid::regtype \
                        WHEN 'bpchar'::regtype THEN 'bpchar' WHEN 'bpchar[]'::regtype THEN 'bpchar[]' \
                        WHEN 'bit'::regtype THEN 'bit varying' WHEN 'bit[]'::regtype THEN 'bit varying[]' \
                        ELSE format_type(a.atttypid, NULL) END, \
                    a.attnotnull, a.atthasdef, a.attgenerated <> '', a.attnum \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(ApplyError::member)?;
    let member_cols: Vec<(String, MemberColumn, i16)> = cols
        .iter()
        .map(|r| {
            let cast_type: String = r.get(1);
            (
                r.get::<_, String>(0),
                MemberColumn {
                    name: r.get(0),
                    cast_type,
                    not_null: r.get(2),
                    has_default: r.get(3),
                    generated: r.get(4),
                },
                r.get::<_, i16>(5),
            )
        })
        .collect();

    let mut columns = Vec::with_capacity(rel.columns.len());
    let mut missing = Vec::new();
    for c in &rel.columns {
        match member_cols.iter().find(|(n, _, _)| *n == c.name) {
            Some((_, mc, _)) => columns.push(Some(mc.clone())),
            None => {
                missing.push(c.name.clone());
                columns.push(None);
            }
        }
    }
    if !missing.is_empty() {
        return Err(ApplyError::Schema(format!(
            "table {display}: hub column(s) {} do not exist on the member. Fix: add them on the member \
             (ALTER TABLE {} ADD COLUMN ...), then start again; nothing past this point was applied",
            missing.join(", "),
            quote_ident(&rel.schema) + "." + &quote_ident(&rel.table)
        )));
    }

    // Unique indexes of the member, as lists of column names.
    let idx = member
        .query(
            "SELECT i.indisprimary, array_agg(a.attname::text ORDER BY k.ord) \
             FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
             GROUP BY i.indexrelid, i.indisprimary ORDER BY i.indisprimary DESC",
            &[&oid],
        )
        .await
        .map_err(ApplyError::member)?;
    let unique: Vec<(bool, Vec<String>)> = idx.iter().map(|r| (r.get(0), r.get(1))).collect();
    let hub_index = |name: &str| rel.columns.iter().position(|c| c.name == name);
    let covers = |keys: &[usize]| {
        let mut names: Vec<&str> = keys.iter().map(|&i| rel.columns[i].name.as_str()).collect();
        names.sort_unstable();
        unique.iter().any(|(_, cols)| {
            let mut c: Vec<&str> = cols.iter().map(String::as_str).collect();
            c.sort_unstable();
            c == names
        })
    };
    let hub_keys: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
    let matching = if rel.replica_identity == ReplicaIdentity::Full {
        // Prefer the member's primary key (or any unique index) if the hub has its columns.
        let from_member = unique.iter().find_map(|(_, cols)| {
            cols.iter()
                .map(|n| hub_index(n))
                .collect::<Option<Vec<usize>>>()
        });
        match from_member {
            Some(k) => Matching::Key(k),
            None => Matching::AllColumns,
        }
    } else if !hub_keys.is_empty() && covers(&hub_keys) {
        Matching::Key(hub_keys)
    } else if !hub_keys.is_empty() {
        Matching::KeyNoIndex(hub_keys)
    } else {
        Matching::AllColumns
    };
    let _ = oid;
    Ok(Target {
        qualified: format!("{}.{}", quote_ident(&rel.schema), quote_ident(&rel.table)),
        display,
        hub: rel,
        columns,
        matching,
    })
}
