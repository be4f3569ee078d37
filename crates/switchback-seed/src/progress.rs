//! Seed progress: a bar per table on a terminal (indicatif), log lines otherwise.
//!
//! Rows count when a chunk commits on the member; bytes count as they stream. The
//! bar's length is the hub's row estimate (`reltuples`), so rate and ETA are
//! estimates too.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

use crate::copy::TableProgress;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, log lines otherwise.
    Auto,
    Bars,
    Log,
}

impl ProgressMode {
    fn bars(self) -> bool {
        match self {
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Bars => true,
            ProgressMode::Log => false,
        }
    }
}

/// Shows progress until `stop`; a last report at the end.
pub async fn report(
    tables: Vec<Arc<TableProgress>>,
    mode: ProgressMode,
    mut stop: watch::Receiver<bool>,
) {
    if mode.bars() {
        bars(tables, &mut stop).await
    } else {
        lines(tables, &mut stop).await
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

async fn bars(tables: Vec<Arc<TableProgress>>, stop: &mut watch::Receiver<bool>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    let style = ProgressStyle::with_template(
        "{prefix:<32!} [{bar:30}] {human_pos}/{human_len} rows {msg} {per_sec:0} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bars: Vec<ProgressBar> = tables
        .iter()
        .map(|t| {
            let b = multi.add(ProgressBar::new(t.est_rows.unwrap_or(0).max(1)));
            b.set_style(style.clone());
            b.set_prefix(t.display.clone());
            b
        })
        .collect();
    loop {
        for (t, b) in tables.iter().zip(&bars) {
            if b.is_finished() {
                continue;
            }
            let rows = t.rows.load(Ordering::Relaxed);
            if rows > b.length().unwrap_or(0) {
                b.set_length(rows);
            }
            b.set_position(rows);
            b.set_message(format!(
                "{} chunk {}/{}",
                mb(t.bytes.load(Ordering::Relaxed)),
                t.chunks_done.load(Ordering::Relaxed),
                t.chunks
            ));
            if t.finished.load(Ordering::Relaxed) {
                b.set_length(rows.max(1));
                b.finish();
            }
        }
        if *stop.borrow() {
            for b in &bars {
                if !b.is_finished() {
                    b.abandon();
                }
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn lines(tables: Vec<Arc<TableProgress>>, stop: &mut watch::Receiver<bool>) {
    let start = Instant::now();
    let total_est: u64 = tables.iter().filter_map(|t| t.est_rows).sum();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let rows: u64 = tables.iter().map(|t| t.rows.load(Ordering::Relaxed)).sum();
        let bytes: u64 = tables.iter().map(|t| t.bytes.load(Ordering::Relaxed)).sum();
        let done = tables
            .iter()
            .filter(|t| t.finished.load(Ordering::Relaxed))
            .count();
        let secs = start.elapsed().as_secs_f64();
        let rate = rows as f64 / secs.max(1e-3);
        let eta = if total_est > rows && rate > 0.0 {
            format!("{:.0} s", (total_est - rows) as f64 / rate)
        } else {
            "-".to_string()
        };
        tracing::info!(
            tables_done = done,
            tables = tables.len(),
            rows,
            rows_estimated = total_est,
            bytes,
            rows_per_s = format!("{rate:.0}"),
            eta,
            "seed progress"
        );
    }
}
