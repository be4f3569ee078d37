//! The hand-over from seed to the stream: per-table sync LSNs kept on the member.
//!
//! `switchback seed` copies each table at a snapshot of the hub and records, in
//! `switchback.seed_tables` on the member, the LSN of that snapshot (the consistent
//! point of the slot that exported it). A table copied at the pipeline slot's own
//! consistent point needs nothing skipped; a table copied later (a resumed seed,
//! with its own snapshot at LSN `L`) already contains every hub transaction that
//! ends at or before `L`, so apply skips that table's changes in those
//! transactions (PostgreSQL's tablesync design).
//!
//! The state row of a table turns `done` in the same member transaction that
//! commits its last copied rows, so a finished table is never copied twice and an
//! unfinished one is never mistaken for finished.
//!
//! **Invariant:** apply refuses to start while a table's seed is unfinished: its
//! rows on the member are incomplete and the stream alone cannot complete them.

use std::collections::HashMap;

use switchback_core::{Lsn, Relation};
use tokio_postgres::Client;

use crate::ApplyError;

/// The member table holding the seed state, schema-qualified.
pub const STATE_TABLE: &str = "switchback.seed_tables";

/// Creates the state table if missing (seed does this; apply only reads).
pub const STATE_DDL: &str = "CREATE SCHEMA IF NOT EXISTS switchback; \
    CREATE TABLE IF NOT EXISTS switchback.seed_tables ( \
        pipeline text NOT NULL, \
        table_schema text NOT NULL, \
        table_name text NOT NULL, \
        state text NOT NULL CHECK (state IN ('copying', 'done')), \
        sync_lsn pg_lsn NOT NULL, \
        chunks_total int4 NOT NULL, \
        chunks_done int4 NOT NULL DEFAULT 0, \
        rows int8 NOT NULL DEFAULT 0, \
        created_schema bool NOT NULL DEFAULT false, \
        started_at timestamptz NOT NULL DEFAULT now(), \
        finished_at timestamptz, \
        PRIMARY KEY (pipeline, table_schema, table_name))";

/// One table's seed state (keyed by the hub's schema and table name).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SeedTableState {
    pub schema: String,
    pub table: String,
    /// `copying` or `done`.
    pub state: String,
    /// Shown as PostgreSQL shows an LSN (`0/16B3748`).
    #[serde(with = "lsn_text")]
    pub sync_lsn: Lsn,
    pub chunks_total: i32,
    pub chunks_done: i32,
    pub rows: i64,
    pub created_schema: bool,
    pub started_at: String,
    pub finished_at: Option<String>,
}

mod lsn_text {
    use switchback_core::Lsn;

    pub fn serialize<S: serde::Serializer>(l: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(l)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl SeedTableState {
    pub fn done(&self) -> bool {
        self.state == "done"
    }
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Reads a pipeline's seed state; empty when seed never ran.
pub async fn read_state(
    member: &Client,
    pipeline: &str,
) -> Result<Vec<SeedTableState>, tokio_postgres::Error> {
    let exists: bool = member
        .query_one(
            "SELECT to_regclass('switchback.seed_tables') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = member
        .query(
            "SELECT table_schema, table_name, state, sync_lsn::text, chunks_total, chunks_done, \
                    rows, created_schema, started_at::text, finished_at::text \
             FROM switchback.seed_tables WHERE pipeline = $1 ORDER BY 1, 2",
            &[&pipeline],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SeedTableState {
            schema: r.get(0),
            table: r.get(1),
            state: r.get(2),
            sync_lsn: r.get::<_, String>(3).parse().unwrap_or(Lsn::ZERO),
            chunks_total: r.get(4),
            chunks_done: r.get(5),
            rows: r.get(6),
            created_schema: r.get(7),
            started_at: r.get(8),
            finished_at: r.get(9),
        })
        .collect())
}

/// The per-table sync LSNs apply honours.
#[derive(Debug, Default)]
pub struct SyncLsns {
    by_table: HashMap<String, HashMap<String, Lsn>>,
    /// The highest sync LSN: past it nothing is skipped (one comparison per change).
    max: Lsn,
}

impl SyncLsns {
    /// Loads the sync LSNs of a pipeline; refuses when a table's seed is unfinished.
    pub async fn load(member: &Client, pipeline: &str) -> Result<SyncLsns, ApplyError> {
        let states = read_state(member, pipeline)
            .await
            .map_err(ApplyError::member)?;
        let unfinished: Vec<String> = states
            .iter()
            .filter(|s| !s.done())
            .map(SeedTableState::display)
            .collect();
        if !unfinished.is_empty() {
            return Err(ApplyError::Config(format!(
                "the seed of table(s) {} is unfinished (seed was interrupted): their rows on the member \
                 are incomplete. Fix: run `switchback seed` again (it keeps the finished tables and \
                 copies only these), then start again",
                unfinished.join(", ")
            )));
        }
        let s = SyncLsns::new(
            states
                .into_iter()
                .map(|st| (st.schema, st.table, st.sync_lsn)),
        );
        if !s.by_table.is_empty() {
            tracing::info!(
                tables = s.by_table.values().map(HashMap::len).sum::<usize>(),
                up_to = %s.max,
                "seeded tables: changes at or before each table's sync LSN are skipped"
            );
        }
        Ok(s)
    }

    /// From (schema, table, sync LSN) of finished tables.
    pub fn new(tables: impl IntoIterator<Item = (String, String, Lsn)>) -> SyncLsns {
        let mut s = SyncLsns::default();
        for (schema, table, lsn) in tables {
            s.max = s.max.max(lsn);
            s.by_table.entry(schema).or_default().insert(table, lsn);
        }
        s
    }

    /// Whether a change of `rel` in the hub transaction ending at `end_lsn` is
    /// already contained in the table's seeded copy.
    pub fn skips(&self, rel: &Relation, end_lsn: Lsn) -> bool {
        end_lsn <= self.max
            && self
                .by_table
                .get(&rel.schema)
                .and_then(|t| t.get(&rel.table))
                .is_some_and(|&l| end_lsn <= l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchback_core::ReplicaIdentity;

    fn rel(schema: &str, table: &str) -> Relation {
        Relation {
            oid: 1,
            schema: schema.into(),
            table: table.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: Vec::new(),
        }
    }

    #[test]
    fn skips_only_the_table_up_to_its_sync_lsn() {
        let s = SyncLsns::new([
            ("public".into(), "a".into(), Lsn(100)),
            ("public".into(), "b".into(), Lsn(200)),
        ]);
        let (a, b, c) = (rel("public", "a"), rel("public", "b"), rel("public", "c"));
        assert!(s.skips(&a, Lsn(99)));
        assert!(s.skips(&a, Lsn(100)), "at the sync LSN: in the copy");
        assert!(!s.skips(&a, Lsn(101)), "after it: from the stream");
        assert!(s.skips(&b, Lsn(150)));
        assert!(!s.skips(&b, Lsn(201)));
        assert!(
            !s.skips(&c, Lsn(50)),
            "a table never seeded is never skipped"
        );
        assert!(!s.skips(&rel("other", "a"), Lsn(50)), "schemas matter");
        assert!(!SyncLsns::default().skips(&a, Lsn(1)));
    }
}
