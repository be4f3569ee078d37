//! Capture acceptance tests: hub → `switchback capture` → queue, observed through
//! `switchback queue dump --json`. The member is not used.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use switchback_tests::{
    assert_dump_order, by_scale, hub, peak_rss_kb, txn_header, wait_until, Cluster, ClusterOptions,
    DumpItem, DumpTxn, Lsn, Pipeline, Spawned,
};

const MINUTE: Duration = Duration::from_secs(60);

/// Waits until the slot has confirmed everything the hub has written so far, then
/// stops capture with SIGINT and asserts a clean exit. Returns the position waited for.
fn stop_when_caught_up(
    hub: &Cluster,
    pipe: &Pipeline,
    cap: &mut Spawned,
    timeout: Duration,
) -> Lsn {
    let target = hub.current_wal_lsn();
    let slot = pipe.slot();
    wait_until(timeout, &format!("slot {slot} to confirm {target}"), || {
        cap.assert_running();
        hub.slot(&slot)
            .and_then(|s| s.confirmed_flush)
            .is_some_and(|c| c >= target)
    });
    let st = cap.sigint_and_wait();
    assert!(
        st.success(),
        "capture did not exit cleanly on SIGINT ({st}); log:\n{}",
        cap.log_tail(40)
    );
    target
}

/// Runs SQL in one transaction and returns its xid.
fn txn(hub: &Cluster, db: &str, sql: &str) -> u64 {
    let out = hub.psql(
        db,
        &format!("BEGIN;\n{sql}\nSELECT pg_current_xact_id();\nCOMMIT;"),
    );
    let last = out.lines().last().unwrap_or_default();
    last.parse()
        .unwrap_or_else(|_| panic!("no xid in psql output {out:?}"))
}

/// Sorts the table list of truncate changes (its order is PostgreSQL's choice).
fn normalize(mut changes: Value) -> Value {
    if let Some(arr) = changes.as_array_mut() {
        for c in arr {
            if c["op"] == "truncate" {
                if let Some(t) = c["tables"].as_array_mut() {
                    t.sort_by_key(|v| v.to_string());
                }
            }
        }
    }
    changes
}

fn ins(table: &str, new: Value) -> Value {
    json!({"op": "insert", "schema": "public", "table": table, "new": new, "old": null, "unchanged": []})
}
fn upd(table: &str, old: Value, new: Value, unchanged: Value) -> Value {
    json!({"op": "update", "schema": "public", "table": table, "new": new, "old": old, "unchanged": unchanged})
}
fn del(table: &str, old: Value) -> Value {
    json!({"op": "delete", "schema": "public", "table": table, "new": null, "old": old, "unchanged": []})
}

/// Acceptance 1: every kind of change appears exactly as committed, in commit order.
#[test]
fn captures_every_change_kind_exactly_in_commit_order() {
    let hub = hub();
    let db = hub.create_db("kinds");
    hub.psql(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
         CREATE TABLE parent (id serial PRIMARY KEY, name text);
         CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent (id), note text);
         CREATE TABLE docs (id int PRIMARY KEY, body text, tag text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE nopk (a int, b text);
         ALTER TABLE nopk REPLICA IDENTITY FULL;",
    );
    let pipe = Pipeline::capture_only("kinds", hub, &db, "");
    let mut cap = pipe.start_capture(hub);

    let big = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i)";
    let mut expected: Vec<(u64, Value)> = Vec::new();
    let mut t = |sql: &str, changes: Value| expected.push((txn(hub, &db, sql), changes));

    t(
        "INSERT INTO items VALUES (1, 'apple', 5), (2, 'pear', NULL);",
        json!([
            ins("items", json!({"id": "1", "name": "apple", "qty": "5"})),
            ins("items", json!({"id": "2", "name": "pear", "qty": null})),
        ]),
    );
    t(
        "UPDATE items SET qty = 7 WHERE id = 1;",
        json!([upd(
            "items",
            json!(null),
            json!({"id": "1", "name": "apple", "qty": "7"}),
            json!([])
        )]),
    );
    t(
        "UPDATE items SET id = 10 WHERE id = 1;",
        json!([upd(
            "items",
            json!({"id": "1"}),
            json!({"id": "10", "name": "apple", "qty": "7"}),
            json!([])
        )]),
    );
    t(
        "DELETE FROM items WHERE id = 2;",
        json!([del("items", json!({"id": "2"}))]),
    );
    // Aborted: must not appear.
    hub.psql(
        &db,
        "BEGIN; INSERT INTO items VALUES (99, 'ghost', 0); ROLLBACK;",
    );
    t(
        "INSERT INTO parent (name) VALUES ('p1'), ('p2');
         INSERT INTO child (parent_id, note) VALUES (1, 'c1'), (2, 'c2');",
        json!([
            ins("parent", json!({"id": "1", "name": "p1"})),
            ins("parent", json!({"id": "2", "name": "p2"})),
            ins("child", json!({"id": "1", "parent_id": "1", "note": "c1"})),
            ins("child", json!({"id": "2", "parent_id": "2", "note": "c2"})),
        ]),
    );
    t(
        "TRUNCATE parent RESTART IDENTITY CASCADE;",
        json!([{
            "op": "truncate",
            "tables": [{"schema": "public", "table": "child"}, {"schema": "public", "table": "parent"}],
            "cascade": true,
            "restart_identity": true,
        }]),
    );
    // RESTART IDENTITY: the sequence starts again at 1.
    t(
        "INSERT INTO parent (name) VALUES ('p3');",
        json!([ins("parent", json!({"id": "1", "name": "p3"}))]),
    );
    t(
        "SELECT pg_logical_emit_message(true, 'prefix', 'content');",
        json!([{"op": "message", "prefix": "prefix", "content": "content"}]),
    );
    let doc_xid = txn(
        hub,
        &db,
        &format!("INSERT INTO docs VALUES (1, {big}, 'a');"),
    );
    let body = hub.query_value(&db, "SELECT body FROM docs WHERE id = 1");
    assert_eq!(body.len(), 64_000, "test setup: body is 2000 md5s");
    let toast_bytes: i64 = hub
        .query_value(
            &db,
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'docs'::regclass",
        )
        .parse()
        .unwrap();
    assert!(toast_bytes >= 64_000, "test setup: docs.body must be stored out of line (toast relation holds {toast_bytes} bytes)");
    expected.push((
        doc_xid,
        json!([ins("docs", json!({"id": "1", "body": body, "tag": "a"}))]),
    ));
    let mut t = |sql: &str, changes: Value| expected.push((txn(hub, &db, sql), changes));
    // The TOASTed column is untouched: unchanged, not in `new`.
    t(
        "UPDATE docs SET tag = 'b' WHERE id = 1;",
        json!([upd(
            "docs",
            json!(null),
            json!({"id": "1", "tag": "b"}),
            json!(["body"])
        )]),
    );
    t(
        "INSERT INTO nopk VALUES (1, 'x'), (2, 'y');",
        json!([
            ins("nopk", json!({"a": "1", "b": "x"})),
            ins("nopk", json!({"a": "2", "b": "y"})),
        ]),
    );
    t(
        "UPDATE nopk SET b = 'z' WHERE a = 1;",
        json!([upd(
            "nopk",
            json!({"a": "1", "b": "x"}),
            json!({"a": "1", "b": "z"}),
            json!([])
        )]),
    );
    t(
        "DELETE FROM nopk WHERE a = 2;",
        json!([del("nopk", json!({"a": "2", "b": "y"}))]),
    );
    // Several kinds in one transaction keep their order.
    t(
        "INSERT INTO items VALUES (3, 'fig', 1);
         SELECT pg_logical_emit_message(true, 'p2', 'mid');
         UPDATE items SET name = 'plum' WHERE id = 3;
         DELETE FROM items WHERE id = 10;",
        json!([
            ins("items", json!({"id": "3", "name": "fig", "qty": "1"})),
            {"op": "message", "prefix": "p2", "content": "mid"},
            upd("items", json!(null), json!({"id": "3", "name": "plum", "qty": "1"}), json!([])),
            del("items", json!({"id": "10"})),
        ]),
    );

    stop_when_caught_up(hub, &pipe, &mut cap, MINUTE);
    let dump = pipe.dump();
    let headers: Vec<DumpTxn> = dump.iter().map(txn_header).collect();
    assert_dump_order(&headers);
    assert_eq!(
        dump.len(),
        expected.len(),
        "stored transactions: {:#?}",
        dump.iter()
            .map(|d| normalize(d["changes"].clone()))
            .collect::<Vec<_>>()
    );
    for (i, (d, (xid, changes))) in dump.iter().zip(expected).enumerate() {
        assert_eq!(d["xid"].as_u64(), Some(xid), "transaction #{i}: xid");
        assert_eq!(d["origin"], Value::Null, "transaction #{i}: origin");
        assert_eq!(
            normalize(d["changes"].clone()),
            normalize(changes),
            "transaction #{i} (xid {xid})"
        );
    }
}

/// What the dump holds of a pgbench database.
struct BenchDump {
    /// Transactions that insert into pgbench_history.
    history_txns: u64,
    /// pgbench_history rows by hid.
    history: BTreeMap<String, Map<String, Value>>,
    headers: Vec<DumpTxn>,
    problems: Vec<String>,
}

fn read_bench_dump(pipe: &Pipeline) -> BenchDump {
    let mut d = BenchDump {
        history_txns: 0,
        history: BTreeMap::new(),
        headers: Vec::new(),
        problems: Vec::new(),
    };
    let mut shape: Vec<(String, String)> = Vec::new();
    let mut inserts_in_txn = 0u64;
    let mut problems = Vec::new();
    let mut history = BTreeMap::new();
    let mut headers = Vec::new();
    let mut history_txns = 0;
    pipe.dump_stream(|item| match item {
        DumpItem::Change(c) => {
            let op = c["op"].as_str().unwrap_or("?").to_string();
            let table = c["table"].as_str().unwrap_or("?").to_string();
            if table == "pgbench_history" && op == "insert" {
                inserts_in_txn += 1;
                let row = c["new"].as_object().cloned().unwrap_or_default();
                let hid = row
                    .get("hid")
                    .and_then(|h| h.as_str())
                    .unwrap_or("?")
                    .to_string();
                if history.insert(hid.clone(), row).is_some() {
                    problems.push(format!("hid {hid} inserted twice"));
                }
            }
            shape.push((op, table));
        }
        DumpItem::End(h) => {
            // A tpcb-like transaction: three updates and one history insert.
            let mut s = std::mem::take(&mut shape);
            s.sort();
            let want = [
                ("insert", "pgbench_history"),
                ("update", "pgbench_accounts"),
                ("update", "pgbench_branches"),
                ("update", "pgbench_tellers"),
            ];
            let got: Vec<(&str, &str)> = s.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            if got != want && problems.len() < 20 {
                problems.push(format!(
                    "txn seq {} xid {} has changes {got:?}",
                    h.seq, h.xid
                ));
            }
            if inserts_in_txn > 0 {
                history_txns += 1;
            }
            inserts_in_txn = 0;
            headers.push(h);
        }
    });
    d.history_txns = history_txns;
    d.history = history;
    d.headers = headers;
    d.problems = problems;
    d
}

/// The log holds exactly the hub's committed pgbench transactions.
fn assert_bench_exact(hub: &Cluster, db: &str, pipe: &Pipeline, pgbench_txns: u64) {
    let d = read_bench_dump(pipe);
    assert!(d.problems.is_empty(), "dump problems: {:#?}", d.problems);
    assert_dump_order(&d.headers);
    let hub_rows: BTreeMap<String, Map<String, Value>> = hub
        .rows_as_text(db, "pgbench_history", "hid")
        .into_iter()
        .map(|r| (r["hid"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(
        hub_rows.len() as u64,
        pgbench_txns,
        "test premise: pgbench_history on the hub has one row per pgbench transaction"
    );
    let missing: Vec<&String> = hub_rows
        .keys()
        .filter(|k| !d.history.contains_key(*k))
        .collect();
    let extra: Vec<&String> = d
        .history
        .keys()
        .filter(|k| !hub_rows.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "history rows missing from the log: {} (first {:?}); in the log but not on the hub: {} (first {:?})",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>()
    );
    for (hid, row) in &hub_rows {
        assert_eq!(&d.history[hid], row, "history row hid {hid} differs");
    }
    assert_eq!(
        d.history_txns, pgbench_txns,
        "stored transactions with a history insert vs pgbench's count"
    );
    assert_eq!(
        d.headers.len() as u64,
        pgbench_txns,
        "stored transactions vs pgbench's count"
    );
}

/// Acceptance 2: four pgbench clients while capture runs; the log holds exactly the
/// hub's committed transactions.
#[test]
fn pgbench_load_is_captured_exactly() {
    let hub = hub();
    let db = hub.create_db("bench");
    hub.pgbench_init(&db, 1);
    let pipe = Pipeline::capture_only("bench", hub, &db, "");
    let mut cap = pipe.start_capture(hub);
    let secs = by_scale(5, 10);
    let started = Instant::now();
    let res = hub.pgbench(&db, 4, secs, &[]);
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    assert!(res.transactions > 0);
    cap.assert_running();
    stop_when_caught_up(hub, &pipe, &mut cap, 5 * MINUTE);
    eprintln!(
        "pgbench_load: {} transactions in {secs} s, caught up {:?} after start",
        res.transactions,
        started.elapsed()
    );
    assert_bench_exact(hub, &db, &pipe, res.transactions);
}

fn test_rng() -> fastrand::Rng {
    let seed = std::env::var("SWITCHBACK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("random seed {seed} (set SWITCHBACK_TEST_SEED to replay)");
    fastrand::Rng::with_seed(seed)
}

/// Acceptance 3: kill -9 at random moments during a pgbench run, restarting each
/// time; after a final clean run, nothing is missing and nothing is twice.
#[test]
fn kill9_during_pgbench_loses_and_duplicates_nothing() {
    let hub = hub();
    let db = hub.create_db("kill");
    hub.pgbench_init(&db, 1);
    let pipe = Pipeline::capture_only("kill", hub, &db, "");
    let mut rng = test_rng();
    let kills = by_scale(6, 20);
    let secs = by_scale(12, 40);
    // Random delays between kills, scaled down if needed so that all of them fit
    // in 70% of the pgbench run (room for the restarts).
    let mean_ms = (secs as u64 * 1000 * 6 / 10) / kills;
    let mut delays: Vec<u64> = (0..kills).map(|_| rng.u64(50..2 * mean_ms)).collect();
    let budget = secs as u64 * 1000 * 7 / 10;
    let total: u64 = delays.iter().sum();
    if total > budget {
        delays.iter_mut().for_each(|d| *d = *d * budget / total);
    }
    let mut cap = pipe.start_capture(hub);

    let bench = {
        let db = db.clone();
        std::thread::spawn(move || hub.pgbench(&db, 4, secs, &[]))
    };
    let mut killed_at = Vec::new();
    let t0 = Instant::now();
    for (done, delay) in delays.into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(delay)); // the fault injection itself
        assert!(
            !bench.is_finished(),
            "pgbench ended before kill {} of {kills}; lengthen the run",
            done + 1
        );
        let st = cap.kill9();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "capture had exited by itself before kill {} ({st}); log:\n{}",
            done + 1,
            cap.log_tail(40)
        );
        killed_at.push(t0.elapsed().as_millis());
        cap = pipe.spawn(&["capture"]);
    }
    eprintln!("kill9: {kills} kills at ms {killed_at:?}");
    let res = bench.join().expect("pgbench thread");
    assert_eq!(res.failed, 0, "pgbench failures:\n{}", res.output);
    cap.assert_running();
    stop_when_caught_up(hub, &pipe, &mut cap, 5 * MINUTE);
    eprintln!("kill9: pgbench committed {} transactions", res.transactions);
    assert_bench_exact(hub, &db, &pipe, res.transactions);
}

/// Acceptance 4: one huge transaction, captured completely with bounded memory.
fn big_transaction(hub: &Cluster, streaming: bool) {
    // SWITCHBACK_TEST_BIG_ROWS overrides the size (to see whether memory plateaus).
    let n: u64 = std::env::var("SWITCHBACK_TEST_BIG_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(by_scale(200_000, 1_000_000));
    let label = if streaming { "big_stream" } else { "big" };
    let db = hub.create_db(label);
    hub.psql(&db, "CREATE TABLE big (id int PRIMARY KEY, payload text)");
    let extra = if streaming {
        "[capture]\nstreaming = true\n"
    } else {
        ""
    };
    let pipe = Pipeline::capture_only(label, hub, &db, extra);
    let mut cap = pipe.start_capture(hub);
    let rows = |from: u64, to: u64| {
        format!(
            "INSERT INTO big SELECT i, rpad(md5(i::text), 100, md5((-i)::text)) \
             FROM generate_series({from}, {to}) i;"
        )
    };
    let t0 = Instant::now();
    let half = n / 2;
    let rolled_back = (n + 1, n + n / 10);
    if streaming {
        // A sub-transaction rolled back in the middle: its rows must not appear.
        hub.psql(
            &db,
            &format!(
                "BEGIN;\n{}\nSAVEPOINT s;\n{}\nROLLBACK TO SAVEPOINT s;\n{}\nCOMMIT;",
                rows(1, half),
                rows(rolled_back.0, rolled_back.1),
                rows(half + 1, n)
            ),
        );
    } else {
        hub.psql(&db, &rows(1, n));
    }
    let inserted = t0.elapsed();
    let target = hub.current_wal_lsn();
    hub.wait_slot_confirmed(&pipe.slot(), target, 20 * MINUTE);
    let captured = t0.elapsed();
    cap.assert_running();
    let rss_kb = peak_rss_kb(cap.pid()).expect("VmHWM of capture");
    let st = cap.sigint_and_wait();
    assert!(
        st.success(),
        "capture exit {st}; log:\n{}",
        cap.log_tail(40)
    );
    eprintln!(
        "{label}: {n} rows; hub insert {inserted:?}; captured (slot confirmed) after {captured:?}; \
         capture peak RSS {} MB ({rss_kb} kB)",
        rss_kb / 1024
    );

    if streaming {
        // The hub did stream the transaction (and the test is not vacuous).
        let q = format!(
            "SELECT coalesce((SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = '{}'), 0)",
            pipe.slot()
        );
        wait_until(
            Duration::from_secs(30),
            "pg_stat_replication_slots.stream_txns > 0",
            || hub.query_value("postgres", &q).parse::<i64>().unwrap_or(0) > 0,
        );
    }

    let mut seen = vec![false; n as usize + 1];
    let mut bad: Vec<String> = Vec::new();
    let mut txns = Vec::new();
    let t1 = Instant::now();
    let dump_rss_kb = pipe.dump_stream(|item| match item {
        DumpItem::Change(c) => {
            let id = c["new"]["id"].as_str().and_then(|s| s.parse::<u64>().ok());
            match (c["op"].as_str(), c["table"].as_str(), id) {
                (Some("insert"), Some("big"), Some(id)) if (1..=n).contains(&id) => {
                    if std::mem::replace(&mut seen[id as usize], true) && bad.len() < 10 {
                        bad.push(format!("id {id} twice"));
                    }
                }
                _ => {
                    if bad.len() < 10 {
                        let mut s = c.to_string();
                        s.truncate(200);
                        bad.push(format!("unexpected change {s}"));
                    }
                }
            }
        }
        DumpItem::End(t) => txns.push(t),
    });
    eprintln!(
        "{label}: dump read in {:?}; `queue dump` peak RSS {} MB (sampled)",
        t1.elapsed(),
        dump_rss_kb / 1024
    );
    assert!(
        bad.is_empty(),
        "{bad:#?} (rolled-back ids are {rolled_back:?})"
    );
    assert_eq!(txns.len(), 1, "one stored transaction: {txns:?}");
    assert_eq!(txns[0].changes, n, "changes in the stored transaction");
    let missing = seen[1..].iter().filter(|s| !**s).count();
    assert_eq!(missing, 0, "ids missing from the log");
    assert!(
        rss_kb < 200 * 1024,
        "capture peak RSS {rss_kb} kB exceeds 200 MB for a {n}-row transaction"
    );
}

#[test]
fn huge_transaction_is_captured_with_bounded_memory() {
    big_transaction(hub(), false);
}

#[test]
fn huge_streamed_transaction_with_rolled_back_savepoint() {
    let c = Cluster::new_dedicated(
        "streaming",
        ClusterOptions::default().conf("logical_decoding_work_mem = 64kB"),
    );
    big_transaction(&c, true);
}

/// Acceptance 5: while only unpublished tables are written, the slot still advances.
#[test]
fn slot_advances_while_only_unpublished_tables_are_written() {
    let hub = hub();
    let db = hub.create_db("unpub");
    hub.psql(
        &db,
        "CREATE TABLE pub_t (id int PRIMARY KEY);
         CREATE TABLE unpub_log (id serial PRIMARY KEY, x text);
         CREATE TABLE unpub_other (id serial PRIMARY KEY, x text);",
    );
    let pipe = Pipeline::capture_only(
        "unpub",
        hub,
        &db,
        "[tables]\nexclude = [\"public.unpub*\"]\n",
    );
    let mut cap = pipe.start_capture(hub);
    let slot = pipe.slot();
    let before = hub
        .slot(&slot)
        .and_then(|s| s.confirmed_flush)
        .expect("slot");
    for _ in 0..by_scale(10, 40) {
        hub.psql(
            &db,
            "INSERT INTO unpub_log (x) SELECT md5(g::text) FROM generate_series(1, 5000) g;
             INSERT INTO unpub_other (x) SELECT md5(g::text) FROM generate_series(1, 1000) g;",
        );
    }
    let target = hub.current_wal_lsn();
    assert!(target > before, "test premise: WAL was written");
    let reached = hub.wait_slot_confirmed(&slot, target, 2 * MINUTE);
    eprintln!(
        "unpublished: slot moved {before} -> {reached} over {} MB of unpublished WAL",
        (target.0 - before.0) / (1 << 20)
    );
    // A published write after them is still captured, alone.
    let xid = txn(hub, &db, "INSERT INTO pub_t VALUES (42);");
    stop_when_caught_up(hub, &pipe, &mut cap, MINUTE);
    let dump = pipe.dump();
    assert_eq!(
        dump.len(),
        1,
        "only the published transaction is stored: {dump:?}"
    );
    assert_eq!(dump[0]["xid"].as_u64(), Some(xid));
    assert_eq!(
        dump[0]["changes"],
        json!([ins("pub_t", json!({"id": "42"}))])
    );
}

/// Runs capture until it exits on its own (at most a minute); asserts a non-zero
/// exit and returns the error paragraph (`error: ...` up to the next log line).
fn capture_error(pipe: &Pipeline) -> String {
    let mut cap = pipe.spawn(&["capture"]);
    let st = cap.wait_timeout(MINUTE);
    let log = cap.log_text();
    assert!(
        !st.success() && st.code().is_some(),
        "capture should fail with an exit code, got {st}; log:\n{log}"
    );
    let mut lines = log.lines().skip_while(|l| !l.starts_with("error: "));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no `error: ` line on stderr:\n{log}"));
    let mut para = vec![first];
    // Continuation lines until the next log record (a timestamp, maybe coloured).
    let is_log_record = |l: &str| {
        l.starts_with('\x1b')
            || l.trim().is_empty()
            || l.chars().next().is_some_and(|c| c.is_ascii_digit())
    };
    para.extend(lines.take_while(|l| !is_log_record(l)));
    let msg = para.join("\n");
    assert!(
        msg.len() < 1500 && para.len() <= 12,
        "the error should be short, got {} bytes / {} lines:\n{msg}",
        msg.len(),
        para.len()
    );
    eprintln!("capture error:\n{msg}");
    msg
}

/// Acceptance 6a: wal_level = replica is refused with the fix.
#[test]
fn refuses_hub_without_logical_wal_level() {
    let c = Cluster::new_dedicated("replica", ClusterOptions::default().wal_level("replica"));
    let db = c.create_db("wl");
    c.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let pipe = Pipeline::capture_only("wal_level", &c, &db, "");
    let msg = capture_error(&pipe);
    assert!(msg.contains("wal_level"), "{msg}");
    assert!(
        msg.contains("ALTER SYSTEM SET wal_level = logical"),
        "{msg}"
    );
    assert!(c.slot(&pipe.slot()).is_none(), "no slot may be created");
}

/// Acceptance 6b: a role without REPLICATION is refused with the fix.
#[test]
fn refuses_role_without_replication() {
    let hub = hub();
    let db = hub.create_db("norep");
    hub.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let role = format!("norep_{}", switchback_tests::unique());
    hub.psql(
        "postgres",
        &format!("CREATE ROLE {role} LOGIN NOREPLICATION"),
    );
    let pipe = Pipeline::new(
        "norep",
        &hub.url_as(&role, &db),
        switchback_tests::NO_MEMBER_URL,
        "",
    );
    let msg = capture_error(&pipe);
    assert!(msg.contains("REPLICATION"), "{msg}");
    assert!(msg.contains("ALTER ROLE"), "{msg}");
    assert!(msg.contains(&role), "the error names the role: {msg}");
    assert!(hub.slot(&pipe.slot()).is_none(), "no slot may be created");
    let _ = hub.try_psql("postgres", &format!("DROP ROLE {role}"));
}

/// Acceptance 6c: an invalidated slot (max_slot_wal_keep_size) is refused, and the
/// error says a re-seed is needed.
#[test]
fn refuses_invalidated_slot() {
    let c = Cluster::new_dedicated(
        "lost",
        ClusterOptions::default()
            .conf("max_slot_wal_keep_size = 1MB")
            .conf("max_wal_size = 32MB")
            .conf("min_wal_size = 32MB"),
    );
    let db = c.create_db("lost");
    c.psql(&db, "CREATE TABLE t (id serial PRIMARY KEY, x text)");
    let pipe = Pipeline::capture_only("lost", &c, &db, "");
    let mut cap = pipe.start_capture(&c);
    let st = cap.sigint_and_wait();
    assert!(st.success(), "{st}: {}", cap.log_tail(20));
    let slot = pipe.slot();
    wait_until(
        2 * MINUTE,
        &format!("slot {slot} to be invalidated (wal_status = 'lost')"),
        || {
            c.psql(
                &db,
                "INSERT INTO t (x) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 2000) g;
             SELECT pg_switch_wal();
             CHECKPOINT;",
            );
            c.slot(&slot).is_some_and(|s| s.wal_status == "lost")
        },
    );
    let msg = capture_error(&pipe);
    assert!(msg.contains("invalidated"), "{msg}");
    assert!(msg.contains("re-seed"), "{msg}");
    assert!(msg.contains(&slot), "the error names the slot: {msg}");
}

/// SIGINT stops capture cleanly (exit 0) and leaves the slot exactly at the last
/// stored transaction. Runs on a quiet dedicated cluster so that no other WAL can
/// legitimately move the slot past it.
#[test]
fn sigint_stops_cleanly_with_slot_at_last_stored_end_lsn() {
    let c = Cluster::new_dedicated(
        "quiet",
        ClusterOptions::default()
            .conf("autovacuum = off")
            .conf("checkpoint_timeout = 1h"),
    );
    let db = c.create_db("sigint");
    c.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let pipe = Pipeline::capture_only("sigint", &c, &db, "");
    let slot = pipe.slot();
    let mut xids = Vec::new();
    let mut next_id = 0;
    let mut write = |c: &Cluster, k: usize, xids: &mut Vec<u64>| {
        for _ in 0..k {
            next_id += 1;
            xids.push(txn(
                c,
                &db,
                &format!("INSERT INTO t VALUES ({next_id}, 'v{next_id}');"),
            ));
        }
    };
    let last_end = |pipe: &Pipeline| pipe.dump().last().map(|d| txn_header(d).end_lsn);

    // 1. Caught up, then SIGINT: the slot is exactly at the last stored end_lsn —
    //    when no other WAL followed (background records such as running_xacts can
    //    legitimately move it; then the round is repeated).
    let mut strict_rounds = 0;
    for round in 1..=5 {
        let mut cap = pipe.start_capture(&c);
        write(&c, 3, &mut xids);
        let target = stop_when_caught_up(&c, &pipe, &mut cap, MINUTE);
        wait_until(MINUTE, "walsender to exit", || {
            c.slot(&slot).is_some_and(|s| !s.active)
        });
        let confirmed = c.slot(&slot).and_then(|s| s.confirmed_flush).unwrap();
        let end = last_end(&pipe).expect("stored transactions");
        assert!(
            confirmed >= end,
            "slot {confirmed} behind the last stored end_lsn {end}"
        );
        let now = c.current_wal_lsn();
        eprintln!("sigint round {round}: last end_lsn {end}, confirmed {confirmed}, target {target}, wal now {now}");
        if now == end {
            assert_eq!(confirmed, end, "confirmed_flush_lsn vs last stored end_lsn");
            strict_rounds += 1;
            break;
        }
    }
    assert_eq!(
        strict_rounds, 1,
        "no round without background WAL in 5 tries"
    );

    // 2. SIGINT right after a burst, without waiting: what was stored is acknowledged
    //    (never less), and a restart stores the rest exactly once.
    let mut cap = pipe.start_capture(&c);
    write(&c, 20, &mut xids);
    let st = cap.sigint_and_wait();
    assert!(
        st.success(),
        "capture exit {st}; log:\n{}",
        cap.log_tail(40)
    );
    wait_until(MINUTE, "walsender to exit", || {
        c.slot(&slot).is_some_and(|s| !s.active)
    });
    let confirmed = c.slot(&slot).and_then(|s| s.confirmed_flush).unwrap();
    let end = last_end(&pipe).unwrap();
    assert!(
        confirmed >= end,
        "slot {confirmed} behind the last stored end_lsn {end}"
    );
    let mut cap = pipe.start_capture(&c);
    stop_when_caught_up(&c, &pipe, &mut cap, MINUTE);
    let dump = pipe.dump();
    let headers: Vec<DumpTxn> = dump.iter().map(txn_header).collect();
    assert_dump_order(&headers);
    let stored: Vec<u64> = headers.iter().map(|h| h.xid).collect();
    assert_eq!(stored, xids, "stored xids vs committed xids, in order");
    let ids: HashSet<String> = dump
        .iter()
        .flat_map(|d| d["changes"].as_array().unwrap().iter())
        .map(|ch| ch["new"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), xids.len());
}

/// Capture rides out a terminated walsender and a hub crash (immediate stop and
/// restart): every committed transaction is stored once, in order.
#[test]
fn survives_walsender_termination_and_hub_crash() {
    let c = Cluster::new_dedicated("crash", ClusterOptions::default());
    let db = c.create_db("crash");
    c.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let pipe = Pipeline::capture_only("crash", &c, &db, "");
    let slot = pipe.slot();
    let mut cap = pipe.start_capture(&c);
    let mut xids = Vec::new();
    let mut id = 0;
    let mut write = |k: usize, xids: &mut Vec<u64>| {
        for _ in 0..k {
            id += 1;
            xids.push(txn(
                &c,
                &db,
                &format!("INSERT INTO t VALUES ({id}, 'v{id}');"),
            ));
        }
    };
    write(5, &mut xids);
    let n = c.terminate_walsenders(Some(&db));
    assert!(n >= 1, "test premise: a walsender was terminated");
    write(5, &mut xids);
    c.wait_slot_active(&slot, MINUTE);
    c.stop_immediate();
    c.start();
    write(5, &mut xids);
    stop_when_caught_up(&c, &pipe, &mut cap, 2 * MINUTE);
    let headers: Vec<DumpTxn> = pipe.dump().iter().map(txn_header).collect();
    assert_dump_order(&headers);
    let stored: Vec<u64> = headers.iter().map(|h| h.xid).collect();
    assert_eq!(stored, xids, "stored xids vs committed xids, in order");
}
