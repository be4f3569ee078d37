//! A table's definition read from a database's catalogs (hub or member).

use tokio_postgres::Client;

/// One column as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, e.g. `character varying(20)`.
    pub type_name: String,
    /// The type for explicit casts: without typmod (an explicit cast to a type
    /// with typmod truncates silently), except where "without typmod" still means a
    /// length (bare `character` is char(1), bare `bit` is bit(1)): there the
    /// unlimited sibling, and assignment to the column checks the length.
    pub cast_type: String,
    /// `format_type(atttypid, NULL)`, e.g. `character varying`.
    pub base_type: String,
    pub type_oid: u32,
    /// `pg_type.typcategory` (S string, N numeric, D date/time, B boolean, ...).
    pub category: char,
    pub not_null: bool,
    /// A DEFAULT, or an identity column (which fills itself).
    pub has_default: bool,
    /// A generated column: never written.
    pub generated: bool,
}

/// What the connected role may do with a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Privileges {
    /// Owner (or member of the owning role): may add it to a publication.
    pub owner: bool,
    pub select: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
}

/// A table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogTable {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `relkind`: `r` table, `p` partitioned table.
    pub kind: char,
    /// `relreplident`: d, n, f or i.
    pub replica_identity: char,
    pub columns: Vec<CatalogColumn>,
    /// Unique indexes without predicate or expression: (is primary key, column names).
    pub unique_keys: Vec<(bool, Vec<String>)>,
    pub privileges: Privileges,
}

impl CatalogTable {
    pub fn column(&self, name: &str) -> Option<&CatalogColumn> {
        self.columns.iter().find(|c| c.name == name)
    }
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
    pub fn qualified(&self) -> String {
        format!(
            "{}.{}",
            switchback_core::quote_ident(&self.schema),
            switchback_core::quote_ident(&self.name)
        )
    }
    pub fn has_primary_key(&self) -> bool {
        self.unique_keys.iter().any(|(pk, _)| *pk)
    }
    /// UPDATE and DELETE on the table fail once it is published for them.
    pub fn lacks_identity(&self) -> bool {
        match self.replica_identity {
            'd' => !self.has_primary_key(),
            'n' => true,
            _ => false,
        }
    }
}

/// Loads `schema.name` (an ordinary or partitioned table), or None when there is
/// no such table.
pub async fn load_table(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<CatalogTable>, tokio_postgres::Error> {
    let Some(t) = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.relreplident::text, \
                    pg_has_role(c.relowner, 'USAGE'), \
                    has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'), \
                    has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE'), \
                    has_table_privilege(c.oid, 'TRUNCATE') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = t.get(0);
    let first = |s: String| s.chars().next().unwrap_or('?');
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    CASE a.atttypid::regtype \
                        WHEN 'bpchar'::regtype THEN 'bpchar' WHEN 'bpchar[]'::regtype THEN 'bpchar[]' \
                        WHEN 'bit'::regtype THEN 'bit varying' WHEN 'bit[]'::regtype THEN 'bit varying[]' \
                        ELSE format_type(a.atttypid, NULL) END, \
                    format_type(a.atttypid, NULL), a.atttypid, ty.typcategory::text, \
                    a.attnotnull, a.atthasdef OR a.attidentity <> '', a.attgenerated <> '' \
             FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let columns = cols
        .iter()
        .map(|r| CatalogColumn {
            name: r.get(0),
            type_name: r.get(1),
            cast_type: r.get(2),
            base_type: r.get(3),
            type_oid: r.get(4),
            category: first(r.get(5)),
            not_null: r.get(6),
            has_default: r.get(7),
            generated: r.get(8),
        })
        .collect();
    let idx = client
        .query(
            "SELECT i.indisprimary, array_agg(a.attname::text ORDER BY k.ord) \
             FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
             GROUP BY i.indexrelid, i.indisprimary ORDER BY i.indisprimary DESC, i.indexrelid",
            &[&oid],
        )
        .await?;
    Ok(Some(CatalogTable {
        oid,
        schema: schema.to_string(),
        name: name.to_string(),
        kind: first(t.get(1)),
        replica_identity: first(t.get(2)),
        columns,
        unique_keys: idx.iter().map(|r| (r.get(0), r.get(1))).collect(),
        privileges: Privileges {
            owner: t.get(3),
            select: t.get(4),
            insert: t.get(5),
            update: t.get(6),
            delete: t.get(7),
            truncate: t.get(8),
        },
    }))
}

/// Loads several tables at once: the queries of all of them are pipelined on the
/// one connection (a few round trips in all instead of six per table). Results
/// are in the order of `names`.
pub async fn load_tables(
    client: &Client,
    names: &[(&str, &str)],
) -> Vec<Result<Option<CatalogTable>, tokio_postgres::Error>> {
    futures_util::future::join_all(names.iter().map(|(s, n)| load_table(client, s, n))).await
}

/// The member's name and category of a built-in hub type (OIDs below 16384 are
/// the same in every cluster); None for user types.
pub async fn builtin_type(
    client: &Client,
    type_oid: u32,
    typmod: i32,
) -> Result<Option<(String, String, char)>, tokio_postgres::Error> {
    if type_oid >= 16384 {
        return Ok(None);
    }
    let r = client
        .query_opt(
            "SELECT format_type(oid, $2), format_type(oid, NULL), typcategory::text FROM pg_type WHERE oid = $1",
            &[&type_oid, &typmod],
        )
        .await?;
    Ok(r.map(|r| {
        let cat: String = r.get(2);
        (r.get(0), r.get(1), cat.chars().next().unwrap_or('?'))
    }))
}
