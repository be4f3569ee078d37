//! Cutover and rollback: move the primary from the hub to the member (or back)
//! with a short write pause and without losing a transaction.
//!
//! A switch runs these steps, each recorded durably in the pipeline state
//! ([`state`]) once it took effect, each idempotent:
//!
//! 1. **preflight** — both sides reachable, the new primary has `wal_level =
//!    logical`, the running pipeline's slot is active and its lag (slot + queue)
//!    under `[cutover] max_lag_bytes`, the reverse mapping can be built, the fence
//!    can hold. Refuses with every reason.
//! 2. **reverse ready**: the new direction's publication and slot on the new
//!    primary, before it takes a write (and before the fence: creating a slot
//!    waits for running transactions, which would lengthen the write pause). What
//!    the old direction applies meanwhile carries its origin and is dropped as echo.
//! 3. **fence** the old primary (read-only database, revoked CONNECT, or a hook)
//!    and end its application sessions.
//! 4. **mark**: a transactional logical message on the old primary; its LSN is
//!    the fence LSN, and every application transaction committed before it.
//! 5. **drain**: wait until the running `switchback run` applied the marker (the
//!    new primary's replication origin progress passes the fence LSN).
//! 6. **sequences** forward only ([`sequences`]).
//! 7. **switch** the recorded direction: `switchback run` notices, stops the old
//!    direction and starts the new one.
//! 8. **open**: lift a fence left on the new primary by an earlier switch, run the
//!    open hook, report the fence LSN, the write pause and the sequences moved.
//!
//! Running the command again after a crash resumes from the recorded step; a
//! `rollback` after an interrupted cutover (before step 7) undoes it instead.
//! The write pause runs from the fence to the open hook (steps 3 to 8).
//! **Invariant:** the new primary is opened only after everything committed on
//! the old one is applied and the slot that captures the new primary's writes exists.

pub mod fence;
pub mod hooks;
pub mod mapping;
pub mod sequences;
pub mod state;

use std::time::{Duration, Instant, SystemTime};

use switchback_config::{Config, Direction};
use switchback_core::Lsn;
use switchback_pg::hub::{self, Session};
use switchback_pg::PgError;

use crate::state::{PipelineState, Side, Step, SwitchKind, SwitchProgress, SwitchReport};

#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("{kind} refused:\n  - {}", reasons.join("\n  - "))]
    Refused {
        kind: &'static str,
        reasons: Vec<String>,
    },
    #[error(transparent)]
    Pg(Box<PgError>),
    #[error("{0}")]
    Failed(String),
    #[error("pipeline state: {0}")]
    State(#[from] std::io::Error),
}

impl From<PgError> for CutoverError {
    fn from(e: PgError) -> Self {
        CutoverError::Pg(Box::new(e))
    }
}

/// What the command did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// `--dry-run`: the plan, and the preflight passed.
    Planned(Vec<String>),
    Completed(SwitchReport),
    /// An interrupted switch of the other kind was undone.
    Undone {
        kind: SwitchKind,
        step: Step,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Configs of a switch: `src` is the direction in force before (its hub is the old
/// primary, its member the new one), `dst` the direction after.
fn configs(cfg: &Config, kind: SwitchKind) -> (Config, Config) {
    let src = cfg.for_direction(kind.from_direction());
    let dst = src.reversed();
    (src, dst)
}

async fn connect(
    pg: Result<tokio_postgres::Config, switchback_config::ConfigError>,
    side: Side,
) -> Result<Session, CutoverError> {
    let pg = pg.map_err(|e| CutoverError::Failed(e.to_string()))?;
    Ok(hub::connect(&pg, side.as_str()).await?)
}

/// Columns of the tables on one side (those matching `[tables]` when `scoped`).
async fn table_columns(
    s: &Session,
    cfg: &Config,
    scoped: bool,
) -> Result<mapping::Tables, CutoverError> {
    let rows = s
        .client
        .query(
            "SELECT n.nspname::text, c.relname::text, a.attname::text, \
                    (a.attnotnull AND NOT a.atthasdef AND a.attidentity = '') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND a.attgenerated = '' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
             ORDER BY 1, 2, a.attnum",
            &[],
        )
        .await
        .map_err(|e| s.err(e))?;
    let mut out = mapping::Tables::new();
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if scoped && !cfg.tables.matches(&schema, &table) {
            continue;
        }
        out.entry((schema, table))
            .or_default()
            .push(mapping::ColumnInfo {
                name: r.get(2),
                required: r.get(3),
            });
    }
    Ok(out)
}

/// Queue bytes not yet applied, from the running process's status file (if fresh).
fn queued_bytes(src: &Config) -> Option<u64> {
    let mut p = src.queue.path.clone().into_os_string();
    p.push(".status.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    let updated = v.get("updated_unix_ms")?.as_u64()?;
    if now_ms().saturating_sub(updated) > 5_000 {
        return None;
    }
    v.get("queue_bytes")?.as_u64()
}

/// Every reason the switch cannot start now (empty: it can).
pub async fn preflight(cfg: &Config, kind: SwitchKind) -> Result<Vec<String>, CutoverError> {
    let (src, dst) = configs(cfg, kind);
    let (old, new) = (kind.old_primary(), kind.new_primary());
    let mut reasons = Vec::new();
    let old_s = match connect(src.hub_pg(), old).await {
        Ok(s) => Some(s),
        Err(e) => {
            reasons.push(format!(
                "the {} (old primary) is not reachable: {e}",
                old.as_str()
            ));
            None
        }
    };
    let new_s = match connect(src.member_pg(), new).await {
        Ok(s) => Some(s),
        Err(e) => {
            reasons.push(format!(
                "the {} (new primary) is not reachable: {e}",
                new.as_str()
            ));
            None
        }
    };
    if let Some(n) = &new_s {
        let row = n
            .client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(|e| n.err(e))?;
        let level: String = row.get(0);
        if level != "logical" {
            reasons.push(format!(
                "the {} has wal_level = {level}: the reverse direction ({} → {}) needs logical \
                 decoding there. Fix: ALTER SYSTEM SET wal_level = logical on the {} and restart it",
                new.as_str(),
                new.as_str(),
                old.as_str(),
                new.as_str()
            ));
        }
    }
    if let Some(o) = &old_s {
        let slot = src.slot_name();
        match hub::slot_state(o, &slot).await? {
            None => reasons.push(format!(
                "slot {slot} does not exist on the {}: the {} direction is not running. Fix: start `switchback run` first",
                old.as_str(),
                src.direction.as_str()
            )),
            Some(s) => {
                if s.wal_status.as_deref() == Some("lost") {
                    reasons.push(format!("slot {slot} on the {} is invalidated (wal_status = lost): re-seed first", old.as_str()));
                }
                if s.active_pid.is_none() {
                    reasons.push(format!(
                        "nothing streams from slot {slot} on the {}: `switchback run` must be running to drain to the fence. Fix: start it",
                        old.as_str()
                    ));
                }
                let slot_lag = s.lag_bytes.unwrap_or(0).max(0);
                let queued = queued_bytes(&src).unwrap_or(0) as i64;
                let lag = slot_lag + queued;
                if lag > cfg.cutover.max_lag_bytes {
                    reasons.push(format!(
                        "lag is {lag} bytes ({slot_lag} not yet captured from slot {slot}, {queued} queued not yet applied), \
                         over [cutover] max_lag_bytes = {}: the write pause would be long. Fix: wait for \
                         `switchback run` to catch up (see `switchback status`), or raise max_lag_bytes",
                        cfg.cutover.max_lag_bytes
                    ));
                }
            }
        }
        reasons.extend(fence::check(&src, old, o).await?);
    }
    if let (Some(o), Some(n)) = (&old_s, &new_s) {
        // After the switch rows flow new primary → old primary.
        let source = table_columns(n, &dst, true).await?;
        let target = table_columns(o, &dst, false).await?;
        reasons.extend(mapping::check_direction(
            &source,
            &target,
            &dst.tables,
            new.as_str(),
            old.as_str(),
        ));
    }
    Ok(reasons)
}

fn plan(cfg: &Config, kind: SwitchKind) -> Vec<String> {
    let (src, dst) = configs(cfg, kind);
    let (old, new) = (kind.old_primary().as_str(), kind.new_primary().as_str());
    vec![
        format!(
            "1. preflight: lag under {} bytes, {new} wal_level = logical, reverse mapping, fence",
            cfg.cutover.max_lag_bytes
        ),
        format!(
            "2. create publication and slot {} on the {new}",
            dst.slot_name()
        ),
        format!(
            "3. fence the {old} ({:?}) and end its application sessions",
            cfg.cutover.fence
        ),
        format!("4. write the fence marker on the {old}; its LSN is the fence LSN"),
        format!(
            "5. wait until origin {} on the {new} passes the fence LSN (at most {} ms, else undo)",
            src.origin_name(),
            cfg.cutover.drain_timeout_ms
        ),
        format!(
            "6. move sequences forward on the {new} (last_value + {})",
            cfg.cutover.sequence_margin
        ),
        format!(
            "7. record direction {} (switchback run follows it)",
            dst.direction.as_str()
        ),
        format!(
            "8. open the {new}{}",
            if cfg.cutover.open_hook.is_some() {
                " and run open_hook"
            } else {
                ""
            }
        ),
    ]
}

/// Test hook: `SWITCHBACK_TEST_PAUSE_AFTER=<step>` stops the command (forever)
/// right after the step is recorded, so a test can kill it -9 there.
async fn maybe_pause(step: Step) {
    if std::env::var("SWITCHBACK_TEST_PAUSE_AFTER").ok().as_deref() == Some(step.as_str()) {
        eprintln!(
            "paused after step {} (SWITCHBACK_TEST_PAUSE_AFTER)",
            step.as_str()
        );
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

struct Run<'a> {
    cfg: &'a Config,
    path: std::path::PathBuf,
    st: PipelineState,
}

impl Run<'_> {
    fn progress(&mut self) -> &mut SwitchProgress {
        self.st.switch.as_mut().expect("a switch is in progress")
    }
    async fn record(&mut self, step: Step) -> Result<(), CutoverError> {
        self.progress().step = step;
        state::save(&self.path, &self.st)?;
        tracing::info!(step = step.as_str(), "step recorded");
        maybe_pause(step).await;
        Ok(())
    }
}

/// Runs (or resumes) a cutover or rollback. `say` receives what to tell the user.
pub async fn switch(
    cfg: &Config,
    kind: SwitchKind,
    dry_run: bool,
    say: &mut dyn FnMut(String),
) -> Result<Outcome, CutoverError> {
    let path = state::path(cfg);
    let st = state::load(&path)?;
    let mut resumed_from = None;
    if let Some(p) = st.switch.clone() {
        if p.kind != kind {
            if p.step >= Step::Switched {
                return Err(CutoverError::Failed(format!(
                    "an interrupted {} already switched the direction; finish it first with `switchback {}`",
                    p.kind.as_str(),
                    p.kind.as_str()
                )));
            }
            if dry_run {
                return Ok(Outcome::Planned(vec![format!(
                    "undo the interrupted {} (it reached step {}): lift the fence on the {}",
                    p.kind.as_str(),
                    p.step.as_str(),
                    p.kind.old_primary().as_str()
                )]));
            }
            let mut run = Run { cfg, path, st };
            undo(&mut run, p.kind).await?;
            say(format!(
                "undid the interrupted {} (it had reached step {}): the {} is the primary and open again",
                p.kind.as_str(),
                p.step.as_str(),
                p.kind.old_primary().as_str()
            ));
            return Ok(Outcome::Undone {
                kind: p.kind,
                step: p.step,
            });
        }
        resumed_from = Some(p.step);
        say(format!(
            "resuming the interrupted {} after step {}{}",
            kind.as_str(),
            p.step.as_str(),
            if p.step == Step::Started {
                " (nothing had changed yet)"
            } else {
                ""
            }
        ));
        if dry_run {
            let done = Step::ALL.iter().position(|s| *s == p.step).unwrap_or(0) + 1;
            return Ok(Outcome::Planned(
                plan(cfg, kind).into_iter().skip(done).collect(),
            ));
        }
    } else {
        if st.direction != kind.from_direction() {
            return Err(CutoverError::Failed(match kind {
                SwitchKind::Cutover => format!(
                    "already cut over (epoch {}): the member is the primary. `switchback rollback` goes back",
                    st.epoch
                ),
                SwitchKind::Rollback => "nothing to roll back: the hub is the primary".to_string(),
            }));
        }
        let reasons = preflight(cfg, kind).await?;
        if !reasons.is_empty() {
            return Err(CutoverError::Refused {
                kind: kind.as_str(),
                reasons,
            });
        }
        if dry_run {
            return Ok(Outcome::Planned(plan(cfg, kind)));
        }
    }
    let mut run = Run { cfg, path, st };
    if run.st.switch.is_none() {
        run.st.switch = Some(SwitchProgress {
            kind,
            step: Step::Started,
            fence_lsn: None,
            started_unix_ms: now_ms(),
            fenced_unix_ms: None,
            sequences: Vec::new(),
        });
        run.record(Step::Started).await?;
    }
    let report = steps(&mut run, kind, resumed_from).await?;
    metrics::counter!(switchback_core::metric::SWITCHES_TOTAL, "kind" => kind.as_str())
        .increment(1);
    Ok(Outcome::Completed(report))
}

/// Lifts the fence of an interrupted switch and forgets it.
async fn undo(run: &mut Run<'_>, kind: SwitchKind) -> Result<(), CutoverError> {
    let (src, _) = configs(run.cfg, kind);
    let old = kind.old_primary();
    if run.st.fenced.contains(&old) {
        let s = connect(src.hub_pg(), old).await?;
        fence::unfence(&src, old, &s).await?;
        run.st.fenced.retain(|x| *x != old);
    }
    run.st.switch = None;
    state::save(&run.path, &run.st)?;
    Ok(())
}

async fn steps(
    run: &mut Run<'_>,
    kind: SwitchKind,
    resumed_from: Option<Step>,
) -> Result<SwitchReport, CutoverError> {
    let cfg = run.cfg;
    let (src, dst) = configs(cfg, kind);
    let (old, new) = (kind.old_primary(), kind.new_primary());
    let old_s = connect(src.hub_pg(), old).await?;
    let new_s = connect(src.member_pg(), new).await?;
    let at = |run: &mut Run<'_>| run.progress().step;

    if at(run) < Step::ReverseReady {
        switchback_capture::setup::prepare(&dst)
            .await
            .map_err(|e| {
                CutoverError::Failed(format!(
                    "preparing the {} direction on the {}: {e}",
                    dst.direction.as_str(),
                    new.as_str()
                ))
            })?;
        run.record(Step::ReverseReady).await?;
    }
    if at(run) < Step::Fenced {
        // The write pause starts when the fence starts.
        let fence_started = now_ms();
        fence::fence(&src, old, &old_s).await?;
        if !run.st.fenced.contains(&old) {
            run.st.fenced.push(old);
        }
        run.progress().fenced_unix_ms = Some(fence_started);
        run.record(Step::Fenced).await?;
    }
    if at(run) < Step::Marked {
        let row = old_s
            .client
            .query_one(
                "SELECT pg_logical_emit_message(true, 'switchback_fence', $1)::text",
                &[&format!("{} epoch {}", kind.as_str(), run.st.epoch + 1)],
            )
            .await
            .map_err(|e| old_s.err(e))?;
        run.progress().fence_lsn = Some(row.get(0));
        run.record(Step::Marked).await?;
    }
    let fence_lsn: Lsn = run
        .progress()
        .fence_lsn
        .as_deref()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| CutoverError::Failed("the recorded fence LSN is unreadable".into()))?;
    if at(run) < Step::Drained {
        let origin = src.origin_name();
        let deadline = Instant::now() + Duration::from_millis(cfg.cutover.drain_timeout_ms);
        loop {
            let row = new_s
                .client
                .query_one(
                    "SELECT CASE WHEN pg_replication_origin_oid($1) IS NULL THEN NULL \
                            ELSE pg_replication_origin_progress($1, false)::text END",
                    &[&origin],
                )
                .await
                .map_err(|e| new_s.err(e))?;
            let applied: Option<Lsn> = row.get::<_, Option<String>>(0).and_then(|l| l.parse().ok());
            if applied.is_some_and(|a| a > fence_lsn) {
                break;
            }
            if Instant::now() > deadline {
                undo(run, kind).await?;
                return Err(CutoverError::Failed(format!(
                    "apply did not reach the fence position {fence_lsn} on the {} within [cutover] drain_timeout_ms = {} \
                     (applied up to {}). The {} was undone: the {} is open again. Check that `switchback run` is running \
                     (`switchback status`), then try again",
                    new.as_str(),
                    cfg.cutover.drain_timeout_ms,
                    applied.map_or("nothing".to_string(), |a| a.to_string()),
                    kind.as_str(),
                    old.as_str()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        run.record(Step::Drained).await?;
    }
    if at(run) < Step::SequencesSynced {
        let moved = sequences::sync(&src, &old_s, &new_s).await?;
        // A resumed sync finds sequences already moved: keep the first report.
        for m in moved {
            if !run
                .progress()
                .sequences
                .iter()
                .any(|s| s.sequence == m.sequence)
            {
                run.progress().sequences.push(m);
            }
        }
        run.record(Step::SequencesSynced).await?;
    }
    if at(run) < Step::Switched {
        run.st.direction = dst.direction;
        run.st.epoch += 1;
        run.record(Step::Switched).await?;
    }
    // Open the new primary.
    if run.st.fenced.contains(&new) {
        fence::unfence(&dst, new, &new_s).await?;
        run.st.fenced.retain(|x| *x != new);
        state::save(&run.path, &run.st)?;
    }
    if let Some(cmd) = cfg.cutover.open_hook.as_deref() {
        let epoch = run.st.epoch.to_string();
        hooks::run_hook(
            "open_hook",
            cmd,
            &[
                ("SWITCHBACK_PRIMARY", new.as_str()),
                ("SWITCHBACK_EPOCH", &epoch),
            ],
        )
        .await?;
    }
    let p = run.st.switch.take().expect("switch in progress");
    let report = SwitchReport {
        kind,
        epoch: run.st.epoch,
        fence_lsn: fence_lsn.to_string(),
        write_pause_ms: now_ms().saturating_sub(p.fenced_unix_ms.unwrap_or(p.started_unix_ms)),
        sequences: p.sequences,
        resumed_from,
    };
    run.st.last_report = Some(report.clone());
    state::save(&run.path, &run.st)?;
    Ok(report)
}

/// The direction(s) `switchback run` should follow now.
pub fn run_directions(cfg: &Config) -> std::io::Result<Vec<Direction>> {
    if cfg.cutover.mode == switchback_config::SyncMode::ActiveActive {
        return Ok(vec![Direction::HubToMember, Direction::MemberToHub]);
    }
    Ok(vec![state::load(&state::path(cfg))?.direction])
}
