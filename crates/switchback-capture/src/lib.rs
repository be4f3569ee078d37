//! Capture: reads the hub's changes through logical replication (pgoutput) and
//! stores committed transactions durably in the queue.
//!
//! * [`setup`] checks the hub and creates the publication, then the slot.
//! * [`stream`] runs one replication session: decode, assemble, store, acknowledge.
//! * [`run`] reconnects with backoff on transient errors until shutdown.
//!
//! **Invariant:** the slot is acknowledged up to a position only once every
//! transaction ending at or before it is durable in the queue (Commit `end_lsn`
//! after a flush; keepalive `walEnd` only when idle and everything is durable).

pub mod assemble;
pub mod setup;
pub mod stream;

use std::time::Duration;

use switchback_config::Config;
use switchback_core::{Classify, ErrorClass, Lsn};
use switchback_pg::PgError;
use switchback_queue::{QueueError, QueueWriter};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Pg(Box<PgError>),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("decoding the hub's stream: {0}")]
    Decode(String),
    #[error("{0}")]
    Setup(String),
}

impl From<PgError> for CaptureError {
    fn from(e: PgError) -> Self {
        CaptureError::Pg(Box::new(e))
    }
}

impl Classify for CaptureError {
    fn class(&self) -> ErrorClass {
        match self {
            CaptureError::Pg(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

/// What capture reports while it runs.
#[derive(Debug, Clone, Default)]
pub struct CaptureProgress {
    /// Last position acknowledged to the hub's slot.
    pub acked: Lsn,
    /// End LSN of the last transaction committed to the queue: visible to a reader
    /// in this process, durable only up to `acked`. Apply in `run` wakes on it.
    pub stored: Lsn,
    /// Whether the replication stream is connected.
    pub connected: bool,
}

/// Runs capture until `shutdown` turns true or a definite error occurs.
/// Transient errors (connection lost, walsender terminated, hub restarting) are
/// retried with exponential backoff.
pub async fn run<Q: QueueWriter + Send>(
    cfg: &Config,
    queue: &mut Q,
    shutdown: watch::Receiver<bool>,
    progress: watch::Sender<CaptureProgress>,
) -> Result<(), CaptureError> {
    let plan = setup::prepare(cfg).await?;
    run_prepared(cfg, plan, None, queue, shutdown, progress).await
}

/// As [`run`], with the hub already prepared and perhaps the stream started
/// (`run` does both while its queue opens, see [`setup::prepare_after`] and
/// [`stream::start`]).
pub async fn run_prepared<Q: QueueWriter + Send>(
    cfg: &Config,
    plan: setup::Plan,
    mut early: Option<stream::Started>,
    queue: &mut Q,
    mut shutdown: watch::Receiver<bool>,
    progress: watch::Sender<CaptureProgress>,
) -> Result<(), CaptureError> {
    // Gap detection: an empty queue's first transaction follows the slot's position.
    if queue.last_end_lsn().is_none() {
        queue.start_at(plan.slot_start);
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        match stream::session(cfg, &plan, early.take(), queue, &mut shutdown, &progress).await {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::Transient => {
                progress.send_modify(|p| p.connected = false);
                metrics::counter!(switchback_core::metric::CAPTURE_RECONNECTS_TOTAL).increment(1);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                let jitter = Duration::from_millis(fastrand_ms(backoff.as_millis() as u64 / 4 + 1));
                tracing::warn!(error = %e, retry_in = ?(backoff + jitter), "replication stream interrupted; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(stream::explain(cfg, e).await),
        }
    }
}

fn fastrand_ms(max: u64) -> u64 {
    // Cheap jitter without a dependency: the low bits of the clock.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % max.max(1)
}
