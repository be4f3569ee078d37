//! Apply acceptance tests ("Apply: exactly-once hub → member replication"): hub →
//! `switchback run` (capture + queue + apply) → member, compared table by table.
//!
//! Every test has its own databases and pipeline. Tests that restart a cluster or
//! need a quiet one use a dedicated cluster, so the shared ones are never disturbed.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchback_tests::{fingerprint, DropSlot, Timed, BENCH_TABLES, PIN};

use serde_json::Value;
use switchback_tests::{
    by_scale, hub, member, quote_literal, unique, wait_for, wait_until, Cluster, ClusterOptions,
    Lsn, Pipeline, Spawned,
};

const MINUTE: Duration = Duration::from_secs(60);

/// A 64,000-character value; with STORAGE EXTERNAL it is stored out of line.
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i)";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Row count and an md5 over the rows (`t::text` of each, ordered by `order_by`).
/// Asserts that every pgbench table is equal on both sides.
fn assert_bench_equal(hub: &Cluster, hdb: &str, member: &Cluster, mdb: &str) {
    let mut diffs = Vec::new();
    for (table, key) in BENCH_TABLES {
        let h = fingerprint(hub, hdb, table, key);
        let m = fingerprint(member, mdb, table, key);
        eprintln!("  {table}: hub {h:?} member {m:?}");
        if h != m {
            diffs.push(format!("{table}: hub {h:?}, member {m:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "member differs from hub (rows, md5):\n{}",
        diffs.join("\n")
    );
}

/// A pgbench database of `scale` on the hub and the same on the member. `pgbench -i`
/// generates the same rows every time, so running it on both sides is a copy of the
/// initial data (checked).
fn bench_dbs(hub: &Cluster, member: &Cluster, prefix: &str, scale: u32) -> (String, String) {
    let hdb = hub.create_db(prefix);
    let mdb = member.create_db(prefix);
    hub.pgbench_init(&hdb, scale);
    member.pgbench_init(&mdb, scale);
    for (table, key) in BENCH_TABLES {
        assert_eq!(
            fingerprint(hub, &hdb, table, key),
            fingerprint(member, &mdb, table, key),
            "test setup: initial {table} differs between hub and member"
        );
    }
    (hdb, mdb)
}

/// Drops the pipeline's slot on the hub when the test ends (however it ends), after
/// its walsender has gone. Declare it before the `Spawned` processes so that they
/// are killed first.
fn drop_slot_later<'a>(hub: &'a Cluster, pipe: &Pipeline) -> DropSlot<'a> {
    DropSlot {
        hub,
        slot: pipe.slot(),
    }
}

/// `switchback <cmd>` (run or capture), then waits until its slot has reached its
/// consistent point: hub transactions committed from then on are in the stream.
/// (`active` alone is not enough: CREATE_REPLICATION_SLOT holds the slot while it
/// waits for the transactions running on the hub to end, and what commits in that
/// time is not decoded; `confirmed_flush_lsn` is set only once it is consistent.)
fn start(hub: &Cluster, pipe: &Pipeline, cmd: &str) -> Spawned {
    let mut p = pipe.spawn(&[cmd]);
    let slot = pipe.slot();
    wait_until(
        MINUTE,
        &format!("{cmd} to stream from slot {slot} (consistent)"),
        || {
            p.assert_running();
            hub.slot(&slot)
                .is_some_and(|s| s.active && s.confirmed_flush.is_some())
        },
    );
    p
}

fn start_run(hub: &Cluster, pipe: &Pipeline) -> Spawned {
    start(hub, pipe, "run")
}

/// SIGINT, and a clean exit.
fn stop_run(run: &mut Spawned) {
    let st = run.sigint_and_wait();
    assert!(
        st.success(),
        "run did not exit cleanly on SIGINT ({st}); log:\n{}",
        run.log_tail(40)
    );
}

/// A hub transaction after everything written so far, then a wait until the member
/// has it: apply keeps commit order, so everything before it is applied too. Needs
/// `sb_mark (id bigint PRIMARY KEY)` on both sides.
fn sync_point(
    hub: &Cluster,
    hdb: &str,
    member: &Cluster,
    mdb: &str,
    run: &mut Spawned,
    timeout: Duration,
) {
    let n = unique();
    hub.psql(hdb, &format!("INSERT INTO sb_mark VALUES ({n})"));
    wait_until(timeout, &format!("marker {n} to reach the member"), || {
        run.assert_running();
        member.query_value(mdb, &format!("SELECT count(*) FROM sb_mark WHERE id = {n}")) == "1"
    });
}

/// Waits until the member's pgbench_history has the hub's count and max(hid) (the
/// last pgbench transaction is applied, and with commit order all before it).
fn wait_bench_drained(
    hub: &Cluster,
    hdb: &str,
    member: &Cluster,
    mdb: &str,
    run: &mut Spawned,
    timeout: Duration,
) {
    let q = "SELECT count(*) || '/' || coalesce(max(hid), 0) FROM pgbench_history";
    let want = hub.query_value(hdb, q);
    let mut last = String::new();
    let t0 = Instant::now();
    wait_until(
        timeout,
        &format!("member pgbench_history to reach the hub's count/max(hid) {want}"),
        || {
            run.assert_running();
            last = member.query_value(mdb, q);
            last == want
        },
    );
    eprintln!("  drained to {want} in {:?} after the load", t0.elapsed());
}

/// `switchback status --json`, parsed.
fn status_json(pipe: &Pipeline) -> Value {
    let out = pipe.run(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json did not print JSON ({e}); exit {}; stdout: {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits until `status` reports a running process with an empty queue.
fn wait_queue_empty(pipe: &Pipeline, run: &mut Spawned) -> Value {
    wait_for(MINUTE, "status to show an empty queue", || {
        run.assert_running();
        let s = status_json(pipe);
        (s["process_running"] == Value::Bool(true) && s["queue_transactions"].as_u64() == Some(0))
            .then_some(s)
    })
}

/// The member's replication-origin progress (remote_lsn) for `origin`; 0/0 before
/// the origin exists.
fn origin_progress(member: &Cluster, origin: &str) -> Result<Lsn, String> {
    let out = member.try_psql(
        "postgres",
        &format!(
            "SELECT coalesce((SELECT remote_lsn::text FROM pg_replication_origin_status \
             WHERE external_id = {}), '0/0')",
            quote_literal(origin)
        ),
    )?;
    out.trim()
        .parse()
        .map_err(|e| format!("remote_lsn {out:?}: {e:?}"))
}

fn origin_of(pipe: &Pipeline) -> String {
    format!("switchback_{}", pipe.name())
}

/// Hub-wins lines in the logs of `run` processes. The tests that start with equal
/// sides expect none: a conflict there means a transaction was applied twice (an
/// insert finding its row) or lost (an update or delete finding none).
fn conflict_lines(logs: &[PathBuf]) -> Vec<String> {
    logs.iter()
        .flat_map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter(|line| line.contains("hub wins") || line.contains("hub-wins"))
                .map(|line| format!("{}: {line}", l.display()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_no_conflicts(logs: &[PathBuf]) {
    let lines = conflict_lines(logs);
    assert!(
        lines.is_empty(),
        "the sides started equal, yet apply met {} hub-wins conflict line(s) (a duplicate or a \
         lost transaction):\n{}",
        lines.len(),
        lines
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Prints how long a test took when it ends (passed or not).
fn test_rng() -> fastrand::Rng {
    let seed = std::env::var("SWITCHBACK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("random seed {seed} (set SWITCHBACK_TEST_SEED to replay)");
    fastrand::Rng::with_seed(seed)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `GET /metrics` over plain HTTP/1.0; the body if the answer is 200.
fn fetch_metrics(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c == "200")
        .then(|| body.to_string())
}

/// The value of the series `name` whose labels include `labels` (all of them).
fn metric_value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, lab) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let ok = labels
            .iter()
            .all(|(k, v)| lab.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        ok.then(|| value.trim().parse().ok()).flatten()
    })
}

/// Runs pgbench for `secs` seconds in a thread.
fn bench_thread(
    hub: &'static Cluster,
    db: &str,
    clients: u32,
    secs: u32,
) -> std::thread::JoinHandle<switchback_tests::PgbenchResult> {
    let db = db.to_string();
    std::thread::spawn(move || hub.pgbench(&db, clients, secs, &[]))
}

/// Samples the member's origin progress every ~100 ms in a thread and records every
/// move backwards.
struct ProgressMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl ProgressMonitor {
    fn start(member: &'static Cluster, origin: String) -> ProgressMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = Lsn::ZERO;
            let mut samples = 0u64;
            let mut backwards = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(p) = origin_progress(member, &origin) {
                    samples += 1;
                    if p < last {
                        backwards.push(format!("{last} -> {p}"));
                    }
                    last = last.max(p);
                }
                std::thread::sleep(Duration::from_millis(100)); // sampling rate, not synchronisation
            }
            (samples, backwards)
        });
        ProgressMonitor {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns (samples, moves backwards).
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("progress monitor")
    }
}

impl Drop for ProgressMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// 1. pgbench while run syncs
// ---------------------------------------------------------------------------

/// pgbench tpcb-like on the hub while `switchback run` syncs; after the drain every
/// pgbench table on the member equals the hub's (row count and md5 by key), no
/// hub-wins conflict was met, and status shows nothing pending.
#[test]
fn pgbench_run_converges() {
    let _timed = Timed::start("pgbench_run_converges");
    let hub = hub();
    let member = member();
    let (scale, secs) = by_scale((1, 8), (10, 60));
    let (hdb, mdb) = bench_dbs(hub, member, "apply_bench", scale);
    let pipe = Pipeline::new("apply_bench", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = drop_slot_later(hub, &pipe);
    let mut run = start_run(hub, &pipe);

    let t0 = Instant::now();
    let res = hub.pgbench(&hdb, 4, secs, &[]);
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    assert!(res.transactions > 0);
    run.assert_running();
    wait_bench_drained(hub, &hdb, member, &mdb, &mut run, by_scale(5, 20) * MINUTE);
    let drained = t0.elapsed();
    let st = wait_queue_empty(&pipe, &mut run);
    eprintln!(
        "pgbench_run_converges: scale {scale}, {} transactions in {secs} s; member equal {:?} \
         after the start; status conflicts {}",
        res.transactions, drained, st["conflicts"]
    );
    assert_bench_equal(hub, &hdb, member, &mdb);
    let history: u64 = member
        .query_value(&mdb, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    assert_eq!(
        history, res.transactions,
        "member history rows vs pgbench's committed transactions"
    );
    assert_eq!(
        st["conflicts"],
        serde_json::json!({}),
        "no conflicts expected"
    );
    stop_run(&mut run);
    assert_no_conflicts(&[run.log.clone()]);
}

// ---------------------------------------------------------------------------
// 2. kill -9 of run during the load
// ---------------------------------------------------------------------------

/// The same load with `run` killed (-9) at random moments and restarted each time:
/// the member converges, every hub transaction applied exactly once (counts equal,
/// no hub-wins conflict in any process's log: a re-applied transaction would meet
/// its own rows), and the member's progress never moves backwards.
#[test]
fn kill9_run_converges() {
    let _timed = Timed::start("kill9_run_converges");
    let hub = hub();
    let member = member();
    let (scale, secs) = by_scale((1, 8), (10, 60));
    let kills = by_scale(5u64, 20);
    let (hdb, mdb) = bench_dbs(hub, member, "apply_kill", scale);
    let pipe = Pipeline::new("apply_kill", &hub.url(&hdb), &member.url(&mdb), "");
    let origin = origin_of(&pipe);
    let _slot = drop_slot_later(hub, &pipe);
    let mut rng = test_rng();
    // Random delays between kills, scaled to fit in 70% of the pgbench run.
    let mean_ms = (secs as u64 * 1000 * 6 / 10) / kills;
    let mut delays: Vec<u64> = (0..kills).map(|_| rng.u64(50..2 * mean_ms)).collect();
    let budget = secs as u64 * 1000 * 7 / 10;
    let total: u64 = delays.iter().sum();
    if total > budget {
        delays.iter_mut().for_each(|d| *d = *d * budget / total);
    }

    let monitor = ProgressMonitor::start(member, origin.clone());
    let mut logs = Vec::new();
    let mut run = start_run(hub, &pipe);
    let bench = bench_thread(hub, &hdb, 4, secs);
    let mut at_kill = Vec::new();
    let mut last = Lsn::ZERO;
    let t0 = Instant::now();
    for (done, delay) in delays.into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(delay)); // the fault injection itself
        assert!(
            !bench.is_finished(),
            "pgbench ended before kill {} of {kills}; lengthen the run",
            done + 1
        );
        let st = run.kill9();
        assert_eq!(
            st.signal(),
            Some(9),
            "run had exited by itself before kill {} ({st}); log:\n{}",
            done + 1,
            run.log_tail(40)
        );
        logs.push(run.log.clone());
        let p = origin_progress(member, &origin).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p >= last,
            "member progress moved backwards across kill {}: {last} -> {p}",
            done + 1
        );
        last = p;
        at_kill.push((t0.elapsed().as_millis(), p));
        run = pipe.spawn(&["run"]);
    }
    eprintln!("kill9_run: {kills} kills (ms, member progress): {at_kill:?}");
    let res = bench.join().expect("pgbench thread");
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    run.assert_running();
    wait_bench_drained(hub, &hdb, member, &mdb, &mut run, by_scale(5, 20) * MINUTE);
    let after = origin_progress(member, &origin).unwrap_or_else(|e| panic!("{e}"));
    assert!(after >= last, "member progress {after} behind {last}");
    let st = wait_queue_empty(&pipe, &mut run);
    eprintln!(
        "kill9_run: scale {scale}, {} pgbench transactions; drained; progress {after}",
        res.transactions
    );
    assert_bench_equal(hub, &hdb, member, &mdb);
    let count = |c: &Cluster, db: &str| -> u64 {
        c.query_value(db, "SELECT count(*) FROM pgbench_history")
            .parse()
            .unwrap()
    };
    assert_eq!(count(member, &mdb), res.transactions, "member history rows");
    assert_eq!(count(hub, &hdb), res.transactions, "hub history rows");
    assert_eq!(st["conflicts"], serde_json::json!({}), "status conflicts");
    stop_run(&mut run);
    logs.push(run.log.clone());
    let (samples, backwards) = monitor.finish();
    assert!(
        backwards.is_empty(),
        "member progress moved backwards ({samples} samples): {backwards:?}"
    );
    assert_no_conflicts(&logs);
}

// ---------------------------------------------------------------------------
// 3. member restarts and walsender kills under load
// ---------------------------------------------------------------------------

/// pgbench on the hub while the (dedicated) member is stopped -m immediate and
/// started twice and the hub's walsender is terminated twice: `run` keeps going by
/// itself (never restarted, still running) and the member ends equal, with no
/// hub-wins conflict (nothing applied twice or lost).
#[test]
fn member_restart_and_walsender_kill_converge() {
    let _timed = Timed::start("member_restart_and_walsender_kill_converge");
    let hub = hub();
    let member = Cluster::new_dedicated("apply_member", ClusterOptions::default());
    let scale = by_scale(1, 10);
    let min_load = Duration::from_secs(by_scale(10, 60));
    let (hdb, mdb) = bench_dbs(hub, &member, "apply_faults", scale);
    let pipe = Pipeline::new("apply_faults", &hub.url(&hdb), &member.url(&mdb), "");
    let origin = origin_of(&pipe);
    let _slot = drop_slot_later(hub, &pipe);
    let mut rng = test_rng();
    let mut faults = ["member", "member", "walsender", "walsender"];
    rng.shuffle(&mut faults);

    let mut run = start_run(hub, &pipe);
    // Load in rounds of 2 s until told to stop: the faults always fall inside it.
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<switchback_tests::PgbenchResult>>> = Arc::default();
    let load = {
        let (stop, results, hdb) = (stop.clone(), results.clone(), hdb.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = hub.pgbench(&hdb, 4, 2, &[]);
                results.lock().unwrap().push(r);
            }
        })
    };
    let t0 = Instant::now();
    let mut last = Lsn::ZERO;
    let mut log = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        // Apply is making progress again (recovered from the previous fault).
        let prev = last;
        last = wait_for(
            2 * MINUTE,
            &format!("member progress to move past {prev} before fault {}", i + 1),
            || {
                run.assert_running();
                origin_progress(&member, &origin).ok().filter(|p| *p > prev)
            },
        );
        std::thread::sleep(Duration::from_millis(rng.u64(0..1000))); // fault injection
        assert!(!load.is_finished(), "the load thread ended early");
        match *fault {
            "member" => {
                member.stop_immediate();
                std::thread::sleep(Duration::from_millis(rng.u64(0..1500))); // downtime
                member.start();
            }
            _ => {
                let n = wait_for(MINUTE, "a walsender of the pipeline to terminate", || {
                    run.assert_running();
                    Some(hub.terminate_walsenders(Some(&hdb))).filter(|n| *n > 0)
                });
                assert_eq!(n, 1, "one walsender streams from {hdb}");
            }
        }
        log.push(format!("{fault} at {} ms", t0.elapsed().as_millis()));
        run.assert_running();
    }
    // Recovered from the last fault too.
    let prev = last;
    wait_until(
        2 * MINUTE,
        &format!("member progress to move past {prev} after the last fault"),
        || {
            run.assert_running();
            origin_progress(&member, &origin).is_ok_and(|p| p > prev)
        },
    );
    let left = min_load.saturating_sub(t0.elapsed());
    std::thread::sleep(left); // the load's minimum length, not synchronisation
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let results = std::mem::take(&mut *results.lock().unwrap());
    let failed: u64 = results.iter().map(|r| r.failed).sum();
    let txns: u64 = results.iter().map(|r| r.transactions).sum();
    assert_eq!(failed, 0, "pgbench failures");
    eprintln!(
        "member_restart_and_walsender_kill: faults {log:?}; {txns} pgbench transactions in {:?}",
        t0.elapsed()
    );
    run.assert_running();
    wait_bench_drained(hub, &hdb, &member, &mdb, &mut run, by_scale(5, 20) * MINUTE);
    wait_queue_empty(&pipe, &mut run);
    assert_bench_equal(hub, &hdb, &member, &mdb);
    let history: u64 = member
        .query_value(&mdb, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    assert_eq!(history, txns, "member history rows vs pgbench transactions");
    run.assert_running();
    let text = run.log_text();
    assert!(
        text.contains("member unavailable"),
        "test premise: apply saw the member go away; log:\n{}",
        run.log_tail(40)
    );
    stop_run(&mut run);
    assert_no_conflicts(&[run.log.clone()]);
}

// ---------------------------------------------------------------------------
// 4. hub wins
// ---------------------------------------------------------------------------

/// Each hub-wins rule, its count in `status --json` and `/metrics`, and its log line
/// (table and key, never values).
#[test]
fn hub_wins_conflicts() {
    let _timed = Timed::start("hub_wins_conflicts");
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("apply_hubwins");
    let mdb = member.create_db("apply_hubwins");
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
               CREATE TABLE docs (id int PRIMARY KEY, body text, tag text);
               ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
               CREATE TABLE sb_mark (id bigint PRIMARY KEY);";
    hub.psql(&hdb, ddl);
    member.psql(&mdb, ddl);
    // The sides before the pipeline starts. Values are distinctive, so that the log
    // can be searched for them.
    hub.psql(
        &hdb,
        &format!(
            "INSERT INTO items VALUES (2, 'secret_two', 2), (3, 'secret_three', 3), \
                                     (4, 'secret_four', 4), (5, 'secret_five', 5);
             INSERT INTO docs VALUES (1, {BIG}, 'secret_a'), (2, 'short' || {BIG}, 'secret_a');"
        ),
    );
    member.psql(
        &mdb,
        &format!(
            "INSERT INTO items VALUES (1, 'secret_member', 100), (4, 'secret_four', 4), \
                                     (5, 'secret_five', 5);
             INSERT INTO docs VALUES (2, 'short' || {BIG}, 'secret_a');"
        ),
    );
    let toast: i64 = hub
        .query_value(
            &hdb,
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'docs'::regclass",
        )
        .parse()
        .unwrap();
    assert!(
        toast >= 128_000,
        "test setup: docs.body must be stored out of line (toast holds {toast} bytes)"
    );
    let port = free_port();
    let pipe = Pipeline::new(
        "apply_hubwins",
        &hub.url(&hdb),
        &member.url(&mdb),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let _slot = drop_slot_later(hub, &pipe);
    let mut run = start_run(hub, &pipe);

    // Each its own hub transaction.
    for sql in [
        // (a) insert of a key the member has with other values: the hub's row wins.
        "INSERT INTO items VALUES (1, 'secret_hub', 1)",
        // (b) update of a key the member lacks: the full row is inserted.
        "UPDATE items SET qty = 22 WHERE id = 2",
        // (c) delete of a key the member lacks: nothing.
        "DELETE FROM items WHERE id = 3",
        // (d) update leaving a TOASTed column untouched, the member lacks the row:
        //     the row cannot be built, so it is skipped (and counted).
        "UPDATE docs SET tag = 'secret_b' WHERE id = 1",
        // No conflict: plain updates of rows both sides have.
        "UPDATE items SET qty = 44 WHERE id = 4",
        "UPDATE docs SET tag = 'secret_c' WHERE id = 2",
    ] {
        hub.psql(&hdb, sql);
    }
    sync_point(hub, &hdb, member, &mdb, &mut run, 2 * MINUTE);

    let items = "SELECT id, name, qty FROM items ORDER BY id";
    assert_eq!(
        member.psql(&mdb, items),
        "1|secret_hub|1\n2|secret_two|22\n4|secret_four|44\n5|secret_five|5",
        "member items"
    );
    assert_eq!(
        member.psql(&mdb, items),
        hub.psql(&hdb, items),
        "items equal"
    );
    let docs = "SELECT id, tag, length(body), md5(body) FROM docs ORDER BY id";
    let hub_docs: Vec<String> = hub.psql(&hdb, docs).lines().map(String::from).collect();
    assert_eq!(hub_docs.len(), 2);
    assert_eq!(
        member.psql(&mdb, docs),
        hub_docs[1],
        "member docs: row 2 updated with its body kept; row 1 skipped (update_missing_skipped)"
    );

    let want = [
        ("insert_existing", 1),
        ("update_missing", 1),
        ("delete_missing", 1),
        ("update_missing_skipped", 1),
    ];
    let expected: serde_json::Map<String, Value> = want
        .iter()
        .map(|(k, n)| (k.to_string(), Value::from(*n)))
        .collect();
    let mut last = Value::Null;
    wait_until(MINUTE, "status --json to report the four conflicts", || {
        run.assert_running();
        last = status_json(&pipe);
        last["conflicts"] == Value::Object(expected.clone())
    });
    eprintln!("hub_wins: status conflicts {}", last["conflicts"]);
    assert_eq!(last["process_running"], Value::Bool(true));

    let body = wait_for(MINUTE, "/metrics to show the conflicts", || {
        run.assert_running();
        let b = fetch_metrics(port)?;
        want.iter()
            .all(|(k, _)| {
                metric_value(&b, "switchback_apply_conflicts_total", &[("kind", *k)]).is_some()
            })
            .then_some(b)
    });
    eprintln!(
        "hub_wins: /metrics {}",
        body.lines()
            .filter(|l| l.starts_with("switchback_apply_conflicts_total"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    for (kind, n) in want {
        let v = metric_value(&body, "switchback_apply_conflicts_total", &[("kind", kind)]);
        assert_eq!(
            v,
            Some(n as f64),
            "switchback_apply_conflicts_total{{kind=\"{kind}\"}}; metrics:\n{}",
            body.lines()
                .filter(|l| l.contains("conflicts"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    stop_run(&mut run);

    // Logged with table and key, never values.
    let text = run.log_text();
    let lines = conflict_lines(&[run.log.clone()]);
    for (kind, _) in want {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(kind) && (l.contains("items") || l.contains("docs"))),
            "no hub-wins log line for {kind} naming the table; lines:\n{}",
            lines.join("\n")
        );
    }
    assert!(
        lines.iter().all(|l| l.contains("id")),
        "hub-wins lines name the key column: {lines:#?}"
    );
    assert!(
        !text.contains("secret_"),
        "the log shows row values:\n{}",
        text.lines()
            .filter(|l| l.contains("secret_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------
// 5. TOAST and REPLICA IDENTITY FULL
// ---------------------------------------------------------------------------

/// An UPDATE leaving an out-of-line value untouched keeps it on the member (with a
/// key, and with REPLICA IDENTITY FULL and no key); on a table without a key
/// (REPLICA IDENTITY FULL on the hub) with duplicate rows, an UPDATE and a DELETE of
/// one duplicate change exactly one member row each.
#[test]
fn toast_and_full_identity() {
    let _timed = Timed::start("toast_and_full_identity");
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("apply_toast");
    let mdb = member.create_db("apply_toast");
    let ddl = "CREATE TABLE docs (id int PRIMARY KEY, body text, tag text);
               ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
               CREATE TABLE fulldocs (id int, body text, tag text);
               ALTER TABLE fulldocs ALTER COLUMN body SET STORAGE EXTERNAL;
               CREATE TABLE dup (a int, b text);
               CREATE TABLE sb_mark (id bigint PRIMARY KEY);";
    hub.psql(&hdb, ddl);
    member.psql(&mdb, ddl);
    hub.psql(
        &hdb,
        "ALTER TABLE dup REPLICA IDENTITY FULL; ALTER TABLE fulldocs REPLICA IDENTITY FULL;",
    );
    let pipe = Pipeline::new("apply_toast", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = drop_slot_later(hub, &pipe);
    let mut run = start_run(hub, &pipe);

    hub.psql(
        &hdb,
        &format!(
            "INSERT INTO docs VALUES (1, {BIG}, 'a'), (2, 'two' || {BIG}, 'a');
             INSERT INTO fulldocs VALUES (1, 'full' || {BIG}, 'a');
             INSERT INTO dup VALUES (1, 'x'), (1, 'x'), (1, 'x'), (2, 'y'), (2, 'y'), (3, NULL), (3, NULL);"
        ),
    );
    let toast = |t: &str| -> i64 {
        hub.query_value(
            &hdb,
            &format!(
                "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = '{t}'::regclass"
            ),
        )
        .parse()
        .unwrap()
    };
    assert!(
        toast("docs") >= 128_000 && toast("fulldocs") >= 64_000,
        "test setup: bodies must be stored out of line"
    );
    sync_point(hub, &hdb, member, &mdb, &mut run, 2 * MINUTE);
    assert_eq!(
        member.query_value(&mdb, "SELECT count(*) FROM dup"),
        "7",
        "duplicates replicated"
    );

    for sql in [
        "UPDATE docs SET tag = 'b' WHERE id = 1",
        "UPDATE fulldocs SET tag = 'b' WHERE id = 1",
        "UPDATE dup SET b = 'z' WHERE ctid = (SELECT ctid FROM dup WHERE a = 1 LIMIT 1)",
        "DELETE FROM dup WHERE ctid = (SELECT ctid FROM dup WHERE a = 2 LIMIT 1)",
        "UPDATE dup SET b = 'n' WHERE ctid = (SELECT ctid FROM dup WHERE a = 3 LIMIT 1)",
    ] {
        hub.psql(&hdb, sql);
    }
    sync_point(hub, &hdb, member, &mdb, &mut run, 2 * MINUTE);

    for t in ["docs", "fulldocs"] {
        let q = format!("SELECT id, tag, length(body), md5(body) FROM {t} ORDER BY id");
        let h = hub.psql(&hdb, &q);
        assert!(h.contains("|b|"), "test premise: hub {t} updated: {h}");
        assert_eq!(
            member.psql(&mdb, &q),
            h,
            "{t}: the untouched TOASTed body must survive the update"
        );
    }
    let q = "SELECT a, coalesce(b, '<null>') FROM dup ORDER BY 1, 2";
    let want = "1|x\n1|x\n1|z\n2|y\n3|<null>\n3|n";
    assert_eq!(hub.psql(&hdb, q), want, "test premise: hub rows");
    assert_eq!(
        member.psql(&mdb, q),
        want,
        "member rows of the key-less table: exactly one duplicate changed per change"
    );
    stop_run(&mut run);
    assert_no_conflicts(&[run.log.clone()]);
}

// ---------------------------------------------------------------------------
// 6. types
// ---------------------------------------------------------------------------

/// Values of many types, NULLs and edge values survive hub → text → member, with
/// user types of other OIDs on the member and other time zones on both sides.
#[test]
fn types_round_trip() {
    let _timed = Timed::start("types_round_trip");
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("apply_types");
    let mdb = member.create_db("apply_types");
    let enum_t = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');";
    let domain_t = "CREATE DOMAIN posint AS integer CHECK (VALUE > 0);";
    let comp_t = "CREATE TYPE pair AS (x int, y text);";
    let table = "CREATE TABLE types (
        id int PRIMARY KEY,
        n numeric, f4 float4, f8 float8, m money, b5 bit(5), vb varbit, by bytea, bo bool,
        c3 char(3), vc varchar(10), tx text, d date, tm time, ttz timetz, ts timestamp,
        tstz timestamptz, iv interval, u uuid, j json, jb jsonb, x xml, ip inet, net cidr,
        mac macaddr, r4 int4range, rtz tstzrange, arr int[], arr2 int[][], mo mood,
        pi posint, pr pair, ca char(3)[], ba bit(3)[]
    );
    CREATE TABLE sb_mark (id bigint PRIMARY KEY);";
    hub.psql(&hdb, &format!("{enum_t}\n{domain_t}\n{comp_t}\n{table}"));
    // Other order, plus unrelated types first: the OIDs differ from the hub's.
    member.psql(
        &mdb,
        &format!(
            "CREATE TYPE unrelated AS (z int); CREATE TYPE unrelated_e AS ENUM ('q');\n\
             {comp_t}\n{domain_t}\n{enum_t}\n{table}"
        ),
    );
    let oids = |c: &Cluster, db: &str| {
        c.psql(
            db,
            "SELECT string_agg(typname || '=' || oid, ',' ORDER BY typname) FROM pg_type \
             WHERE typname IN ('mood', 'posint', 'pair')",
        )
    };
    let (ho, mo) = (oids(hub, &hdb), oids(member, &mdb));
    eprintln!("types: hub OIDs {ho}, member OIDs {mo}");
    for (h, m) in ho.split(',').zip(mo.split(',')) {
        assert_ne!(h, m, "test setup: user type OIDs must differ");
    }
    hub.psql(
        "postgres",
        &format!("ALTER DATABASE {hdb} SET timezone = 'America/St_Johns'"),
    );
    member.psql(
        "postgres",
        &format!("ALTER DATABASE {mdb} SET timezone = 'Asia/Tokyo'"),
    );

    let pipe = Pipeline::new("apply_types", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = drop_slot_later(hub, &pipe);
    let mut run = start_run(hub, &pipe);

    hub.psql(
        &hdb,
        r#"INSERT INTO types VALUES
        (1, 12345.6789, 1.5, 1.5e-300, 1234.56, B'10101', B'1', '\xdeadbeef00', true,
         'ab', 'hello', E'quote '' double " backslash \\ newline\n tab\t emoji 🎉 end',
         '2000-02-29', '23:59:59.999999', '12:00:00+05:30', '2020-05-05 12:34:56.789',
         '2020-05-05 12:34:56.789+02', '1 year 2 mons -3 days 04:05:06.7',
         'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.50, "x"],  "b" : null}',
         '{"b": {"c": [true, false]}, "a": 1.50}', '<a b="1">t &amp; u</a>',
         '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '[1,10)',
         '[2020-01-01 00:00+00,2021-01-01 00:00+00)', '{1,NULL,3}', '{{1,2},{3,NULL}}',
         'happy', 7, ROW(1, 'a "quoted", (paren) \ back'), '{xyz,ab,NULL}', '{101,010}'),
        (2, 'NaN', 'Infinity', '-Infinity', '-92233720368547758.08', B'00000', B'', '\x',
         false, '', '', '', 'infinity', '00:00', '00:00:00-15:59', 'infinity', '-infinity',
         '-178000000 years', '00000000-0000-0000-0000-000000000000', '[]', '"str"', '<x/>',
         '::1', '::/0', 'ff:ff:ff:ff:ff:ff', 'empty', '(,)', '{}',
         '{{NULL,NULL},{NULL,NULL}}', 'sad', 1, ROW(NULL, NULL), '{}', '{}'),
        (3, '-Infinity', '-Infinity', 'NaN', 0, B'11111', B'0101010101', '\x00ff',
         NULL, 'xyz', 'ten chars!', E'\\', '0044-03-15 BC', '24:00:00', '23:59:59-12',
         '-infinity', '1900-01-01 00:00:00+00', '0', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
         'null', 'null', 'plain text', '2001:db8::1/64', '2001:db8::/32', '00:00:00:00:00:00',
         '(,5]', '[2020-01-01 00:00:00.123456+00,infinity)', '{NULL}', '{{1},{2}}',
         'ok', 2147483647, ROW(-1, ''), '{"a,b",xyz}', '{111,NULL}'),
        (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL),
        (5, 0.000000000000000000001, 'NaN', 2.2250738585072014e-308, 0.01, B'00001', B'1',
         '\x5c', true, 'a', 'z', 'NULL', '1999-12-31', '12:34', '12:34+14', '1999-12-31 23:59:59',
         '1999-12-31 23:59:59.999999-08', '-1 days +23:59:59', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12',
         '{"k": "v\"q"}', '{"k": "v\"q"}', '<r/>', '10.1.2.3', '10.1.2.0/24', '01:02:03:04:05:06',
         '[5,6]', '[2000-01-01,2000-01-02]', '{-1,0,1}', '{{NULL,1},{2,3}}', 'happy', 5, ROW(5, NULL), '{zzz}', '{001}');
        UPDATE types SET n = n * 2, f4 = 3.4028235e38, f8 = -0.0, m = -5, tx = tx || E' more\r\n',
            arr = array_append(arr, NULL), arr2 = '{{9,8},{7,6}}', mo = 'ok', pi = 99,
            pr = ROW(2, NULL), tstz = 'infinity', rtz = '[2020-01-01,)', jb = jb || '{"z": 1}',
            ttz = '00:00:01+01', d = d + 1
          WHERE id = 1;
        DELETE FROM types WHERE id = 5;"#,
    );
    sync_point(hub, &hdb, member, &mdb, &mut run, 2 * MINUTE);

    let q = format!("{PIN}\nSELECT row_to_json(t)::text FROM types t ORDER BY id");
    let (h, m) = (hub.psql(&hdb, &q), member.psql(&mdb, &q));
    assert_eq!(h.lines().count(), 4, "test premise: 4 hub rows");
    assert_eq!(m.lines().count(), 4, "member rows:\n{m}");
    // Every differing column of every row, hub value then member value.
    let mut diffs = Vec::new();
    for (hl, ml) in h.lines().zip(m.lines()) {
        let hv: serde_json::Map<String, Value> = serde_json::from_str(hl).expect("hub row JSON");
        let mv: serde_json::Map<String, Value> = serde_json::from_str(ml).expect("member row JSON");
        for (k, v) in &hv {
            if mv.get(k) != Some(v) {
                diffs.push(format!(
                    "id {} column {k}: hub {v}, member {}",
                    hv["id"],
                    mv.get(k).map_or("(missing)".to_string(), |m| m.to_string())
                ));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "member rows differ from the hub's:\n{}",
        diffs.join("\n")
    );
    // The text form, too (composites and arrays as PostgreSQL prints them).
    let q = format!("{PIN}\nSELECT t::text FROM types t ORDER BY id");
    assert_eq!(member.psql(&mdb, &q), hub.psql(&hdb, &q), "t::text");
    // timestamptz values are the same instants, whatever the zones.
    let q = "SELECT id, extract(epoch FROM tstz) FROM types ORDER BY id";
    assert_eq!(
        member.psql(&mdb, q),
        hub.psql(&hdb, q),
        "timestamptz epochs"
    );
    stop_run(&mut run);
    assert_no_conflicts(&[run.log.clone()]);
}

// ---------------------------------------------------------------------------
// 7. status and metrics after a drain
// ---------------------------------------------------------------------------

/// After a small load drains: `status --json` shows lag 0, an empty queue, the slot
/// caught up (lag bytes small), no problem; `/metrics` shows
/// `switchback_apply_lag_seconds 0`. A dedicated, quiet hub so that other tests' WAL
/// does not count as lag.
#[test]
fn status_and_metrics_show_lag_returning_to_zero() {
    let _timed = Timed::start("status_and_metrics_show_lag_returning_to_zero");
    let hub = Cluster::new_dedicated("apply_quiet_hub", ClusterOptions::default());
    let member = member();
    let hdb = hub.create_db("apply_status");
    let mdb = member.create_db("apply_status");
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text);
               CREATE TABLE sb_mark (id bigint PRIMARY KEY);";
    hub.psql(&hdb, ddl);
    member.psql(&mdb, ddl);
    let port = free_port();
    let pipe = Pipeline::new(
        "apply_status",
        &hub.url(&hdb),
        &member.url(&mdb),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut run = start_run(&hub, &pipe);
    let txns = 30;
    for i in 0..txns {
        hub.psql(
            &hdb,
            &format!(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g;
                 UPDATE t SET v = 'u' WHERE id = {};",
                i * 100 + 1,
                i * 100 + 100,
                i * 100 + 1
            ),
        );
    }
    sync_point(&hub, &hdb, member, &mdb, &mut run, 2 * MINUTE);
    let q = "SELECT count(*), md5(string_agg(id || v, ',' ORDER BY id)) FROM t";
    assert_eq!(member.psql(&mdb, q), hub.psql(&hdb, q), "member equals hub");

    let mut last = Value::Null;
    let t0 = Instant::now();
    let ok = |s: &Value| {
        s["process_running"] == Value::Bool(true)
            && s["queue_transactions"].as_u64() == Some(0)
            && s["lag_seconds"].as_f64() == Some(0.0)
            && s["slot_lag_bytes"]
                .as_i64()
                .is_some_and(|b| (0..4096).contains(&b))
            // The status file is refreshed every second: wait until it has caught up
            // with the member's progress (read live).
            && s["member_applied_lsn"].is_string()
            && s["member_applied_lsn"] == s["process"]["apply"]["last_applied_lsn"]
    };
    wait_until(
        MINUTE,
        "status: lag 0, queue empty, slot lag under 4 kB, process at the member's progress",
        || {
            run.assert_running();
            last = status_json(&pipe);
            ok(&last)
        },
    );
    eprintln!(
        "status after {:?}: {}",
        t0.elapsed(),
        serde_json::to_string(&last).unwrap()
    );
    assert_eq!(last["problems"], serde_json::json!([]), "status problems");
    assert_eq!(last["conflicts"], serde_json::json!({}), "status conflicts");
    assert_eq!(last["slot_active"], Value::Bool(true));
    let applied = last["member_applied_lsn"].as_str().unwrap_or_default();
    assert_eq!(
        Some(applied),
        last["process"]["apply"]["last_applied_lsn"].as_str(),
        "member progress vs the process's last applied LSN"
    );
    assert!(
        last["process"]["apply"]["applied_transactions"]
            .as_u64()
            .is_some_and(|n| n > txns),
        "applied transactions: {}",
        last["process"]["apply"]
    );
    // The exit code says "no problem".
    let out = pipe.run(&["status"]);
    assert!(
        out.status.success(),
        "status exit {} (3 = a problem found):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    let body = wait_for(MINUTE, "/metrics: apply lag 0 and queue empty", || {
        run.assert_running();
        let b = fetch_metrics(port)?;
        (metric_value(&b, "switchback_apply_lag_seconds", &[]) == Some(0.0)
            && metric_value(&b, "switchback_queue_depth_transactions", &[]) == Some(0.0)
            && metric_value(&b, "switchback_hub_slot_lag_bytes", &[]).is_some_and(|v| v < 4096.0))
        .then_some(b)
    });
    let applied = metric_value(&body, "switchback_apply_transactions_total", &[]);
    assert!(
        applied.is_some_and(|n| n > txns as f64),
        "switchback_apply_transactions_total {applied:?}"
    );
    assert!(
        body.lines().any(|l| l == "switchback_apply_lag_seconds 0"),
        "the exporter prints `switchback_apply_lag_seconds 0`:\n{}",
        body.lines()
            .filter(|l| l.contains("lag"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    stop_run(&mut run);
    // The status file written at the stop is fresh, but says the process is gone.
    let s = status_json(&pipe);
    assert_eq!(
        s["process_running"],
        Value::Bool(false),
        "status right after a clean stop: {s}"
    );
    assert_eq!(s["queue_transactions"].as_u64(), Some(0), "status: {s}");
    assert_no_conflicts(&[run.log.clone()]);
}

// ---------------------------------------------------------------------------
// 8. the queue after a kill -9 during a sled snapshot
// ---------------------------------------------------------------------------

/// A kill -9 can land while sled writes a snapshot (it does so when it opens a log
/// that has grown, i.e. at every start after a kill): between creating
/// `snap.<lsn>.generating` and writing it. The empty file is left behind (seen in
/// `kill9_run_converges`); here it is planted deterministically. The transactions in
/// the queue are acknowledged to the hub already, so the queue is their only copy:
/// `run` must still open it and apply them.
#[test]
fn queue_survives_kill9_during_snapshot_write() {
    let _timed = Timed::start("queue_survives_kill9_during_snapshot_write");
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("apply_snap");
    let mdb = member.create_db("apply_snap");
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    hub.psql(&hdb, ddl);
    member.psql(&mdb, ddl);
    let pipe = Pipeline::new("apply_snap", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = drop_slot_later(hub, &pipe);
    // Capture alone: the transactions end up in the queue only.
    let mut cap = start(hub, &pipe, "capture");
    for i in 0..10 {
        hub.psql(
            &hdb,
            &format!(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
                i * 10 + 1,
                i * 10 + 10
            ),
        );
    }
    let target = hub.current_wal_lsn();
    hub.wait_slot_confirmed(&pipe.slot(), target, MINUTE);
    let st = cap.sigint_and_wait();
    assert!(st.success(), "capture exit {st}: {}", cap.log_tail(20));

    // What a kill -9 between sled's create and write of a snapshot leaves.
    let queue = pipe.queue_path();
    let snaps: Vec<String> = std::fs::read_dir(&queue)
        .expect("queue directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("snap."))
        .collect();
    let max = snaps
        .iter()
        .filter_map(|n| u64::from_str_radix(n.trim_start_matches("snap.").get(..16)?, 16).ok())
        .max()
        .unwrap_or(0);
    let planted = queue.join(format!("snap.{:016X}.generating", max + 1));
    std::fs::write(&planted, b"").expect("plant the snapshot file");
    eprintln!("queue snapshots {snaps:?}; planted {}", planted.display());

    let mut run = pipe.spawn(&["run"]);
    wait_until(2 * MINUTE, "the queued rows to reach the member", || {
        run.assert_running();
        member.query_value(&mdb, "SELECT count(*) FROM t") == "100"
    });
    let q = "SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t";
    assert_eq!(member.psql(&mdb, q), hub.psql(&hdb, q));
    stop_run(&mut run);
}

/// Sets up `items` on both sides, runs `hub_sql` on the hub while capture alone
/// stores it, then `apply --until-empty` over the whole queued transaction.
/// Returns the databases and the status file that apply wrote.
fn queue_then_apply(
    prefix: &str,
    hub_rows: &str,
    member_rows: &str,
    hub_sql: &str,
) -> (String, String, Value) {
    let hub = hub();
    let member = member();
    let hdb = hub.create_db(prefix);
    let mdb = member.create_db(prefix);
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, qty int)";
    hub.psql(&hdb, ddl);
    member.psql(&mdb, ddl);
    hub.psql(&hdb, hub_rows);
    member.psql(&mdb, member_rows);
    let pipe = Pipeline::new(prefix, &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = drop_slot_later(hub, &pipe);
    // Capture alone first, so that apply later finds the whole transaction queued.
    let mut capture = start(hub, &pipe, "capture");
    hub.psql(&hdb, hub_sql);
    let target = hub.current_wal_lsn();
    hub.wait_slot_confirmed(&pipe.slot(), target, MINUTE);
    let st = capture.sigint_and_wait();
    assert!(st.success(), "capture did not stop cleanly: {st}");
    let out = pipe.run(&["apply", "--until-empty"]);
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(
        &std::fs::read(format!("{}.status.json", pipe.queue_path().display())).unwrap(),
    )
    .unwrap();
    (hdb, mdb, status)
}

/// A fast-path conflict must be decided before anything commits: one hub
/// transaction updates a row the member lacks (the fast path's plain UPDATE finds
/// nothing), deletes a row and inserts a new one. The group is replayed with
/// upserts from a rolled-back state, so exactly one conflict is counted
/// (update_missing) and none for the delete or the insert — a replay on top of a
/// committed attempt would count delete_missing and insert_existing too.
#[test]
fn fast_path_conflict_is_replayed_before_commit() {
    let _timed = Timed::start("fast_path_conflict_is_replayed_before_commit");
    let (_, mdb, status) = queue_then_apply(
        "apply_fastpath",
        "INSERT INTO items VALUES (2, 2), (10, 10), (11, 11)",
        "INSERT INTO items VALUES (10, 10), (11, 11)",
        "BEGIN; UPDATE items SET qty = 22 WHERE id = 2; DELETE FROM items WHERE id = 10; \
         INSERT INTO items VALUES (12, 12); COMMIT;",
    );
    assert_eq!(
        member()
            .psql(
                &mdb,
                "SELECT string_agg(id || ':' || qty, ',' ORDER BY id) FROM items"
            )
            .trim(),
        "2:22,11:11,12:12"
    );
    assert_eq!(
        &status["apply"]["conflicts"],
        &serde_json::json!({"update_missing": 1}),
        "exactly the one real conflict; status: {status}"
    );
}

/// The same with several round trips in flight: one hub transaction updates 1,500
/// rows and the member lacks the first. The conflict is found while a later round
/// trip of the same group is still unread; apply must read it (the connection stays
/// in step), roll back, replay, and count exactly one conflict.
#[test]
fn fast_path_conflict_with_round_trips_in_flight() {
    let _timed = Timed::start("fast_path_conflict_with_round_trips_in_flight");
    let (hdb, mdb, status) = queue_then_apply(
        "apply_inflight",
        "INSERT INTO items SELECT i, i FROM generate_series(1, 1500) i",
        "INSERT INTO items SELECT i, i FROM generate_series(2, 1500) i",
        "UPDATE items SET qty = qty + 1",
    );
    assert_eq!(
        fingerprint(member(), &mdb, "items", "id"),
        fingerprint(hub(), &hdb, "items", "id")
    );
    assert_eq!(
        &status["apply"]["conflicts"],
        &serde_json::json!({"update_missing": 1}),
        "exactly the one real conflict; status: {status}"
    );
}
