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
    /// Acknowledge up to the k-th committed, unacknowledged transaction (or the
    /// last one).
    Ack(u8),
    /// Flush, close and reopen: nothing committed is lost.
    Reopen,
    /// Close and reopen without a flush: transactions committed since the last
    /// flush may be lost (a suffix of them), nothing flushed is; acknowledgements
    /// since the last flush may be lost too (those transactions come back).
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    // Weighted so that cases commit and acknowledge enough to fill batches.
    prop_oneof![
        4 => (0..3u8).prop_map(Op::Open),
        3 => (0..3u8, 0..3u8, 1..4u8).prop_map(|(a, b, c)| Op::Append(a, b, c)),
        1 => (0..3u8, 0..3u8).prop_map(|(a, b)| Op::DiscardSub(a, b)),
        1 => (0..3u8).prop_map(Op::Discard),
        5 => (0..3u8).prop_map(Op::Commit),
        1 => Just(Op::Flush),
        2 => (0..4u8).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Committed transactions are read back in commit order with exactly their
    /// surviving records; discarded ones never appear; acknowledged ones go away;
    /// open transactions do not survive a reopen; end LSNs only grow; a reader
    /// handle walking with `next_from` sees the same; a crash loses only what was
    /// not flushed. Batches are bounded at a random size, so several commits share
    /// a batch, batches are written between flushes, and acks land mid-batch.
    #[test]
    fn sled_log_matches_model(
        ops in proptest::collection::vec(op(), 1..80),
        batch_bytes in prop_oneof![Just(1usize), 100..2000usize, Just(1usize << 20)],
        retain_txns in prop_oneof![Just(1u64), Just(3u64), Just(switchback_queue::sled_log::RETAIN_TXNS)],
        decoded in any::<bool>(),
    ) {
        let dir = tempdir();
        // `decoded`: as `run` uses it, records handed over and kept for the reader.
        let open_log = |dir: &std::path::Path| {
            let log = reopen(dir)
                .with_batch_bytes(batch_bytes)
                .with_retention(retain_txns, switchback_queue::sled_log::RETAIN_FOR);
            if decoded { log.keep_decoded() } else { log }
        };
        let mut log = open_log(&dir);
        let mut reader = log.clone();
        // model: open slots -> (id, records with subxid); committed -> (seq, end, records)
        let mut open: HashMap<u8, (u64, Vec<(u32, Record)>)> = HashMap::new();
        let mut committed: BTreeMap<u64, (u64, Vec<Record>)> = BTreeMap::new();
        // Every commit, acknowledged or not, by seq (a seq lost in a crash is reused).
        let mut history: BTreeMap<u64, (u64, Vec<Record>)> = BTreeMap::new();
        // Highest seq committed before the last flush, highest acked, and highest
        // acked before the last flush.
        let (mut flushed_upto, mut acked, mut durable_acked) = (0u64, 0u64, 0u64);
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
                        if decoded {
                            log.append_owned(*id, u32::from(sub), batch.clone()).unwrap();
                        } else {
                            log.append(*id, u32::from(sub), &batch).unwrap();
                        }
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
                    // The s-th open slot (any open slot, so that commits are frequent).
                    let mut slots: Vec<u8> = open.keys().copied().collect();
                    slots.sort_unstable();
                    let slot = (!slots.is_empty()).then(|| slots[usize::from(s) % slots.len()]);
                    if let Some((id, recs)) = slot.and_then(|slot| open.remove(&slot)) {
                        next_end += 10;
                        let seq = log.commit(id, header(next_end)).unwrap();
                        prop_assert!(committed.keys().all(|&k| k < seq), "seq must grow");
                        prop_assert!(seq > acked, "seq {} at or below the acknowledged {}", seq, acked);
                        let t = (next_end, recs.into_iter().map(|(_, r)| r).collect());
                        committed.insert(seq, t.clone());
                        history.insert(seq, t);
                    }
                }
                Op::Flush => {
                    futures_block_on(log.flush()).unwrap();
                    flushed_upto = history.keys().next_back().copied().unwrap_or(0);
                    durable_acked = acked;
                }
                Op::Ack(k) => {
                    let k = usize::from(k).min(committed.len().saturating_sub(1));
                    if let Some(&seq) = committed.keys().nth(k) {
                        reader.ack(seq).unwrap();
                        acked = seq;
                        committed = committed.split_off(&(seq + 1));
                    }
                }
                Op::Reopen => {
                    futures_block_on(log.flush()).unwrap();
                    drop((log, reader));
                    log = open_log(&dir);
                    reader = log.clone();
                    open.clear();
                    flushed_upto = history.keys().next_back().copied().unwrap_or(0);
                    durable_acked = acked;
                }
                Op::Crash => {
                    drop((log, reader));
                    log = open_log(&dir);
                    reader = log.clone();
                    open.clear();
                    let got: Vec<u64> = log.all().unwrap().iter().map(|t| t.seq).collect();
                    for s in committed.keys().filter(|&&s| s <= flushed_upto) {
                        prop_assert!(got.contains(s), "flushed seq {} lost in a crash", s);
                    }
                    for s in &got {
                        prop_assert!(
                            committed.contains_key(s) || (*s > durable_acked && *s <= acked),
                            "seq {} came back from nowhere", s
                        );
                    }
                    let mut lost = false;
                    for s in committed.keys().filter(|&&s| s > flushed_upto) {
                        if !got.contains(s) {
                            lost = true;
                        } else {
                            prop_assert!(!lost, "seq {} survived after a lost one", s);
                        }
                    }
                    if let Some(end) = history.get(&flushed_upto).map(|t| t.0) {
                        prop_assert!(log.last_end_lsn() >= Some(Lsn(end)));
                    }
                    committed = got.iter().map(|s| (*s, history[s].clone())).collect();
                    acked = log.acked().unwrap().unwrap_or(0);
                    prop_assert!(acked >= durable_acked);
                    // Lost seqs are forgotten: they may be committed again. (An
                    // acknowledgement can outlive the unflushed transactions it
                    // acknowledged; seqs then continue after it.)
                    flushed_upto = flushed_upto.max(got.last().copied().unwrap_or(0));
                    history.retain(|&s, _| s <= flushed_upto);
                    durable_acked = acked;
                }
            }
            let want: Vec<u64> = committed.keys().copied().collect();
            // A second handle walking the queue as apply does (its batch cache,
            // the pending batch, sled, or the records kept decoded) sees exactly
            // the committed, unacknowledged transactions; so does `all` below (once
            // the walk has taken the decoded ones: from what is stored).
            let mut walked = Vec::new();
            let mut from = acked + 1;
            while let Some(t) = reader.next_from(from).unwrap() {
                let got: Vec<Record> = reader.records(&t).unwrap().flat_map(|c| c.unwrap()).collect();
                prop_assert_eq!(Some(&got), committed.get(&t.seq).map(|c| &c.1));
                from = t.seq + 1;
                walked.push(t);
            }
            let all = log.all().unwrap();
            prop_assert_eq!(&walked, &all, "headers walked and stored differ");
            let seen: Vec<u64> = all.iter().map(|t| t.seq).collect();
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
    while_locked("reopen", || SledLog::open(dir))
}

/// Runs `f` until the queue is no longer locked (30 s at most).
fn while_locked<T>(what: &str, f: impl Fn() -> Result<T, switchback_queue::QueueError>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(switchback_queue::QueueError::Locked { .. })
                if start.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::yield_now()
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// A scratch directory removed when dropped (a sled log takes hundreds of MB).
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let p = std::env::temp_dir().join(format!(
        "switchback-queue-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
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
        let seq = commit_records(&mut log, &recs, 100 + u64::from(i) * 10);
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

fn commit_one(log: &mut SledLog, end: u64) -> (u64, Vec<Record>) {
    let recs = vec![relation(1, 0), rec(end as u32, 1)];
    (commit_records(log, &recs, end), recs)
}

/// Commits one transaction holding `recs`; returns its seq.
fn commit_records(log: &mut SledLog, recs: &[Record], end: u64) -> u64 {
    let id = log.open();
    log.append(id, 1, recs).unwrap();
    log.commit(id, header(end)).unwrap()
}

fn read(log: &SledLog, seq: u64) -> Option<Vec<Record>> {
    let t = log.next_from(seq).unwrap()?;
    assert_eq!(t.seq, seq, "next_from({seq}) skipped to {}", t.seq);
    Some(log.records(&t).unwrap().flat_map(|c| c.unwrap()).collect())
}

/// Group commit: several commits share a batch; they are visible before the
/// flush; an acknowledgement in the middle of a batch keeps the rest of it; a
/// reopen without flush loses exactly the commits after the last flush; a batch
/// acknowledged in full is deleted and its end LSN is kept.
#[test]
fn batch_boundaries_ack_mid_batch_and_unflushed_loss() {
    let dir = tempdir();
    // Retention on every acknowledgement, so a mid-batch ack would delete too much.
    let mut log = SledLog::open(&dir)
        .unwrap()
        .with_retention(1, Duration::from_secs(3600));
    let flushed: Vec<_> = (1..=3).map(|i| commit_one(&mut log, 100 * i)).collect();
    futures_block_on(log.flush()).unwrap();
    let unflushed: Vec<_> = (4..=5).map(|i| commit_one(&mut log, 100 * i)).collect();
    assert_eq!(
        flushed
            .iter()
            .chain(&unflushed)
            .map(|t| t.0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    // Visible at once to another handle, flushed or not.
    let reader = log.clone();
    for (seq, recs) in flushed.iter().chain(&unflushed) {
        assert_eq!(read(&reader, *seq).as_ref(), Some(recs), "seq {seq}");
    }
    assert_eq!(reader.next_from(6).unwrap(), None);
    // Acknowledge in the middle of the stored batch 1..=3 (not caught up).
    reader.ack(2).unwrap();
    let fresh = log.clone();
    assert_eq!(read(&fresh, 3).as_ref(), Some(&flushed[2].1));
    assert_eq!(
        log.all().unwrap().iter().map(|t| t.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    // "Crash": no flush since 4 and 5 were committed.
    drop((log, reader, fresh));
    let mut log = reopen(&dir).with_retention(1, Duration::from_secs(3600));
    assert_eq!(log.acked().unwrap(), Some(2));
    assert_eq!(
        log.all().unwrap().iter().map(|t| t.seq).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(read(&log, 3).as_ref(), Some(&flushed[2].1));
    assert_eq!(log.last_end_lsn(), Some(Lsn(300)));
    // Seqs continue after what survived; the lost ones are committed again.
    let again = commit_one(&mut log, 400);
    assert_eq!(again.0, 4);
    futures_block_on(log.flush()).unwrap();
    // Acknowledging everything (caught up) deletes both batches; the end LSN stays.
    log.ack(4).unwrap();
    assert_eq!(
        log.next_from(0).unwrap(),
        None,
        "acknowledged batches deleted"
    );
    drop(log);
    let mut log = reopen(&dir);
    assert_eq!(log.all().unwrap(), vec![]);
    assert_eq!(log.last_end_lsn(), Some(Lsn(400)));
    assert_eq!(commit_one(&mut log, 500).0, 5);
}

/// A multi-chunk transaction's chunks go when its batch goes: deleted with the
/// stored batch, or at once when apply acknowledged it before the flush (the
/// batch is then never written).
#[test]
fn multi_chunk_transactions_leave_no_chunks_behind() {
    let dir = tempdir();
    let mut log = SledLog::open(&dir).unwrap();
    let reader = log.clone();
    let commit_multi = |log: &mut SledLog, end: u64| {
        let id = log.open();
        for i in 0..3 {
            log.append(id, 1, &[relation(1, 0), rec(i, 1)]).unwrap();
        }
        log.commit(id, header(end)).unwrap()
    };
    // Stored, then acknowledged (caught up): batch and chunks deleted.
    let seq = commit_multi(&mut log, 100);
    futures_block_on(log.flush()).unwrap();
    assert_eq!(log.data_chunks(), 3);
    let t = reader.next_from(seq).unwrap().unwrap();
    assert_eq!(reader.records(&t).unwrap().count(), 3);
    reader.ack(seq).unwrap();
    assert_eq!(log.data_chunks(), 0);
    // Acknowledged from the pending batch, then flushed: nothing is left.
    let seq = commit_multi(&mut log, 200);
    let t = reader.next_from(seq).unwrap().unwrap();
    let got: Vec<Record> = reader
        .records(&t)
        .unwrap()
        .flat_map(|c| c.unwrap())
        .collect();
    assert_eq!(got.len(), 6);
    reader.ack(seq).unwrap();
    futures_block_on(log.flush()).unwrap();
    assert_eq!(log.data_chunks(), 0);
    drop((log, reader));
    let log = reopen(&dir);
    assert_eq!(log.last_end_lsn(), Some(Lsn(200)));
    assert_eq!(log.all().unwrap(), vec![]);
}

/// Ordinary batches stay inside sled's log, also when sled rewrites a leaf page
/// holding many of them; a value too large for it (one huge row) becomes a sled
/// blob file, which the flush fsyncs itself (sled 0.34 does not), and it reads
/// back whole after a reopen.
#[test]
fn batches_stay_in_the_log_and_huge_values_survive_as_blobs() {
    let blobs = |dir: &std::path::Path| {
        std::fs::read_dir(dir.join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let dir = tempdir();
    let mut log = SledLog::open(&dir).unwrap();
    // 6 MiB of 1 KiB rows, unacknowledged: about 60 full batches, so leaves fill
    // up, split and are rewritten whole (with 512 KiB segments this made blobs).
    let mut end = 100;
    for i in 0..6000u32 {
        let recs = vec![
            relation(1, 0),
            Record::Change(Change::Insert {
                rel: 1,
                new: vec![Value::Text(vec![b'a' + (i % 26) as u8; 1024])],
            }),
        ];
        commit_records(&mut log, &recs, end);
        end += 10;
        if i % 500 == 0 {
            futures_block_on(log.flush()).unwrap();
        }
    }
    futures_block_on(log.flush()).unwrap();
    assert_eq!(
        blobs(&dir),
        0,
        "sled stored a page of batches as a blob file"
    );

    let huge = vec![
        relation(1, 0),
        Record::Change(Change::Insert {
            rel: 1,
            new: vec![Value::Text(vec![b'x'; 3 * 1024 * 1024])],
        }),
    ];
    let seq = commit_records(&mut log, &huge, end);
    futures_block_on(log.flush()).unwrap();
    assert!(
        blobs(&dir) > 0,
        "a 3 MiB value is expected to be a sled blob"
    );
    drop(log);
    let log = reopen(&dir);
    assert_eq!(read(&log, seq).as_ref(), Some(&huge));
}

/// The name of sled's newest snapshot file (`snap.<lsn in hex>`).
fn newest_snapshot(dir: &std::path::Path) -> Option<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap.") && !n.ends_with(".generating"))
        .max()
}

/// After a clean stop, `checkpoint_closed` makes sled record a snapshot at the
/// end of its log (so the next open replays nothing), and the queue keeps every
/// transaction, its acknowledgement and its continuity.
#[test]
fn checkpoint_after_close_moves_the_snapshot_and_keeps_the_queue() {
    let dir = tempdir();
    let mut log = SledLog::open(&dir).unwrap();
    let mut want = Vec::new();
    for i in 0..300u64 {
        want.push(commit_one(&mut log, 100 + i * 10));
    }
    futures_block_on(log.flush()).unwrap();
    log.ack(want[99].0).unwrap();
    let before = newest_snapshot(&dir);
    drop(log);
    while_locked("checkpoint", || SledLog::checkpoint_closed(&dir));
    let after = newest_snapshot(&dir);
    assert!(
        after > before,
        "no newer snapshot: {before:?} then {after:?}"
    );
    let log = reopen(&dir);
    assert_eq!(
        newest_snapshot(&dir),
        after,
        "the open after a checkpoint replayed log"
    );
    for (seq, recs) in &want[100..] {
        assert_eq!(read(&log, *seq).as_ref(), Some(recs), "seq {seq}");
    }
    assert_eq!(log.acked().unwrap(), Some(want[99].0));
}
