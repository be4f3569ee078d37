//! Hub-side setup: preflight checks, the publication and the slot.
//!
//! Order matters: the publication is created before the slot (a slot created first
//! fails when decoding changes of tables it does not know were published).

use switchback_core::{quote_ident, quote_literal, Lsn};
use tokio_postgres::Client;

use crate::error::{describe_sql_error, PgError};

/// A connected SQL session with its description for messages.
pub struct Session {
    pub client: Client,
    pub endpoint: String,
}

/// Opens an SQL session; the connection task runs in the background.
pub async fn connect(cfg: &tokio_postgres::Config, role: &str) -> Result<Session, PgError> {
    let endpoint = format!("{role} {}", crate::replication::endpoint_name(cfg));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| match e.code() {
            Some(_) => PgError::Setup(format!("{endpoint}: {}", describe_sql_error(&e))),
            None => PgError::Connect {
                endpoint: endpoint.clone(),
                source: std::io::Error::other(describe_sql_error(&e)),
            },
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "sql connection ended");
        }
    });
    Ok(Session { client, endpoint })
}

impl Session {
    pub fn err(&self, e: tokio_postgres::Error) -> PgError {
        PgError::sql(&self.endpoint, e)
    }

    /// `server_version_num`, e.g. 150018.
    pub async fn server_version(&self) -> Result<u32, PgError> {
        let row = self
            .client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.get::<_, i32>(0) as u32)
    }
}

/// A table of the hub in scope of the pipeline.
#[derive(Debug, Clone)]
pub struct HubTable {
    pub schema: String,
    pub table: String,
    /// `relreplident`: d, n, f or i.
    pub replica_identity: char,
    pub has_primary_key: bool,
    pub partitioned: bool,
    /// PG15 publication row filter (a WHERE expression), if any.
    pub row_filter: Option<String>,
}

impl HubTable {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
    /// Whether UPDATE/DELETE on the hub would fail once published for them.
    pub fn lacks_identity(&self) -> bool {
        match self.replica_identity {
            'd' => !self.has_primary_key,
            'n' => true,
            _ => false,
        }
    }
}

/// Checks that logical decoding can work on the hub. Every problem is reported
/// with its fix; the first definite one is returned as the error.
pub async fn preflight(hub: &Session) -> Result<(), PgError> {
    let row = hub
        .client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text, \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    current_setting('max_replication_slots')::int4, \
                    current_setting('server_encoding')",
            &[],
        )
        .await
        .map_err(|e| hub.err(e))?;
    let wal_level: String = row.get(0);
    let user: String = row.get(1);
    let can_replicate: bool = row.get::<_, Option<bool>>(2).unwrap_or(false);
    let encoding: String = row.get(4);
    let mut problems = Vec::new();
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is '{wal_level}', logical decoding needs 'logical'. Fix: run \
             ALTER SYSTEM SET wal_level = logical; on the hub and restart PostgreSQL."
        ));
    }
    if !can_replicate {
        problems.push(format!(
            "role {user:?} may not start replication. Fix: ALTER ROLE {} REPLICATION; (as a superuser).",
            quote_ident(&user)
        ));
    }
    if encoding != "UTF8" && encoding != "SQL_ASCII" {
        problems.push(format!(
            "server_encoding is {encoding}; switchback carries values as UTF-8 text. Fix: use a UTF8 hub database."
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PgError::Setup(format!(
            "{} is not ready for switchback:\n  - {}",
            hub.endpoint,
            problems.join("\n  - ")
        )))
    }
}

/// Lists the hub's ordinary and partitioned tables (partitions are published via
/// their root) that `in_scope` accepts.
pub async fn list_tables(
    hub: &Session,
    in_scope: impl Fn(&str, &str) -> bool,
) -> Result<Vec<HubTable>, PgError> {
    let rows = hub
        .client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    c.relkind = 'p' \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| hub.err(e))?;
    Ok(rows
        .iter()
        .map(|r| HubTable {
            schema: r.get(0),
            table: r.get(1),
            replica_identity: r.get::<_, String>(2).chars().next().unwrap_or('d'),
            has_primary_key: r.get(3),
            partitioned: r.get(4),
            row_filter: None,
        })
        .filter(|t| in_scope(&t.schema, &t.table))
        .collect())
}

/// The tables of a publication as they should be.
#[derive(Debug, Clone)]
pub struct PublicationSpec {
    pub name: String,
    /// `publish` option, e.g. "insert, update, delete, truncate".
    pub publish: String,
    pub tables: Vec<HubTable>,
}

/// Whether the publication exists exactly as `spec` says: its operations,
/// `publish_via_partition_root`, and the same tables, none by schema and none with
/// a row filter. A spec with a row filter never matches (PostgreSQL keeps the
/// filter deparsed, so it cannot be compared to the configured text): such a
/// publication is set again at every start.
pub async fn publication_matches(
    hub: &Session,
    spec: &PublicationSpec,
    server_version: u32,
) -> Result<bool, PgError> {
    if spec.tables.iter().any(|t| t.row_filter.is_some()) {
        return Ok(false);
    }
    // Schemas in a publication and row filters exist from PG15 on; before, the
    // catalogs they live in do not (a CASE on the version would not do: the
    // query is parsed whole).
    let by_schema_or_filter = if server_version >= 150000 {
        "(SELECT count(*) FROM pg_catalog.pg_publication_namespace pn WHERE pn.pnpubid = p.oid) \
         + (SELECT count(*) FROM pg_catalog.pg_publication_rel pr \
            WHERE pr.prpubid = p.oid AND pr.prqual IS NOT NULL)"
    } else {
        "0::int8"
    };
    // One row per publication: its options, how much is published by schema or
    // with a row filter, and its tables.
    let sql = format!(
        "SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, \
                p.pubviaroot AND NOT p.puballtables, {by_schema_or_filter}, \
                ARRAY(SELECT n.nspname::text FROM pg_catalog.pg_publication_rel pr \
                      JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid \
                      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                      WHERE pr.prpubid = p.oid ORDER BY n.nspname, c.relname), \
                ARRAY(SELECT c.relname::text FROM pg_catalog.pg_publication_rel pr \
                      JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid \
                      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                      WHERE pr.prpubid = p.oid ORDER BY n.nspname, c.relname) \
         FROM pg_catalog.pg_publication p WHERE p.pubname = $1"
    );
    let row = hub
        .client
        .query_opt(sql.as_str(), &[&spec.name])
        .await
        .map_err(|e| hub.err(e))?;
    let Some(row) = row else { return Ok(false) };
    let mut published: Vec<&str> = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| row.get::<_, bool>(*i))
        .map(|(_, op)| op)
        .collect();
    let mut wanted: Vec<&str> = spec.publish.split(',').map(str::trim).collect();
    published.sort_unstable();
    wanted.sort_unstable();
    if published != wanted || !row.get::<_, bool>(4) || row.get::<_, i64>(5) != 0 {
        return Ok(false);
    }
    let schemas: Vec<String> = row.get(6);
    let names: Vec<String> = row.get(7);
    let mut have: Vec<(String, String)> = schemas.into_iter().zip(names).collect();
    let mut want: Vec<(String, String)> = spec
        .tables
        .iter()
        .map(|t| (t.schema.clone(), t.table.clone()))
        .collect();
    have.sort();
    want.sort();
    Ok(have == want)
}

/// Creates the publication, or brings its table list and options to `spec`.
pub async fn ensure_publication(hub: &Session, spec: &PublicationSpec) -> Result<(), PgError> {
    let exists = hub
        .client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&spec.name],
        )
        .await
        .map_err(|e| hub.err(e))?
        .is_some();
    let with = format!(
        "WITH (publish = {}, publish_via_partition_root = true)",
        quote_literal(&spec.publish)
    );
    let list = spec
        .tables
        .iter()
        .map(|t| match &t.row_filter {
            Some(f) => format!("{} WHERE ({f})", t.qualified()),
            None => t.qualified(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let name = quote_ident(&spec.name);
    let mut stmts = Vec::new();
    if !exists {
        if list.is_empty() {
            stmts.push(format!("CREATE PUBLICATION {name} {with}"));
        } else {
            stmts.push(format!("CREATE PUBLICATION {name} FOR TABLE {list} {with}"));
        }
    } else {
        stmts.push(format!(
            "ALTER PUBLICATION {name} SET ({})",
            &with[6..with.len() - 1]
        ));
        if list.is_empty() {
            let current = hub
                .client
                .query(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_publication p \
                     JOIN pg_publication_rel pr ON pr.prpubid = p.oid \
                     JOIN pg_class c ON c.oid = pr.prrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                    &[&spec.name],
                )
                .await
                .map_err(|e| hub.err(e))?;
            for r in current {
                stmts.push(format!(
                    "ALTER PUBLICATION {name} DROP TABLE {}",
                    r.get::<_, String>(0)
                ));
            }
        } else {
            stmts.push(format!("ALTER PUBLICATION {name} SET TABLE {list}"));
        }
    }
    for s in stmts {
        // One statement each (extended protocol): a row filter from the config can
        // never smuggle in a second statement.
        hub.client.execute(s.as_str(), &[]).await.map_err(|e| {
            PgError::Setup(format!(
                "{}: cannot set up publication {}: {}",
                hub.endpoint,
                spec.name,
                describe_sql_error(&e)
            ))
        })?;
    }
    Ok(())
}

/// Drops a publication if it exists.
pub async fn drop_publication(hub: &Session, name: &str) -> Result<(), PgError> {
    hub.client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(|e| hub.err(e))
}

/// The state of a slot on the hub.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    pub plugin: Option<String>,
    pub active_pid: Option<i32>,
    /// Bytes of WAL between the slot's confirmed position and the hub's current LSN.
    pub lag_bytes: Option<i64>,
}

/// Reads a slot's state, if the slot exists.
pub async fn slot_state(hub: &Session, slot: &str) -> Result<Option<SlotState>, PgError> {
    let row = hub
        .client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text, wal_status, plugin::text, active_pid, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| hub.err(e))?;
    Ok(row.map(|r| SlotState {
        confirmed_flush: r.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()),
        restart_lsn: r.get::<_, Option<String>>(1).and_then(|s| s.parse().ok()),
        wal_status: r.get(2),
        plugin: r.get(3),
        active_pid: r.get(4),
        lag_bytes: r.get(5),
    }))
}

/// The error for a slot whose WAL the hub removed.
pub fn slot_lost_error(endpoint: &str, slot: &str) -> PgError {
    PgError::Setup(format!(
        "{endpoint}: replication slot {slot:?} is invalidated (wal_status = 'lost'): the hub removed WAL \
         the slot still needed (max_slot_wal_keep_size), so changes since are no longer available. \
         Fix: the member must be re-seeded: drop the slot with SELECT pg_drop_replication_slot('{slot}'); \
         then run `switchback seed` (or rebuild the member) and start again."
    ))
}

/// Makes sure the logical slot exists and is usable; creates it when missing.
/// Returns its confirmed position.
pub async fn ensure_slot(hub: &Session, slot: &str) -> Result<Lsn, PgError> {
    if let Some(lsn) = existing_slot(hub, slot).await? {
        return Ok(lsn);
    }
    let row = hub
        .client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(|e| {
            PgError::Setup(format!(
                "{}: cannot create replication slot {slot:?}: {}",
                hub.endpoint,
                describe_sql_error(&e)
            ))
        })?;
    tracing::info!(slot, "created replication slot");
    Ok(row.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO))
}

/// The confirmed position of an existing, usable pgoutput slot; `None` if there
/// is no such slot. A lost slot or one of another plugin is an error naming the fix.
pub async fn existing_slot(hub: &Session, slot: &str) -> Result<Option<Lsn>, PgError> {
    let Some(s) = slot_state(hub, slot).await? else {
        return Ok(None);
    };
    if s.wal_status.as_deref() == Some("lost") {
        return Err(slot_lost_error(&hub.endpoint, slot));
    }
    if s.plugin.as_deref() != Some("pgoutput") {
        return Err(PgError::Setup(format!(
            "{}: replication slot {slot:?} exists but uses plugin {:?}, not pgoutput. \
             Fix: drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another [pipeline] name.",
            hub.endpoint, s.plugin
        )));
    }
    Ok(Some(s.confirmed_flush.unwrap_or(Lsn::ZERO)))
}
