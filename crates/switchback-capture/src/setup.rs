//! Hub preparation before streaming: preflight, publication(s), slot.

use switchback_config::{Config, NoKeyPolicy};
use switchback_core::Lsn;
use switchback_pg::hub::{self, HubTable, PublicationSpec};
use switchback_pg::PgError;

use crate::CaptureError;

/// What a replication session needs, decided once at start.
#[derive(Debug, Clone)]
pub struct Plan {
    pub slot: String,
    /// Publications to stream (the main one, plus the insert-only one if any).
    pub publications: Vec<String>,
    pub server_version: u32,
    pub proto_version: u32,
    pub streaming: bool,
    pub tables: Vec<HubTable>,
    /// The slot's confirmed position when capture started.
    pub slot_start: Lsn,
}

/// Checks the hub, creates or updates the publication(s), then the slot.
pub async fn prepare(cfg: &Config) -> Result<Plan, CaptureError> {
    let hub_cfg = cfg
        .hub_pg()
        .map_err(|e| CaptureError::Setup(e.to_string()))?;
    let session = hub::connect(&hub_cfg, "hub").await?;
    hub::preflight(&session).await?;
    let version = session.server_version().await?;
    let tables = hub::list_tables(&session, |s, t| cfg.tables.matches(s, t)).await?;

    let (mut full, mut insert_only) = (Vec::new(), Vec::new());
    let mut refused = Vec::new();
    for t in &tables {
        if !t.lacks_identity() {
            full.push(t.clone());
            continue;
        }
        match cfg.tables.no_key {
            NoKeyPolicy::Refuse => refused.push(t.display()),
            NoKeyPolicy::InsertOnly => insert_only.push(t.clone()),
            NoKeyPolicy::ReplicaIdentityFull => {
                session
                    .client
                    .batch_execute(&format!(
                        "ALTER TABLE {} REPLICA IDENTITY FULL",
                        t.qualified()
                    ))
                    .await
                    .map_err(|e| {
                        PgError::Setup(format!(
                            "{}: cannot set REPLICA IDENTITY FULL on {}: {}",
                            session.endpoint,
                            t.display(),
                            switchback_pg::error::describe_sql_error(&e)
                        ))
                    })?;
                tracing::info!(table = %t.display(), "set REPLICA IDENTITY FULL (table has no primary key)");
                let mut t = t.clone();
                t.replica_identity = 'f';
                full.push(t);
            }
        }
    }
    if !refused.is_empty() {
        return Err(CaptureError::Setup(format!(
            "{}: these tables have no primary key and no replica identity: {}.\n\
             Once published for UPDATE and DELETE, the hub would reject its own UPDATE and DELETE on them.\n\
             Fix one of: add a primary key; ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX); \
             set [tables] no_key = \"replica-identity-full\" to let switchback do it; \
             set [tables] no_key = \"insert-only\" to replicate only their inserts; \
             or exclude them with [tables] exclude.",
            session.endpoint,
            refused.join(", ")
        )));
    }

    let main_pub = cfg.publication_name();
    let ins_pub = format!("{main_pub}_ins");
    hub::ensure_publication(
        &session,
        &PublicationSpec {
            name: main_pub.clone(),
            publish: "insert, update, delete, truncate".into(),
            tables: full.clone(),
        },
    )
    .await?;
    let mut publications = vec![main_pub];
    if insert_only.is_empty() {
        hub::drop_publication(&session, &ins_pub).await?;
    } else {
        hub::ensure_publication(
            &session,
            &PublicationSpec {
                name: ins_pub.clone(),
                publish: "insert, truncate".into(),
                tables: insert_only.clone(),
            },
        )
        .await?;
        publications.push(ins_pub);
    }
    let slot = cfg.slot_name();
    let slot_start = hub::ensure_slot(&session, &slot).await?;

    let proto_version = if version >= 140000 { 2 } else { 1 };
    let streaming = cfg.capture.streaming && version >= 140000;
    if cfg.capture.streaming && !streaming {
        tracing::warn!("[capture] streaming needs PostgreSQL 14 or newer on the hub; large transactions are sent at commit");
    }
    let mut all = full;
    all.extend(insert_only);
    tracing::info!(
        tables = all.len(),
        slot = %slot,
        proto_version,
        streaming,
        "hub ready"
    );
    Ok(Plan {
        slot,
        publications,
        server_version: version,
        proto_version,
        streaming,
        tables: all,
        slot_start,
    })
}
