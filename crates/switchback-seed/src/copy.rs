//! The copy workers: each holds one hub session inside the exported snapshot and
//! one member session, and copies chunks (a whole table or a ctid range of one)
//! with COPY streamed from the hub straight into the member.
//!
//! Memory per worker is bounded by one batch ([`BATCH_BYTES`]) plus what
//! tokio-postgres buffers per connection: nothing is staged on disk or in memory.
//!
//! **Invariant:** a chunk's rows and its count in the table's seed state commit in
//! one member transaction; the chunk that completes the table turns its state to
//! `done` in that same transaction.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use switchback_core::{metric, quote_ident, quote_literal};
use tokio_postgres::Client;

use crate::{db_err, SeedError};

/// Bytes gathered from the hub before they are sent to the member.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Session settings of both sides: text values are printed and parsed the same
/// way on both (as the replication connection pins them).
const PIN: &str = "SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3; \
                   SET client_encoding = 'UTF8'";

/// Live progress of one table (read by the reporter).
#[derive(Debug)]
pub struct TableProgress {
    pub display: String,
    pub est_rows: Option<u64>,
    pub chunks: usize,
    pub chunks_done: AtomicUsize,
    /// Rows committed on the member.
    pub rows: AtomicU64,
    /// COPY bytes streamed (committed or not).
    pub bytes: AtomicU64,
    pub started: Mutex<Option<Instant>>,
    pub finished: AtomicBool,
}

/// A table to copy.
#[derive(Debug)]
pub struct TablePlan {
    pub schema: String,
    pub table: String,
    /// `(SELECT cols FROM [ONLY] table` — the conditions and `)` are appended.
    pub select: String,
    /// The table's row filter (`[[tables.table]] row_filter`), on the hub's columns.
    pub filter: Option<String>,
    /// `COPY member (cols) FROM STDIN (FORMAT ...)`.
    pub copy_in: String,
    pub binary: bool,
    pub progress: Arc<TableProgress>,
}

/// A piece of work: a table, or pages `[from, to)` of it (`to = None`: to the end).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub table: Arc<TablePlan>,
    pub range: Option<(u64, Option<u64>)>,
}

impl Chunk {
    fn copy_out(&self) -> String {
        let mut conds = Vec::new();
        match self.range {
            None => {}
            Some((from, None)) => conds.push(format!("ctid >= '({from},0)'::tid")),
            Some((from, Some(to))) => conds.push(format!(
                "ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid"
            )),
        }
        if let Some(f) = &self.table.filter {
            conds.push(format!("({f})"));
        }
        let cond = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let fmt = if self.table.binary { "binary" } else { "text" };
        format!("COPY {}{cond}) TO STDOUT (FORMAT {fmt})", self.table.select)
    }
}

/// Splits `pages` into ranges of about `chunk_pages`; the last one is open-ended
/// (pages added after planning hold no row of the snapshot, but the range must
/// not depend on that).
pub fn ranges(pages: u64, chunk_pages: u64) -> Vec<Option<(u64, Option<u64>)>> {
    let chunk_pages = chunk_pages.max(1);
    if pages <= chunk_pages {
        return vec![None];
    }
    let n = pages.div_ceil(chunk_pages);
    (0..n)
        .map(|i| {
            let from = i * chunk_pages;
            let to = (i + 1 < n).then_some((i + 1) * chunk_pages);
            Some((from, to))
        })
        .collect()
}

/// What one worker needs.
pub struct WorkerSetup {
    pub hub: tokio_postgres::Config,
    pub member: tokio_postgres::Config,
    pub snapshot: String,
    pub pipeline: String,
    pub queue: Arc<Mutex<VecDeque<Chunk>>>,
    pub replica_role: bool,
}

async fn connect(cfg: &tokio_postgres::Config, side: &str) -> Result<Client, SeedError> {
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| db_err(format!("connecting to the {side}"), e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "seed connection ended");
        }
    });
    Ok(client)
}

/// Runs one worker until the queue is empty. Returns the chunks it copied.
pub async fn worker(id: usize, w: Arc<WorkerSetup>) -> Result<usize, SeedError> {
    let hub = connect(&w.hub, "hub").await?;
    hub.batch_execute(&format!(
        "{PIN}; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(&w.snapshot)
    ))
    .await
    .map_err(|e| db_err("importing the exported snapshot on the hub", e))?;
    let mut member = connect(&w.member, "member").await?;
    member
        .batch_execute(PIN)
        .await
        .map_err(|e| db_err("setting up the member session", e))?;
    if w.replica_role {
        // Member triggers and foreign keys do not fire during the copy (as for apply).
        member
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(|e| db_err("SET session_replication_role = replica", e))?;
    }
    let mut done = 0;
    loop {
        let next = w.queue.lock().expect("chunk queue").pop_front();
        let Some(chunk) = next else { break };
        copy_chunk(id, &hub, &mut member, &chunk, &w.pipeline).await?;
        done += 1;
    }
    hub.batch_execute("COMMIT")
        .await
        .map_err(|e| db_err("ending the snapshot transaction on the hub", e))?;
    tracing::info!(job = id, chunks = done, "copy job finished");
    Ok(done)
}

async fn copy_chunk(
    job: usize,
    hub: &Client,
    member: &mut Client,
    chunk: &Chunk,
    pipeline: &str,
) -> Result<(), SeedError> {
    let t = &chunk.table;
    let p = &t.progress;
    p.started
        .lock()
        .expect("progress")
        .get_or_insert_with(Instant::now);
    let what = match chunk.range {
        None => format!("copying {}", p.display),
        Some((from, to)) => format!(
            "copying {} pages {from}..{}",
            p.display,
            to.map_or("end".to_string(), |t| t.to_string())
        ),
    };
    tracing::debug!(job, "{what}");
    let tx = member
        .transaction()
        .await
        .map_err(|e| db_err(format!("{what}: member"), e))?;
    let sink = tx
        .copy_in::<_, Bytes>(t.copy_in.as_str())
        .await
        .map_err(|e| db_err(format!("{what}: member"), e))?;
    let stream = hub
        .copy_out(chunk.copy_out().as_str())
        .await
        .map_err(|e| db_err(format!("{what}: hub"), e))?;
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    while let Some(data) = stream.next().await {
        let data = data.map_err(|e| db_err(format!("{what}: hub"), e))?;
        buf.extend_from_slice(&data);
        if buf.len() >= BATCH_BYTES {
            let n = buf.len() as u64;
            sink.send(buf.split().freeze())
                .await
                .map_err(|e| db_err(format!("{what}: member"), e))?;
            buf.reserve(BATCH_BYTES);
            p.bytes.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(metric::SEED_BYTES_TOTAL).increment(n);
        }
    }
    if !buf.is_empty() {
        let n = buf.len() as u64;
        sink.send(buf.split().freeze())
            .await
            .map_err(|e| db_err(format!("{what}: member"), e))?;
        p.bytes.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(metric::SEED_BYTES_TOTAL).increment(n);
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| db_err(format!("{what}: member"), e))?;
    // Serialised by the row lock: the chunk that completes the table marks it done.
    let state: String = tx
        .query_one(
            "UPDATE switchback.seed_tables SET chunks_done = chunks_done + 1, rows = rows + $4, \
                 state = CASE WHEN chunks_done + 1 >= chunks_total THEN 'done' ELSE state END, \
                 finished_at = CASE WHEN chunks_done + 1 >= chunks_total THEN now() END \
             WHERE pipeline = $1 AND table_schema = $2 AND table_name = $3 RETURNING state",
            &[&pipeline, &t.schema, &t.table, &(rows as i64)],
        )
        .await
        .map_err(|e| db_err(format!("{what}: recording its seed state"), e))?
        .get(0);
    tx.commit()
        .await
        .map_err(|e| db_err(format!("{what}: member commit"), e))?;
    p.rows.fetch_add(rows, Ordering::Relaxed);
    metrics::counter!(metric::SEED_ROWS_TOTAL).increment(rows);
    let chunks_done = p.chunks_done.fetch_add(1, Ordering::Relaxed) + 1;
    if state == "done" {
        p.finished.store(true, Ordering::Relaxed);
        metrics::counter!(metric::SEED_TABLES_DONE_TOTAL).increment(1);
        let secs = p
            .started
            .lock()
            .expect("progress")
            .map_or(0.0, |s| s.elapsed().as_secs_f64());
        let bytes = p.bytes.load(Ordering::Relaxed);
        tracing::info!(
            table = %p.display,
            rows = p.rows.load(Ordering::Relaxed),
            bytes,
            chunks = p.chunks,
            seconds = format!("{secs:.2}"),
            mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / secs.max(1e-3)),
            format = if t.binary { "binary" } else { "text" },
            "table copied"
        );
    } else {
        tracing::debug!(job, table = %p.display, chunks_done, chunks = p.chunks, rows, "chunk copied");
    }
    Ok(())
}

/// `(SELECT cols FROM [ONLY] table` for a hub table.
pub fn select_prefix(
    schema: &str,
    table: &str,
    partitioned: bool,
    cols: &[String],
    constants: &[(String, String)],
) -> String {
    let cols: Vec<String> = cols
        .iter()
        .map(|c| quote_ident(c))
        .chain(
            constants
                .iter()
                .map(|(_, v)| switchback_core::quote_literal(v)),
        )
        .collect();
    format!(
        "(SELECT {} FROM {}{}.{}",
        cols.join(", "),
        if partitioned { "" } else { "ONLY " },
        quote_ident(schema),
        quote_ident(table)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_page_once_and_end_open() {
        assert_eq!(ranges(0, 100), vec![None]);
        assert_eq!(ranges(100, 100), vec![None]);
        let r = ranges(250, 100);
        assert_eq!(
            r,
            vec![
                Some((0, Some(100))),
                Some((100, Some(200))),
                Some((200, None))
            ]
        );
    }
}
