//! Seed: a consistent, parallel, resumable copy of the hub's tables into the
//! member, handed over to the stream as PostgreSQL's tablesync does.
//!
//! 1. The publication is prepared (as capture does). If the pipeline's slot does
//!    not exist, seed creates it with an exported snapshot ([`snapshot`]): every
//!    table is copied at the slot's consistent point, where the stream begins.
//! 2. If the slot exists (a resumed seed, or tables added later), the tables not
//!    yet seeded are copied at a new snapshot from a temporary slot; each records
//!    that snapshot's LSN and apply skips its changes at or before it
//!    (`switchback_apply::handover`).
//! 3. Tables are copied by `jobs` workers ([`copy`]), large ones in ctid ranges,
//!    with COPY streamed from hub to member (binary when every column type is
//!    built in and identical on both sides, text otherwise).
//! 4. Per-table state lives on the member (`switchback.seed_tables`), updated in
//!    the same member transaction as the rows: a finished table is kept by a
//!    resumed seed; an unfinished one is truncated and copied again.
//!
//! **Invariant:** a table is `done` only if all of its rows as of its sync LSN are
//! committed on the member; apply never runs while a table is not `done`.

pub mod catalog;
pub mod copy;
pub mod mapping;
pub mod progress;
pub mod snapshot;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchback_apply::handover::{self, SeedTableState};
use switchback_capture::CaptureError;
use switchback_config::Config;
use switchback_core::{quote_ident, Classify, ErrorClass, Lsn};
use switchback_pg::PgError;
use tokio::sync::watch;

use catalog::{CopyColumns, TableInfo};
use copy::{Chunk, TablePlan, TableProgress, WorkerSetup};
pub use mapping::Mapping;
pub use progress::ProgressMode;
use snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The configuration, the schema or the data do not allow seeding (definite).
    #[error("{0}")]
    Setup(String),
    /// A statement failed; `context` says which table and side.
    #[error("{context}: {message}")]
    Db {
        context: String,
        message: String,
        transient: bool,
    },
    #[error(transparent)]
    Capture(Box<CaptureError>),
    #[error(transparent)]
    Pg(Box<PgError>),
    #[error("seed interrupted; run `switchback seed` again to finish (finished tables are kept)")]
    Interrupted,
}

impl From<PgError> for SeedError {
    fn from(e: PgError) -> Self {
        SeedError::Pg(Box::new(e))
    }
}

impl From<CaptureError> for SeedError {
    fn from(e: CaptureError) -> Self {
        SeedError::Capture(Box::new(e))
    }
}

impl Classify for SeedError {
    fn class(&self) -> ErrorClass {
        match self {
            SeedError::Db {
                transient: true, ..
            } => ErrorClass::Transient,
            SeedError::Pg(e) => e.class(),
            SeedError::Capture(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

/// A database error with its context, without DETAIL or CONTEXT (COPY errors put
/// row values there).
pub(crate) fn db_err(context: impl Into<String>, e: tokio_postgres::Error) -> SeedError {
    let transient = e
        .code()
        .is_none_or(|c| switchback_pg::error::transient_sqlstate(c.code()));
    let message = match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    };
    SeedError::Db {
        context: context.into(),
        message,
        transient,
    }
}

/// Options of one seed.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// Parallel copy workers.
    pub jobs: usize,
    /// Create missing member tables from the hub's definitions.
    pub create_schema: bool,
    /// Empty non-empty member tables first (otherwise they are refused).
    pub truncate: bool,
    /// Pages per ctid range (None: from table size and jobs).
    pub chunk_pages: Option<u64>,
    pub progress: ProgressMode,
}

impl Default for SeedOptions {
    fn default() -> Self {
        SeedOptions {
            jobs: default_jobs(),
            create_schema: false,
            truncate: false,
            chunk_pages: None,
            progress: ProgressMode::Auto,
        }
    }
}

/// One job per CPU, at least two.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// What a seed did.
#[derive(Debug, Clone, Default)]
pub struct SeedSummary {
    pub copied: Vec<String>,
    pub kept: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub sync_lsn: Option<Lsn>,
}

/// Smallest automatic ctid range: 4096 pages (32 MiB of heap).
const MIN_CHUNK_PAGES: u64 = 4096;

fn chunk_pages(pages: u64, jobs: usize, forced: Option<u64>) -> u64 {
    if let Some(p) = forced {
        return p.max(1);
    }
    // About four ranges per job for a big table, so jobs finish together.
    let per = pages.div_ceil((jobs as u64 * 4).max(1));
    per.max(MIN_CHUNK_PAGES)
}

/// Seeds the member. Returns when every table in scope is `done`.
pub async fn run(
    cfg: &Config,
    opts: &SeedOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SeedSummary, SeedError> {
    let started = Instant::now();
    let mapping = Mapping::from_config(&cfg.tables);
    let pipeline = cfg.pipeline.name.clone();
    let slot = cfg.slot_name();
    let hub_cfg = cfg.hub_pg().map_err(|e| SeedError::Setup(e.to_string()))?;
    let member_cfg = cfg
        .member_pg()
        .map_err(|e| SeedError::Setup(e.to_string()))?;

    // The publication first (a slot created before it fails when decoding).
    let plan = switchback_capture::setup::prepare_with(cfg, false).await?;
    let hub = switchback_pg::hub::connect(&hub_cfg, "hub").await?;
    let member = switchback_pg::hub::connect(&member_cfg, "member").await?;
    member
        .client
        .batch_execute(&format!(
            "SET client_min_messages = warning; {}",
            handover::STATE_DDL
        ))
        .await
        .map_err(|e| {
            db_err(
                format!(
                    "creating {} on the member (the seed state; needs CREATE on the database)",
                    handover::STATE_TABLE
                ),
                e,
            )
        })?;

    let slot_state = switchback_pg::hub::slot_state(&hub, &slot).await?;
    if let Some(s) = &slot_state {
        if s.wal_status.as_deref() == Some("lost") {
            return Err(switchback_pg::hub::slot_lost_error(&hub.endpoint, &slot).into());
        }
        if let Some(pid) = s.active_pid {
            return Err(SeedError::Setup(format!(
                "replication slot {slot:?} is in use (walsender pid {pid}): `switchback run` or `capture` \
                 is running for this pipeline. Fix: stop it first; `switchback run --seed` seeds and \
                 then runs"
            )));
        }
    }
    let fresh = slot_state.is_none();
    let mut states: HashMap<(String, String), SeedTableState> =
        handover::read_state(&member.client, &pipeline)
            .await
            .map_err(|e| db_err("reading the seed state on the member", e))?
            .into_iter()
            .map(|s| ((s.schema.clone(), s.table.clone()), s))
            .collect();
    // Rows of tables now out of scope are forgotten (apply would otherwise wait on them).
    let in_scope: std::collections::HashSet<(String, String)> = plan
        .tables
        .iter()
        .map(|t| (t.schema.clone(), t.table.clone()))
        .collect();
    let stale: Vec<(String, String)> = states
        .keys()
        .filter(|k| !in_scope.contains(*k))
        .cloned()
        .collect();
    for (s, t) in &stale {
        member
            .client
            .execute(
                "DELETE FROM switchback.seed_tables WHERE pipeline = $1 AND table_schema = $2 AND table_name = $3",
                &[&pipeline, s, t],
            )
            .await
            .map_err(|e| db_err("forgetting seed state of tables out of scope", e))?;
        states.remove(&(s.clone(), t.clone()));
    }
    if fresh && states.values().any(SeedTableState::done) {
        tracing::warn!(
            slot,
            "the pipeline's slot does not exist but the member has seed state from an earlier slot: \
             every table is copied again"
        );
    }

    // Which tables to copy, and what they look like on both sides.
    let mut kept = Vec::new();
    let mut todo: Vec<(TableInfo, CopyColumns, bool, bool)> = Vec::new(); // info, cols, create, truncate
    let mut not_empty = Vec::new();
    for t in &plan.tables {
        let key = (t.schema.clone(), t.table.clone());
        let state = states.get(&key);
        if !fresh && state.is_some_and(SeedTableState::done) {
            let s = state.expect("checked");
            tracing::info!(
                table = %t.display(),
                sync_lsn = %s.sync_lsn,
                rows = s.rows,
                "keeping finished table (seeded before)"
            );
            kept.push(t.display());
            continue;
        }
        let info = catalog::describe(&hub.client, t).await?;
        let (ms, mt) = mapping.table(&t.schema, &t.table);
        let member_cols = catalog::member_columns(&member.client, &ms, &mt).await?;
        let create = member_cols.is_none();
        if create && !opts.create_schema {
            return Err(SeedError::Setup(format!(
                "table {} does not exist on the member (as {ms}.{mt}). Fix: create it on the member, \
                 seed with --create-schema, or exclude it with [tables] exclude",
                t.display()
            )));
        }
        let cols = catalog::copy_columns(&info, member_cols.as_deref(), &mapping)?;
        let mut truncate = state.is_some();
        if !create && !truncate {
            let has_rows: bool = member
                .client
                .query_one(
                    &format!(
                        "SELECT EXISTS (SELECT FROM {}.{})",
                        quote_ident(&ms),
                        quote_ident(&mt)
                    ),
                    &[],
                )
                .await
                .map_err(|e| db_err(format!("checking that {ms}.{mt} is empty on the member"), e))?
                .get(0);
            if has_rows {
                if opts.truncate {
                    truncate = true;
                } else {
                    not_empty.push(format!("{ms}.{mt}"));
                }
            }
        }
        todo.push((info, cols, create, truncate));
    }
    if !not_empty.is_empty() {
        return Err(SeedError::Setup(format!(
            "member table(s) {} are not empty; seed copies into empty tables. Fix: empty them, or seed \
             with --truncate (deletes their rows on the member)",
            not_empty.join(", ")
        )));
    }
    if todo.is_empty() && !fresh {
        tracing::info!(kept = kept.len(), "every table in scope is seeded already");
        ensure_indexes(&hub, &member, &pipeline, &plan.tables, &mapping).await?;
        return Ok(SeedSummary {
            kept,
            seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        });
    }

    // The snapshot: the pipeline slot's own on a fresh seed, a temporary one otherwise.
    let snap = if fresh {
        Snapshot::create_slot(&hub_cfg, &slot).await?
    } else {
        Snapshot::temporary(&hub_cfg, &slot).await?
    };
    tracing::info!(
        snapshot_lsn = %snap.lsn,
        pipeline_slot = snap.pipeline_slot,
        tables = todo.len(),
        kept = kept.len(),
        "snapshot exported; copying"
    );

    // One member transaction: create what is missing, empty what must be emptied,
    // and record every table as `copying` at this snapshot's LSN.
    let jobs = opts.jobs.max(1);
    let mut tables: Vec<Arc<TablePlan>> = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    {
        let mut prep = String::from("BEGIN;\n");
        if fresh {
            prep.push_str(&format!(
                "DELETE FROM switchback.seed_tables WHERE pipeline = {};\n",
                switchback_core::quote_literal(&pipeline)
            ));
        }
        let mut truncates = Vec::new();
        for (info, cols, create, truncate) in &todo {
            let (ms, mt) = mapping.table(&info.hub.schema, &info.hub.table);
            let member_q = format!("{}.{}", quote_ident(&ms), quote_ident(&mt));
            if *create {
                prep.push_str(&catalog::create_table_sql(info, &mapping)?);
                prep.push_str(";\n");
            } else if *truncate {
                truncates.push(member_q.clone());
            }
            let pages = if info.hub.partitioned { 0 } else { info.pages };
            let ranges = copy::ranges(pages, chunk_pages(pages, jobs, opts.chunk_pages));
            prep.push_str(&format!(
                "INSERT INTO switchback.seed_tables (pipeline, table_schema, table_name, state, sync_lsn, \
                     chunks_total, chunks_done, rows, created_schema, started_at, finished_at) \
                 VALUES ({}, {}, {}, 'copying', {}, {}, 0, 0, {create}, now(), NULL) \
                 ON CONFLICT (pipeline, table_schema, table_name) DO UPDATE SET state = 'copying', \
                     sync_lsn = EXCLUDED.sync_lsn, chunks_total = EXCLUDED.chunks_total, chunks_done = 0, \
                     rows = 0, created_schema = seed_tables.created_schema OR EXCLUDED.created_schema, \
                     started_at = now(), finished_at = NULL;\n",
                switchback_core::quote_literal(&pipeline),
                switchback_core::quote_literal(&info.hub.schema),
                switchback_core::quote_literal(&info.hub.table),
                switchback_core::quote_literal(&snap.lsn.to_string()),
                ranges.len()
            ));
            let fmt = if cols.binary { "binary" } else { "text" };
            let member_cols: Vec<String> = cols
                .member
                .iter()
                .chain(cols.constants.iter().map(|(c, _)| c))
                .map(|c| quote_ident(c))
                .collect();
            let plan = Arc::new(TablePlan {
                schema: info.hub.schema.clone(),
                table: info.hub.table.clone(),
                select: copy::select_prefix(
                    &info.hub.schema,
                    &info.hub.table,
                    info.hub.partitioned,
                    &cols.hub,
                    &cols.constants,
                ),
                filter: mapping.row_filter(&info.hub.schema, &info.hub.table),
                copy_in: format!(
                    "COPY {member_q} ({}) FROM STDIN (FORMAT {fmt})",
                    member_cols.join(", ")
                ),
                binary: cols.binary,
                progress: Arc::new(TableProgress {
                    display: info.hub.display(),
                    est_rows: info.est_rows,
                    chunks: ranges.len(),
                    chunks_done: AtomicUsize::new(0),
                    rows: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                    started: Mutex::new(None),
                    finished: AtomicBool::new(false),
                }),
            });
            tracing::info!(
                table = %info.hub.display(),
                chunks = ranges.len(),
                pages = info.pages,
                rows_estimated = info.est_rows,
                format = fmt,
                create = *create,
                truncate = *truncate,
                "copying table"
            );
            for r in ranges {
                chunks.push(Chunk {
                    table: plan.clone(),
                    range: r,
                });
            }
            tables.push(plan);
        }
        if !truncates.is_empty() {
            prep.push_str(&format!("TRUNCATE {};\n", truncates.join(", ")));
        }
        prep.push_str("COMMIT;");
        member.client.batch_execute(&prep).await.map_err(|e| {
            db_err(
                "preparing the member tables (create, truncate, seed state)",
                e,
            )
        })?;
    }
    // Big tables first, their ranges interleaved with nothing: the long pole starts early.
    let pages_of: HashMap<(String, String), u64> = todo
        .iter()
        .map(|(i, _, _, _)| ((i.hub.schema.clone(), i.hub.table.clone()), i.pages))
        .collect();
    chunks.sort_by_key(|c| {
        std::cmp::Reverse(
            pages_of
                .get(&(c.table.schema.clone(), c.table.table.clone()))
                .copied()
                .unwrap_or(0),
        )
    });

    // Workers.
    let replica_role = cfg.apply.replica_role && can_set_replica_role(&member).await;
    let setup = Arc::new(WorkerSetup {
        hub: hub_cfg.clone(),
        member: member_cfg.clone(),
        snapshot: snap.name.clone(),
        pipeline: pipeline.clone(),
        queue: Arc::new(Mutex::new(VecDeque::from(chunks))),
        replica_role,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let reporter = tokio::spawn(progress::report(
        tables.iter().map(|t| t.progress.clone()).collect(),
        opts.progress,
        stop_rx,
    ));
    let mut set = tokio::task::JoinSet::new();
    for id in 0..jobs {
        set.spawn(copy::worker(id, setup.clone()));
    }
    let mut result: Result<(), SeedError> = Ok(());
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                None => break,
                Some(Ok(Ok(_))) => {}
                Some(Ok(Err(e))) => { result = Err(e); break; }
                Some(Err(e)) => { result = Err(SeedError::Setup(format!("a copy worker failed: {e}"))); break; }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() { result = Err(SeedError::Interrupted); break; }
            }
        }
    }
    set.abort_all();
    let _ = stop_tx.send(true);
    let _ = reporter.await;
    let sync_lsn = snap.lsn;
    snap.close();
    result?;

    // Indexes after the data, statistics for the planner.
    ensure_indexes(&hub, &member, &pipeline, &plan.tables, &mapping).await?;
    for t in &tables {
        let (ms, mt) = mapping.table(&t.schema, &t.table);
        member
            .client
            .batch_execute(&format!(
                "ANALYZE {}.{}",
                quote_ident(&ms),
                quote_ident(&mt)
            ))
            .await
            .map_err(|e| db_err(format!("ANALYZE {ms}.{mt} on the member"), e))?;
    }
    let rows = tables
        .iter()
        .map(|t| t.progress.rows.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let bytes = tables
        .iter()
        .map(|t| t.progress.bytes.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        copied = tables.len(),
        kept = kept.len(),
        rows,
        bytes,
        seconds = format!("{seconds:.2}"),
        sync_lsn = %sync_lsn,
        peak_rss_kb = peak_rss_kb().unwrap_or(0),
        "seed finished"
    );
    Ok(SeedSummary {
        copied: tables.iter().map(|t| t.progress.display.clone()).collect(),
        kept,
        rows,
        bytes,
        seconds,
        sync_lsn: Some(sync_lsn),
    })
}

/// Whether the member session may `SET session_replication_role = replica`.
async fn can_set_replica_role(member: &switchback_pg::hub::Session) -> bool {
    match member
        .client
        .batch_execute("SET session_replication_role = replica; RESET session_replication_role")
        .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = %switchback_pg::error::describe_sql_error(&e),
                "cannot SET session_replication_role = replica: member triggers and foreign keys fire \
                 during the copy. Fix: connect as a superuser, or GRANT SET ON PARAMETER \
                 session_replication_role TO the member role (PG15+)"
            );
            false
        }
    }
}

/// Creates the hub's indexes missing on tables seed created (after their data).
async fn ensure_indexes(
    hub: &switchback_pg::hub::Session,
    member: &switchback_pg::hub::Session,
    pipeline: &str,
    tables: &[switchback_pg::hub::HubTable],
    mapping: &Mapping,
) -> Result<usize, SeedError> {
    let states = handover::read_state(&member.client, pipeline)
        .await
        .map_err(|e| db_err("reading the seed state on the member", e))?;
    let mut n = 0;
    for s in states.iter().filter(|s| s.created_schema && s.done()) {
        let Some(t) = tables
            .iter()
            .find(|t| t.schema == s.schema && t.table == s.table)
        else {
            continue;
        };
        let info = catalog::describe(&hub.client, t).await?;
        n += catalog::create_missing_indexes(&member.client, &info, mapping).await?;
    }
    Ok(n)
}

/// This process's peak resident set size (`VmHWM`), in kB (Linux).
pub fn peak_rss_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
