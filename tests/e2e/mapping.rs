//! Mapping acceptance tests (issue 5: table filters, column mapping, schema drift,
//! `check`), one per acceptance point, against the shared hub and member clusters.

use std::time::{Duration, Instant};
use switchback_tests::Timed;

use switchback_tests::{
    hub, member, quote_literal, unique, wait_until, Cluster, Pipeline, Spawned,
};

const MINUTE: Duration = Duration::from_secs(60);

/// Drops the pipeline's slot and publications on the hub when the test ends.
struct Cleanup {
    slot: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let h = hub();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && h.try_psql(
                "postgres",
                &format!(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = {}",
                    quote_literal(&self.slot)
                ),
            )
            .is_ok_and(|o| o.trim() == "t")
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        h.drop_slot_if_inactive(&self.slot);
    }
}

/// Databases on both sides with their DDL (plus `sb_mark` for sync points).
fn dbs(prefix: &str, hub_ddl: &str, member_ddl: &str) -> (String, String) {
    let hdb = hub().create_db(prefix);
    let mdb = member().create_db(prefix);
    let mark = "CREATE TABLE sb_mark (id bigint PRIMARY KEY);";
    hub().psql(&hdb, &format!("{mark}{hub_ddl}"));
    member().psql(&mdb, &format!("{mark}{member_ddl}"));
    (hdb, mdb)
}

fn pipeline(prefix: &str, hdb: &str, mdb: &str, toml: &str) -> (Pipeline, Cleanup) {
    let pipe = Pipeline::new(prefix, &hub().url(hdb), &member().url(mdb), toml);
    let c = Cleanup { slot: pipe.slot() };
    (pipe, c)
}

/// `switchback run`, waiting until its slot is consistent.
fn start_run(pipe: &Pipeline) -> Spawned {
    let mut p = pipe.spawn(&["run"]);
    let slot = pipe.slot();
    wait_until(MINUTE, &format!("run to stream from slot {slot}"), || {
        p.assert_running();
        hub()
            .slot(&slot)
            .is_some_and(|s| s.active && s.confirmed_flush.is_some())
    });
    p
}

fn stop_run(run: &mut Spawned) {
    let st = run.sigint_and_wait();
    assert!(
        st.success(),
        "run did not exit cleanly ({st}):\n{}",
        run.log_tail(40)
    );
}

/// A hub transaction after everything so far; waits until the member has it
/// (commit order: everything before it is applied too).
fn sync_point(hdb: &str, mdb: &str, run: &mut Spawned) {
    let n = unique();
    hub().psql(hdb, &format!("INSERT INTO sb_mark VALUES ({n})"));
    wait_until(2 * MINUTE, &format!("marker {n} on the member"), || {
        run.assert_running();
        member().query_value(mdb, &format!("SELECT count(*) FROM sb_mark WHERE id = {n}")) == "1"
    });
}

/// `switchback check`: (exit success, stdout).
fn check(pipe: &Pipeline) -> (bool, String) {
    let out = pipe.run(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "check crashed ({}): {stdout}\n{stderr}",
        out.status
    );
    (out.status.success(), stdout)
}

fn q(c: &Cluster, db: &str, sql: &str) -> String {
    c.psql(db, sql)
}

// ---------------------------------------------------------------------------
// 1. Expand/contract rename under a write load; check shows forward and reverse.
// ---------------------------------------------------------------------------

#[test]
fn rename_under_load_and_reverse_mapping() {
    let _t = Timed::start("rename_under_load_and_reverse_mapping");
    let (hdb, mdb) = dbs(
        "map_rename",
        "CREATE TABLE person (id int PRIMARY KEY, first_name text, last_name text);",
        "CREATE TABLE person (id int PRIMARY KEY, first_name text, surname text, nickname text NULL);",
    );
    let (pipe, _c) = pipeline(
        "map_rename",
        &hdb,
        &mdb,
        "[[tables.table]]\nschema = \"public\"\nname = \"person\"\n[tables.table.rename]\nlast_name = \"surname\"\n",
    );
    let (ok, report) = check(&pipe);
    eprintln!("check report:\n{report}");
    assert!(ok, "check found problems:\n{report}");
    assert!(
        report.contains("last_name (text)") && report.contains("-> surname (text)  (renamed)"),
        "forward mapping not shown:\n{report}"
    );
    assert!(
        report.contains("reverse public.person -> public.person: id -> id, first_name -> first_name, surname -> last_name"),
        "reverse mapping not shown:\n{report}"
    );
    assert!(
        report.contains("member column \"nickname\" has no hub column"),
        "{report}"
    );

    let mut run = start_run(&pipe);
    // Two writers, each statement its own transaction: inserts, renames of
    // last_name, deletes, on overlapping ids.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let hdb = hdb.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w);
                let mut sql = String::new();
                for n in 0..600 {
                    let id = rng.u32(1..300);
                    match rng.u8(0..4) {
                        0 | 1 => sql.push_str(&format!(
                            "INSERT INTO person VALUES ({id}, 'f{w}_{n}', 'l{w}_{n}') \
                             ON CONFLICT (id) DO UPDATE SET last_name = excluded.last_name;\n"
                        )),
                        2 => sql.push_str(&format!(
                            "UPDATE person SET last_name = last_name || '+{n}', first_name = 'g{n}' WHERE id = {id};\n"
                        )),
                        _ => sql.push_str(&format!("DELETE FROM person WHERE id = {id};\n")),
                    }
                }
                hub().psql(&hdb, &sql);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    sync_point(&hdb, &mdb, &mut run);
    let h = q(
        hub(),
        &hdb,
        "SELECT id, first_name, last_name FROM person ORDER BY id",
    );
    let m = q(
        member(),
        &mdb,
        "SELECT id, first_name, surname FROM person ORDER BY id",
    );
    assert!(
        h.lines().count() > 50,
        "test setup: too few rows on the hub"
    );
    assert_eq!(m, h, "member (through the mapping) differs from the hub");
    assert_eq!(
        q(
            member(),
            &mdb,
            "SELECT count(*) FROM person WHERE nickname IS NOT NULL"
        ),
        "0"
    );
    stop_run(&mut run);
}

// ---------------------------------------------------------------------------
// 2. One check lists every problem, exits non-zero; run refuses to start.
// ---------------------------------------------------------------------------

#[test]
fn check_reports_every_problem() {
    let _t = Timed::start("check_reports_every_problem");
    let (hdb, mdb) = dbs(
        "map_check",
        "CREATE TABLE gone (id int PRIMARY KEY);
         CREATE TABLE renamed (id int PRIMARY KEY, a text);
         CREATE TABLE strict (id int PRIMARY KEY, v text);
         CREATE TABLE typed (id int PRIMARY KEY, n text, s varchar(20));
         CREATE TABLE nokey (id int PRIMARY KEY, v text);
         CREATE TABLE noident (v text);",
        "CREATE TABLE renamed (id int PRIMARY KEY, c text);
         CREATE TABLE strict (id int PRIMARY KEY, v text, must text NOT NULL);
         CREATE TABLE typed (id int PRIMARY KEY, n integer, s varchar(10));
         CREATE TABLE nokey (id int, v text);
         CREATE TABLE noident (v text);",
    );
    let (pipe, _c) = pipeline(
        "map_check",
        &hdb,
        &mdb,
        "[[tables.table]]\nname = \"renamed\"\n[tables.table.rename]\na = \"b\"\n",
    );
    let (ok, report) = check(&pipe);
    eprintln!("check report:\n{report}");
    assert!(!ok, "check must fail:\n{report}");
    for (what, needle) in [
        ("missing target table", "public.gone: the target table public.gone does not exist on the member"),
        ("missing mapped column", "public.renamed column \"a\": is renamed to \"b\", but the member table public.renamed has no such column"),
        ("NOT NULL without source or default", "public.strict column \"must\": member column public.strict.must is NOT NULL and has neither a hub source nor a default"),
        ("type that cannot hold the source", "public.typed column \"n\": member type integer cannot hold every value of hub type text"),
        ("narrower type", "public.typed column \"s\": member type character varying(10) may not hold every value of hub type character varying(20)"),
        ("member table without key", "public.nokey: the member table public.nokey has no primary key or unique index"),
        ("hub table without replica identity", "public.noident: the hub table has no primary key and no replica identity"),
    ] {
        assert!(report.contains(needle), "check does not report the {what}:\n{report}");
    }
    assert!(report.contains("fix: "), "{report}");
    assert!(
        report.contains("table public.gone -> public.gone (missing on the member)"),
        "{report}"
    );
    // check changes nothing on the hub.
    assert_eq!(
        q(
            hub(),
            &hdb,
            &format!(
                "SELECT count(*) FROM pg_publication WHERE pubname LIKE {}",
                quote_literal(&format!("{}%", pipe.slot()))
            )
        ),
        "0"
    );
    assert!(hub().slot(&pipe.slot()).is_none(), "check created a slot");
    // Privileges: a member role that may only read, and no replication origins.
    let role = format!("map_reader_{}", unique());
    member().psql(
        &mdb,
        &format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
        ),
    );
    let reader = Pipeline::new(
        "map_check_priv",
        &hub().url(&hdb),
        &member().url_as(&role, &mdb),
        "[tables]\ninclude = [\"public.sb_mark\"]\n",
    );
    let (ok, report) = check(&reader);
    assert!(!ok, "{report}");
    for needle in [
        "member: the member role may not use replication origins",
        "public.sb_mark: the member role may not insert on public.sb_mark",
        "fix: GRANT INSERT ON \"public\".\"sb_mark\" TO the member role",
        "public.sb_mark: the member role may not delete on public.sb_mark",
        "note: the member role may not SET session_replication_role",
    ] {
        assert!(report.contains(needle), "missing {needle:?}:\n{report}");
    }
    // An unreachable member is a problem for check too.
    let nomember = Pipeline::capture_only("map_check_nomember", hub(), &hdb, "");
    let (ok, report) = check(&nomember);
    assert!(!ok && report.contains("member: cannot connect"), "{report}");
    // run runs the same checks at start and refuses.
    let out = pipe.run(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run started despite the problems");
    assert!(
        err.contains("problem(s) found before starting") && err.contains("public.typed"),
        "{err}"
    );
    assert!(
        hub().slot(&pipe.slot()).is_none(),
        "run created a slot despite the problems"
    );
}

// ---------------------------------------------------------------------------
// 3. ALTER TABLE ADD COLUMN on the hub mid-run under each drift policy.
// ---------------------------------------------------------------------------

fn drift_case(policy: &str) {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let (hdb, mdb) = dbs(&format!("map_drift_{}", policy.replace('-', "_")), ddl, ddl);
    let (pipe, _c) = pipeline(
        &format!("map_drift_{}", policy.replace('-', "_")),
        &hdb,
        &mdb,
        &format!("[tables]\ndrift = \"{policy}\"\n"),
    );
    let mut run = start_run(&pipe);
    hub().psql(&hdb, "INSERT INTO t VALUES (1, 'before')");
    sync_point(&hdb, &mdb, &mut run);
    hub().psql(&hdb, "ALTER TABLE t ADD COLUMN extra text");
    hub().psql(&hdb, "INSERT INTO t VALUES (2, 'after', 'x2')");
    hub().psql(&hdb, "UPDATE t SET extra = 'x1' WHERE id = 1");
    hub().psql(&hdb, "INSERT INTO sb_mark VALUES (-1)");
    match policy {
        "stop" => {
            let st = run.wait_timeout(MINUTE);
            assert!(!st.success(), "run must stop on drift");
            let log = run.log_text();
            assert!(
                log.contains("public.t")
                    && log.contains("\"extra\"")
                    && log.contains("nothing past this point was applied"),
                "the error must name table and column:\n{}",
                run.log_tail(20)
            );
            assert!(!log.contains("x2"), "a row value was logged");
            // Nothing after the drift was applied, not even the other table's row.
            assert_eq!(
                q(member(), &mdb, "SELECT id, v FROM t ORDER BY id"),
                "1|before"
            );
            assert_eq!(
                q(member(), &mdb, "SELECT count(*) FROM sb_mark WHERE id = -1"),
                "0"
            );
            // Fix the member; run continues from there, nothing lost.
            member().psql(&mdb, "ALTER TABLE t ADD COLUMN extra text");
            let mut run = start_run(&pipe);
            sync_point(&hdb, &mdb, &mut run);
            assert_eq!(
                q(member(), &mdb, "SELECT id, v, extra FROM t ORDER BY id"),
                q(hub(), &hdb, "SELECT id, v, extra FROM t ORDER BY id")
            );
            assert_eq!(
                q(member(), &mdb, "SELECT count(*) FROM sb_mark WHERE id = -1"),
                "1"
            );
            stop_run(&mut run);
        }
        "ignore-new-columns" => {
            sync_point(&hdb, &mdb, &mut run);
            assert_eq!(
                q(member(), &mdb, "SELECT id, v FROM t ORDER BY id"),
                "1|before\n2|after"
            );
            assert_eq!(
                q(member(), &mdb, "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'extra'"),
                "0"
            );
            stop_run(&mut run);
        }
        "add-columns" => {
            sync_point(&hdb, &mdb, &mut run);
            assert_eq!(
                q(member(), &mdb, "SELECT id, v, extra FROM t ORDER BY id"),
                "1|before|x1\n2|after|x2"
            );
            assert_eq!(
                q(member(), &mdb, "SELECT is_nullable || data_type FROM information_schema.columns WHERE table_name = 't' AND column_name = 'extra'"),
                "YEStext"
            );
            stop_run(&mut run);
        }
        _ => unreachable!(),
    }
}

#[test]
fn drift_add_column_under_each_policy() {
    let _t = Timed::start("drift_add_column_under_each_policy");
    for policy in ["stop", "ignore-new-columns", "add-columns"] {
        eprintln!("drift policy {policy}");
        drift_case(policy);
    }
}

/// A column retyped on the hub into one the member cannot hold, and a column
/// dropped on the hub that the member requires (NOT NULL, no default): both stop
/// apply with an error naming table and column, before anything of it commits.
#[test]
fn drift_retype_and_drop_stop() {
    let _t = Timed::start("drift_retype_and_drop_stop");
    let ddl = "CREATE TABLE typed (id int PRIMARY KEY, n int);
               CREATE TABLE req (id int PRIMARY KEY, v text NOT NULL);";
    for (case, alter, write, needle) in [
        (
            "retype",
            "ALTER TABLE typed ALTER COLUMN n TYPE text",
            "INSERT INTO typed VALUES (2, 'two')",
            "public.typed column \"n\": member type integer cannot hold every value of hub type text",
        ),
        (
            "drop",
            "ALTER TABLE req DROP COLUMN v",
            "INSERT INTO req VALUES (2)",
            "public.req column \"v\": member column public.req.v is NOT NULL and has neither a hub source nor a default",
        ),
    ] {
        let prefix = format!("map_drift_{case}");
        let (hdb, mdb) = dbs(&prefix, ddl, ddl);
        let (pipe, _c) = pipeline(&prefix, &hdb, &mdb, "");
        let mut run = start_run(&pipe);
        hub().psql(&hdb, "INSERT INTO typed VALUES (1, 1); INSERT INTO req VALUES (1, 'one')");
        sync_point(&hdb, &mdb, &mut run);
        hub().psql(&hdb, alter);
        hub().psql(&hdb, write);
        hub().psql(&hdb, "INSERT INTO sb_mark VALUES (-1)");
        let st = run.wait_timeout(MINUTE);
        assert!(!st.success(), "{case}: run must stop on drift");
        let log = run.log_text();
        assert!(log.contains(needle), "{case}: error must name table and column:\n{}", run.log_tail(10));
        assert_eq!(q(member(), &mdb, "SELECT count(*) FROM typed") + &q(member(), &mdb, "SELECT count(*) FROM req"), "11");
        assert_eq!(q(member(), &mdb, "SELECT count(*) FROM sb_mark WHERE id = -1"), "0", "{case}");
    }
}

/// add-columns when the drift arrives in a group that already holds a lock on the
/// table (capture first, then apply the whole queue as one group): apply regroups
/// instead of waiting for itself; nothing lost.
#[test]
fn drift_add_columns_inside_a_group() {
    let _t = Timed::start("drift_add_columns_inside_a_group");
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let (hdb, mdb) = dbs("map_drift_group", ddl, ddl);
    let (pipe, _c) = pipeline(
        "map_drift_group",
        &hdb,
        &mdb,
        "[tables]\ndrift = \"add-columns\"\n",
    );
    let mut cap = pipe.start_capture(hub());
    // More rows than one round trip: the group has written into t (and holds its
    // lock) before it meets the new column.
    hub().psql(
        &hdb,
        "INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 1200) i",
    );
    hub().psql(&hdb, "ALTER TABLE t ADD COLUMN extra text");
    hub().psql(&hdb, "INSERT INTO t VALUES (5000, 'after', 'x')");
    hub().psql(&hdb, "UPDATE t SET extra = 'e' || id WHERE id <= 3");
    hub().psql(&hdb, "INSERT INTO sb_mark VALUES (1)");
    let end = hub().current_wal_lsn();
    hub().wait_slot_confirmed(&pipe.slot(), end, MINUTE);
    let st = cap.sigint_and_wait();
    assert!(
        st.success(),
        "capture did not stop cleanly:\n{}",
        cap.log_tail(20)
    );
    let out = pipe.run_ok(&["apply", "--until-empty"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("applying the group's first transaction alone"),
        "the regroup path was not taken:\n{log}"
    );
    let cols = "SELECT id, v, extra FROM t ORDER BY id";
    assert_eq!(q(member(), &mdb, cols), q(hub(), &hdb, cols));
    assert_eq!(q(member(), &mdb, "SELECT count(*) FROM sb_mark"), "1");
}

// ---------------------------------------------------------------------------
// 4. Excluded tables untouched; insert-only and row filters.
// ---------------------------------------------------------------------------

#[test]
fn filters_exclude_insert_only_and_row_filter() {
    let _t = Timed::start("filters_exclude_insert_only_and_row_filter");
    let ddl = "CREATE TABLE audit_log (id int PRIMARY KEY, v text);
               CREATE TABLE events (id int PRIMARY KEY, v text);";
    // canary goes to another table name on the member, leaves `secret` on the hub
    // and stamps a member-only NOT NULL column with a constant.
    let (hdb, mdb) = dbs(
        "map_filters",
        &format!("{ddl} CREATE TABLE canary (id int PRIMARY KEY, v text, secret text);"),
        &format!(
            "{ddl} CREATE TABLE canary_slice (id int PRIMARY KEY, v text, source text NOT NULL);"
        ),
    );
    member().psql(&mdb, "INSERT INTO audit_log VALUES (7, 'member only')");
    let rules = "[tables]\nexclude = [\"public.audit_*\"]\n\
                 [[tables.table]]\nname = \"events\"\noperations = [\"insert\"]\n\
                 [[tables.table]]\nname = \"canary\"\ntarget_name = \"canary_slice\"\n\
                 row_filter = \"id in (1, 2, 3) or id between 600 and 10000\"\nexclude_columns = [\"secret\"]\n\
                 [tables.table.constants]\nsource = \"hub\"\n";
    let (pipe, _c) = pipeline("map_filters", &hdb, &mdb, rules);
    let (ok, report) = check(&pipe);
    assert!(ok, "{report}");
    assert!(
        report.contains("table public.events -> public.events  [insert]"),
        "{report}"
    );
    assert!(
        report.contains("where id in (1, 2, 3) or id between 600 and 10000"),
        "{report}"
    );
    assert!(
        !report.contains("audit_log"),
        "excluded table in the report:\n{report}"
    );

    let mut run = start_run(&pipe);
    for sql in [
        "INSERT INTO audit_log VALUES (1, 'a'), (7, 'hub')",
        "UPDATE audit_log SET v = 'b'",
        "TRUNCATE audit_log",
        "INSERT INTO events VALUES (1, 'one'), (2, 'two'), (3, 'three')",
        "UPDATE events SET v = 'changed' WHERE id = 1",
        "DELETE FROM events WHERE id = 2",
        "INSERT INTO canary SELECT i, 'v' || i, 'secret' FROM generate_series(1, 5) i",
        "INSERT INTO canary VALUES (599, 'a', 's'), (600, 'b', 's'), (601, 'c', 's'), (20000, 'd', 's')",
        "UPDATE canary SET v = 'changed' WHERE id IN (1, 4, 601)",
        "DELETE FROM canary WHERE id IN (3, 5)",
    ] {
        hub().psql(&hdb, sql);
    }
    sync_point(&hdb, &mdb, &mut run);
    assert_eq!(
        q(member(), &mdb, "SELECT id, v FROM audit_log"),
        "7|member only"
    );
    assert_eq!(
        q(member(), &mdb, "SELECT id, v FROM events ORDER BY id"),
        "1|one\n2|two\n3|three",
        "insert-only: updates and deletes must not replicate"
    );
    assert_eq!(
        q(
            member(),
            &mdb,
            "SELECT id, v, source FROM canary_slice ORDER BY id"
        ),
        "1|changed|hub\n2|v2|hub\n600|b|hub\n601|changed|hub",
        "row filter, target table, constant"
    );
    stop_run(&mut run);

    // PG15: a row filter on a non-identity column of a table published for
    // UPDATE/DELETE would make the hub's own UPDATEs fail: check says so.
    let (pipe2, _c2) = pipeline(
        "map_filters_bad",
        &hdb,
        &mdb,
        "[[tables.table]]\nname = \"canary\"\ntarget_name = \"canary_slice\"\nrow_filter = \"v <> 'x'\"\n\
         exclude_columns = [\"secret\"]\n[tables.table.constants]\nsource = \"hub\"\n",
    );
    let (ok, report) = check(&pipe2);
    assert!(!ok, "{report}");
    assert!(
        report.contains("public.canary: row_filter \"v <> 'x'\" is not usable")
            && report.contains("replica identity"),
        "{report}"
    );
    hub().psql(&hdb, "UPDATE canary SET v = 'still works' WHERE id = 1");
    // A filter is one expression: a second statement is refused, never run.
    let (pipe3, _c3) = pipeline(
        "map_filters_inject",
        &hdb,
        &mdb,
        "[[tables.table]]\nname = \"events\"\noperations = [\"insert\"]\n\
         row_filter = \"true); DROP TABLE events; SELECT (1\"\n",
    );
    let (ok, report) = check(&pipe3);
    assert!(!ok && report.contains("is not usable"), "{report}");
    assert_eq!(q(hub(), &hdb, "SELECT count(*) FROM events"), "2");
}

// ---------------------------------------------------------------------------
// 5. Identifiers: spaces, mixed case, reserved words, quotes, non-ASCII.
// ---------------------------------------------------------------------------

#[test]
fn awkward_identifiers_replicate() {
    let _t = Timed::start("awkward_identifiers_replicate");
    let hub_ddl = r#"CREATE SCHEMA "Sales Ops";
        CREATE TABLE "Sales Ops"."Order" ("select" int PRIMARY KEY, "naïve" text, "Quote""d" text, "Mixed Case" int);"#;
    let member_ddl = r#"CREATE SCHEMA "Sales Ops";
        CREATE TABLE "Sales Ops"."Order" ("select" int PRIMARY KEY, "naïve" text, "Quote""d" text, "Größe" int);"#;
    let (hdb, mdb) = dbs("map_idents", hub_ddl, member_ddl);
    let (pipe, _c) = pipeline(
        "map_idents",
        &hdb,
        &mdb,
        "[[tables.table]]\nschema = \"Sales Ops\"\nname = \"Order\"\n[tables.table.rename]\n\"Mixed Case\" = \"Größe\"\n",
    );
    let (ok, report) = check(&pipe);
    assert!(ok, "{report}");
    let mut run = start_run(&pipe);
    for sql in [
        r#"INSERT INTO "Sales Ops"."Order" VALUES (1, 'café', 'it''s', 10), (2, 'b', NULL, 20), (3, 'c', 'q', 30)"#,
        r#"UPDATE "Sales Ops"."Order" SET "naïve" = 'crème', "Mixed Case" = 11 WHERE "select" = 1"#,
        r#"UPDATE "Sales Ops"."Order" SET "select" = 4 WHERE "select" = 2"#,
        r#"DELETE FROM "Sales Ops"."Order" WHERE "select" = 3"#,
    ] {
        hub().psql(&hdb, sql);
    }
    sync_point(&hdb, &mdb, &mut run);
    assert_eq!(
        q(
            member(),
            &mdb,
            r#"SELECT "select", "naïve", "Quote""d", "Größe" FROM "Sales Ops"."Order" ORDER BY 1"#
        ),
        q(
            hub(),
            &hdb,
            r#"SELECT "select", "naïve", "Quote""d", "Mixed Case" FROM "Sales Ops"."Order" ORDER BY 1"#
        )
    );
    assert_eq!(
        q(
            member(),
            &mdb,
            r#"SELECT "select" || "naïve" FROM "Sales Ops"."Order" ORDER BY 1"#
        ),
        "1crème\n4b"
    );
    hub().psql(&hdb, r#"TRUNCATE "Sales Ops"."Order""#);
    sync_point(&hdb, &mdb, &mut run);
    assert_eq!(
        q(
            member(),
            &mdb,
            r#"SELECT count(*) FROM "Sales Ops"."Order""#
        ),
        "0"
    );
    stop_run(&mut run);
}

// ---------------------------------------------------------------------------
// 6. Partitioned table, rows moving between partitions; generated member columns.
// ---------------------------------------------------------------------------

#[test]
fn partitioned_table_rows_move_between_partitions() {
    let _t = Timed::start("partitioned_table_rows_move_between_partitions");
    let hub_ddl =
        "CREATE TABLE measure (id int, region text, v int, total int, PRIMARY KEY (id, region))
                       PARTITION BY LIST (region);
                   CREATE TABLE measure_eu PARTITION OF measure FOR VALUES IN ('eu');
                   CREATE TABLE measure_us PARTITION OF measure FOR VALUES IN ('us');";
    // The member partitions differently, and computes `total` and `double` itself.
    let member_ddl = "CREATE TABLE measure (id int, region text, v int,
                          total int GENERATED ALWAYS AS (v * 10) STORED,
                          double int GENERATED ALWAYS AS (v * 2) STORED,
                          PRIMARY KEY (id, region)) PARTITION BY RANGE (id);
                      CREATE TABLE measure_low PARTITION OF measure FOR VALUES FROM (MINVALUE) TO (100);
                      CREATE TABLE measure_high PARTITION OF measure FOR VALUES FROM (100) TO (MAXVALUE);";
    let (hdb, mdb) = dbs("map_parts", hub_ddl, member_ddl);
    let (pipe, _c) = pipeline("map_parts", &hdb, &mdb, "");
    let (ok, report) = check(&pipe);
    assert!(ok, "{report}");
    assert!(
        report.contains("table public.measure -> public.measure (partitioned, via root)"),
        "{report}"
    );
    assert!(
        !report.contains("measure_eu"),
        "partitions are published via the root:\n{report}"
    );
    let mut run = start_run(&pipe);
    for sql in [
        "INSERT INTO measure SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, i, -1 FROM generate_series(1, 200) i",
        // Rows move between the hub's partitions (cross-partition updates).
        "UPDATE measure SET region = 'us', v = v + 1000 WHERE region = 'eu' AND id <= 50",
        "UPDATE measure SET region = 'eu' WHERE region = 'us' AND id > 150",
        // And between the member's partitions.
        "UPDATE measure SET id = id + 300 WHERE id BETWEEN 10 AND 20",
        "DELETE FROM measure WHERE id % 7 = 0",
    ] {
        hub().psql(&hdb, sql);
    }
    sync_point(&hdb, &mdb, &mut run);
    assert_eq!(
        q(
            member(),
            &mdb,
            "SELECT id, region, v FROM measure ORDER BY id, region"
        ),
        q(
            hub(),
            &hdb,
            "SELECT id, region, v FROM measure ORDER BY id, region"
        )
    );
    assert_eq!(
        q(
            member(),
            &mdb,
            "SELECT count(*) FROM measure WHERE total <> v * 10 OR double <> v * 2"
        ),
        "0",
        "generated member columns are computed by the member, never written"
    );
    assert_ne!(
        q(
            hub(),
            &hdb,
            "SELECT count(*) FROM measure_us WHERE v > 1000"
        ),
        "0",
        "test setup: rows moved to the other partition"
    );
    stop_run(&mut run);
}

// ---------------------------------------------------------------------------
// A restart changes nothing on the hub; a check that fails after the member
// changed still stops `run`, even though its stream started meanwhile.
// ---------------------------------------------------------------------------

/// The hub's catalog rows of the pipeline's publications, by transaction id:
/// any CREATE or ALTER PUBLICATION changes this.
fn publication_versions(hdb: &str, pipe: &Pipeline) -> String {
    q(
        hub(),
        hdb,
        &format!(
            "SELECT string_agg(p.pubname || '@' || p.xmin::text || ':' || coalesce((SELECT \
             string_agg(pr.xmin::text, ',' ORDER BY pr.oid) FROM pg_publication_rel pr \
             WHERE pr.prpubid = p.oid), ''), ';' ORDER BY p.pubname) \
             FROM pg_publication p WHERE p.pubname LIKE {}",
            quote_literal(&format!("{}%", pipe.slot()))
        ),
    )
}

#[test]
fn restart_leaves_the_hub_alone_and_a_failing_check_still_stops_run() {
    let _t = Timed::start("restart_leaves_the_hub_alone_and_a_failing_check_still_stops_run");
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let (hdb, mdb) = dbs("map_restart", ddl, ddl);
    let (pipe, _c) = pipeline("map_restart", &hdb, &mdb, "");
    let mut run = start_run(&pipe);
    hub().psql(&hdb, "INSERT INTO t VALUES (1, 'one')");
    sync_point(&hdb, &mdb, &mut run);
    stop_run(&mut run);
    let before = publication_versions(&hdb, &pipe);
    assert!(before.contains('@'), "no publication: {before:?}");

    // A restart with the same configuration: no DDL on the hub.
    let mut run = start_run(&pipe);
    hub().psql(&hdb, "INSERT INTO t VALUES (2, 'two')");
    sync_point(&hdb, &mdb, &mut run);
    stop_run(&mut run);
    assert_eq!(
        publication_versions(&hdb, &pipe),
        before,
        "a restart changed the publication"
    );
    assert_eq!(q(member(), &mdb, "SELECT count(*) FROM t"), "2");

    // The member no longer fits: run refuses, and what it streamed meanwhile
    // is not applied.
    member().psql(&mdb, "ALTER TABLE t ADD COLUMN must text NOT NULL DEFAULT 'x'; ALTER TABLE t ALTER COLUMN must DROP DEFAULT");
    hub().psql(&hdb, "INSERT INTO t VALUES (3, 'three')");
    let out = pipe.run(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run started despite the problem");
    assert!(
        err.contains("problem(s) found before starting")
            && err.contains("public.t column \"must\""),
        "{err}"
    );
    assert_eq!(q(member(), &mdb, "SELECT count(*) FROM t"), "2");
    assert_eq!(publication_versions(&hdb, &pipe), before);

    // Fixed, it resumes with the row it had not applied.
    member().psql(&mdb, "ALTER TABLE t DROP COLUMN must");
    let mut run = start_run(&pipe);
    sync_point(&hdb, &mdb, &mut run);
    stop_run(&mut run);
    assert_eq!(
        q(
            member(),
            &mdb,
            "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t"
        ),
        "1=one,2=two,3=three"
    );
}
