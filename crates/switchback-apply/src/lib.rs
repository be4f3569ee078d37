//! Apply: writes queued hub transactions into the member, exactly once, in commit
//! order, hub wins.
//!
//! * Consecutive hub transactions are grouped into one member transaction (commit
//!   order kept); a hub transaction is never split across member transactions.
//! * Each row change runs a prepared statement (one per table and change shape)
//!   with text-format parameters; statements are pipelined: sent back to back and
//!   their outcomes read afterwards, so a group costs about one round trip.
//! * Progress (the last hub `end_lsn`) is stamped into the same member transaction
//!   through a replication origin ([`progress`]); on restart everything at or
//!   below it is skipped, then acknowledged in the queue.
//!
//! **Invariant:** a hub transaction's rows and the progress that covers it commit
//! in one member transaction; the queue is acknowledged only after that commit.

pub mod handover;
pub mod progress;
pub mod sql;
pub mod target;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use switchback_config::Config;
use switchback_core::{metric, Change, Classify, ErrorClass, Lsn, Record, Relation};
use switchback_pg::error::describe_sql_error;
use switchback_pg::pipeline::{Entry, PipelineConn};
use switchback_pg::PgError;
use switchback_queue::{QueueError, QueueReader, QueuedTxn};
use tokio::sync::watch;
use tokio_postgres::Client;

pub use sql::Conflict;
use sql::Expect;
use target::Target;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A member statement failed; `context` names the table and the hub position.
    #[error("member: {context}: {message}")]
    Statement {
        context: String,
        message: String,
        transient: bool,
    },
    #[error("member: {message}")]
    Member { message: String, transient: bool },
    /// The member's schema does not fit the hub's changes.
    #[error("{0}")]
    Schema(String),
    /// A value or change cannot be applied.
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Config(String),
    /// Internal: the fast path met a conflict; the group is replayed carefully.
    #[error("internal: group needs the careful replay")]
    Replay,
    /// Internal: a schema change on the member (drift = add-columns) waits for a
    /// lock the group itself holds; the group is retried one transaction at a time.
    #[error("internal: group must be retried one transaction at a time")]
    Regroup,
}

/// No SQLSTATE means the connection broke: transient.
fn sqlstate_transient(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_none_or(|c| switchback_pg::error::transient_sqlstate(c.code()))
}

/// Error text without DETAIL, which can hold row values.
fn describe_without_values(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => describe_sql_error(e),
    }
}

impl ApplyError {
    pub fn member(e: tokio_postgres::Error) -> ApplyError {
        ApplyError::Member {
            transient: sqlstate_transient(&e),
            message: describe_without_values(&e),
        }
    }
}

impl Classify for ApplyError {
    fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Statement {
                transient: true, ..
            }
            | ApplyError::Member {
                transient: true, ..
            } => ErrorClass::Transient,
            _ => ErrorClass::Definite,
        }
    }
}

/// What apply reports while it runs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyStatus {
    /// End LSN of the last hub transaction applied (the member's progress).
    pub last_applied_lsn: Option<String>,
    /// Hub commit time of that transaction (RFC 3339).
    pub last_commit_time: Option<String>,
    /// Seconds between that commit on the hub and its apply (0 when caught up).
    pub lag_seconds: f64,
    pub applied_transactions: u64,
    pub conflicts: BTreeMap<Conflict, u64>,
    pub connected: bool,
}

/// Options of one apply run.
pub struct ApplyOptions {
    /// Stop when the queue is empty.
    pub until_empty: bool,
    /// Changes when capture stores something (run mode); otherwise the queue is polled.
    pub wake: Option<watch::Receiver<()>>,
}

/// A member session ready to apply: connected, replication origin bound, the
/// member's progress read.
pub struct Connected {
    applier: Applier,
    conn_task: tokio::task::JoinHandle<()>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

/// Connects the apply session to the member (`run` does it while its queue
/// opens; [`run_connected`] then starts with it).
pub async fn connect(cfg: &Config) -> Result<Connected, ApplyError> {
    connect_after(cfg, std::future::ready(true))
        .await
        .map(|c| c.expect("go was true"))
}

/// As [`connect`], but the member is only connected to until `go` resolves:
/// `true` lets the session bind (and, the first time, create) its replication
/// origin; `false` closes it (`None`). `run` connects while its check runs.
pub async fn connect_after(
    cfg: &Config,
    go: impl std::future::Future<Output = bool>,
) -> Result<Option<Connected>, ApplyError> {
    let member_cfg = cfg
        .member_pg()
        .map_err(|e| ApplyError::Config(e.to_string()))?;
    // Both member sessions connect at once: the catalog one and the pipeline.
    let catalog = async {
        let (client, conn) = member_cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(ApplyError::member)?;
        let conn_task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "member connection ended");
            }
        });
        Ok::<_, ApplyError>((client, conn_task))
    };
    let (catalog, pipeline) = tokio::join!(catalog, Applier::connect(cfg, &member_cfg));
    let (client, conn_task) = catalog?;
    let (conn, replica_role) = pipeline?;
    if !go.await {
        conn_task.abort();
        return Ok(None);
    }
    let applier = match Applier::start(cfg, client, conn, replica_role).await {
        Ok(a) => a,
        Err(e) => {
            conn_task.abort();
            return Err(e);
        }
    };
    Ok(Some(Connected { applier, conn_task }))
}

/// Runs apply until shutdown (or until the queue is empty with `until_empty`).
/// Transient member errors reconnect with backoff; definite ones stop with a clear
/// error and leave the queue as it is.
pub async fn run<R: QueueReader + Sync>(
    cfg: &Config,
    queue: &R,
    shutdown: watch::Receiver<bool>,
    opts: ApplyOptions,
    status: watch::Sender<ApplyStatus>,
) -> Result<(), ApplyError> {
    run_connected(cfg, None, queue, shutdown, opts, status).await
}

/// As [`run`], starting with the session `early` if there is one.
pub async fn run_connected<R: QueueReader + Sync>(
    cfg: &Config,
    mut early: Option<Connected>,
    queue: &R,
    mut shutdown: watch::Receiver<bool>,
    mut opts: ApplyOptions,
    status: watch::Sender<ApplyStatus>,
) -> Result<(), ApplyError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let res = async {
            let mut session = match early.take() {
                Some(s) => s,
                None => connect(cfg).await?,
            };
            let applier = &mut session.applier;
            status.send_modify(|s| {
                s.connected = true;
                s.last_applied_lsn = Some(applier.progress.to_string());
            });
            applier
                .follow(queue, &mut shutdown, &mut opts, &status)
                .await
        }
        .await;
        match res {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::Transient => {
                status.send_modify(|s| s.connected = false);
                tracing::warn!(error = %e, retry_in = ?backoff, "member unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Statements sent in one round trip at most.
const STATEMENTS_PER_ROUND_TRIP: usize = 500;
/// Round trips left unread while the next is built (their responses, a few dozen
/// bytes a statement, stay far below socket buffer sizes).
const MAX_UNREAD: usize = 1;
/// Conflicts logged one by one per round trip; the rest are summarised.
const CONFLICTS_LOGGED_PER_ROUND_TRIP: usize = 5;

/// A statement queued for the next round trip.
struct Queued {
    what: QueuedSql,
    expect: Expect,
    /// Index into the group's context (table, op, hub xid and end LSN).
    ctx: Option<usize>,
}

enum QueuedSql {
    /// A named statement, its parameters, and whether they are binary (`text[]`).
    Prepared(String, Vec<Option<Vec<u8>>>, bool),
    Sql(String),
}

struct Applier {
    /// The apply session: replication origin bound, statements pipelined.
    conn: PipelineConn,
    /// Catalog lookups (member table definitions).
    catalog: Client,
    progress: Lsn,
    /// Member definitions per hub relation OID.
    targets: HashMap<u32, Arc<Target>>,
    /// Prepared statement names per shape.
    statements: HashMap<sql::ShapeKey, (String, Arc<sql::Shape>)>,
    next_statement: u64,
    /// Statements to parse at the start of the next round trip.
    parses: Vec<(String, String)>,
    batch_txns: usize,
    batch_changes: usize,
    stats: ApplyStatus,
    /// `session_replication_role = replica` is in effect on the apply session.
    replica_role: bool,
    /// Round trips of the current group sent and not read yet, oldest first.
    sent: std::collections::VecDeque<SentBatch>,
    /// Table rules: mapping and drift policy.
    tables: switchback_config::Tables,
    /// Seeded tables: their changes at or before their sync LSN are skipped.
    handover: handover::SyncLsns,
    /// Active-active member → hub: the target (hub) wins conflicts; always careful.
    hub_wins_reverse: bool,
}

/// A round trip sent to the member whose outcomes are not read yet.
struct SentBatch {
    queued: Vec<Queued>,
    /// Statements first parsed in it (forgotten if their parse failed).
    parses: Vec<String>,
}

type Ctx = (Arc<Target>, &'static str, u32, Lsn);

/// Row changes of one table buffered in a group: (target, change, context index).
type Buffered = (u32, Vec<(Arc<Target>, sql::Planned, usize)>);

/// Runs of at least this many inserts (or updates) on one table become one statement.
const MIN_INSERT_RUN: usize = 2;

/// Length of the run of fast-path updates at the start of `items` whose keys are
/// all distinct (one multi-row UPDATE must not touch a row twice).
fn update_run(items: &[(Arc<Target>, sql::Planned, usize)]) -> Option<usize> {
    let (tg, first, _) = items.first()?;
    if first.key.kind != sql::Kind::UpdateFast {
        return None;
    }
    let target::Matching::Key(keys) = &tg.matching else {
        return None;
    };
    let mut seen = std::collections::HashSet::new();
    let mut n = 0;
    for (_, p, _) in items {
        if p.key.kind != sql::Kind::UpdateFast {
            break;
        }
        let k: Vec<&switchback_core::Value> = keys.iter().filter_map(|&i| p.new.get(i)).collect();
        if !seen.insert(k) {
            break;
        }
        n += 1;
    }
    Some(n)
}

fn pg_transient(e: &PgError) -> bool {
    e.class() == ErrorClass::Transient
}

/// PgError text without DETAIL (which can hold row values).
fn pg_describe(e: &PgError) -> String {
    match e {
        PgError::Server { error, .. } => {
            let mut s = format!("{} ({})", error.message, error.code);
            if let Some(h) = &error.hint {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        other => other.to_string(),
    }
}

fn pg_err(e: PgError) -> ApplyError {
    ApplyError::Member {
        transient: pg_transient(&e),
        message: pg_describe(&e),
    }
}

impl Applier {
    /// The pipeline session, its settings made; whether it may use
    /// `session_replication_role = replica`.
    async fn connect(
        cfg: &Config,
        member_cfg: &tokio_postgres::Config,
    ) -> Result<(PipelineConn, bool), ApplyError> {
        let mut conn = PipelineConn::connect(member_cfg, "switchback_apply")
            .await
            .map_err(pg_err)?;
        conn.simple_query("SET standard_conforming_strings = on")
            .await
            .map_err(pg_err)?;
        let mut replica_role = false;
        if cfg.apply.replica_role {
            if let Err(e) = conn
                .simple_query("SET session_replication_role = replica")
                .await
            {
                tracing::warn!(
                    error = %pg_describe(&e),
                    "cannot SET session_replication_role = replica: member triggers and foreign keys \
                     will fire during apply. Fix: connect as a superuser, or GRANT SET ON PARAMETER \
                     session_replication_role TO the apply role (PG15+)"
                );
            } else {
                replica_role = true;
            }
        }
        Ok((conn, replica_role))
    }

    /// Binds the replication origin (created the first time) and reads the
    /// member's progress and handover positions.
    async fn start(
        cfg: &Config,
        catalog: Client,
        mut conn: PipelineConn,
        replica_role: bool,
    ) -> Result<Applier, ApplyError> {
        let origin = cfg.origin_name();
        let (progress, handover) = tokio::join!(
            progress::setup(&mut conn, &origin),
            handover::SyncLsns::load(&catalog, &cfg.pipeline.name)
        );
        let (progress, handover) = (progress?, handover?);
        tracing::info!(progress = %progress, "apply resumes after the member's progress");
        Ok(Applier {
            conn,
            catalog,
            progress,
            targets: HashMap::new(),
            statements: HashMap::new(),
            next_statement: 0,
            parses: Vec::new(),
            batch_txns: cfg.apply.batch_txns,
            batch_changes: cfg.apply.batch_changes,
            stats: ApplyStatus::default(),
            replica_role,
            sent: Default::default(),
            tables: cfg.tables.clone(),
            handover,
            hub_wins_reverse: cfg.direction == switchback_config::Direction::MemberToHub
                && cfg.cutover.mode == switchback_config::SyncMode::ActiveActive,
        })
    }

    /// One statement for one row change.
    fn queue_row(
        &mut self,
        tg: &Target,
        planned: &sql::Planned,
        at: usize,
    ) -> Result<Queued, ApplyError> {
        let (name, shape) = self.statement(tg, &planned.key);
        let params = sql::params(tg, &shape, planned)?;
        Ok(Queued {
            what: QueuedSql::Prepared(name, params, false),
            expect: shape.expect,
            ctx: Some(at),
        })
    }

    /// One multi-row statement (`InsertMany` / `UpdateMany`) for a run of changes
    /// on one table.
    fn queue_many(
        &mut self,
        run: &[(Arc<Target>, sql::Planned, usize)],
        kind: sql::Kind,
        expect: Expect,
    ) -> Result<Queued, ApplyError> {
        let (tg, first, at) = &run[0];
        let n = tg.hub.columns.len();
        let key = sql::ShapeKey {
            rel: first.key.rel,
            kind,
            by_old: false,
            skip_new: vec![false; n],
            skip_old: vec![false; n],
        };
        let (name, shape) = self.statement(tg, &key);
        let rows: Vec<&sql::Planned> = run.iter().map(|(_, p, _)| p).collect();
        let params = sql::many_params(tg, &shape, &rows)?;
        Ok(Queued {
            what: QueuedSql::Prepared(name, params, true),
            expect,
            ctx: Some(*at),
        })
    }

    /// Moves the per-table buffers into the round trip, table by table in first
    /// use order; runs of fast-path inserts become one multi-row statement.
    fn flush_tables(
        &mut self,
        tables: &mut Vec<Buffered>,
        inflight: &mut Vec<Queued>,
    ) -> Result<(), ApplyError> {
        for (_, items) in tables.drain(..) {
            let mut i = 0;
            while i < items.len() {
                let run = items[i..]
                    .iter()
                    .take_while(|(_, p, _)| p.key.kind == sql::Kind::InsertFast)
                    .count();
                if run >= MIN_INSERT_RUN {
                    let q = self.queue_many(
                        &items[i..i + run],
                        sql::Kind::InsertMany,
                        Expect::Nothing,
                    )?;
                    inflight.push(q);
                    i += run;
                } else if let Some(run) = update_run(&items[i..]).filter(|&r| r >= MIN_INSERT_RUN) {
                    let q = self.queue_many(
                        &items[i..i + run],
                        sql::Kind::UpdateMany,
                        Expect::MustMatchN(run as u64),
                    )?;
                    inflight.push(q);
                    i += run;
                } else {
                    let (tg, planned, at) = &items[i];
                    let q = self.queue_row(tg, planned, *at)?;
                    inflight.push(q);
                    i += 1;
                }
            }
        }
        Ok(())
    }

    async fn target(&mut self, rel: Arc<Relation>) -> Result<Arc<Target>, ApplyError> {
        if let Some(t) = self.targets.get(&rel.oid) {
            if Arc::ptr_eq(&t.hub, &rel) || *t.hub == *rel {
                return Ok(t.clone());
            }
            tracing::info!(table = %rel.display_name(), "table definition changed on the hub");
        }
        let oid = rel.oid;
        let t = Arc::new(target::resolve(&self.catalog, rel, &self.tables).await?);
        self.statements.retain(|k, _| k.rel != oid);
        self.targets.insert(oid, t.clone());
        Ok(t)
    }

    /// The prepared statement of a shape; new ones are parsed with the next round trip.
    fn statement(&mut self, t: &Target, key: &sql::ShapeKey) -> (String, Arc<sql::Shape>) {
        if let Some(s) = self.statements.get(key) {
            return s.clone();
        }
        let shape = Arc::new(sql::build(t, key));
        self.next_statement += 1;
        let name = format!("sb{}", self.next_statement);
        self.parses.push((name.clone(), shape.sql.clone()));
        self.statements
            .insert(key.clone(), (name.clone(), shape.clone()));
        (name, shape)
    }

    /// Follows the queue from the first transaction not yet applied.
    async fn follow<R: QueueReader + Sync>(
        &mut self,
        queue: &R,
        shutdown: &mut watch::Receiver<bool>,
        opts: &mut ApplyOptions,
        status: &watch::Sender<ApplyStatus>,
    ) -> Result<(), ApplyError> {
        self.stats = status.borrow().clone();
        // Gap detection: whatever the queue hands out must follow the member's progress.
        queue.resume(self.progress)?;
        let mut next_seq = queue.acked()?.map_or(0, |a| a + 1);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let Some(first) = queue.next_from(next_seq)? else {
                if opts.until_empty {
                    return Ok(());
                }
                // Caught up.
                self.stats.lag_seconds = 0.0;
                metrics::gauge!(metric::APPLY_LAG_SECONDS).set(0.0);
                status.send_replace(self.stats.clone());
                let wait = async {
                    match opts.wake.as_mut() {
                        Some(w) => {
                            let _ =
                                tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
                        }
                        None => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                tokio::select! {
                    _ = wait => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            };
            let careful = self.hub_wins_reverse;
            next_seq = match self
                .apply_group(queue, first.clone(), status, careful)
                .await
            {
                Err(ApplyError::Replay) => {
                    tracing::debug!("conflict on the fast path; replaying the group with upserts");
                    self.apply_group(queue, first, status, true).await?
                }
                Err(ApplyError::Regroup) => self.apply_alone(queue, first, status).await?,
                r => r?,
            };
        }
    }

    /// After [`ApplyError::Regroup`]: rolls the group back and applies its first
    /// transaction alone (a second lock wait is then someone else's: transient).
    async fn apply_alone<R: QueueReader + Sync>(
        &mut self,
        queue: &R,
        first: QueuedTxn,
        status: &watch::Sender<ApplyStatus>,
    ) -> Result<u64, ApplyError> {
        tracing::info!(
            "a member schema change (drift = add-columns) waits for a lock of this group: \
             applying the group's first transaction alone"
        );
        self.abandon().await?;
        let batch = std::mem::replace(&mut self.batch_txns, 1);
        let r = self.apply_group(queue, first, status, true).await;
        self.batch_txns = batch;
        match r {
            Err(ApplyError::Regroup) => {
                self.abandon().await?;
                Err(ApplyError::Member {
                    message: "a member schema change (drift = add-columns) waits for a lock held by another session".into(),
                    transient: true,
                })
            }
            r => r,
        }
    }

    /// Applies consecutive transactions starting at `first` in one member
    /// transaction; returns the next seq to read.
    async fn apply_group<R: QueueReader + Sync>(
        &mut self,
        queue: &R,
        first: QueuedTxn,
        status: &watch::Sender<ApplyStatus>,
        careful: bool,
    ) -> Result<u64, ApplyError> {
        let mut inflight: Vec<Queued> = Vec::new();
        let mut ctx: Vec<Ctx> = Vec::new();
        // Fast path with member triggers and FKs off: changes to different tables
        // commute, so they are buffered per table (order kept within a table) and
        // runs of inserts become one statement.
        let reorder = !careful && self.replica_role;
        let mut tables: Vec<Buffered> = Vec::new();
        let mut buffered = 0usize;
        let mut began = false;
        let mut txn = Some(first);
        let mut last: Option<QueuedTxn> = None;
        let mut skipped_upto: Option<u64> = None;
        let mut txns = 0usize;
        let mut changes = 0usize;
        let mut conflicts: BTreeMap<Conflict, u64> = BTreeMap::new();
        let mut ops: BTreeMap<&'static str, u64> = BTreeMap::new();

        while let Some(t) = txn.take() {
            let seq = t.seq;
            if t.header.end_lsn <= self.progress {
                // Applied before a restart; only its acknowledgement was lost.
                skipped_upto = Some(seq);
            } else {
                if !began {
                    inflight.push(Queued {
                        what: QueuedSql::Sql("BEGIN".into()),
                        expect: Expect::Nothing,
                        ctx: None,
                    });
                    began = true;
                }
                let mut rels: HashMap<u32, Arc<Target>> = HashMap::new();
                for chunk in queue.records(&t)? {
                    for rec in chunk? {
                        let change = match rec {
                            Record::Relation(r) => {
                                let tg = self.target(r).await?;
                                rels.insert(tg.hub.oid, tg);
                                continue;
                            }
                            Record::Type(_) | Record::Change(Change::Message { .. }) => continue,
                            Record::Change(c) => c,
                        };
                        let item = match &change {
                            Change::Truncate {
                                rels: oids,
                                cascade,
                                restart_identity,
                            } => {
                                // A barrier: everything buffered per table goes first.
                                self.flush_tables(&mut tables, &mut inflight)?;
                                let tgs: Vec<Arc<Target>> = oids
                                    .iter()
                                    .filter_map(|o| rels.get(o).cloned())
                                    .filter(|tg| !self.handover.skips(&tg.hub, t.header.end_lsn))
                                    .collect();
                                if tgs.is_empty() {
                                    continue;
                                }
                                let refs: Vec<&Target> = tgs.iter().map(|t| t.as_ref()).collect();
                                let mut f = Queued {
                                    what: QueuedSql::Sql(sql::truncate(
                                        &refs,
                                        *cascade,
                                        *restart_identity,
                                    )),
                                    expect: Expect::Nothing,
                                    ctx: None,
                                };
                                *ops.entry("truncate").or_default() += 1;
                                if let Some(tg) = tgs.first() {
                                    ctx.push((
                                        tg.clone(),
                                        "truncate",
                                        t.header.xid,
                                        t.header.end_lsn,
                                    ));
                                    f.ctx = Some(ctx.len() - 1);
                                }
                                f
                            }
                            Change::Insert { rel, .. }
                            | Change::Update { rel, .. }
                            | Change::Delete { rel, .. } => {
                                let tg = rels.get(rel).cloned().ok_or_else(|| {
                                    ApplyError::Data(format!(
                                        "transaction at {} changes relation {rel} without its definition",
                                        t.header.end_lsn
                                    ))
                                })?;
                                if self.handover.skips(&tg.hub, t.header.end_lsn) {
                                    continue;
                                }
                                let planned = if self.hub_wins_reverse {
                                    sql::plan_hub_wins_reverse(&tg, change)?
                                } else {
                                    sql::plan(&tg, change, careful)?
                                };
                                *ops.entry(planned.op).or_default() += 1;
                                ctx.push((tg.clone(), planned.op, t.header.xid, t.header.end_lsn));
                                let at = ctx.len() - 1;
                                if reorder {
                                    match tables.iter_mut().find(|(oid, _)| *oid == tg.hub.oid) {
                                        Some((_, items)) => items.push((tg, planned, at)),
                                        None => tables.push((tg.hub.oid, vec![(tg, planned, at)])),
                                    }
                                    buffered += 1;
                                    changes += 1;
                                    if buffered >= STATEMENTS_PER_ROUND_TRIP {
                                        buffered = 0;
                                        self.flush_tables(&mut tables, &mut inflight)?;
                                        self.settle(&mut inflight, &ctx, &mut conflicts, careful)
                                            .await?;
                                    }
                                    continue;
                                }
                                self.queue_row(&tg, &planned, at)?
                            }
                            Change::Message { .. } => continue,
                        };
                        inflight.push(item);
                        changes += 1;
                        if inflight.len() >= STATEMENTS_PER_ROUND_TRIP {
                            self.settle(&mut inflight, &ctx, &mut conflicts, careful)
                                .await?;
                        }
                    }
                }
                txns += 1;
                last = Some(t.clone());
            }
            // Group more transactions while they are already queued.
            if txns < self.batch_txns && changes < self.batch_changes {
                txn = queue.next_from(seq + 1)?;
            }
            if txn.is_none() {
                if last.is_none() {
                    // Only transactions applied before a restart: acknowledge them.
                    if let Some(s) = skipped_upto {
                        queue.ack(s)?;
                    }
                    return Ok(seq + 1);
                }
                break;
            }
        }

        let Some(last) = last else {
            unreachable!("a group without applied transactions returned early")
        };
        self.flush_tables(&mut tables, &mut inflight)?;
        if changes == 0 {
            // Only messages (e.g. a cutover's fence marker): a member transaction
            // without an xid writes no commit record, so the origin's progress would
            // not move. Assign one.
            inflight.push(Queued {
                what: QueuedSql::Sql("SELECT pg_current_xact_id()".into()),
                expect: Expect::Nothing,
                ctx: None,
            });
        }
        let stamp = progress::stamp(last.header.end_lsn, last.header.commit_time);
        inflight.push(Queued {
            what: QueuedSql::Sql(stamp),
            expect: Expect::Nothing,
            ctx: None,
        });
        self.settle(&mut inflight, &ctx, &mut conflicts, careful)
            .await?;
        self.drain(&ctx, &mut conflicts, careful).await?;
        // COMMIT only now: every outcome was checked, so a fast-path conflict has
        // already rolled the attempt back instead of committing it.
        self.conn.simple_query("COMMIT").await.map_err(pg_err)?;
        // Durable in the member: now the queue may forget them.
        queue.ack(last.seq)?;
        self.progress = last.header.end_lsn;

        tracing::debug!(txns, changes, end_lsn = %last.header.end_lsn, "group committed");
        metrics::counter!(metric::APPLY_TRANSACTIONS_TOTAL).increment(txns as u64);
        metrics::counter!(metric::APPLY_BATCHES_TOTAL).increment(1);
        for (op, n) in ops {
            metrics::counter!(metric::APPLY_CHANGES_TOTAL, "op" => op).increment(n);
        }
        metrics::gauge!(metric::APPLY_LAST_LSN).set(last.header.end_lsn.0 as f64);
        let lag = (switchback_core::time::now_pg() - last.header.commit_time).max(0) as f64 / 1e6;
        metrics::gauge!(metric::APPLY_LAG_SECONDS).set(lag);
        self.stats.applied_transactions += txns as u64;
        self.stats.last_applied_lsn = Some(last.header.end_lsn.to_string());
        self.stats.last_commit_time = Some(switchback_core::time::format_pg_timestamp(
            last.header.commit_time,
        ));
        self.stats.lag_seconds = lag;
        for (k, n) in conflicts {
            *self.stats.conflicts.entry(k).or_default() += n;
        }
        status.send_replace(self.stats.clone());
        Ok(last.seq + 1)
    }

    /// Sends the queued statements as one round trip without waiting for them, then
    /// reads the outcomes of older round trips so that at most [`MAX_UNREAD`] stay
    /// unread: the next round trip is built while the member executes this one.
    /// All of them are in the group's one member transaction, which commits only
    /// after [`drain`](Self::drain) has read and checked every outcome.
    async fn settle(
        &mut self,
        inflight: &mut Vec<Queued>,
        ctx: &[Ctx],
        conflicts: &mut BTreeMap<Conflict, u64>,
        careful: bool,
    ) -> Result<(), ApplyError> {
        let parses = std::mem::take(&mut self.parses);
        let parse_refs: Vec<(&str, &str)> = parses
            .iter()
            .map(|(n, q)| (n.as_str(), q.as_str()))
            .collect();
        let entries: Vec<Entry<'_>> = inflight
            .iter()
            .map(|q| match &q.what {
                QueuedSql::Prepared(name, params, binary) => Entry::Prepared {
                    name,
                    params,
                    binary: *binary,
                },
                QueuedSql::Sql(sql) => Entry::Sql(sql),
            })
            .collect();
        let sent = self.conn.send(&parse_refs, &entries).await;
        drop(entries);
        let queued = std::mem::take(inflight);
        sent.map_err(pg_err)?;
        self.sent.push_back(SentBatch {
            queued,
            parses: parses.into_iter().map(|(n, _)| n).collect(),
        });
        while self.sent.len() > MAX_UNREAD {
            self.receive_one(ctx, conflicts, careful).await?;
        }
        Ok(())
    }

    /// Reads and checks every round trip still unread.
    async fn drain(
        &mut self,
        ctx: &[Ctx],
        conflicts: &mut BTreeMap<Conflict, u64>,
        careful: bool,
    ) -> Result<(), ApplyError> {
        while !self.sent.is_empty() {
            self.receive_one(ctx, conflicts, careful).await?;
        }
        Ok(())
    }

    /// Ends a failed attempt: reads what the member still owes (the connection must
    /// stay in step), then rolls the member transaction back.
    async fn abandon(&mut self) -> Result<(), ApplyError> {
        while let Some(b) = self.sent.pop_front() {
            if let Err(e) = self.conn.receive().await {
                if pg_transient(&e.error) {
                    self.sent.clear();
                    return Err(pg_err(e.error));
                }
                if e.index.is_none() {
                    self.forget_statements(&b.parses);
                }
            }
        }
        self.rollback().await
    }

    fn forget_statements(&mut self, names: &[String]) {
        self.statements.retain(|_, (n, _)| !names.contains(n));
    }

    /// Reads the outcomes of the oldest unread round trip. A conflict on the fast
    /// path or an error abandons the attempt (nothing of it commits).
    async fn receive_one(
        &mut self,
        ctx: &[Ctx],
        conflicts: &mut BTreeMap<Conflict, u64>,
        careful: bool,
    ) -> Result<(), ApplyError> {
        let Some(batch) = self.sent.pop_front() else {
            return Ok(());
        };
        let queued = batch.queued;
        let outcomes = match self.conn.receive().await {
            Ok(o) => o,
            Err(e) => {
                let transient = pg_transient(&e.error);
                if transient {
                    self.sent.clear();
                } else {
                    if e.index.is_none() {
                        // A statement could not be prepared: forget the new ones.
                        self.forget_statements(&batch.parses);
                    }
                    self.abandon().await?;
                }
                let at = e.index.and_then(|i| queued.get(i));
                if !careful && e.code() == Some("23505") && at.is_some_and(|q| q.ctx.is_some()) {
                    // The fast path's plain INSERT met an existing row: replay carefully.
                    return Err(ApplyError::Replay);
                }
                let context = match at.and_then(|q| q.ctx).and_then(|i| ctx.get(i)) {
                    Some((tg, op, xid, lsn)) => format!(
                        "{op} on table {} (hub transaction {xid} ending at {lsn})",
                        tg.display
                    ),
                    None => "applying a transaction group".to_string(),
                };
                return Err(ApplyError::Statement {
                    context,
                    message: pg_describe(&e.error),
                    transient,
                });
            }
        };
        let mut logged = 0usize;
        let mut unlogged = 0u64;
        for (q, o) in queued.iter().zip(&outcomes) {
            let missed = match q.expect {
                Expect::MustMatch => o.rows == 0,
                Expect::MustMatchN(n) => o.rows != n,
                _ => false,
            };
            if missed {
                self.abandon().await?;
                return Err(ApplyError::Replay);
            }
            let returned = o.returned.as_deref().map(|v| v == "t");
            if let Some(c) = q.expect.conflict(o.rows, returned) {
                *conflicts.entry(c).or_default() += 1;
                metrics::counter!(metric::APPLY_CONFLICTS_TOTAL, "kind" => c.as_str()).increment(1);
                if logged >= CONFLICTS_LOGGED_PER_ROUND_TRIP {
                    unlogged += 1;
                } else if let Some((tg, op, xid, lsn)) = q.ctx.and_then(|i| ctx.get(i)) {
                    logged += 1;
                    tracing::warn!(
                        table = %tg.display,
                        key = %tg.key_names(),
                        op,
                        conflict = c.as_str(),
                        xid,
                        end_lsn = %lsn,
                        "hub wins"
                    );
                }
            }
        }
        if unlogged > 0 {
            tracing::warn!(
                more = unlogged,
                "more hub-wins conflicts in this round trip (counted in status and metrics)"
            );
        }
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), ApplyError> {
        tracing::debug!(status = %(self.conn.txn_status as char), "rolling back the group");
        if self.conn.txn_status != b'I' {
            self.conn.simple_query("ROLLBACK").await.map_err(pg_err)?;
        }
        Ok(())
    }
}
