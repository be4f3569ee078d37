//! Kafka acceptance tests: `switchback capture` and `switchback apply` as two
//! processes with a real broker (tansu) between them, against real PostgreSQL 15.
//!
//! The conformance suite of the queue contract (both backends) is in
//! `queue_conformance.rs`; these tests drive the binary end to end.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchback_tests::{
    by_scale, fingerprint, hub, kafka_broker, member, quote_literal, wait_for, wait_until, Broker,
    Cluster, Lsn, Pipeline, Spawned, BENCH_TABLES,
};

const MINUTE: Duration = Duration::from_secs(60);

fn assert_bench_equal(hub: &Cluster, hdb: &str, member: &Cluster, mdb: &str) {
    for (table, key) in BENCH_TABLES {
        let h = fingerprint(hub, hdb, table, key);
        let m = fingerprint(member, mdb, table, key);
        eprintln!("  {table}: hub {h:?} member {m:?}");
        assert_eq!(h, m, "{table} differs (count|md5)");
    }
}

fn bench_dbs(hub: &Cluster, member: &Cluster, prefix: &str, scale: u32) -> (String, String) {
    let hdb = hub.create_db(prefix);
    let mdb = member.create_db(prefix);
    hub.pgbench_init(&hdb, scale);
    member.pgbench_init(&mdb, scale);
    (hdb, mdb)
}

/// Drops the slot when the test ends, once its walsender is gone.
struct DropSlot<'a>(&'a Cluster, String);

impl Drop for DropSlot<'_> {
    fn drop(&mut self) {
        let active = || {
            self.0
                .try_psql(
                    "postgres",
                    &format!(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = {}",
                        quote_literal(&self.1)
                    ),
                )
                .is_ok_and(|o| o.trim() == "t")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while active() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.0.drop_slot_if_inactive(&self.1);
    }
}

fn kafka_pipeline(prefix: &str, broker: &Broker, hdb: &str, mdb: &str) -> Pipeline {
    Pipeline::new(
        prefix,
        &hub().url(hdb),
        &member().url(mdb),
        &broker.queue_toml(),
    )
}

fn history(c: &Cluster, db: &str) -> String {
    c.query_value(
        db,
        "SELECT count(*) || '/' || coalesce(max(hid), 0) FROM pgbench_history",
    )
}

/// Waits until the member's pgbench_history has the hub's count and max(hid);
/// both processes must stay up meanwhile.
fn wait_drained(hdb: &str, mdb: &str, procs: &mut [&mut Spawned], timeout: Duration) {
    let want = history(hub(), hdb);
    let t0 = Instant::now();
    wait_until(
        timeout,
        &format!("member pgbench_history to reach {want}"),
        || {
            for p in procs.iter_mut() {
                p.assert_running();
            }
            history(member(), mdb) == want
        },
    );
    eprintln!("  drained to {want} in {:?}", t0.elapsed());
}

fn origin_progress(member: &Cluster, origin: &str) -> Lsn {
    member
        .query_value(
            "postgres",
            &format!(
                "SELECT coalesce((SELECT remote_lsn::text FROM pg_replication_origin_status \
                 WHERE external_id = {}), '0/0')",
                quote_literal(origin)
            ),
        )
        .parse()
        .expect("remote_lsn")
}

fn status_json(pipe: &Pipeline) -> Value {
    let out = pipe.run(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Hub-wins lines: with sides equal at the start, one means a transaction was
/// applied twice or lost.
fn assert_no_conflicts(logs: &[&Spawned]) {
    for l in logs {
        let text = l.log_text();
        let bad: Vec<&str> = text.lines().filter(|l| l.contains("hub wins")).collect();
        assert!(bad.is_empty(), "conflicts in {:?}: {bad:?}", l.args);
    }
}

/// Acceptance 2: pgbench with capture and apply as separate processes over Kafka;
/// the member equals the hub, every pgbench transaction once, `queue dump` reads
/// the topic and `status` shows the backlog drained.
#[test]
fn kafka_pgbench_separate_processes() {
    let broker = kafka_broker();
    let (scale, secs) = by_scale((1, 8), (10, 60));
    let (hdb, mdb) = bench_dbs(hub(), member(), "kafka_bench", scale);
    let pipe = kafka_pipeline("kafka_bench", broker, &hdb, &mdb);
    let _slot = DropSlot(hub(), pipe.slot());
    let mut capture = pipe.start_capture(hub());
    let mut apply = pipe.spawn(&["apply"]);
    let t0 = Instant::now();
    let res = hub().pgbench(&hdb, 4, secs, &[]);
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    wait_drained(
        &hdb,
        &mdb,
        &mut [&mut capture, &mut apply],
        by_scale(5, 20) * MINUTE,
    );
    eprintln!(
        "kafka_pgbench: scale {scale}, {} transactions in {secs} s, member equal after {:?}",
        res.transactions,
        t0.elapsed()
    );
    assert_bench_equal(hub(), &hdb, member(), &mdb);
    let rows: u64 = member()
        .query_value(&mdb, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    assert_eq!(rows, res.transactions);
    let st = wait_for(MINUTE, "status to show the kafka backlog drained", || {
        let s = status_json(&pipe);
        (s["queue_kafka_backlog_messages"].as_i64() == Some(0)).then_some(s)
    });
    assert_eq!(st["conflicts"], serde_json::json!({}));
    // queue dump reads the topic: the last pgbench transaction is in it.
    let dump = pipe.run_ok(&["queue", "dump", "--json"]);
    let dump = String::from_utf8_lossy(&dump.stdout);
    let last_hid = member().query_value(&mdb, "SELECT max(hid) FROM pgbench_history");
    assert!(
        dump.contains(&format!("\"hid\":\"{last_hid}\"")),
        "queue dump lacks the last history row"
    );
    assert!(
        capture.sigint_and_wait().success(),
        "{}",
        capture.log_tail(20)
    );
    assert!(apply.sigint_and_wait().success(), "{}", apply.log_tail(20));
    assert_no_conflicts(&[&capture, &apply]);
}

/// Acceptance 3: the same load with capture and apply each killed (-9) at random
/// moments and restarted: the member equals the hub, no duplicate rows (counts
/// equal, no hub-wins conflict in any log), progress never moves backwards.
#[test]
fn kafka_kill9_capture_and_apply() {
    let broker = kafka_broker();
    let (scale, secs) = by_scale((1, 20), (10, 60));
    let kills = by_scale(3usize, 10);
    let (hdb, mdb) = bench_dbs(hub(), member(), "kafka_kill", scale);
    let pipe = kafka_pipeline("kafka_kill", broker, &hdb, &mdb);
    let origin = format!("switchback_{}", pipe.name());
    let _slot = DropSlot(hub(), pipe.slot());
    let seed = std::env::var("SWITCHBACK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("random seed {seed} (set SWITCHBACK_TEST_SEED to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut capture = pipe.start_capture(hub());
    let mut apply = pipe.spawn(&["apply"]);
    let mut dead: Vec<Spawned> = Vec::new();
    let bench = {
        let hdb = hdb.clone();
        std::thread::spawn(move || hub().pgbench(&hdb, 4, secs, &[]))
    };
    // 2 × kills kills spread over ~70% of the run.
    let mean_ms = secs as u64 * 1000 * 7 / 10 / (2 * kills as u64);
    let mut last = Lsn::ZERO;
    for k in 0..2 * kills {
        std::thread::sleep(Duration::from_millis(rng.u64(mean_ms / 2..mean_ms * 3 / 2))); // fault injection
        assert!(!bench.is_finished(), "pgbench ended before kill {k}");
        let victim = if k % 2 == 0 { &mut capture } else { &mut apply };
        let st = victim.kill9();
        assert_eq!(
            st.signal(),
            Some(9),
            "{:?} had exited by itself: {}",
            victim.args,
            victim.log_tail(30)
        );
        let p = origin_progress(member(), &origin);
        assert!(p >= last, "progress moved backwards: {last} -> {p}");
        last = p;
        let fresh = pipe.spawn(&[if k % 2 == 0 { "capture" } else { "apply" }]);
        dead.push(std::mem::replace(victim, fresh));
    }
    let res = bench.join().unwrap();
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    wait_drained(
        &hdb,
        &mdb,
        &mut [&mut capture, &mut apply],
        by_scale(5, 20) * MINUTE,
    );
    eprintln!(
        "kafka_kill9: {} kills, {} pgbench transactions, progress {}",
        2 * kills,
        res.transactions,
        origin_progress(member(), &origin)
    );
    assert_bench_equal(hub(), &hdb, member(), &mdb);
    let rows: u64 = member()
        .query_value(&mdb, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    assert_eq!(rows, res.transactions, "member history rows");
    assert!(capture.sigint_and_wait().success());
    assert!(apply.sigint_and_wait().success());
    let mut all: Vec<&Spawned> = dead.iter().collect();
    all.push(&capture);
    all.push(&apply);
    assert_no_conflicts(&all);
}

/// Acceptance 4: the broker frozen (SIGSTOP) mid-run: capture stops acknowledging
/// (status shows the slot lag growing), both processes stay up, and once the
/// broker answers again (SIGCONT) everything arrives, nothing lost.
#[test]
fn kafka_broker_frozen() {
    let broker = Broker::dedicated();
    let freeze = Duration::from_secs(by_scale(10, 30));
    let (hdb, mdb) = bench_dbs(hub(), member(), "kafka_freeze", 1);
    let pipe = kafka_pipeline("kafka_freeze", &broker, &hdb, &mdb);
    let _slot = DropSlot(hub(), pipe.slot());
    let mut capture = pipe.start_capture(hub());
    let mut apply = pipe.spawn(&["apply"]);
    hub().pgbench(&hdb, 2, 2, &[]);
    wait_drained(&hdb, &mdb, &mut [&mut capture, &mut apply], 5 * MINUTE);
    let (cpid, apid) = (capture.pid(), apply.pid());

    broker.freeze();
    let frozen_at = Instant::now();
    let lag = |p: &Pipeline| status_json(p)["slot_lag_bytes"].as_i64().unwrap_or(0);
    let lag0 = lag(&pipe);
    let bench = {
        let hdb = hdb.clone();
        let secs = (freeze.as_secs() as u32 * 2 / 3).max(1);
        std::thread::spawn(move || hub().pgbench(&hdb, 2, secs, &[]))
    };
    // The slot lag grows while the broker is frozen: nothing is acknowledged.
    let mut samples = vec![lag0];
    while frozen_at.elapsed() < freeze {
        std::thread::sleep(Duration::from_secs(2)); // sampling period of the lag
        samples.push(lag(&pipe));
        capture.assert_running();
        apply.assert_running();
    }
    let res = bench.join().unwrap();
    assert_eq!(res.failed, 0);
    eprintln!("kafka_freeze: slot lag while frozen {samples:?}");
    assert!(
        samples.last().unwrap() > &(lag0 + 100_000),
        "slot lag did not grow while the broker was frozen: {samples:?}"
    );
    broker.thaw();
    wait_drained(&hdb, &mdb, &mut [&mut capture, &mut apply], 5 * MINUTE);
    let after = wait_for(MINUTE, "slot lag to fall after the thaw", || {
        let l = lag(&pipe);
        (l < samples.last().copied().unwrap_or(0)).then_some(l)
    });
    eprintln!("kafka_freeze: lag after thaw {after}");
    assert_eq!((capture.pid(), apply.pid()), (cpid, apid));
    capture.assert_running();
    apply.assert_running();
    assert_bench_equal(hub(), &hdb, member(), &mdb);
    assert!(
        capture.sigint_and_wait().success(),
        "{}",
        capture.log_tail(30)
    );
    assert!(apply.sigint_and_wait().success(), "{}", apply.log_tail(30));
    assert_no_conflicts(&[&capture, &apply]);
}

/// Acceptance 5: the broker restarted with its data wiped. Capture (restarted)
/// writes on; apply reports the missing LSN range, exits non-zero, and applies
/// nothing past the gap.
#[test]
fn kafka_wiped_broker_gap() {
    let broker = Broker::dedicated();
    let hdb = hub().create_db("kafka_gap");
    let mdb = member().create_db("kafka_gap");
    for (c, db) in [(hub(), &hdb), (member(), &mdb)] {
        c.psql(db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    }
    let pipe = kafka_pipeline("kafka_gap", &broker, &hdb, &mdb);
    let origin = format!("switchback_{}", pipe.name());
    let _slot = DropSlot(hub(), pipe.slot());
    let mut capture = pipe.start_capture(hub());
    let mut apply = pipe.spawn(&["apply"]);
    hub().psql(
        &hdb,
        "INSERT INTO t SELECT i, 'a' FROM generate_series(1, 10) i",
    );
    wait_until(MINUTE, "the first rows to be applied", || {
        apply.assert_running();
        member().query_value(&mdb, "SELECT count(*) FROM t") == "10"
    });
    assert!(apply.sigint_and_wait().success());
    let applied = origin_progress(member(), &origin);
    // Durable in the broker (the slot is acknowledged past it), never applied.
    for i in 11..=20 {
        hub().psql(&hdb, &format!("INSERT INTO t VALUES ({i}, 'lost')"));
    }
    let lost_end = hub().current_wal_lsn();
    hub().wait_slot_confirmed(&pipe.slot(), lost_end, MINUTE);
    capture.kill9();
    // Where the slot stands once capture is gone: the new topic starts there.
    let confirmed = wait_for(MINUTE, "the slot to be released", || {
        hub()
            .slot(&pipe.slot())
            .filter(|s| !s.active)
            .and_then(|s| s.confirmed_flush)
    });
    broker.restart_wiped();
    let mut capture = pipe.start_capture(hub());
    hub().psql(
        &hdb,
        "INSERT INTO t SELECT i, 'after' FROM generate_series(21, 30) i",
    );
    hub().wait_slot_confirmed(&pipe.slot(), hub().current_wal_lsn(), MINUTE);
    let mut apply = pipe.spawn(&["apply"]);
    let st = apply.wait_timeout(2 * MINUTE);
    let log = apply.log_text();
    eprintln!("apply after the wipe ({st}):\n{}", apply.log_tail(5));
    assert!(!st.success(), "apply must exit non-zero on a gap");
    assert!(log.contains("gap"), "apply must report a gap:\n{log}");
    assert!(
        log.contains(&format!("after {applied} and up to {confirmed}")),
        "the missing range ({applied}, {confirmed}] must be named:\n{log}"
    );
    assert_eq!(
        member().query_value(&mdb, "SELECT count(*) || '/' || max(id) FROM t"),
        "10/10",
        "nothing may be applied past the gap"
    );
    assert_eq!(origin_progress(member(), &origin), applied);
    capture.assert_running();
    assert!(capture.sigint_and_wait().success());
}
