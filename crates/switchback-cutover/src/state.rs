//! The pipeline's durable state: which direction `run` follows, the epoch, and
//! the switch (cutover or rollback) in progress with its last completed step.
//!
//! Stored as JSON in `<queue.path>.state.json` (the forward queue's path), written
//! atomically: a temporary file is written and fsynced, renamed over the old one,
//! and the directory fsynced. A step is recorded only after it took effect, and
//! every step is idempotent, so a command killed between doing a step and
//! recording it simply does it again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use switchback_config::{Config, Direction};

/// A database: the hub (blue) or the member (green).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Hub,
    Member,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Hub => "hub",
            Side::Member => "member",
        }
    }
}

/// Which switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchKind {
    /// hub → member becomes member → hub: the member becomes the primary.
    Cutover,
    /// Back: the hub becomes the primary again.
    Rollback,
}

impl SwitchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchKind::Cutover => "cutover",
            SwitchKind::Rollback => "rollback",
        }
    }
    /// The direction in force before the switch.
    pub fn from_direction(self) -> Direction {
        match self {
            SwitchKind::Cutover => Direction::HubToMember,
            SwitchKind::Rollback => Direction::MemberToHub,
        }
    }
    /// The primary before the switch (fenced) and after it (opened).
    pub fn old_primary(self) -> Side {
        match self {
            SwitchKind::Cutover => Side::Hub,
            SwitchKind::Rollback => Side::Member,
        }
    }
    pub fn new_primary(self) -> Side {
        match self {
            SwitchKind::Cutover => Side::Member,
            SwitchKind::Rollback => Side::Hub,
        }
    }
}

/// The steps of a switch, in order. Each is recorded once it took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Preflight passed; nothing changed yet.
    Started,
    /// The new direction's publication and slot exist on the new primary (created
    /// before the fence, so it does not lengthen the write pause).
    ReverseReady,
    /// The old primary is fenced against application writes.
    Fenced,
    /// The fence marker is written on the old primary; `fence_lsn` is known.
    Marked,
    /// Apply committed everything up to the fence position on the new primary.
    Drained,
    /// Sequences moved forward on the new primary.
    SequencesSynced,
    /// The recorded direction is the new one (`run` follows it).
    Switched,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Started,
        Step::ReverseReady,
        Step::Fenced,
        Step::Marked,
        Step::Drained,
        Step::SequencesSynced,
        Step::Switched,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Started => "started",
            Step::Fenced => "fenced",
            Step::Marked => "marked",
            Step::Drained => "drained",
            Step::SequencesSynced => "sequences_synced",
            Step::ReverseReady => "reverse_ready",
            Step::Switched => "switched",
        }
    }
}

/// A sequence moved forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceMove {
    pub sequence: String,
    pub from: i64,
    pub to: i64,
}

/// A switch in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchProgress {
    pub kind: SwitchKind,
    pub step: Step,
    /// The old primary's WAL position at the fence marker.
    pub fence_lsn: Option<String>,
    pub started_unix_ms: u64,
    pub fenced_unix_ms: Option<u64>,
    #[serde(default)]
    pub sequences: Vec<SequenceMove>,
}

/// What a completed switch reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReport {
    pub kind: SwitchKind,
    pub epoch: u64,
    pub fence_lsn: String,
    /// From the fence to the open hook (application writes refused meanwhile).
    pub write_pause_ms: u64,
    pub sequences: Vec<SequenceMove>,
    /// Whether this run resumed an interrupted switch (and from which step).
    pub resumed_from: Option<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineState {
    pub version: u32,
    /// The direction `switchback run` follows.
    pub direction: Direction,
    /// Completed switches.
    pub epoch: u64,
    /// The sides currently fenced against application writes.
    pub fenced: Vec<Side>,
    pub switch: Option<SwitchProgress>,
    pub last_report: Option<SwitchReport>,
}

impl Default for PipelineState {
    fn default() -> Self {
        PipelineState {
            version: 1,
            direction: Direction::HubToMember,
            epoch: 0,
            fenced: Vec::new(),
            switch: None,
            last_report: None,
        }
    }
}

/// `<queue.path>.state.json` of the forward direction.
pub fn path(cfg: &Config) -> PathBuf {
    let fwd = cfg.for_direction(Direction::HubToMember);
    let mut p = fwd.queue.path.into_os_string();
    p.push(".state.json");
    PathBuf::from(p)
}

/// Reads the state; a missing file is the initial state (hub → member, epoch 0).
pub fn load(path: &Path) -> std::io::Result<PipelineState> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            std::io::Error::other(format!(
                "pipeline state file {} is unreadable: {e}. It records the direction and any \
                 switch in progress; restore it from a backup rather than deleting it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PipelineState::default()),
        Err(e) => Err(e),
    }
}

/// Writes the state durably (temporary file, fsync, rename, fsync of the directory).
pub fn save(path: &Path, st: &PipelineState) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_default() {
        let dir = std::env::temp_dir().join(format!("sb-state-{}", std::process::id()));
        let p = dir.join("q.state.json");
        assert_eq!(load(&p).unwrap(), PipelineState::default());
        let st = PipelineState {
            switch: Some(SwitchProgress {
                kind: SwitchKind::Cutover,
                step: Step::Marked,
                fence_lsn: Some("0/16B3748".into()),
                started_unix_ms: 1,
                fenced_unix_ms: Some(2),
                sequences: vec![],
            }),
            ..PipelineState::default()
        };
        save(&p, &st).unwrap();
        assert_eq!(load(&p).unwrap(), st);
        std::fs::write(&p, b"{").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("unreadable"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn steps_are_ordered() {
        assert!(Step::ALL.windows(2).all(|w| w[0] < w[1]));
    }
}
