//! What seed needs to know about a table on both sides: the hub's columns, size
//! and keys; whether and how the member has it; and creating it there
//! (`--create-schema`: columns and primary key before the data, other indexes after).

use switchback_core::{quote_ident, quote_literal};
use switchback_pg::hub::HubTable;
use tokio_postgres::Client;

use crate::mapping::Mapping;
use crate::{db_err, SeedError};

/// First OID of user-defined objects: below it, types are built in and have the
/// same OID (and binary format) in every cluster.
const FIRST_NORMAL_OID: u32 = 16384;

/// A column of the hub table.
#[derive(Debug, Clone)]
pub struct HubColumn {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    pub type_sql: String,
    pub type_oid: u32,
    pub not_null: bool,
    /// The expression of a stored generated column (not copied).
    pub generated: Option<String>,
}

/// The hub's definition and size of a table in scope.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub hub: HubTable,
    pub columns: Vec<HubColumn>,
    /// Heap pages at planning time (0 for a partitioned table).
    pub pages: u64,
    /// The planner's row estimate (`reltuples`), when known.
    pub est_rows: Option<u64>,
    /// Primary key constraint name and column names, in key order.
    pub primary_key: Option<(String, Vec<String>)>,
    /// Other indexes: (name, `pg_get_indexdef`).
    pub indexes: Vec<(String, String)>,
}

/// Reads a hub table's definition.
pub async fn describe(hub: &Client, t: &HubTable) -> Result<TableInfo, SeedError> {
    let ctx = || format!("reading the definition of {} on the hub", t.display());
    let oid: u32 = hub
        .query_one(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&t.schema, &t.table],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?
        .get(0);
    let size = hub
        .query_one(
            "SELECT pg_relation_size($1::oid) / current_setting('block_size')::int8, \
                    CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8 END \
             FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?;
    let cols = hub
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, \
                    CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?;
    let pk = hub
        .query_opt(
            "SELECT con.conname::text, array_agg(a.attname::text ORDER BY k.ord) \
             FROM pg_constraint con \
             CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum \
             WHERE con.conrelid = $1 AND con.contype = 'p' GROUP BY con.conname",
            &[&oid],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?;
    let idx = hub
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1 AND NOT i.indisprimary ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?;
    Ok(TableInfo {
        hub: t.clone(),
        columns: cols
            .iter()
            .map(|r| HubColumn {
                name: r.get(0),
                type_sql: r.get(1),
                type_oid: r.get(2),
                not_null: r.get(3),
                generated: r.get(4),
            })
            .collect(),
        pages: size.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as u64,
        est_rows: size.get::<_, Option<i64>>(1).map(|n| n.max(0) as u64),
        primary_key: pk.map(|r| (r.get(0), r.get(1))),
        indexes: idx.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}

/// A member column: name, `format_type`, type OID, generated.
#[derive(Debug, Clone)]
pub struct MemberColumn {
    pub name: String,
    pub type_sql: String,
    pub type_oid: u32,
    pub generated: bool,
}

/// The member's columns of a table, or `None` when it does not exist.
pub async fn member_columns(
    member: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<Vec<MemberColumn>>, SeedError> {
    let ctx = || format!("reading the definition of {schema}.{table} on the member");
    let Some(oid) = member
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?
    else {
        return Ok(None);
    };
    let oid: u32 = oid.get(0);
    let rows = member
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod), atttypid, attgenerated <> '' \
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| db_err(ctx(), e))?;
    Ok(Some(
        rows.iter()
            .map(|r| MemberColumn {
                name: r.get(0),
                type_sql: r.get(1),
                type_oid: r.get(2),
                generated: r.get(3),
            })
            .collect(),
    ))
}

/// How a table is copied: the hub's column list, the member's, and the format.
#[derive(Debug, Clone)]
pub struct CopyColumns {
    pub hub: Vec<String>,
    pub member: Vec<String>,
    /// Binary COPY: every column's type is built in and the same on both sides.
    pub binary: bool,
    /// Member columns filled with a constant (text), after the copied ones.
    pub constants: Vec<(String, String)>,
}

/// Matches the hub's copied columns with the member's (through the mapping).
/// `member` is `None` when the table is to be created from the hub's definition.
pub fn copy_columns(
    info: &TableInfo,
    member: Option<&[MemberColumn]>,
    mapping: &Mapping,
) -> Result<CopyColumns, SeedError> {
    let (ms, mt) = mapping.table(&info.hub.schema, &info.hub.table);
    let mut out = CopyColumns {
        hub: Vec::new(),
        member: Vec::new(),
        binary: true,
        constants: Vec::new(),
    };
    let mut missing = Vec::new();
    for c in info.columns.iter().filter(|c| c.generated.is_none()) {
        let Some(to) = mapping.column(&info.hub.schema, &info.hub.table, &c.name) else {
            continue;
        };
        let builtin = c.type_oid < FIRST_NORMAL_OID;
        match member {
            None => out.binary &= builtin,
            Some(cols) => match cols.iter().find(|m| m.name == to) {
                Some(m) if m.generated => {
                    return Err(SeedError::Setup(format!(
                        "member table {ms}.{mt}: column {to} is generated on the member but a plain column \
                         on the hub ({}.{}.{}). Fix: make it a plain column on the member, or leave it out \
                         of the mapping",
                        info.hub.schema, info.hub.table, c.name
                    )))
                }
                Some(m) => {
                    out.binary &= builtin && m.type_oid == c.type_oid && m.type_sql == c.type_sql
                }
                None => missing.push(to.clone()),
            },
        }
        out.hub.push(c.name.clone());
        out.member.push(to);
    }
    for (col, value) in mapping.constants(&info.hub.schema, &info.hub.table) {
        if let Some(cols) = member {
            if !cols.iter().any(|m| m.name == col) {
                missing.push(col.clone());
            }
        }
        // A constant travels as text: the member parses it with the column's type.
        out.binary = false;
        out.constants.push((col, value));
    }
    if !missing.is_empty() {
        return Err(SeedError::Setup(format!(
            "member table {ms}.{mt} lacks column(s) {} of the hub table {}. Fix: add them on the member \
             (ALTER TABLE {}.{} ADD COLUMN ...), or drop the member table and seed with --create-schema",
            missing.join(", "),
            info.hub.display(),
            quote_ident(&ms),
            quote_ident(&mt)
        )));
    }
    if out.hub.is_empty() {
        return Err(SeedError::Setup(format!(
            "table {} has no column to copy (every column is generated or unmapped). Fix: exclude it \
             with [tables] exclude",
            info.hub.display()
        )));
    }
    Ok(out)
}

/// `CREATE TABLE` for the member from the hub's definition: columns (types, NOT
/// NULL, stored generated columns) and the primary key. Defaults, sequences,
/// foreign keys and check constraints are not copied.
pub fn create_table_sql(info: &TableInfo, mapping: &Mapping) -> Result<String, SeedError> {
    if info.hub.partitioned {
        return Err(SeedError::Setup(format!(
            "table {} is partitioned on the hub; --create-schema does not create partitioned tables. \
             Fix: create it (and its partitions) on the member first",
            info.hub.display()
        )));
    }
    let (ms, mt) = mapping.table(&info.hub.schema, &info.hub.table);
    let mut parts = Vec::new();
    for c in &info.columns {
        let Some(to) = mapping.column(&info.hub.schema, &info.hub.table, &c.name) else {
            continue;
        };
        let mut def = format!("{} {}", quote_ident(&to), c.type_sql);
        if let Some(expr) = &c.generated {
            def.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
        }
        if c.not_null {
            def.push_str(" NOT NULL");
        }
        parts.push(def);
    }
    if let Some((name, cols)) = &info.primary_key {
        let cols: Vec<String> = cols
            .iter()
            .filter_map(|c| mapping.column(&info.hub.schema, &info.hub.table, c))
            .map(|c| quote_ident(&c))
            .collect();
        parts.push(format!(
            "CONSTRAINT {} PRIMARY KEY ({})",
            quote_ident(name),
            cols.join(", ")
        ));
    }
    Ok(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; CREATE TABLE {schema}.{table} ({cols})",
        schema = quote_ident(&ms),
        table = quote_ident(&mt),
        cols = parts.join(", ")
    ))
}

/// Creates the hub's other indexes that the member table lacks (by name, in the
/// member table's schema). Returns how many were created.
pub async fn create_missing_indexes(
    member: &Client,
    info: &TableInfo,
    mapping: &Mapping,
) -> Result<usize, SeedError> {
    let (ms, _) = mapping.table(&info.hub.schema, &info.hub.table);
    let mut n = 0;
    for (name, def) in &info.indexes {
        let exists = member
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&ms, name],
            )
            .await
            .map_err(|e| db_err(format!("looking for index {name} on the member"), e))?
            .is_some();
        if exists {
            continue;
        }
        tracing::info!(table = %info.hub.display(), index = %name, "creating index");
        member.batch_execute(def).await.map_err(|e| {
            db_err(
                format!(
                    "creating index {name} of {} on the member (definition {})",
                    info.hub.display(),
                    quote_literal(def)
                ),
                e,
            )
        })?;
        n += 1;
    }
    Ok(n)
}
