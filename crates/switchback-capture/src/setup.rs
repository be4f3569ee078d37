//! Hub preparation before streaming: preflight, publication(s), slot.

use std::collections::BTreeMap;

use switchback_config::{Config, NoKeyPolicy, Operation};
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
    prepare_with(cfg, true).await
}

/// As [`prepare`]; with `create_slot = false` the slot is left alone (seed creates
/// it itself, exporting a snapshot).
pub async fn prepare_with(cfg: &Config, create_slot: bool) -> Result<Plan, CaptureError> {
    prepare_after(cfg, create_slot, std::future::ready(true)).await
}

/// As [`prepare_with`], but the hub is only read until `go` resolves: `true` lets
/// it change the hub (replica identity, publications, slot), `false` stops it
/// before any change. `run` starts this while its check is still running. When
/// the hub needs no change (a restart: the publications are as configured and the
/// slot exists) the plan is returned without waiting for `go`.
pub async fn prepare_after(
    cfg: &Config,
    create_slot: bool,
    go: impl std::future::Future<Output = bool>,
) -> Result<Plan, CaptureError> {
    let hub_cfg = cfg
        .hub_pg()
        .map_err(|e| CaptureError::Setup(e.to_string()))?;
    let session = hub::connect(&hub_cfg, "hub").await?;
    let main_pub = cfg.publication_name();
    let slot = cfg.slot_name();
    // The reads go out together (one connection pipelines them); errors are
    // reported in this order.
    let existing_pubs = async {
        session
            .client
            .query(
                "SELECT pubname::text FROM pg_publication WHERE starts_with(pubname::text, $1)",
                &[&main_pub],
            )
            .await
            .map_err(|e| session.err(e))
    };
    let (preflight, version, tables, existing, slot_lsn) = tokio::join!(
        hub::preflight(&session),
        session.server_version(),
        hub::list_tables(&session, |s, t| cfg.tables.matches(s, t)),
        existing_pubs,
        async {
            if create_slot {
                hub::existing_slot(&session, &slot).await
            } else {
                Ok(None)
            }
        },
    );
    preflight?;
    let version = version?;
    let mut tables = tables?;
    let existing: Vec<String> = existing?.iter().map(|r| r.get(0)).collect();
    let slot_lsn = slot_lsn?;

    // First what has to change, read only; then, once `go` allows, the changes in
    // this order: replica identities, publications, the slot (a publication is
    // created before the slot that decodes it).
    let mut changes: Vec<Change> = Vec::new();
    if cfg.direction == switchback_config::Direction::MemberToHub
        && cfg.cutover.mode == switchback_config::SyncMode::ActiveActive
    {
        // Hub-wins needs the member's whole old rows to see whether the hub changed
        // the row meanwhile (see switchback-apply `plan_hub_wins_reverse`).
        for t in tables.iter_mut().filter(|t| t.replica_identity != 'f') {
            changes.push(Change::IdentityFull(
                t.clone(),
                "active-active needs it: conflicts are detected on whole old rows",
            ));
            t.replica_identity = 'f';
        }
    }

    // Tables grouped by the operations they publish: one publication per set
    // (`publish` is a publication option); row filters go with each table.
    let mut groups: BTreeMap<Vec<Operation>, Vec<HubTable>> = BTreeMap::new();
    let mut refused = Vec::new();
    for t in &tables {
        let rule = cfg.tables.rule(&t.schema, &t.table);
        let mut ops = rule.ops();
        let mut t = t.clone();
        t.row_filter = rule.row_filter.clone();
        let changes_rows = ops.contains(&Operation::Update) || ops.contains(&Operation::Delete);
        if t.lacks_identity() && changes_rows {
            match cfg.tables.no_key {
                NoKeyPolicy::Refuse => {
                    refused.push(t.display());
                    continue;
                }
                NoKeyPolicy::InsertOnly => {
                    ops.retain(|o| matches!(o, Operation::Insert | Operation::Truncate))
                }
                NoKeyPolicy::ReplicaIdentityFull => {
                    changes.push(Change::IdentityFull(
                        t.clone(),
                        "the table has no primary key",
                    ));
                    t.replica_identity = 'f';
                }
            }
        }
        if ops.is_empty() {
            tracing::warn!(table = %t.display(), "no operation left to replicate (no key on the hub, [tables] no_key = \"insert-only\")");
            continue;
        }
        groups.entry(ops).or_default().push(t);
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

    let mut publications = Vec::new();
    let mut all = Vec::new();
    let mut specs = Vec::new();
    for ops in op_sets() {
        let name = publication_for(&main_pub, &ops);
        let tables = groups.remove(&ops).unwrap_or_default();
        if tables.is_empty() && name != main_pub {
            if existing.contains(&name) {
                changes.push(Change::DropPublication(name));
            }
            continue;
        }
        let publish: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
        let spec = PublicationSpec {
            name: name.clone(),
            publish: publish.join(", "),
            tables: tables.clone(),
        };
        specs.push(spec);
        publications.push(name);
        all.extend(tables);
    }
    let matching = futures_util::future::join_all(
        specs
            .iter()
            .map(|spec| hub::publication_matches(&session, spec, version)),
    )
    .await;
    for (spec, matches) in specs.into_iter().zip(matching) {
        if !matches? {
            changes.push(Change::Publication(spec));
        }
    }
    // The slot's position (where the stream starts) when this call owns the slot;
    // seed creates it itself.
    let mut slot_start = Lsn::ZERO;
    if create_slot {
        match slot_lsn {
            Some(lsn) => slot_start = lsn,
            None => changes.push(Change::CreateSlot),
        }
    }

    if !changes.is_empty() {
        if !go.await {
            return Err(CaptureError::Setup(
                "stopped before changing the hub: the check before start failed".into(),
            ));
        }
        for change in changes {
            match change {
                Change::IdentityFull(t, why) => identity_full(&session, &t, why).await?,
                Change::Publication(spec) => hub::ensure_publication(&session, &spec).await?,
                Change::DropPublication(name) => hub::drop_publication(&session, &name).await?,
                // Read again before creating: the check may have taken a while.
                Change::CreateSlot => slot_start = hub::ensure_slot(&session, &slot).await?,
            }
        }
    }

    let proto_version = if version >= 140000 { 2 } else { 1 };
    let streaming = cfg.capture.streaming && version >= 140000;
    if cfg.capture.streaming && !streaming {
        tracing::warn!("[capture] streaming needs PostgreSQL 14 or newer on the hub; large transactions are sent at commit");
    }
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

/// A change `prepare_after` makes on the hub once allowed.
enum Change {
    IdentityFull(HubTable, &'static str),
    Publication(PublicationSpec),
    DropPublication(String),
    CreateSlot,
}

/// Every non-empty set of operations, the full set first.
fn op_sets() -> Vec<Vec<Operation>> {
    let mut sets: Vec<Vec<Operation>> = (1..16u8)
        .map(|bits| {
            Operation::ALL
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, o)| *o)
                .collect()
        })
        .collect();
    sets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    sets
}

/// The publication of a set of operations: `switchback_<name>` for all four,
/// `_ins` for insert and truncate (the no-key insert-only tables), otherwise
/// `_` and the operations' initials (`_iu`: insert and update).
fn publication_for(main: &str, ops: &[Operation]) -> String {
    if ops.len() == Operation::ALL.len() {
        return main.to_string();
    }
    if ops == [Operation::Insert, Operation::Truncate] {
        return format!("{main}_ins");
    }
    let letters: String = ops.iter().map(|o| &o.as_str()[..1]).collect();
    format!("{main}_{letters}")
}

/// `ALTER TABLE … REPLICA IDENTITY FULL` on a hub table; `why` goes to the log and
/// to the error.
async fn identity_full(session: &hub::Session, t: &HubTable, why: &str) -> Result<(), PgError> {
    session
        .client
        .batch_execute(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            t.qualified()
        ))
        .await
        .map_err(|e| {
            PgError::Setup(format!(
                "{}: cannot set REPLICA IDENTITY FULL on {} ({why}): {}",
                session.endpoint,
                t.display(),
                switchback_pg::error::describe_sql_error(&e)
            ))
        })?;
    tracing::info!(table = %t.display(), why, "set REPLICA IDENTITY FULL");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_names() {
        let sets = op_sets();
        assert_eq!(sets.len(), 15);
        assert_eq!(publication_for("p", &sets[0]), "p");
        let names: std::collections::HashSet<String> =
            sets.iter().map(|s| publication_for("p", s)).collect();
        assert_eq!(names.len(), 15);
        assert!(names.contains("p_ins") && names.contains("p_i") && names.contains("p_iud"));
    }
}
