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

pub mod progress;
pub mod sql;
pub mod target;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use switchback_config::Config;
use switchback_core::{metric, Change, Classify, ErrorClass, Lsn, Record, Relation};
use switchback_pg::error::describe_sql_error;
use switchback_queue::{QueueError, QueueReader, QueuedTxn};
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};

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
}

fn sqlstate_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(c) => {
            let c = c.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57")
                || c == "40001"
                || c == "40P01"
                || c == "55006"
        }
    }
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

/// Runs apply until shutdown (or until the queue is empty with `until_empty`).
/// Transient member errors reconnect with backoff; definite ones stop with a clear
/// error and leave the queue as it is.
pub async fn run<R: QueueReader + Sync>(
    cfg: &Config,
    queue: &R,
    mut shutdown: watch::Receiver<bool>,
    mut opts: ApplyOptions,
    status: watch::Sender<ApplyStatus>,
) -> Result<(), ApplyError> {
    let member_cfg = cfg
        .member_pg()
        .map_err(|e| ApplyError::Config(e.to_string()))?;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let res = async {
            let (client, conn) = member_cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(ApplyError::member)?;
            let conn_task = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "member connection ended");
                }
            });
            let mut applier = Applier::start(cfg, client).await?;
            status.send_modify(|s| {
                s.connected = true;
                s.last_applied_lsn = Some(applier.progress.to_string());
            });
            let r = applier
                .follow(queue, &mut shutdown, &mut opts, &status)
                .await;
            conn_task.abort();
            r
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

/// Row changes in flight (sent, outcome not read yet) at most.
const STATEMENTS_PER_ROUND_TRIP: usize = 2000;
/// Conflicts logged one by one per round trip; the rest are summarised.
const CONFLICTS_LOGGED_PER_ROUND_TRIP: usize = 5;

type Outcome = Result<(u64, Option<bool>), tokio_postgres::Error>;
type Pipelined = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A statement already sent to the member, whose outcome is read later.
struct InFlight {
    fut: Pipelined,
    expect: Expect,
    /// Index into the group's context (table, op, hub xid and end LSN).
    ctx: Option<usize>,
}

/// Polls a future once so that tokio-postgres sends its request now: requests go
/// out in the order they are submitted, and their outcomes are read later in the
/// same order (pipelining).
fn submit(mut fut: Pipelined) -> Pipelined {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
        return Box::pin(std::future::ready(out));
    }
    fut
}

struct Applier {
    client: Arc<Client>,
    progress: Lsn,
    /// Member definitions per hub relation OID.
    targets: HashMap<u32, Arc<Target>>,
    /// Prepared statements per shape.
    statements: HashMap<sql::ShapeKey, (Statement, Arc<sql::Shape>)>,
    batch_txns: usize,
    batch_changes: usize,
    stats: ApplyStatus,
}

type Ctx = (Arc<Target>, &'static str, u32, Lsn);

impl Applier {
    async fn start(cfg: &Config, client: Client) -> Result<Applier, ApplyError> {
        client
            .batch_execute(
                "SET standard_conforming_strings = on; SET client_encoding = 'UTF8'; \
                 SET datestyle = 'ISO'; SET intervalstyle = 'postgres'; SET extra_float_digits = 3; \
                 SET application_name = 'switchback_apply'",
            )
            .await
            .map_err(ApplyError::member)?;
        if cfg.apply.replica_role {
            if let Err(e) = client
                .batch_execute("SET session_replication_role = replica")
                .await
            {
                tracing::warn!(
                    error = %describe_without_values(&e),
                    "cannot SET session_replication_role = replica: member triggers and foreign keys \
                     will fire during apply. Fix: connect as a superuser, or GRANT SET ON PARAMETER \
                     session_replication_role TO the apply role (PG15+)"
                );
            }
        }
        let progress = progress::setup(&client, &cfg.origin_name()).await?;
        tracing::info!(progress = %progress, "apply resumes after the member's progress");
        Ok(Applier {
            client: Arc::new(client),
            progress,
            targets: HashMap::new(),
            statements: HashMap::new(),
            batch_txns: cfg.apply.batch_txns,
            batch_changes: cfg.apply.batch_changes,
            stats: ApplyStatus::default(),
        })
    }

    async fn target(&mut self, rel: Relation) -> Result<Arc<Target>, ApplyError> {
        if let Some(t) = self.targets.get(&rel.oid) {
            if *t.hub == rel {
                return Ok(t.clone());
            }
            tracing::info!(table = %rel.display_name(), "table definition changed on the hub");
        }
        let oid = rel.oid;
        let t = Arc::new(target::resolve(&self.client, Arc::new(rel)).await?);
        self.statements.retain(|k, _| k.rel != oid);
        self.targets.insert(oid, t.clone());
        Ok(t)
    }

    async fn statement(
        &mut self,
        t: &Target,
        key: &sql::ShapeKey,
    ) -> Result<(Statement, Arc<sql::Shape>), ApplyError> {
        if let Some(s) = self.statements.get(key) {
            return Ok(s.clone());
        }
        let shape = Arc::new(sql::build(t, key));
        let stmt = self.client.prepare(&shape.sql).await.map_err(|e| {
            ApplyError::Schema(format!(
                "table {}: cannot prepare the {:?} statement on the member: {}",
                t.display,
                key.kind,
                describe_without_values(&e)
            ))
        })?;
        self.statements
            .insert(key.clone(), (stmt.clone(), shape.clone()));
        Ok((stmt, shape))
    }

    fn send_simple(&self, sql: String) -> InFlight {
        let client = self.client.clone();
        InFlight {
            fut: submit(Box::pin(async move {
                client.batch_execute(&sql).await.map(|()| (0, None))
            })),
            expect: Expect::Nothing,
            ctx: None,
        }
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
            next_seq = match self.apply_group(queue, first.clone(), status, false).await {
                Err(ApplyError::Replay) => {
                    tracing::debug!("conflict on the fast path; replaying the group with upserts");
                    self.apply_group(queue, first, status, true).await?
                }
                r => r?,
            };
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
        let mut inflight: Vec<InFlight> = Vec::new();
        let mut ctx: Vec<Ctx> = Vec::new();
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
                    inflight.push(self.send_simple("BEGIN".into()));
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
                                let tgs: Vec<Arc<Target>> =
                                    oids.iter().filter_map(|o| rels.get(o).cloned()).collect();
                                let refs: Vec<&Target> = tgs.iter().map(|t| t.as_ref()).collect();
                                let mut f = self.send_simple(sql::truncate(
                                    &refs,
                                    *cascade,
                                    *restart_identity,
                                ));
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
                                let planned = sql::plan(&tg, &change, careful)?;
                                let (stmt, shape) = self.statement(&tg, &planned.key).await?;
                                let params = sql::params(&tg, &shape, &planned)?;
                                *ops.entry(planned.op).or_default() += 1;
                                ctx.push((tg.clone(), planned.op, t.header.xid, t.header.end_lsn));
                                let client = self.client.clone();
                                let returns = shape.expect.returns_row();
                                InFlight {
                                    fut: submit(Box::pin(async move {
                                        let stream = client.query_raw(&stmt, params).await?;
                                        let mut stream = std::pin::pin!(stream);
                                        let mut returned = None;
                                        while let Some(row) = stream.next().await {
                                            let row = row?;
                                            if returns {
                                                returned = row.try_get::<_, bool>(0).ok();
                                            }
                                        }
                                        Ok((stream.rows_affected().unwrap_or(0), returned))
                                    })),
                                    expect: shape.expect,
                                    ctx: Some(ctx.len() - 1),
                                }
                            }
                            Change::Message { .. } => continue,
                        };
                        inflight.push(item);
                        changes += 1;
                        if inflight.len() >= STATEMENTS_PER_ROUND_TRIP {
                            self.settle(&mut inflight, &ctx, &mut conflicts).await?;
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
        let stamp = progress::stamp(last.header.end_lsn, last.header.commit_time);
        inflight.push(self.send_simple(format!("{stamp}; COMMIT")));
        self.settle(&mut inflight, &ctx, &mut conflicts).await?;
        // Durable in the member: now the queue may forget them.
        queue.ack(last.seq)?;
        self.progress = last.header.end_lsn;

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

    /// Reads the outcomes of the statements in flight, in order. The first error
    /// ends the group: the member transaction is rolled back, the queue untouched.
    async fn settle(
        &mut self,
        inflight: &mut Vec<InFlight>,
        ctx: &[Ctx],
        conflicts: &mut BTreeMap<Conflict, u64>,
    ) -> Result<(), ApplyError> {
        let mut logged = 0usize;
        let mut unlogged = 0u64;
        let mut failure = None;
        let mut replay = false;
        for item in inflight.drain(..) {
            match item.fut.await {
                Ok((0, _)) if item.expect == Expect::MustMatch => {
                    replay = true;
                    break;
                }
                Err(e)
                    if item.ctx.is_some()
                        && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                {
                    // The fast path's plain INSERT met an existing row (or an UPDATE
                    // of a key met another row's key): the careful replay decides.
                    replay = true;
                    break;
                }
                Ok((rows, returned)) => {
                    if let Some(c) = item.expect.conflict(rows, returned) {
                        *conflicts.entry(c).or_default() += 1;
                        metrics::counter!(metric::APPLY_CONFLICTS_TOTAL, "kind" => c.as_str())
                            .increment(1);
                        if logged >= CONFLICTS_LOGGED_PER_ROUND_TRIP {
                            unlogged += 1;
                        } else if let Some((tg, op, xid, lsn)) = item.ctx.and_then(|i| ctx.get(i)) {
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
                Err(e) => {
                    failure = Some((e, item.ctx));
                    break;
                }
            }
        }
        if unlogged > 0 {
            tracing::warn!(
                more = unlogged,
                "more hub-wins conflicts in this round trip (counted in status and metrics)"
            );
        }
        if replay {
            inflight.clear();
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(ApplyError::Replay);
        }
        let Some((e, at)) = failure else {
            return Ok(());
        };
        // Later statements failed only because the transaction was aborted.
        inflight.clear();
        let transient = sqlstate_transient(&e);
        let context = match at.and_then(|i| ctx.get(i)) {
            Some((tg, op, xid, lsn)) => format!(
                "{op} on table {} (hub transaction {xid} ending at {lsn})",
                tg.display
            ),
            None => "applying a transaction group".to_string(),
        };
        if !transient {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        Err(ApplyError::Statement {
            context,
            message: describe_without_values(&e),
            transient,
        })
    }
}
