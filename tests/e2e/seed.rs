//! Seed acceptance tests ("Bulk initial seeding"): `switchback seed` copies the hub
//! into the member at a consistent snapshot while the hub is written to, then
//! `switchback run` continues from the slot; the sides are compared table by table.
//! Kill -9 at three stages of a seed, resume, and check that finished tables were
//! kept; `--create-schema`; a large table split into ctid ranges across jobs.

use std::time::{Duration, Instant};
use switchback_tests::{fingerprint, DropSlot, Timed, BENCH_TABLES};

use serde_json::Value;
use switchback_tests::seed::Holder;
use switchback_tests::{
    by_scale, hub, member, wait_for, wait_until, Cluster, Lsn, Pipeline, Spawned,
};

const MINUTE: Duration = Duration::from_secs(60);

/// The pgbench tables as `pgbench -i` creates them (plus the harness's `hid` key),
/// empty: the member side of a seed.
const BENCH_DDL: &str = "\
    CREATE TABLE pgbench_accounts (aid int NOT NULL PRIMARY KEY, bid int, abalance int, filler char(84)); \
    CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, filler char(88)); \
    CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, tbalance int, filler char(84)); \
    CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22), \
                                  hid bigint PRIMARY KEY);";

fn assert_tables_equal(
    hub: &Cluster,
    hdb: &str,
    member: &Cluster,
    mdb: &str,
    tables: &[(&str, &str)],
) {
    let mut diffs = Vec::new();
    for (table, key) in tables {
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

/// Drops the pipeline's slot when the test ends, once no walsender holds it.
/// Runs `switchback seed <args>` to its end; asserts success; returns its log.
fn seed_ok(pipe: &Pipeline, args: &[&str]) -> String {
    let mut all = vec!["seed"];
    all.extend_from_slice(args);
    let mut p = pipe.spawn(&all);
    let st = p.wait_timeout(by_scale(5, 20) * MINUTE);
    let log = p.log_text();
    assert!(
        st.success(),
        "switchback {all:?} failed ({st}); log:\n{log}"
    );
    log
}

/// `switchback status --json`, parsed.
fn status_json(pipe: &Pipeline) -> Value {
    let out = pipe.run(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json did not print JSON ({e}); stdout: {}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Seed state per table from `status --json`: table → (state, sync_lsn, rows, chunks_total).
fn seed_states(pipe: &Pipeline) -> Vec<(String, String, Lsn, i64, i64)> {
    let s = status_json(pipe);
    s["seed"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no seed array: {s}"))
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
                t["sync_lsn"].as_str().unwrap().parse().unwrap(),
                t["rows"].as_i64().unwrap(),
                t["chunks_total"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn start_run(hub: &Cluster, pipe: &Pipeline) -> Spawned {
    let mut p = pipe.spawn(&["run"]);
    let slot = pipe.slot();
    wait_until(MINUTE, &format!("run to stream from slot {slot}"), || {
        p.assert_running();
        hub.slot(&slot)
            .is_some_and(|s| s.active && s.confirmed_flush.is_some())
    });
    p
}

/// Waits until the member's pgbench_history has the hub's count and max(hid).
fn wait_history_drained(hub: &Cluster, hdb: &str, member: &Cluster, mdb: &str, run: &mut Spawned) {
    let q = "SELECT count(*) || '/' || coalesce(max(hid), 0) FROM pgbench_history";
    let want = hub.query_value(hdb, q);
    wait_until(
        by_scale(3, 10) * MINUTE,
        &format!("member history to reach {want}"),
        || {
            run.assert_running();
            member.query_value(mdb, q) == want
        },
    );
}

fn hub_wins_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("hub wins")).collect()
}

/// pgbench on the hub in a thread.
fn bench_thread(
    hub: &'static Cluster,
    db: &str,
    secs: u32,
) -> std::thread::JoinHandle<switchback_tests::PgbenchResult> {
    let db = db.to_string();
    std::thread::spawn(move || hub.pgbench(&db, 4, secs, &[]))
}

fn wait_history_grows(hub: &Cluster, hdb: &str) {
    let before: u64 = hub
        .query_value(hdb, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    wait_until(MINUTE, "pgbench to write on the hub", || {
        hub.query_value(hdb, "SELECT count(*) FROM pgbench_history")
            .parse::<u64>()
            .unwrap()
            > before
    });
}

fn log_field<'a>(log: &'a str, line_has: &str, field: &str) -> Option<&'a str> {
    log.lines().filter(|l| l.contains(line_has)).find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .map(|v| v.trim_matches('"'))
    })
}

// ---------------------------------------------------------------------------
// 1. seed while pgbench writes, then run
// ---------------------------------------------------------------------------

/// pgbench writes on the hub during the whole seed; then `run` streams from the
/// slot's consistent point. The member equals the hub, and apply met no hub-wins
/// conflict: nothing was applied twice or lost at the hand-over.
#[test]
fn seed_during_pgbench_then_run_converges() {
    let _t = Timed("seed_during_pgbench_then_run_converges", Instant::now());
    let hub = hub();
    let member = member();
    let (scale, secs) = by_scale((5, 25), (50, 120));
    let hdb = hub.create_db("seed_bench");
    let mdb = member.create_db("seed_bench");
    hub.pgbench_init(&hdb, scale);
    member.psql(&mdb, BENCH_DDL);
    let pipe = Pipeline::new("seed_bench", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = DropSlot {
        hub,
        slot: pipe.slot(),
    };

    let bench = bench_thread(hub, &hdb, secs);
    wait_history_grows(hub, &hdb);
    let t0 = Instant::now();
    let log = seed_ok(&pipe, &["--jobs", "2"]);
    let seed_secs = t0.elapsed().as_secs_f64();
    assert!(
        !bench.is_finished(),
        "pgbench ended before the seed did: make the load longer"
    );
    let states = seed_states(&pipe);
    assert_eq!(states.len(), 4, "seed state of the four tables: {states:?}");
    let lsn0 = states[0].2;
    for (t, st, lsn, _, _) in &states {
        assert_eq!(st, "done", "{t}");
        assert_eq!(
            *lsn, lsn0,
            "{t}: a fresh seed copies every table at the slot's consistent point"
        );
    }
    let mut run = start_run(hub, &pipe);
    let res = bench.join().expect("pgbench thread");
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    wait_history_drained(hub, &hdb, member, &mdb, &mut run);
    assert_tables_equal(hub, &hdb, member, &mdb, &BENCH_TABLES);
    let st = run.sigint_and_wait();
    assert!(st.success(), "run exit {st}; log:\n{}", run.log_tail(40));
    let run_log = run.log_text();
    assert!(
        hub_wins_lines(&run_log).is_empty(),
        "hub-wins conflicts after a seed mean a change was applied twice or lost:\n{}",
        hub_wins_lines(&run_log).join("\n")
    );
    eprintln!(
        "seed_during_pgbench: scale {scale}, seeded in {seed_secs:.1} s ({} rows, peak RSS {} kB) while \
         pgbench ran {} transactions",
        log_field(&log, "seed finished", "rows").unwrap_or("?"),
        log_field(&log, "seed finished", "peak_rss_kb").unwrap_or("?"),
        res.transactions
    );
}

// ---------------------------------------------------------------------------
// 2. kill -9 at three stages, resume
// ---------------------------------------------------------------------------

/// Waits until a walsender on `hub` runs CREATE_REPLICATION_SLOT (and waits there).
fn wait_slot_creation(hub: &Cluster, seed: &mut Spawned) {
    wait_until(MINUTE, "seed to be creating a replication slot", || {
        seed.assert_running();
        hub.query_value(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE_REPLICATION_SLOT%' \
             AND state = 'active'",
        ) != "0"
    });
}

/// Waits until no walsender is creating a slot any more.
fn wait_no_slot_creation(hub: &Cluster) {
    wait_until(MINUTE, "the killed seed's walsender to end", || {
        hub.query_value(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE_REPLICATION_SLOT%' \
             AND state = 'active'",
        ) == "0"
    });
}

fn wait_slot_free(hub: &Cluster, slot: &str) {
    wait_until(MINUTE, &format!("slot {slot} to be free"), || {
        hub.slot(slot).is_none_or(|s| !s.active)
    });
}

/// Kill -9 (A) while the pipeline's slot is being created, (B) in the middle of
/// the copy with three tables finished and pgbench_accounts in flight, and (C)
/// while a resumed seed creates its new snapshot; pgbench writes all along. The
/// last seed keeps the three finished tables (log and status: their sync LSN is
/// still B's) and copies pgbench_accounts again at a later LSN; then `run`
/// converges with no hub-wins conflict.
#[test]
fn seed_kill9_at_three_stages_resumes() {
    let _t = Timed("seed_kill9_at_three_stages_resumes", Instant::now());
    let hub = hub();
    let member = member();
    let (scale, secs) = by_scale((3, 60), (20, 180));
    let hdb = hub.create_db("seed_kill");
    let mdb = member.create_db("seed_kill");
    hub.pgbench_init(&hdb, scale);
    member.psql(&mdb, BENCH_DDL);
    let pipe = Pipeline::new("seed_kill", &hub.url(&hdb), &member.url(&mdb), "");
    let slot = pipe.slot();
    let _slot = DropSlot {
        hub,
        slot: slot.clone(),
    };
    // One range per table: pgbench_accounts is then one blocked chunk in stage B.
    let args = ["--jobs", "2", "--chunk-pages", "1000000"];
    let bench = bench_thread(hub, &hdb, secs);
    wait_history_grows(hub, &hdb);

    // A: a hub transaction with an xid makes the slot creation wait.
    let xact = Holder::open(hub, &hdb, "SELECT txid_current()");
    let mut seed = pipe.spawn(&[&["seed"][..], &args[..]].concat());
    wait_slot_creation(hub, &mut seed);
    seed.kill9();
    xact.release();
    wait_no_slot_creation(hub);
    wait_slot_free(hub, &slot);
    eprintln!(
        "stage A: killed while creating the slot; slot now {:?}",
        hub.slot(&slot)
    );

    // B: a SHARE lock on the member's pgbench_accounts blocks its COPY only.
    let lock = Holder::open(member, &mdb, "LOCK TABLE pgbench_accounts IN SHARE MODE");
    let mut seed = pipe.spawn(&[&["seed"][..], &args[..]].concat());
    wait_until(
        by_scale(2, 10) * MINUTE,
        "three tables seeded, pgbench_accounts in flight",
        || {
            seed.assert_running();
            member
            .try_psql(
                &mdb,
                "SELECT count(*) FILTER (WHERE state = 'done') || '/' || count(*) FROM switchback.seed_tables",
            )
            .is_ok_and(|v| v.trim() == "3/4")
        },
    );
    seed.kill9();
    lock.release();
    let after_b = seed_states(&pipe);
    eprintln!("stage B: killed mid-copy; seed state {after_b:?}");
    let lsn_b = after_b
        .iter()
        .find(|t| t.0 == "pgbench_branches")
        .expect("branches")
        .2;
    assert!(after_b
        .iter()
        .any(|t| t.0 == "pgbench_accounts" && t.1 == "copying"));
    let status = pipe.run(&["status"]);
    assert_eq!(
        status.status.code(),
        Some(3),
        "status must flag the unfinished seed"
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("pgbench_accounts copying"));
    // Apply refuses to start on an unfinished seed.
    let refused = pipe.run(&["apply", "--until-empty"]);
    assert!(
        !refused.status.success(),
        "apply started on an unfinished seed"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unfinished"),
        "apply's refusal: {}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // C: killed while the resumed seed waits for its new snapshot.
    let xact = Holder::open(hub, &hdb, "SELECT txid_current()");
    let mut seed = pipe.spawn(&[&["seed"][..], &args[..]].concat());
    wait_slot_creation(hub, &mut seed);
    seed.kill9();
    xact.release();
    wait_no_slot_creation(hub);
    eprintln!("stage C: killed while creating the resume snapshot");

    // The resumed seed copies only pgbench_accounts.
    let log = seed_ok(&pipe, &args);
    for t in ["pgbench_branches", "pgbench_tellers", "pgbench_history"] {
        assert!(
            log.lines()
                .any(|l| l.contains("keeping finished table") && l.contains(t)),
            "{t} not kept; log:\n{log}"
        );
        assert!(
            !log.lines()
                .any(|l| l.contains("copying table") && l.contains(t)),
            "{t} copied again; log:\n{log}"
        );
    }
    assert!(log
        .lines()
        .any(|l| l.contains("copying table") && l.contains("pgbench_accounts")));
    let fin = seed_states(&pipe);
    eprintln!("after the resumed seed: {fin:?}");
    for (t, st, lsn, _, _) in &fin {
        assert_eq!(st, "done", "{t}");
        if t == "pgbench_accounts" {
            assert!(
                *lsn > lsn_b,
                "accounts re-copied at a new snapshot: {lsn} vs {lsn_b}"
            );
        } else {
            assert_eq!(*lsn, lsn_b, "{t} kept with its first sync LSN");
        }
    }
    assert!(
        !bench.is_finished(),
        "pgbench ended before the seeds did: make the load longer"
    );

    let mut run = start_run(hub, &pipe);
    let res = bench.join().expect("pgbench thread");
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    wait_history_drained(hub, &hdb, member, &mdb, &mut run);
    assert_tables_equal(hub, &hdb, member, &mdb, &BENCH_TABLES);
    let st = run.sigint_and_wait();
    assert!(st.success(), "run exit {st}");
    let run_log = run.log_text();
    assert!(
        hub_wins_lines(&run_log).is_empty(),
        "hub-wins conflicts after a resumed seed:\n{}",
        hub_wins_lines(&run_log).join("\n")
    );
}

// ---------------------------------------------------------------------------
// 3. --create-schema
// ---------------------------------------------------------------------------

fn index_defs(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(
        db,
        "SELECT tablename || ': ' || indexdef FROM pg_indexes WHERE schemaname IN ('public', 'app') \
         ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn constraints(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(
        db,
        "SELECT conrelid::regclass || ' ' || contype::text || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE connamespace IN (SELECT oid FROM pg_namespace WHERE nspname IN ('public', 'app')) \
           AND contype IN ('p', 'u') ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// An empty member: `--create-schema` creates every table with its primary key,
/// then the other indexes (plain, unique, multi-column, in another schema), copies
/// the rows (binary for built-in types, text for a user enum and arrays of it,
/// generated columns computed by the member); `run` then streams into them.
#[test]
fn seed_create_schema_builds_tables_keys_and_indexes() {
    let _t = Timed(
        "seed_create_schema_builds_tables_keys_and_indexes",
        Instant::now(),
    );
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("seed_schema");
    let mdb = member.create_db("seed_schema");
    hub.pgbench_init(&hdb, 1);
    let extra = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');";
    hub.psql(
        &hdb,
        &format!(
            "{extra}
             CREATE INDEX accounts_bid ON pgbench_accounts (bid);
             CREATE UNIQUE INDEX tellers_bid_tid ON pgbench_tellers (bid, tid);
             CREATE SCHEMA app;
             CREATE TABLE app.\"Mixed Case\" (id bigint, k text, m mood, ms mood[], n numeric(12,3), \
                 t timestamptz, j jsonb, b bytea, doubled bigint GENERATED ALWAYS AS (id * 2) STORED, \
                 PRIMARY KEY (id, k));
             CREATE INDEX mixed_m ON app.\"Mixed Case\" (m) WHERE m <> 'sad';
             INSERT INTO app.\"Mixed Case\" (id, k, m, ms, n, t, j, b) \
                 SELECT i, 'k' || i, (ARRAY['sad','ok','happy'])[1 + i % 3]::mood, \
                        ARRAY['ok', 'happy']::mood[], i / 7.0, '2024-01-01 00:00+00'::timestamptz + i * interval '1 min', \
                        jsonb_build_object('i', i), decode(md5(i::text), 'hex') \
                 FROM generate_series(1, 5000) i;
             CREATE TABLE sb_mark (id bigint PRIMARY KEY);"
        ),
    );
    // User types are not created by seed: the member has the enum.
    member.psql(&mdb, extra);
    let pipe = Pipeline::new("seed_schema", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = DropSlot {
        hub,
        slot: pipe.slot(),
    };

    // Without --create-schema: refused, naming the table and the fix.
    let out = pipe.run(&["seed"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist on the member") && err.contains("--create-schema"),
        "{err}"
    );

    let log = seed_ok(&pipe, &["--create-schema", "--jobs", "2"]);
    assert!(
        log.contains("format=\"text\"") && log.contains("format=\"binary\""),
        "formats; log:\n{log}"
    );
    assert_eq!(
        index_defs(hub, &hdb),
        index_defs(member, &mdb),
        "indexes differ"
    );
    assert_eq!(
        constraints(hub, &hdb),
        constraints(member, &mdb),
        "keys differ"
    );
    let mut tables: Vec<(&str, &str)> = BENCH_TABLES.to_vec();
    tables.push(("app.\"Mixed Case\"", "id, k"));
    assert_tables_equal(hub, &hdb, member, &mdb, &tables);

    // A second seed finds everything done and copies nothing.
    let again = seed_ok(&pipe, &["--create-schema"]);
    assert!(
        again.contains("every table in scope is seeded already"),
        "{again}"
    );

    // The stream continues into the created tables.
    let mut run = start_run(hub, &pipe);
    hub.psql(
        &hdb,
        "UPDATE app.\"Mixed Case\" SET m = 'happy', ms = ms || 'sad'::mood WHERE id <= 10; \
         DELETE FROM pgbench_accounts WHERE aid <= 5; INSERT INTO sb_mark VALUES (1)",
    );
    wait_until(MINUTE, "the marker on the member", || {
        run.assert_running();
        member.query_value(&mdb, "SELECT count(*) FROM sb_mark") == "1"
    });
    assert_tables_equal(hub, &hdb, member, &mdb, &tables);
    let st = run.sigint_and_wait();
    assert!(st.success());
}

// ---------------------------------------------------------------------------
// 4. a large table in ctid ranges across jobs, bounded memory
// ---------------------------------------------------------------------------

/// A table of 5,000,000 rows (300,000 at ci scale) split into ctid ranges copied by
/// two jobs: every range is copied once (count and md5 equal), both jobs worked,
/// and the seed's peak RSS stays small.
#[test]
fn seed_large_table_in_ranges_with_bounded_memory() {
    let _t = Timed(
        "seed_large_table_in_ranges_with_bounded_memory",
        Instant::now(),
    );
    let hub = hub();
    let member = member();
    let rows: u64 = by_scale(300_000, 5_000_000);
    let hdb = hub.create_db("seed_big");
    let mdb = member.create_db("seed_big");
    let ddl =
        "CREATE TABLE big (id bigint PRIMARY KEY, grp int NOT NULL, payload text, at timestamptz)";
    hub.psql(
        &hdb,
        &format!(
            "{ddl}; INSERT INTO big SELECT i, i % 1000, repeat(md5(i::text), 2), \
             '2024-01-01 00:00+00'::timestamptz + i * interval '1 s' FROM generate_series(1, {rows}) i; \
             VACUUM ANALYZE big"
        ),
    );
    member.psql(&mdb, ddl);
    let pages: u64 = hub
        .query_value(&hdb, "SELECT relpages FROM pg_class WHERE relname = 'big'")
        .parse()
        .unwrap();
    let pipe = Pipeline::new("seed_big", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = DropSlot {
        hub,
        slot: pipe.slot(),
    };
    // ci: ranges of 500 pages (about 11 of them); full: the automatic size.
    let chunk = (pages / 10).max(1).to_string();
    let mut args = vec!["--jobs", "2"];
    if rows < 1_000_000 {
        args.extend(["--chunk-pages", chunk.as_str()]);
    }
    let t0 = Instant::now();
    let mut p = pipe.spawn(&[&["seed"][..], &args[..]].concat());
    let mut peak_sampled = 0u64;
    let st = wait_for(by_scale(5, 20) * MINUTE, "seed to end", || {
        if let Some(kb) = switchback_tests::peak_rss_kb(p.pid()) {
            peak_sampled = peak_sampled.max(kb);
        }
        p.try_wait()
    });
    let secs = t0.elapsed().as_secs_f64();
    let log = p.log_text();
    assert!(st.success(), "seed failed ({st}); log:\n{log}");
    let states = seed_states(&pipe);
    let chunks = states[0].4;
    assert!(
        chunks >= 4,
        "big split into {chunks} ranges (pages {pages}); log:\n{log}"
    );
    let jobs_with_work = log
        .lines()
        .filter(|l| l.contains("copy job finished"))
        .filter(|l| !l.contains("chunks=0"))
        .count();
    assert_eq!(jobs_with_work, 2, "both jobs copied ranges; log:\n{log}");
    assert_tables_equal(hub, &hdb, member, &mdb, &[("big", "id")]);
    let peak: u64 = log_field(&log, "seed finished", "peak_rss_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(peak_sampled);
    eprintln!(
        "seed_large_table: {rows} rows, {pages} pages in {chunks} ranges, 2 jobs, {secs:.1} s, peak RSS {peak} kB"
    );
    assert!(
        peak < 150 * 1024,
        "seed peak RSS {peak} kB: memory is not bounded"
    );
}

// ---------------------------------------------------------------------------
// 5. run --seed
// ---------------------------------------------------------------------------

/// `run --seed` seeds, then streams: rows written after the seed reach the member;
/// restarted, it finds everything seeded and copies nothing again.
#[test]
fn run_with_seed_seeds_then_streams() {
    let _t = Timed("run_with_seed_seeds_then_streams", Instant::now());
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("seed_run");
    let mdb = member.create_db("seed_run");
    hub.pgbench_init(&hdb, 1);
    member.psql(&mdb, BENCH_DDL);
    let pipe = Pipeline::new("seed_run", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = DropSlot {
        hub,
        slot: pipe.slot(),
    };
    for round in 0..2 {
        let mut run = pipe.spawn(&["run", "--seed", "--jobs", "2"]);
        let slot = pipe.slot();
        wait_until(MINUTE, "run --seed to stream", || {
            run.assert_running();
            hub.slot(&slot).is_some_and(|s| s.active)
        });
        hub.pgbench(&hdb, 2, 2, &[]);
        wait_history_drained(hub, &hdb, member, &mdb, &mut run);
        assert_tables_equal(hub, &hdb, member, &mdb, &BENCH_TABLES);
        let st = run.sigint_and_wait();
        assert!(st.success(), "run --seed exit {st}");
        let log = run.log_text();
        if round == 0 {
            assert!(log.contains("seed finished"), "{log}");
        } else {
            assert!(
                log.contains("every table in scope is seeded already"),
                "{log}"
            );
            assert!(!log.contains("copying table"), "{log}");
        }
        assert!(hub_wins_lines(&log).is_empty(), "{log}");
    }
}

// ---------------------------------------------------------------------------
// 6. kill -9 in the middle of a table split into ranges
// ---------------------------------------------------------------------------

/// A table split into ranges, with hub updates moving rows between pages all along:
/// the seed is killed -9 after two ranges committed (an `ENABLE ALWAYS` trigger on
/// the member makes later ranges wait on an advisory lock the test holds). The
/// resumed seed empties the table and copies every range again at a new snapshot
/// (ranges of two snapshots would not fit together); `run` then converges.
#[test]
fn seed_kill9_mid_split_table_recopies_it() {
    let _t = Timed("seed_kill9_mid_split_table_recopies_it", Instant::now());
    let hub = hub();
    let member = member();
    let rows: u64 = by_scale(200_000, 1_000_000);
    let hdb = hub.create_db("seed_split");
    let mdb = member.create_db("seed_split");
    let ddl = "CREATE TABLE big (id bigint PRIMARY KEY, grp int NOT NULL, payload text)";
    hub.psql(
        &hdb,
        &format!(
            "{ddl}; INSERT INTO big SELECT i, i % 1000, md5(i::text) FROM generate_series(1, {rows}) i; \
             VACUUM ANALYZE big"
        ),
    );
    member.psql(&mdb, ddl);
    // Later ranges wait (after their COPY, before their commit) once two are done.
    member.psql(
        &mdb,
        "CREATE FUNCTION wait_after_two() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF (SELECT chunks_done FROM switchback.seed_tables WHERE table_name = 'big') >= 2 THEN \
             PERFORM pg_advisory_xact_lock(4242); \
           END IF; RETURN NULL; END $$; \
         CREATE TRIGGER wait_after_two AFTER INSERT ON big FOR EACH STATEMENT EXECUTE FUNCTION wait_after_two(); \
         ALTER TABLE big ENABLE ALWAYS TRIGGER wait_after_two;",
    );
    let pages: u64 = hub
        .query_value(&hdb, "SELECT relpages FROM pg_class WHERE relname = 'big'")
        .parse()
        .unwrap();
    let pipe = Pipeline::new("seed_split", &hub.url(&hdb), &member.url(&mdb), "");
    let _slot = DropSlot {
        hub,
        slot: pipe.slot(),
    };
    // Updates on the hub move rows to other pages during both seeds and until run.
    let script = pipe.dir().join("move.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, {rows})\nUPDATE big SET payload = payload || 'x', grp = grp + 1 WHERE id = :id;\n"
        ),
    )
    .unwrap();
    let load = {
        let db = hdb.clone();
        let script = script.to_str().unwrap().to_string();
        let secs = by_scale(40, 90);
        std::thread::spawn(move || hub.pgbench(&db, 2, secs, &["-f", &script]))
    };
    let chunk = (pages / 12).max(1).to_string();
    let args = ["--jobs", "2", "--chunk-pages", chunk.as_str()];

    let lock = Holder::open(member, &mdb, "SELECT pg_advisory_xact_lock(4242)");
    let mut seed = pipe.spawn(&[&["seed"][..], &args[..]].concat());
    wait_until(
        MINUTE,
        "two ranges of big committed, the others waiting",
        || {
            seed.assert_running();
            // At least two ranges committed (two jobs can both pass the trigger's
            // check before either commit is visible), some left, and both jobs
            // waiting on this database's lock.
            member
                .try_psql(
                    &mdb,
                    "SELECT state = 'copying' AND chunks_done >= 2 AND chunks_done < chunks_total \
                     FROM switchback.seed_tables WHERE table_name = 'big'",
                )
                .is_ok_and(|v| v.trim() == "t")
                && member.query_value(
                    &mdb,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                ) == "2"
        },
    );
    seed.kill9();
    lock.release();
    let first = seed_states(&pipe);
    eprintln!("killed with {first:?}");
    let committed: u64 = member
        .query_value(&mdb, "SELECT count(*) FROM big")
        .parse()
        .unwrap();
    assert!(
        committed > 0 && committed < rows,
        "two ranges' rows stay committed: {committed}"
    );
    member.psql(&mdb, "DROP TRIGGER wait_after_two ON big");

    let log = seed_ok(&pipe, &args);
    assert!(
        log.lines()
            .any(|l| l.contains("copying table") && l.contains("truncate=true")),
        "the partly copied table is emptied first; log:\n{log}"
    );
    let second = seed_states(&pipe);
    assert_eq!(second[0].1, "done");
    assert!(second[0].2 > first[0].2, "copied again at a later snapshot");
    assert!(second[0].4 >= 4, "split into ranges: {second:?}");
    assert!(
        !load.is_finished(),
        "the hub load ended before the seeds did"
    );

    let mut run = start_run(hub, &pipe);
    let res = load.join().expect("load thread");
    assert_eq!(res.failed, 0, "{}", res.output);
    // The last hub update is applied once the member's sum of grp matches.
    let q = "SELECT sum(grp)::text || ':' || sum(length(payload))::text FROM big";
    let want = hub.query_value(&hdb, q);
    wait_until(
        by_scale(3, 10) * MINUTE,
        "member big to match the hub",
        || {
            run.assert_running();
            member.query_value(&mdb, q) == want
        },
    );
    assert_tables_equal(hub, &hdb, member, &mdb, &[("big", "id")]);
    let st = run.sigint_and_wait();
    assert!(st.success());
    assert!(
        hub_wins_lines(&run.log_text()).is_empty(),
        "{}",
        run.log_text()
    );
    eprintln!(
        "seed_kill9_mid_split: {rows} rows, {} ranges; killed with {committed} rows committed; {} hub updates",
        second[0].4, res.transactions
    );
}

// ---------------------------------------------------------------------------
// 3. The column mapping applies during seed (the expand/contract rename)
// ---------------------------------------------------------------------------

/// The rename scenario of the mapping issue, seeded: the hub has
/// `person(id, first_name, last_name)`, the member `person(id, first_name, surname,
/// nickname NULL, source NOT NULL)`; `last_name → surname`, `source` a constant. A
/// second table is seeded through its row filter only. The hub is written while
/// seed runs; after `run` the member equals the hub through the mapping.
#[test]
fn seed_applies_the_column_mapping() {
    let _t = Timed("seed_applies_the_column_mapping", Instant::now());
    let hub = hub();
    let member = member();
    let hdb = hub.create_db("seed_map");
    let mdb = member.create_db("seed_map");
    hub.psql(
        &hdb,
        "CREATE TABLE person (id int PRIMARY KEY, first_name text, last_name text); \
         INSERT INTO person SELECT g, 'f' || g, 'l' || g FROM generate_series(1, 5000) g; \
         CREATE TABLE canary (id int PRIMARY KEY, v text); \
         INSERT INTO canary SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    );
    member.psql(
        &mdb,
        "CREATE TABLE person (id int PRIMARY KEY, first_name text, surname text, \
                              nickname text NULL, source text NOT NULL); \
         CREATE TABLE canary (id int PRIMARY KEY, v text);",
    );
    let rules = "[[tables.table]]\nschema = \"public\"\nname = \"person\"\n\
                 [tables.table.rename]\nlast_name = \"surname\"\n\
                 [tables.table.constants]\nsource = \"hub\"\n\
                 [[tables.table]]\nschema = \"public\"\nname = \"canary\"\n\
                 row_filter = \"id in (1, 2, 3) or id between 600 and 10000\"\n";
    let pipe = Pipeline::new("seed_map", &hub.url(&hdb), &member.url(&mdb), rules);
    let _slot = DropSlot {
        hub,
        slot: pipe.slot(),
    };
    // Writes while seeding: renames of last_name, inserts, deletes.
    let writer = {
        let hdb = hdb.clone();
        std::thread::spawn(move || {
            let mut sql = String::new();
            for n in 0..400 {
                let id = 1 + (n * 37) % 6000;
                sql.push_str(&match n % 4 {
                    0 => format!(
                        "INSERT INTO person VALUES ({id}, 'nf{n}', 'nl{n}') \
                         ON CONFLICT (id) DO UPDATE SET last_name = excluded.last_name;\n"
                    ),
                    1 => format!(
                        "UPDATE person SET last_name = last_name || '+{n}' WHERE id = {id};\n"
                    ),
                    2 => format!("DELETE FROM person WHERE id = {id};\n"),
                    _ => format!(
                        "UPDATE canary SET v = v || '+{n}' WHERE id = {};\n",
                        1 + n % 1000
                    ),
                });
            }
            switchback_tests::hub().psql(&hdb, &sql);
        })
    };
    let log = seed_ok(&pipe, &["--jobs", "2"]);
    writer.join().unwrap();
    assert!(log.contains("seed finished"), "{log}");
    hub.psql(
        &hdb,
        "INSERT INTO person VALUES (1000000, 'last', 'marker')",
    );
    let mut run = start_run(hub, &pipe);
    wait_until(MINUTE, "the marker row to reach the member", || {
        run.assert_running();
        member.query_value(&mdb, "SELECT count(*) FROM person WHERE id = 1000000") == "1"
    });
    let h = hub.psql(
        &hdb,
        "COPY (SELECT id, first_name, last_name FROM person ORDER BY id) TO STDOUT",
    );
    let m = member.psql(
        &mdb,
        "COPY (SELECT id, first_name, surname FROM person ORDER BY id) TO STDOUT",
    );
    assert!(h.lines().count() > 4000, "hub rows: {}", h.lines().count());
    assert!(h == m, "person differs through the mapping");
    assert_eq!(
        member.query_value(
            &mdb,
            "SELECT count(*) FROM person WHERE source IS DISTINCT FROM 'hub' OR nickname IS NOT NULL"
        ),
        "0"
    );
    let filtered =
        "COPY (SELECT id, v FROM canary WHERE id in (1, 2, 3) or id between 600 and 10000 \
                    ORDER BY id) TO STDOUT";
    let (h, m) = (
        hub.psql(&hdb, filtered),
        member.psql(
            &mdb,
            "COPY (SELECT id, v FROM canary ORDER BY id) TO STDOUT",
        ),
    );
    assert_eq!(h.lines().count(), 404);
    assert!(h == m, "canary differs through its row filter");
    let st = run.sigint_and_wait();
    assert!(st.success(), "run exit {st}");
    assert!(
        hub_wins_lines(&run.log_text()).is_empty(),
        "{}",
        run.log_text()
    );
}
