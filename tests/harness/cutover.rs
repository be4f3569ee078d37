//! A pgbench-like writer for cutover tests: clients that write tpcb-like
//! transactions to whichever side is the primary, retry on error, and record
//! every transaction they saw commit (a unique id in `pgbench_history.filler`)
//! and when, so a test can check that nothing was lost or duplicated and measure
//! the write pause (the longest gap between successful transactions).
//!
//! The primary is read from a file (`hub` or `member`) that the cutover's
//! `open_hook` writes; a client reads it again before every reconnection.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the writers did.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// Ids of transactions whose COMMIT succeeded.
    pub committed: Vec<String>,
    /// Ids whose outcome is unknown (the connection broke during COMMIT).
    pub uncertain: Vec<String>,
    /// Success times with the side written ("hub" / "member").
    pub successes: Vec<(Instant, String)>,
    /// Unique violations (a sequence behind after a switch).
    pub duplicate_key_errors: u64,
    pub other_errors: u64,
}

impl WriterReport {
    /// The longest gap between consecutive successful transactions (any client)
    /// that overlaps `[from, to]`.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut t: Vec<Instant> = self.successes.iter().map(|(t, _)| *t).collect();
        t.sort();
        t.windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
    pub fn count_on(&self, side: &str, after: Instant) -> usize {
        self.successes
            .iter()
            .filter(|(t, s)| s == side && *t >= after)
            .count()
    }
}

/// Running writer clients.
pub struct Writers {
    stop: Arc<AtomicBool>,
    live: Arc<std::sync::Mutex<WriterReport>>,
    handles: Vec<JoinHandle<()>>,
}

/// Starts `clients` writers. `urls` are the hub's and the member's database URLs;
/// `primary_file` holds `hub` or `member`; `scale` is the pgbench scale; `tag`
/// prefixes the transaction ids (distinct per set of writers).
pub fn start_writers(
    tag: &str,
    clients: usize,
    hub_url: &str,
    member_url: &str,
    primary_file: PathBuf,
    scale: u32,
) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(std::sync::Mutex::new(WriterReport::default()));
    let mut handles = Vec::new();
    for c in 0..clients {
        let (stop, live) = (stop.clone(), live.clone());
        let (hub_url, member_url, primary_file) = (
            hub_url.to_string(),
            member_url.to_string(),
            primary_file.clone(),
        );
        let tag = tag.to_string();
        handles.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(client_loop(
                format!("{tag}{c}"),
                stop,
                live,
                hub_url,
                member_url,
                primary_file,
                scale,
            ));
        }));
    }
    Writers {
        stop,
        live,
        handles,
    }
}

impl Writers {
    /// Successful transactions on `side` since `after` so far.
    pub fn count_on(&self, side: &str, after: Instant) -> usize {
        self.live.lock().unwrap().count_on(side, after)
    }
    pub fn stop(self) -> WriterReport {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            h.join().expect("writer thread panicked");
        }
        std::mem::take(&mut *self.live.lock().unwrap())
    }
}

async fn client_loop(
    id: String,
    stop: Arc<AtomicBool>,
    live: Arc<std::sync::Mutex<WriterReport>>,
    hub_url: String,
    member_url: String,
    primary_file: PathBuf,
    scale: u32,
) {
    let mut rng = fastrand::Rng::with_seed(id.bytes().fold(7u64, |h, b| h * 31 + b as u64));
    let mut n = 0u64;
    let mut conn: Option<(tokio_postgres::Client, String)> = None;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            let side = std::fs::read_to_string(&primary_file)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "hub".into());
            let url = if side == "member" {
                &member_url
            } else {
                &hub_url
            };
            match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                Ok((client, c)) => {
                    tokio::spawn(async move {
                        let _ = c.await;
                    });
                    conn = Some((client, side));
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
            }
        }
        let (client, side) = conn.as_ref().unwrap();
        n += 1;
        let tx_id = format!("{id}-{n}");
        let (aid, tid, bid) = (
            rng.u32(1..=100_000 * scale),
            rng.u32(1..=10 * scale),
            rng.u32(1..=scale),
        );
        let delta = rng.i32(-5000..=5000);
        let body = format!(
            "UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid}; \
             UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid}; \
             UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid}; \
             INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) \
             VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP, '{tx_id}');"
        );
        let r = async {
            client.batch_execute("BEGIN").await?;
            client.batch_execute(&body).await?;
            Ok::<_, tokio_postgres::Error>(())
        }
        .await;
        let r = match r {
            Ok(()) => client.batch_execute("COMMIT").await.map_err(|e| (e, true)),
            Err(e) => Err((e, false)),
        };
        match r {
            Ok(()) => {
                let mut l = live.lock().unwrap();
                l.committed.push(tx_id);
                l.successes.push((Instant::now(), side.clone()));
            }
            Err((e, during_commit)) => {
                {
                    let mut l = live.lock().unwrap();
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                        l.duplicate_key_errors += 1;
                        eprintln!("writer {id}: duplicate key on the {side}: {e}");
                    } else {
                        l.other_errors += 1;
                    }
                    if during_commit && e.code().is_none() {
                        l.uncertain.push(tx_id);
                    }
                }
                conn = None;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
