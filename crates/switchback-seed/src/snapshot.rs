//! Consistent snapshots of the hub, exported by a replication connection.
//!
//! A fresh seed creates the pipeline's slot with `EXPORT_SNAPSHOT`: the tables
//! are copied at exactly the slot's consistent point, so the stream continues
//! them without a gap or an overlap. A resumed seed (the slot already exists and
//! streams from its own position) takes a new snapshot from a temporary slot, as
//! PostgreSQL's tablesync does; the tables copied at it record its LSN and apply
//! skips their changes at or before it.
//!
//! The snapshot lives only while the replication connection stays open and idle:
//! [`Snapshot`] owns that connection until the copy is over.

use switchback_core::{quote_ident, Lsn};
use switchback_pg::replication::ReplicationClient;

use crate::SeedError;

/// An exported snapshot and the connection that keeps it alive.
pub struct Snapshot {
    /// The name for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The consistent point: every transaction committed before it is visible.
    pub lsn: Lsn,
    /// Whether it came from creating the pipeline's slot (else a temporary slot).
    pub pipeline_slot: bool,
    conn: ReplicationClient,
}

impl Snapshot {
    /// Creates the pipeline's slot, exporting its snapshot.
    pub async fn create_slot(
        hub: &tokio_postgres::Config,
        slot: &str,
    ) -> Result<Snapshot, SeedError> {
        let mut conn = ReplicationClient::connect(hub, "switchback_seed").await?;
        tracing::info!(
            slot,
            "creating the replication slot (waits for running hub transactions to end)"
        );
        let created = conn.create_logical_slot(slot, true).await?;
        let name = created.snapshot_name.ok_or_else(|| {
            SeedError::Setup(format!(
                "creating slot {slot:?}: the hub exported no snapshot"
            ))
        })?;
        Ok(Snapshot {
            name,
            lsn: created.consistent_point,
            pipeline_slot: true,
            conn,
        })
    }

    /// A snapshot from a temporary slot (dropped when the connection closes).
    pub async fn temporary(
        hub: &tokio_postgres::Config,
        slot: &str,
    ) -> Result<Snapshot, SeedError> {
        let mut conn = ReplicationClient::connect(hub, "switchback_seed").await?;
        let tmp = format!("{slot}_seed_{}", std::process::id());
        tracing::info!(slot = %tmp, "creating a temporary slot for a new snapshot (waits for running hub transactions to end)");
        let rows = conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(&tmp)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            SeedError::Setup(format!("creating temporary slot {tmp:?}: no result row"))
        })?;
        let get = |i: usize| row.get(i).cloned().flatten();
        let lsn = get(1).and_then(|l| l.parse().ok()).ok_or_else(|| {
            SeedError::Setup(format!(
                "creating temporary slot {tmp:?}: no consistent point"
            ))
        })?;
        let name = get(2).ok_or_else(|| {
            SeedError::Setup(format!(
                "creating temporary slot {tmp:?}: no snapshot exported"
            ))
        })?;
        Ok(Snapshot {
            name,
            lsn,
            pipeline_slot: false,
            conn,
        })
    }

    /// Ends the replication connection (a temporary slot goes with it).
    pub fn close(self) {
        drop(self.conn);
    }
}
