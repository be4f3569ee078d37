//! `[queue] format = "json"`: capture also produces every committed transaction as
//! JSON to `<topic>_json`. The records of real hub changes, produced through a real
//! broker (tansu), are read back as another consumer would and validated against
//! `schemas/change-record.schema.json`; apply keeps reading the bincode topic.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use switchback_tests::{hub, kafka_broker, member, wait_for, wait_until, Pipeline};

const SETUP: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
     CREATE TABLE docs (id int PRIMARY KEY, body text, tag text);
     ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
     CREATE TABLE nopk (a int, b text);
     ALTER TABLE nopk REPLICA IDENTITY FULL;";

/// Every message of partition 0 of `topic`, read until `enough` holds for the
/// messages read so far (or the deadline passes).
fn read_topic(brokers: &str, topic: &str, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}_test_reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut got: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !enough(&got) {
        assert!(
            Instant::now() < deadline,
            "topic {topic}: only {} JSON records arrived: {got:#?}",
            got.len()
        );
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                assert_eq!(
                    m.offset(),
                    got.len() as i64,
                    "offsets in order, none skipped"
                );
                let v: Value = serde_json::from_slice(m.payload().expect("a payload"))
                    .unwrap_or_else(|e| {
                        panic!("message at offset {} is not JSON: {e}", m.offset())
                    });
                got.push(v);
            }
            Some(Err(e)) => eprintln!("  consumer: {e}"),
            None => {}
        }
    }
    got
}

/// The published schema, compiled (and itself checked against the meta-schema).
fn schema_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            switchback_tests::repo_root().join("schemas/change-record.schema.json"),
        )
        .expect("read the schema"),
    )
    .expect("the schema is JSON");
    assert!(
        jsonschema::meta::is_valid(&schema),
        "the schema is not a valid JSON Schema"
    );
    jsonschema::draft202012::new(&schema).expect("compile the schema")
}

fn assert_valid(validator: &jsonschema::Validator, records: &[Value]) {
    for (i, r) in records.iter().enumerate() {
        let errors: Vec<String> = validator
            .iter_errors(r)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "record {i} does not match the schema: {errors:?}"
        );
    }
}

fn ins(table: &str, new: Value) -> Value {
    json!({"op": "insert", "schema": "public", "table": table, "new": new, "old": null, "unchanged": []})
}

#[test]
fn kafka_json_records_match_schema() {
    let broker = kafka_broker();
    let hdb = hub().create_db("kjson");
    let mdb = member().create_db("kjson");
    hub().psql(&hdb, SETUP);
    member().psql(&mdb, SETUP);
    let pipe = Pipeline::new(
        "kjson",
        &hub().url(&hdb),
        &member().url(&mdb),
        &format!("format = \"json\"\n{}", broker.queue_toml()),
    );
    let slot = pipe.slot();
    let mut capture = pipe.start_capture(hub());

    let big = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i)";
    let steps: Vec<(String, Value)> = vec![
        (
            "INSERT INTO items VALUES (1, 'apple', 5), (2, 'pear', NULL);".into(),
            json!([
                ins("items", json!({"id": "1", "name": "apple", "qty": "5"})),
                ins("items", json!({"id": "2", "name": "pear", "qty": null})),
            ]),
        ),
        (
            "UPDATE items SET qty = 7 WHERE id = 1; UPDATE items SET id = 3 WHERE id = 2;".into(),
            json!([
                {"op": "update", "schema": "public", "table": "items",
                 "new": {"id": "1", "name": "apple", "qty": "7"}, "old": null, "unchanged": []},
                {"op": "update", "schema": "public", "table": "items",
                 "new": {"id": "3", "name": "pear", "qty": null}, "old": {"id": "2"}, "unchanged": []},
            ]),
        ),
        (format!("INSERT INTO docs VALUES (1, {big}, 'a');"), Value::Null),
        (
            "UPDATE docs SET tag = 'b' WHERE id = 1;".into(),
            json!([{"op": "update", "schema": "public", "table": "docs",
                    "new": {"id": "1", "tag": "b"}, "old": null, "unchanged": ["body"]}]),
        ),
        (
            "DELETE FROM items WHERE id = 1; INSERT INTO nopk VALUES (1, 'x'), (2, NULL); DELETE FROM nopk WHERE a = 2;".into(),
            json!([
                {"op": "delete", "schema": "public", "table": "items", "new": null,
                 "old": {"id": "1"}, "unchanged": []},
                ins("nopk", json!({"a": "1", "b": "x"})),
                ins("nopk", json!({"a": "2", "b": null})),
                {"op": "delete", "schema": "public", "table": "nopk", "new": null,
                 "old": {"a": "2", "b": null}, "unchanged": []},
            ]),
        ),
        (
            "INSERT INTO items VALUES (10, 'kept', 1); SAVEPOINT s; \
             INSERT INTO items VALUES (11, 'rolled back', 1); ROLLBACK TO s;"
                .into(),
            json!([ins("items", json!({"id": "10", "name": "kept", "qty": "1"}))]),
        ),
        (
            "TRUNCATE nopk, docs;".into(),
            json!([{"op": "truncate", "tables": [
                {"schema": "public", "table": "nopk"}, {"schema": "public", "table": "docs"}],
                "cascade": false, "restart_identity": false}]),
        ),
    ];
    // One hub transaction per step; its xid, to find it in the records.
    let xids: Vec<u64> = steps
        .iter()
        .map(|(sql, _)| {
            let out = hub().psql(
                &hdb,
                &format!("BEGIN;\n{sql}\nSELECT pg_current_xact_id();\nCOMMIT;"),
            );
            let last = out.lines().last().unwrap_or_default();
            last.parse()
                .unwrap_or_else(|_| panic!("no xid in psql output {out:?}"))
        })
        .collect();

    let topic = format!("switchback_{}_hub_to_member_json", pipe.name());
    let records = read_topic(&broker.addr(), &topic, |got| got.len() >= steps.len());

    // Every record validates against the published schema.
    let validator = schema_validator();
    assert_valid(&validator, &records);
    // The schema is not vacuous: a record with a change missing its table fails.
    let mut bad = records[0].clone();
    bad["changes"][0].as_object_mut().unwrap().remove("table");
    assert!(
        !validator.is_valid(&bad),
        "the schema accepts a change without a table"
    );

    // One record per transaction, in commit order, with the expected changes and
    // the gap-detection chain.
    assert_eq!(records.len(), steps.len(), "one record per transaction");
    for (i, ((_, want), r)) in steps.iter().zip(&records).enumerate() {
        assert_eq!(r["xid"], xids[i], "record {i}: xid");
        assert_eq!(r["part"], 0, "record {i}");
        assert_eq!(r["parts"], 1, "record {i}");
        if i > 0 {
            let prev = &records[i - 1];
            assert_eq!(
                r["seq"],
                prev["seq"].as_u64().unwrap() + 1,
                "record {i}: seq"
            );
            assert_eq!(
                r["prev_end_lsn"], prev["end_lsn"],
                "record {i}: prev_end_lsn"
            );
        }
        if want.is_null() {
            // The big insert: the whole TOASTed value is there, nothing unchanged.
            let c = &r["changes"][0];
            assert_eq!(c["op"], "insert");
            assert_eq!(c["new"]["body"].as_str().map(str::len), Some(64_000));
            continue;
        }
        let mut got = r["changes"].clone();
        if let Some(tables) = got
            .get_mut(0)
            .and_then(|c| c.get_mut("tables"))
            .and_then(Value::as_array_mut)
        {
            // The order of a truncate's tables is PostgreSQL's choice.
            tables.sort_by_key(|t| std::cmp::Reverse(t["table"].to_string()));
        }
        assert_eq!(&got, want, "record {i}: changes");
    }

    // Apply, reading the bincode topic, brings the member to the hub's state.
    pipe.run_ok(&["apply", "--until-empty"]);
    for (t, order) in [("items", "id"), ("docs", "id"), ("nopk", "a")] {
        let q = format!(
            "SELECT coalesce(string_agg(md5(x::text), ',' ORDER BY {order}), '') FROM {t} x"
        );
        assert_eq!(
            hub().query_value(&hdb, &q),
            member().query_value(&mdb, &q),
            "{t} differs between hub and member"
        );
    }
    assert!(
        capture.sigint_and_wait().success(),
        "{}",
        capture.log_tail(20)
    );
    let log = capture.log_text();
    assert!(
        !log.contains("apple") && !log.contains("rolled back"),
        "capture logged row values"
    );
    wait_until(Duration::from_secs(10), "the slot to be released", || {
        hub().slot(&slot).is_some_and(|s| !s.active)
    });
    hub().drop_slot_if_inactive(&slot);
}

/// A transaction larger than a message is split into parts that concatenate to
/// its changes; a single change larger than a message stops capture with an
/// error naming the table and the fix (and no value).
#[test]
fn kafka_json_split_and_too_large() {
    let broker = kafka_broker();
    let hdb = hub().create_db("kjsonsplit");
    hub().psql(&hdb, SETUP);
    // 64 KiB messages: 48 KiB of JSON per message.
    let pipe = Pipeline::capture_only(
        "kjsonsplit",
        hub(),
        &hdb,
        &format!(
            "format = \"json\"\n{}\"message.max.bytes\" = \"65536\"\n",
            broker.queue_toml()
        ),
    );
    let mut capture = pipe.start_capture(hub());
    hub().psql(
        &hdb,
        "INSERT INTO items SELECT i, repeat('n', 1000), i FROM generate_series(1, 120) i;",
    );
    let topic = format!("switchback_{}_hub_to_member_json", pipe.name());
    let records = read_topic(&broker.addr(), &topic, |got| {
        got.last()
            .is_some_and(|r| r["part"].as_u64().unwrap() + 1 == r["parts"].as_u64().unwrap())
    });
    assert_valid(&schema_validator(), &records);
    let parts = records.len();
    assert!(
        parts >= 3,
        "120 KiB of changes in {parts} messages of 48 KiB"
    );
    let mut ids = Vec::new();
    for (i, r) in records.iter().enumerate() {
        assert!(
            r.to_string().len() <= 65536 - 16 * 1024,
            "part {i} is larger than a message"
        );
        assert_eq!(r["part"], i, "parts in order");
        assert_eq!(r["parts"], parts);
        for k in ["seq", "xid", "commit_lsn", "end_lsn", "prev_end_lsn"] {
            assert_eq!(r[k], records[0][k], "part {i}: {k} is the transaction's");
        }
        for c in r["changes"].as_array().unwrap() {
            assert_eq!(c["op"], "insert");
            ids.push(c["new"]["id"].as_str().unwrap().parse::<u32>().unwrap());
        }
    }
    assert_eq!(
        ids,
        (1..=120).collect::<Vec<u32>>(),
        "every change once, in order"
    );

    // One value of ~64 KB cannot be one JSON message of 48 KiB.
    hub().psql(
        &hdb,
        "INSERT INTO docs SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 2000) i;",
    );
    let status = wait_for(
        Duration::from_secs(60),
        "capture to stop on a JSON record too large",
        || capture.try_wait(),
    );
    assert!(!status.success(), "capture exited with success");
    let log = capture.log_text();
    assert!(
        log.contains("public.docs") && log.contains("message.max.bytes"),
        "the error names neither the table nor the fix:\n{}",
        capture.log_tail(20)
    );
    // md5('1'): the start of the value.
    assert!(
        !log.contains("c4ca4238a0b923820dcc509a6f75849b"),
        "capture logged the value"
    );
}
