//! `switchback status`, and the status file a running process keeps fresh.
//!
//! The embedded sled log can be opened by one process only, so `run`, `capture`
//! and `apply` write their view (queue depth, apply progress, conflicts) to
//! `<queue.path>.status.json` every second; `status` reads it and adds what it can
//! ask the databases itself (slot lag on the hub, progress on the member).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use switchback_apply::ApplyStatus;
use switchback_capture::CaptureProgress;
use switchback_config::Config;
use switchback_config::QueueKind;
use switchback_core::metric;
use switchback_queue::{QueueReader, SledLog};
use tokio::sync::watch;

use crate::cli::StatusArgs;

/// What a running process publishes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub updated_at: String,
    pub updated_unix_ms: u64,
    pub capture_connected: bool,
    pub capture_acked_lsn: Option<String>,
    pub queue_transactions: u64,
    pub queue_bytes: u64,
    pub apply: Option<ApplyStatusFile>,
    /// Written last by a process that stopped: the file is fresh, the process gone.
    #[serde(default)]
    pub stopped: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApplyStatusFile {
    pub connected: bool,
    pub last_applied_lsn: Option<String>,
    pub last_commit_time: Option<String>,
    pub lag_seconds: f64,
    pub applied_transactions: u64,
    pub conflicts: std::collections::BTreeMap<String, u64>,
}

pub fn status_path(cfg: &Config) -> PathBuf {
    let mut p = cfg.queue.path.clone().into_os_string();
    p.push(".status.json");
    PathBuf::from(p)
}

/// With Kafka, capture and apply are separate processes: one status file each
/// (`<queue.path>.capture.status.json`, `<queue.path>.apply.status.json`).
fn status_path_of(cfg: &Config, apply: bool) -> PathBuf {
    if cfg.queue.kind != QueueKind::Kafka {
        return status_path(cfg);
    }
    let mut p = cfg.queue.path.clone().into_os_string();
    p.push(if apply {
        ".apply.status.json"
    } else {
        ".capture.status.json"
    });
    PathBuf::from(p)
}

/// The status file(s) of running processes; with Kafka the capture and apply
/// files merged (capture fields from the capture process).
fn read_status_file(cfg: &Config) -> Option<ProcessStatus> {
    let read = |p: PathBuf| -> Option<ProcessStatus> {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    };
    if cfg.queue.kind != QueueKind::Kafka {
        return read(status_path(cfg));
    }
    let cap = read(status_path_of(cfg, false));
    let app = read(status_path_of(cfg, true));
    match (cap, app) {
        (Some(c), Some(mut a)) => {
            a.capture_connected = c.capture_connected;
            a.capture_acked_lsn = c.capture_acked_lsn;
            a.updated_unix_ms = a.updated_unix_ms.max(c.updated_unix_ms);
            a.stopped = a.stopped && c.stopped;
            Some(a)
        }
        (c, a) => a.or(c),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn snapshot(
    reader: Option<&(dyn QueueReader + Send + Sync)>,
    cap: &CaptureProgress,
    apply: &ApplyStatus,
    with_apply: bool,
) -> ProcessStatus {
    let depth = reader.and_then(|r| r.depth().ok()).unwrap_or_default();
    metrics::gauge!(metric::QUEUE_DEPTH_TRANSACTIONS).set(depth.transactions as f64);
    metrics::gauge!(metric::QUEUE_DEPTH_BYTES).set(depth.bytes as f64);
    ProcessStatus {
        pid: std::process::id(),
        updated_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        updated_unix_ms: now_ms(),
        capture_connected: cap.connected,
        capture_acked_lsn: (cap.acked.0 > 0).then(|| cap.acked.to_string()),
        queue_transactions: depth.transactions,
        queue_bytes: depth.bytes,
        apply: with_apply.then(|| ApplyStatusFile {
            connected: apply.connected,
            last_applied_lsn: apply.last_applied_lsn.clone(),
            last_commit_time: apply.last_commit_time.clone(),
            lag_seconds: apply.lag_seconds,
            applied_transactions: apply.applied_transactions,
            conflicts: apply
                .conflicts
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), *v))
                .collect(),
        }),
        stopped: false,
    }
}

fn write_atomic(path: &PathBuf, st: &ProcessStatus) {
    let tmp = path.with_extension("json.tmp");
    let res = (|| -> std::io::Result<()> {
        // One write: serde_json on a File issues a syscall per token.
        let mut buf = serde_json::to_vec_pretty(st)?;
        buf.push(b'\n');
        std::fs::write(&tmp, buf)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        tracing::debug!(error = %e, "cannot write status file");
    }
}

/// Refreshes the status file every second until `stop`, and once more at the end.
/// Every fifth second, from the second one on, it also reads the slot's lag on the
/// hub for the metric (not at once: a start that catches up is busy enough).
pub async fn publish(
    cfg: Config,
    reader: Option<Arc<dyn QueueReader + Send + Sync>>,
    cap: watch::Receiver<CaptureProgress>,
    apply: Option<watch::Receiver<ApplyStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let path = status_path_of(&cfg, apply.is_some());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut hub: Option<switchback_pg::hub::Session> = None;
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        let none = ApplyStatus::default();
        let mut st = match &apply {
            Some(a) => snapshot(reader.as_deref(), &cap.borrow(), &a.borrow(), true),
            None => snapshot(reader.as_deref(), &cap.borrow(), &none, false),
        };
        st.stopped = *stop.borrow();
        write_atomic(&path, &st);
        if st.stopped {
            return;
        }
        n += 1;
        if n % 5 == 2 {
            if hub.is_none() {
                if let Ok(c) = cfg.hub_pg() {
                    hub = switchback_pg::hub::connect(&c, "hub").await.ok();
                }
            }
            if let Some(h) = &hub {
                match switchback_pg::hub::slot_state(h, &cfg.slot_name()).await {
                    Ok(Some(s)) => {
                        if let Some(lag) = s.lag_bytes {
                            metrics::gauge!(metric::HUB_SLOT_LAG_BYTES).set(lag as f64);
                        }
                    }
                    Ok(None) => {}
                    Err(_) => hub = None,
                }
            }
        }
    }
}

/// Everything `status` prints.
#[derive(Debug, Serialize)]
struct Report {
    pipeline: String,
    slot: String,
    hub_reachable: bool,
    slot_exists: bool,
    slot_active: bool,
    slot_wal_status: Option<String>,
    slot_confirmed_lsn: Option<String>,
    slot_lag_bytes: Option<i64>,
    member_reachable: bool,
    member_applied_lsn: Option<String>,
    process_running: bool,
    process: Option<ProcessStatus>,
    queue_transactions: Option<u64>,
    queue_bytes: Option<u64>,
    /// Kafka: messages after apply's committed offset.
    queue_kafka_backlog_messages: Option<i64>,
    lag_seconds: Option<f64>,
    conflicts: std::collections::BTreeMap<String, u64>,
    problems: Vec<String>,
    /// Per-table seed state on the member (empty when seed never ran).
    seed: Vec<switchback_apply::handover::SeedTableState>,
    /// The recorded direction (hub_to_member, member_to_hub) and completed switches.
    direction: String,
    epoch: u64,
    /// An interrupted cutover/rollback: its kind and last recorded step.
    switch_in_progress: Option<String>,
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::commands::load(&a.config)?;
    // After a cutover the source is the member: report the recorded direction.
    let state = switchback_cutover::state::load(&switchback_cutover::state::path(&cfg))?;
    let cfg = cfg.for_direction(state.direction);
    let mut r = Report {
        direction: state.direction.as_str().to_string(),
        epoch: state.epoch,
        switch_in_progress: state
            .switch
            .as_ref()
            .map(|p| format!("{} after step {}", p.kind.as_str(), p.step.as_str())),
        pipeline: cfg.pipeline.name.clone(),
        slot: cfg.slot_name(),
        hub_reachable: false,
        slot_exists: false,
        slot_active: false,
        slot_wal_status: None,
        slot_confirmed_lsn: None,
        slot_lag_bytes: None,
        member_reachable: false,
        member_applied_lsn: None,
        process_running: false,
        process: None,
        queue_transactions: None,
        queue_bytes: None,
        queue_kafka_backlog_messages: None,
        lag_seconds: None,
        conflicts: Default::default(),
        problems: Vec::new(),
        seed: Vec::new(),
    };
    match switchback_pg::hub::connect(&cfg.hub_pg()?, "hub").await {
        Ok(hub) => {
            r.hub_reachable = true;
            match switchback_pg::hub::slot_state(&hub, &cfg.slot_name()).await {
                Ok(Some(s)) => {
                    r.slot_exists = true;
                    r.slot_active = s.active_pid.is_some();
                    r.slot_confirmed_lsn = s.confirmed_flush.map(|l| l.to_string());
                    r.slot_lag_bytes = s.lag_bytes;
                    if s.wal_status.as_deref() == Some("lost") {
                        r.problems.push("the slot is invalidated (wal_status = lost): the member must be re-seeded".into());
                    }
                    r.slot_wal_status = s.wal_status;
                }
                Ok(None) => r
                    .problems
                    .push("the hub has no slot for this pipeline yet (capture creates it)".into()),
                Err(e) => r.problems.push(format!("cannot read the slot: {e}")),
            }
        }
        Err(e) => r.problems.push(format!("hub unreachable: {e}")),
    }
    match switchback_pg::hub::connect(&cfg.member_pg()?, "member").await {
        Ok(m) => {
            r.member_reachable = true;
            match switchback_apply::progress::read(&m.client, &cfg.origin_name()).await {
                Ok(l) => r.member_applied_lsn = l.map(|l| l.to_string()),
                Err(e) => r.problems.push(format!("cannot read apply progress: {e}")),
            }
            match switchback_apply::handover::read_state(&m.client, &cfg.pipeline.name).await {
                Ok(s) => r.seed = s,
                Err(e) => r.problems.push(format!("cannot read the seed state: {e}")),
            }
        }
        Err(e) => r.problems.push(format!("member unreachable: {e}")),
    }
    let file: Option<ProcessStatus> = read_status_file(&cfg);
    let fresh = file
        .as_ref()
        .is_some_and(|f| !f.stopped && now_ms().saturating_sub(f.updated_unix_ms) < 5_000);
    if fresh {
        let f = file.clone().unwrap_or_default();
        r.process_running = true;
        r.queue_transactions = Some(f.queue_transactions);
        r.queue_bytes = Some(f.queue_bytes);
        if let Some(ap) = &f.apply {
            r.lag_seconds = Some(ap.lag_seconds);
            r.conflicts = ap.conflicts.clone();
        }
        r.process = Some(f);
    } else if cfg.queue.kind == QueueKind::Kafka {
        if let Some(f) = file {
            r.process = Some(f);
        }
    } else if cfg.queue.path.exists() {
        // Nothing running: the queue can be opened directly.
        match SledLog::open(&cfg.queue.path) {
            Ok(q) => {
                let d = q.depth()?;
                r.queue_transactions = Some(d.transactions);
                r.queue_bytes = Some(d.bytes);
            }
            Err(e) => r.problems.push(format!("cannot open the queue: {e}")),
        }
        if let Some(f) = file {
            if let Some(ap) = &f.apply {
                r.conflicts = ap.conflicts.clone();
            }
            r.process = Some(f);
        }
    }
    let unfinished: Vec<String> = r
        .seed
        .iter()
        .filter(|s| !s.done())
        .map(|s| s.display())
        .collect();
    if !unfinished.is_empty() && !r.process_running {
        r.problems.push(format!(
            "the seed of {} is unfinished (a seed is running, or was interrupted: then run `switchback seed` again)",
            unfinished.join(", ")
        ));
    }
    if let Some(p) = &state.switch {
        r.problems.push(format!(
            "an interrupted {} stopped after step {}: run `switchback {}` again to resume it",
            p.kind.as_str(),
            p.step.as_str(),
            p.kind.as_str()
        ));
    }
    if cfg.queue.kind == QueueKind::Kafka {
        // What apply has not acknowledged: messages after the group's committed offset.
        let opts = crate::commands::kafka_options(&cfg)?;
        match tokio::task::spawn_blocking(move || switchback_kafka::backlog_messages(&opts)).await?
        {
            Ok(n) => r.queue_kafka_backlog_messages = Some(n),
            Err(e) => r.problems.push(format!("cannot read the kafka topic: {e}")),
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r);
    }
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn print_report(r: &Report) {
    let dash = || "-".to_string();
    println!("pipeline          {}", r.pipeline);
    println!(
        "direction         {} (epoch {}){}",
        r.direction,
        r.epoch,
        r.switch_in_progress
            .as_ref()
            .map_or(String::new(), |s| format!(", interrupted {s}"))
    );
    println!(
        "process           {}",
        if r.process_running {
            format!("running (pid {})", r.process.as_ref().map_or(0, |p| p.pid))
        } else {
            "not running".into()
        }
    );
    println!(
        "hub slot          {} {}",
        r.slot,
        if !r.slot_exists {
            "(missing)".to_string()
        } else if r.slot_active {
            "(active)".to_string()
        } else {
            "(inactive)".to_string()
        }
    );
    println!(
        "  confirmed       {}   wal_status {}",
        r.slot_confirmed_lsn.clone().unwrap_or_else(dash),
        r.slot_wal_status.clone().unwrap_or_else(dash)
    );
    println!(
        "  lag             {}",
        r.slot_lag_bytes.map_or_else(dash, |b| format!("{b} bytes"))
    );
    println!(
        "queue             {} transactions, {} bytes",
        r.queue_transactions.map_or_else(dash, |v| v.to_string()),
        r.queue_bytes.map_or_else(dash, |v| v.to_string())
    );
    if let Some(n) = r.queue_kafka_backlog_messages {
        println!("kafka backlog     {n} messages not acknowledged by apply");
    }
    let ap = r.process.as_ref().and_then(|p| p.apply.as_ref());
    println!(
        "member applied    {}   (hub commit {})",
        r.member_applied_lsn.clone().unwrap_or_else(dash),
        ap.and_then(|a| a.last_commit_time.clone())
            .unwrap_or_else(dash)
    );
    println!(
        "apply lag         {}",
        r.lag_seconds.map_or_else(dash, |s| format!("{s:.3} s"))
    );
    if r.conflicts.is_empty() {
        println!("conflicts         none");
    } else {
        let list: Vec<String> = r
            .conflicts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("conflicts         {}", list.join(", "));
    }
    for s in &r.seed {
        println!(
            "seed              {} {} at {} ({} rows, chunks {}/{}{})",
            s.display(),
            s.state,
            s.sync_lsn,
            s.rows,
            s.chunks_done,
            s.chunks_total,
            s.finished_at
                .as_deref()
                .map_or(String::new(), |f| format!(", finished {f}"))
        );
    }
    for p in &r.problems {
        println!("problem           {p}");
    }
}
