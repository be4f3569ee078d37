//! The sled log against a simple in-memory model, and under concurrent use.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use switchback_core::{Change, Lsn, Record, TxnHeader, Value};
use switchback_queue::{QueueReader, QueueWriter, SledLog};

fn header(end: u64) -> TxnHeader {
    TxnHeader {
        xid: end as u32,
        commit_lsn: Lsn(end - 1),
        end_lsn: Lsn(end),
        commit_time: 0,
        origin: None,
        records: 0,
        bytes: 0,
    }
}

fn rec(tag: u32, sub: u32) -> Record {
    Record::Change(Change::Insert {
        rel: sub,
        new: vec![Value::Text(tag.to_be_bytes().to_vec())],
    })
}

fn relation(oid: u32, version: u32) -> Record {
    Record::Relation(Arc::new(switchback_core::Relation {
        oid,
        schema: "public".into(),
        table: format!("t{oid}"),
        replica_identity: switchback_core::ReplicaIdentity::Default,
        columns: vec![switchback_core::Column {
            name: format!("c{version}"),
            type_oid: 25,
            type_modifier: -1,
            is_key: true,
        }],
    }))
}

#[derive(Debug, Clone)]
enum Op {
    /// Start a transaction (slot index).
    Open(u8),
    /// Append n records tagged with a sub-transaction to an open slot.
    Append(u8, u8, u8),
    DiscardSub(u8, u8),
    Discard(u8),
    Commit(u8),
    Flush,
    /// Acknowledge up to the k-th committed, unacknowledged transaction.
    Ack(u8),
    /// Close and reopen (a crash after the last flush loses nothing committed
    /// before it; sled may keep more, which the model allows).
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3u8).prop_map(Op::Open),
        (0..3u8, 0..3u8, 1..4u8).prop_map(|(a, b, c)| Op::Append(a, b, c)),
        (0..3u8, 0..3u8).prop_map(|(a, b)| Op::DiscardSub(a, b)),
        (0..3u8).prop_map(Op::Discard),
        (0..3u8).prop_map(Op::Commit),
        Just(Op::Flush),
        (0..4u8).prop_map(Op::Ack),
        Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Committed transactions are read back in commit order with exactly their
    /// surviving records; discarded ones never appear; acknowledged ones go away;
    /// open transactions do not survive a reopen; end LSNs only grow.
    #[test]
    fn sled_log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempdir();
        let mut log = SledLog::open(&dir).unwrap();
        // model: open slots -> (id, records with subxid); committed -> (seq, end, records)
        let mut open: HashMap<u8, (u64, Vec<(u32, Record)>)> = HashMap::new();
        let mut committed: BTreeMap<u64, (u64, Vec<Record>)> = BTreeMap::new();
        let mut next_end = 10u64;
        let mut tag = 0u32;
        for op in ops {
            match op {
                Op::Open(s) => {
                    open.entry(s).or_insert_with(|| (log.open(), Vec::new()));
                }
                Op::Append(s, sub, n) => {
                    if let Some((id, recs)) = open.get_mut(&s) {
                        // As capture writes them: the relation's definition before its
                        // changes. Two versions per relation, so the log's elision of
                        // unchanged definitions is exercised both ways.
                        let mut batch = vec![relation(u32::from(sub), u32::from(n) % 2)];
                        batch.extend((0..n).map(|_| { tag += 1; rec(tag, u32::from(sub)) }));
                        log.append(*id, u32::from(sub), &batch).unwrap();
                        recs.extend(batch.into_iter().map(|r| (u32::from(sub), r)));
                    }
                }
                Op::DiscardSub(s, sub) => {
                    if let Some((id, recs)) = open.get_mut(&s) {
                        log.discard_subxact(*id, u32::from(sub)).unwrap();
                        recs.retain(|(x, _)| *x != u32::from(sub));
                    }
                }
                Op::Discard(s) => {
                    if let Some((id, _)) = open.remove(&s) {
                        log.discard(id).unwrap();
                    }
                }
                Op::Commit(s) => {
                    if let Some((id, recs)) = open.remove(&s) {
                        next_end += 10;
                        let seq = log.commit(id, header(next_end)).unwrap();
                        prop_assert!(committed.keys().all(|&k| k < seq), "seq must grow");
                        committed.insert(seq, (next_end, recs.into_iter().map(|(_, r)| r).collect()));
                    }
                }
                Op::Flush => {
                    futures_block_on(log.flush()).unwrap();
                }
                Op::Ack(k) => {
                    if let Some(&seq) = committed.keys().nth(usize::from(k)) {
                        log.ack(seq).unwrap();
                        committed = committed.split_off(&(seq + 1));
                    }
                }
                Op::Reopen => {
                    futures_block_on(log.flush()).unwrap();
                    drop(log);
                    log = reopen(&dir);
                    open.clear();
                }
            }
            // The reader sees exactly the committed, unacknowledged transactions.
            let all = log.all().unwrap();
            let seen: Vec<u64> = all.iter().map(|t| t.seq).collect();
            let want: Vec<u64> = committed.keys().copied().collect();
            prop_assert_eq!(&seen, &want);
            let mut last = 0u64;
            for t in &all {
                let (end, recs) = &committed[&t.seq];
                prop_assert_eq!(t.header.end_lsn, Lsn(*end));
                prop_assert!(t.header.end_lsn.0 > last);
                last = t.header.end_lsn.0;
                let got: Vec<Record> = log.records(t).unwrap().flat_map(|c| c.unwrap()).collect();
                prop_assert_eq!(&got, recs);
                prop_assert_eq!(t.header.records, recs.len() as u64);
            }
            if let Some((&_, (end, _))) = committed.iter().next_back() {
                prop_assert_eq!(log.last_end_lsn(), Some(Lsn(*end)));
            }
        }
    }
}

/// Stress: a writer committing and a reader acknowledging from two threads keep
/// making progress. (The sled deadlock seen under `switchback run` with multi-key
/// batches did not reproduce in this shape; the end-to-end `run` tests cover it.)
#[test]
fn concurrent_commit_and_ack_make_progress() {
    let dir = tempdir();
    let mut writer = SledLog::open(&dir).unwrap();
    let reader = writer.clone();
    let done = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    const TXNS: u64 = 20_000;
    let w = std::thread::spawn(move || {
        for i in 0..TXNS {
            let id = writer.open();
            // Row-sized values, so segments fill and nodes split as under pgbench.
            let payload = vec![
                Record::Change(Change::Insert {
                    rel: 0,
                    new: vec![
                        Value::Text(vec![b'x'; 300]),
                        Value::Text(i.to_be_bytes().to_vec())
                    ],
                });
                3
            ];
            writer.append(id, 0, &payload).unwrap();
            writer.commit(id, header(100 + i * 10)).unwrap();
            if i % 64 == 0 {
                futures_block_on(writer.flush()).unwrap();
            }
        }
        futures_block_on(writer.flush()).unwrap();
    });
    let (d2, a2) = (done.clone(), applied.clone());
    let r = std::thread::spawn(move || {
        let mut next = 0;
        while a2.load(Ordering::Relaxed) < TXNS {
            match reader.next_from(next).unwrap() {
                Some(t) => {
                    let n: usize = reader.records(&t).unwrap().map(|c| c.unwrap().len()).sum();
                    assert_eq!(n, 3);
                    reader.ack(t.seq).unwrap();
                    next = t.seq + 1;
                    a2.fetch_add(1, Ordering::Relaxed);
                }
                None => std::thread::yield_now(),
            }
        }
        d2.store(true, Ordering::Relaxed);
    });
    // A deadlock shows as no progress at all for a long time.
    let start = Instant::now();
    let mut last = (0, Instant::now());
    while !done.load(Ordering::Relaxed) {
        let now = applied.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(30),
            "no progress for 30 s after {now} transactions: deadlock"
        );
        std::thread::park_timeout(Duration::from_millis(100));
    }
    w.join().unwrap();
    r.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(600));
    // Everything was acknowledged: a reopened log is empty and knows the last end.
    let reopened = reopen(&dir);
    assert_eq!(reopened.depth().unwrap().transactions, 0);
    assert_eq!(reopened.last_end_lsn(), Some(Lsn(100 + (TXNS - 1) * 10)));
}

/// Opens the log again after a drop: sled's flusher thread can hold the file lock
/// for a moment after the last handle is gone.
fn reopen(dir: &std::path::Path) -> SledLog {
    let start = Instant::now();
    loop {
        match SledLog::open(dir) {
            Ok(log) => return log,
            Err(switchback_queue::QueueError::Locked { .. })
                if start.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::yield_now()
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

fn tempdir() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "switchback-queue-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A tiny executor for the log's async flush in synchronous tests.
fn futures_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// Unchanged relation definitions are stored once and restored for every
/// transaction that left them out, also after a reopen.
#[test]
fn unchanged_relations_are_elided_and_restored() {
    let dir = tempdir();
    let mut log = SledLog::open(&dir).unwrap();
    let mut want = Vec::new();
    for i in 0..6u32 {
        let recs = vec![relation(1, i / 3), rec(i, 1), relation(2, 0), rec(i, 2)];
        let id = log.open();
        log.append(id, 1, &recs).unwrap();
        let seq = log.commit(id, header(100 + u64::from(i) * 10)).unwrap();
        want.push((seq, recs));
    }
    let size_first = log.all().unwrap()[0].header.bytes;
    futures_block_on(log.flush()).unwrap();
    let reader = log.clone();
    for (seq, recs) in &want {
        let t = reader.next_from(*seq).unwrap().unwrap();
        let got: Vec<Record> = reader
            .records(&t)
            .unwrap()
            .flat_map(|c| c.unwrap())
            .collect();
        assert_eq!(&got, recs, "seq {seq}");
    }
    drop((log, reader));
    let log = reopen(&dir);
    for (seq, recs) in &want {
        let t = log.next_from(*seq).unwrap().unwrap();
        let got: Vec<Record> = log.records(&t).unwrap().flat_map(|c| c.unwrap()).collect();
        assert_eq!(&got, recs, "seq {seq} after reopen");
    }
    assert!(size_first > 0);
}
