//! One replication session: connect, stream, store, acknowledge.
//!
//! Three tasks cooperate:
//! * the **reader** owns the socket's read half, decodes walsender frames and passes
//!   them on through a channel bounded in bytes (backpressure); a keepalive that asks for a
//!   reply wakes the status task at once;
//! * the **status** task owns the write half and sends a Standby Status Update with the
//!   acknowledged position at least every `status_interval` and whenever asked, so
//!   the walsender never times out even while storage is slow;
//! * the **session** loop (this function) assembles transactions into the queue,
//!   flushes it in groups and then publishes the new acknowledged position.

use std::sync::Arc;
use std::time::Duration;

use switchback_config::Config;
use switchback_core::{metric, Lsn};
use switchback_pg::hub;
use switchback_pg::replication::{FrameReader, FrameWriter, ReplicationClient, StreamEvent};
use switchback_pg::PgError;
use switchback_pgoutput::{decode_frame, Decoder, ReplicationFrame};
use switchback_queue::{BackgroundFlush, QueueError, QueueWriter};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::assemble::{Assembler, Step};
use crate::setup::Plan;
use crate::{CaptureError, CaptureProgress};

enum Frame {
    Data {
        data: Vec<u8>,
        /// Its bytes' share of [`READ_AHEAD_BYTES`], given back once handled.
        _budget: OwnedSemaphorePermit,
    },
    Keepalive {
        wal_end: u64,
    },
    End,
}

/// Bytes of walsender frames the reader task reads ahead of the session (a frame
/// larger than this is read alone). A count bound would not bound memory (a
/// frame holds a whole row); this one also lets the walsender go on decoding
/// while the session waits, e.g. for the queue to open at start (20,000 pgbench
/// transactions are about 10 MiB of frames).
const READ_AHEAD_BYTES: usize = 16 * 1024 * 1024;
/// Commits between two forced flushes under continuous load.
const MAX_UNFLUSHED_COMMITS: usize = 2000;
/// Under continuous load (the frame channel never drains), a reader in this process
/// is told about new transactions at least every this many commits.
const PUBLISH_EVERY_COMMITS: usize = 250;
/// Flushes (each an fsync, then a status update that makes the walsender save
/// its slot) start at most this often. Readers in this process see transactions
/// when they are committed, not when they are durable, so this only delays the
/// slot's acknowledgement, and it saves CPU on both sides while a backlog drains
/// (measured on the drain bench: 10 ms meant about 30 sled flushes per 20,000
/// transactions; 50 ms about 10, one per [`MAX_UNFLUSHED_COMMITS`], and 2-3
/// fewer CPU ticks of this process).
const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Acknowledges the hub up to `to` once everything stored up to it is durable: the
/// status task reports it, and progress and the metric follow. Never moves back.
fn advance_ack(
    acked: &mut Lsn,
    to: Lsn,
    ack_tx: &watch::Sender<Lsn>,
    progress: &watch::Sender<CaptureProgress>,
) {
    if to > *acked {
        *acked = to;
        ack_tx.send_replace(to);
        metrics::gauge!(metric::CAPTURE_ACKED_LSN).set(to.0 as f64);
        progress.send_modify(|p| p.acked = to);
    }
}

/// Stops a task when dropped: a stream started but never used must not keep the
/// slot busy (its reader task owns the socket).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A replication stream started and not read yet.
pub struct Started {
    /// Frames read so far (the reader task starts with the stream, so the
    /// walsender is read while the queue still opens).
    frames: mpsc::UnboundedReceiver<Result<Frame, CaptureError>>,
    reader_task: AbortOnDrop,
    /// Woken when the walsender asks for a reply.
    reply_now: Arc<Notify>,
    writer: FrameWriter,
    /// How often the status task reports at least (a third of wal_sender_timeout).
    status_interval: Duration,
}

/// A replication connection to the hub, not streaming yet: `run` opens it while
/// the hub is being checked, then starts the stream on it ([`start_on`]).
pub struct Connection {
    client: ReplicationClient,
    status_interval: Duration,
}

/// Opens the replication connection and reads what the stream's status needs.
pub async fn connect(cfg: &Config) -> Result<Connection, CaptureError> {
    let hub_cfg = cfg
        .hub_pg()
        .map_err(|e| CaptureError::Setup(e.to_string()))?;
    let mut client = ReplicationClient::connect(
        &hub_cfg,
        &format!("switchback_capture_{}", cfg.pipeline.name),
    )
    .await?;
    // wal_sender_timeout: status at least every third of it.
    let timeout_ms = client
        .simple_query("SHOW wal_sender_timeout")
        .await
        .ok()
        .and_then(|rows| rows.first().cloned())
        .and_then(|r| r.into_iter().next().flatten())
        .and_then(|v| parse_pg_duration_ms(&v))
        .unwrap_or(cfg.capture.wal_sender_timeout_ms);
    let mut status_interval = Duration::from_millis(cfg.capture.status_interval_ms.max(10));
    if timeout_ms > 0 {
        status_interval = status_interval.min(Duration::from_millis((timeout_ms / 3).max(10)));
    }
    Ok(Connection {
        client,
        status_interval,
    })
}

/// Connects to the hub and starts the replication stream at `from`, before any
/// of it is read: `run` starts it from the slot's position while its queue
/// still opens, so the walsender decodes meanwhile (the session then drops
/// what the queue already holds, see [`Assembler`]).
pub async fn start(cfg: &Config, plan: &Plan, from: Lsn) -> Result<Started, CaptureError> {
    start_on(connect(cfg).await?, plan, from).await
}

/// As [`start`], on a connection opened before.
pub async fn start_on(conn: Connection, plan: &Plan, from: Lsn) -> Result<Started, CaptureError> {
    let Connection {
        client,
        status_interval,
    } = conn;
    let mut options = vec![
        ("proto_version", format!("'{}'", plan.proto_version)),
        (
            "publication_names",
            switchback_core::quote_literal(
                &plan
                    .publications
                    .iter()
                    .map(|p| switchback_core::quote_ident(p))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ),
    ];
    if plan.server_version >= 140000 {
        options.push(("messages", "'true'".into()));
    }
    if plan.streaming {
        options.push(("streaming", "'on'".into()));
    }
    if plan.server_version >= 160000 {
        // Loop prevention on the server (PG16+): transactions that carry any
        // replication origin (what a switchback apply wrote) are not sent. On PG15
        // the Origin message is filtered here instead (see `Assembler::with_echo_filter`).
        options.push(("origin", "'none'".into()));
    }
    let (mut reader, writer) = client.start_replication(&plan.slot, from, &options).await?;
    tracing::info!(slot = %plan.slot, start = %from, "replication stream started");
    // A stream starts behind, as a rule: read it in batches (see `batch_reads`).
    reader.batch_reads();
    let (frames, reader_task, reply_now) = spawn_reader(reader);
    let reader_task = AbortOnDrop(reader_task);
    Ok(Started {
        frames,
        reader_task,
        reply_now,
        writer,
        status_interval,
    })
}

/// Streams into `queue` until shutdown or an error; `started` is a stream
/// already started (otherwise one starts at what the queue holds).
pub async fn session<Q: QueueWriter + Send>(
    cfg: &Config,
    plan: &Plan,
    started: Option<Started>,
    queue: &mut Q,
    shutdown: &mut watch::Receiver<bool>,
    progress: &watch::Sender<CaptureProgress>,
) -> Result<(), CaptureError> {
    let start = queue.last_end_lsn().unwrap_or(Lsn::ZERO);
    let Started {
        mut frames,
        reader_task,
        reply_now,
        mut writer,
        status_interval,
    } = match started {
        Some(s) => s,
        None => self::start(cfg, plan, start).await?,
    };

    // The acknowledged position starts at what the queue already holds durably.
    let (ack_tx, ack_rx) = watch::channel(start);
    progress.send_modify(|p| {
        p.connected = true;
        p.acked = p.acked.max(start);
    });
    let (stop_status_tx, mut stop_status) = watch::channel(false);
    let status_task = {
        let reply_now = reply_now.clone();
        let mut ack_rx = ack_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(status_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = reply_now.notified() => {}
                    r = ack_rx.changed() => { if r.is_err() { break; } }
                    _ = stop_status.changed() => break,
                }
                let acked = *ack_rx.borrow_and_update();
                writer.send_status(acked, acked, acked, false).await?;
            }
            // Final acknowledgement, then end the stream.
            let acked = *ack_rx.borrow();
            writer.send_status(acked, acked, acked, false).await?;
            let _ = writer.close().await;
            Ok::<(), PgError>(())
        })
    };

    let mut decoder = Decoder::new(plan.proto_version, false);
    let mut asm = Assembler::new(cfg.capture.chunk_bytes).with_echo_filter(Some(cfg.echo_origin()));
    // Highest end position handled (stored, empty or duplicate) since the last flush.
    let mut handled: Option<Lsn> = None;
    let mut unflushed_commits = 0usize;
    let mut acked = start;
    let mut stored = start;
    let mut unpublished_commits = 0usize;
    // When the last flush started; the next waits until MIN_FLUSH_INTERVAL after it.
    let mut last_flush = tokio::time::Instant::now() - MIN_FLUSH_INTERVAL;
    let mut flush_timer = false;
    // One timer, re-armed when a flush must wait (a new `Sleep` per loop turn would
    // re-register with the timer wheel, and wake the runtime's driver, every time).
    let flush_sleep = tokio::time::sleep_until(last_flush);
    tokio::pin!(flush_sleep);

    // A flush running in the background and the end position it makes durable:
    // capture goes on decoding while the queue syncs to disk.
    let mut inflight: Option<(BackgroundFlush, Lsn)> = None;

    let result: Result<(), CaptureError> = async {
        loop {
            enum Event {
                Frame(Option<Result<Frame, CaptureError>>),
                Flushed(Result<(), QueueError>),
                FlushDue,
            }
            let flushed = async {
                match inflight.as_mut() {
                    Some((f, _)) => f.await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                r = flushed => Event::Flushed(r),
                f = frames.recv() => Event::Frame(f),
                _ = &mut flush_sleep, if flush_timer => Event::FlushDue,
                _ = shutdown.changed() => Event::Frame(None),
            };
            match event {
                Event::Flushed(r) => {
                    r?;
                    let (_, lsn) = inflight.take().expect("a flush was in flight");
                    advance_ack(&mut acked, lsn, &ack_tx, progress);
                }
                Event::FlushDue => flush_timer = false,
                Event::Frame(None) => {
                    if *shutdown.borrow() {
                        break Ok(());
                    }
                    return Err(PgError::Io {
                        endpoint: "hub".into(),
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    }
                    .into());
                }
                Event::Frame(Some(frame)) => match frame? {
                    Frame::End => {
                        return Err(PgError::Io {
                            endpoint: "hub".into(),
                            source: std::io::Error::other("the hub ended the replication stream"),
                        }
                        .into())
                    }
                    Frame::Keepalive { wal_end } => {
                        // Idle: nothing in progress and everything stored is durable.
                        if asm.idle()
                            && handled.is_none()
                            && inflight.is_none()
                            && Lsn(wal_end) > acked
                        {
                            acked = Lsn(wal_end);
                            ack_tx.send_replace(acked);
                            progress.send_modify(|p| p.acked = acked);
                        }
                    }
                    Frame::Data { data, .. } => {
                        let msg = decoder
                            .decode(&data)
                            .map_err(|e| CaptureError::Decode(e.to_string()))?;
                        if let Step::Committed { end_lsn, stored: s } = asm.handle(queue, msg)? {
                            handled = Some(handled.map_or(end_lsn, |h| h.max(end_lsn)));
                            if s {
                                unflushed_commits += 1;
                                unpublished_commits += 1;
                                stored = end_lsn;
                            }
                        }
                    }
                },
            }
            // Group commit: flush when the channel is drained or enough piled up;
            // one flush at a time (the next group waits for the one in flight).
            let Some(h) = handled else { continue };
            let drained = frames.is_empty();
            if unpublished_commits > 0 && (drained || unpublished_commits >= PUBLISH_EVERY_COMMITS)
            {
                // Visible to apply in this process now, durable with the next flush.
                unpublished_commits = 0;
                progress.send_modify(|p| p.stored = stored);
            }
            let due = drained || unflushed_commits >= MAX_UNFLUSHED_COMMITS;
            if !due {
                continue;
            }
            if unflushed_commits > 0
                && unflushed_commits < MAX_UNFLUSHED_COMMITS
                && tokio::time::Instant::now() < last_flush + MIN_FLUSH_INTERVAL
            {
                if !flush_timer {
                    flush_timer = true;
                    flush_sleep.as_mut().reset(last_flush + MIN_FLUSH_INTERVAL);
                }
                continue;
            }
            if let Some((f, lsn)) = inflight.as_mut() {
                if unflushed_commits < MAX_UNFLUSHED_COMMITS {
                    continue;
                }
                // Too much piled up behind the flush in flight: wait for it.
                f.await?;
                let lsn = *lsn;
                inflight = None;
                advance_ack(&mut acked, lsn, &ack_tx, progress);
            }
            metrics::counter!(metric::CAPTURE_TRANSACTIONS_TOTAL).increment(asm.stored_txns);
            metrics::counter!(metric::CAPTURE_CHANGES_TOTAL).increment(asm.stored_changes);
            metrics::counter!(metric::CAPTURE_DUPLICATES_TOTAL).increment(asm.duplicates);
            metrics::counter!(metric::CAPTURE_ECHOES_DROPPED_TOTAL, "direction" => cfg.direction.as_str())
                .increment(asm.echoes);
            asm.echoes = 0;
            asm.stored_txns = 0;
            asm.stored_changes = 0;
            asm.duplicates = 0;
            handled = None;
            if unflushed_commits > 0 {
                unflushed_commits = 0;
                last_flush = tokio::time::Instant::now();
                tracing::debug!(upto = %h, "flushing the queue");
                metrics::counter!(metric::CAPTURE_FLUSHES_TOTAL).increment(1);
                match queue.flush_in_background() {
                    Some(f) => {
                        inflight = Some((f?, h));
                        continue;
                    }
                    None => queue.flush().await?,
                }
            }
            advance_ack(&mut acked, h, &ack_tx, progress);
        }
    }
    .await;

    // A flush in flight finishes first; its position is acknowledged below with the rest.
    if let Some((f, lsn)) = inflight.take() {
        if f.await.is_ok() && result.is_ok() {
            handled = Some(handled.map_or(lsn, |h| h.max(lsn)));
        }
    }

    // Whatever happened, drop half-written transactions and make the rest durable
    // before the final acknowledgement.
    let cleanup = async {
        asm.abandon(queue)?;
        queue.flush().await?;
        Ok::<_, CaptureError>(())
    }
    .await;
    if result.is_ok() {
        if let Some(h) = handled {
            if h > acked {
                ack_tx.send_replace(h);
                progress.send_modify(|p| p.acked = h);
            }
        }
    }
    let _ = stop_status_tx.send(true);
    drop(reader_task);
    let status_result = tokio::time::timeout(Duration::from_secs(5), status_task).await;
    result?;
    cleanup?;
    match status_result {
        Ok(Ok(Err(e))) => Err(e.into()),
        _ => Ok(()),
    }
}

/// The reader task: owns the socket's read half, decodes walsender frames and
/// passes them on through a channel bounded in bytes (backpressure); a keepalive that asks
/// for a reply wakes the status task at once (`reply_now`).
fn spawn_reader(
    mut reader: FrameReader,
) -> (
    mpsc::UnboundedReceiver<Result<Frame, CaptureError>>,
    tokio::task::JoinHandle<()>,
    Arc<Notify>,
) {
    let reply_now = Arc::new(Notify::new());
    let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    let (frames_tx, frames) = mpsc::unbounded_channel::<Result<Frame, CaptureError>>();
    let task = {
        let reply_now = reply_now.clone();
        tokio::spawn(async move {
            loop {
                let ev = match reader.next().await {
                    Ok(ev) => ev,
                    Err(e) => {
                        let _ = frames_tx.send(Err(e.into()));
                        return;
                    }
                };
                let frame = match ev {
                    StreamEvent::End => {
                        let _ = frames_tx.send(Ok(Frame::End));
                        return;
                    }
                    StreamEvent::Data(bytes) => match decode_frame(&bytes) {
                        Ok(ReplicationFrame::XLogData { data, .. }) => {
                            let n = data.len().clamp(1, READ_AHEAD_BYTES) as u32;
                            let Ok(permit) = budget.clone().acquire_many_owned(n).await else {
                                return;
                            };
                            Frame::Data {
                                data,
                                _budget: permit,
                            }
                        }
                        Ok(ReplicationFrame::Keepalive {
                            wal_end,
                            reply_requested,
                            ..
                        }) => {
                            if reply_requested {
                                reply_now.notify_one();
                            }
                            Frame::Keepalive { wal_end }
                        }
                        Err(e) => {
                            let _ = frames_tx.send(Err(CaptureError::Decode(e.to_string())));
                            return;
                        }
                    },
                };
                if frames_tx.send(Ok(frame)).is_err() {
                    return;
                }
            }
        })
    };
    (frames, task, reply_now)
}

/// Parses `SHOW wal_sender_timeout` output (`60s`, `500ms`, `1min`, `0`).
fn parse_pg_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    })
}

/// Turns a definite error into the clearest message: an invalidated slot says so.
pub async fn explain(cfg: &Config, e: CaptureError) -> CaptureError {
    if let CaptureError::Pg(pg) = &e {
        if pg.code().as_deref() == Some("55000") {
            if let Ok(hub_cfg) = cfg.hub_pg() {
                if let Ok(session) = hub::connect(&hub_cfg, "hub").await {
                    if let Ok(Some(s)) = hub::slot_state(&session, &cfg.slot_name()).await {
                        if s.wal_status.as_deref() == Some("lost") {
                            return hub::slot_lost_error(&session.endpoint, &cfg.slot_name())
                                .into();
                        }
                    }
                }
            }
        }
    }
    e
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_pg_duration_ms("60s"), Some(60_000));
        assert_eq!(super::parse_pg_duration_ms("500ms"), Some(500));
        assert_eq!(super::parse_pg_duration_ms("1min"), Some(60_000));
        assert_eq!(super::parse_pg_duration_ms("0"), Some(0));
    }
}
