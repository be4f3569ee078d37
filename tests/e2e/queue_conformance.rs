//! One conformance suite for the queue contract (`switchback-queue`), run against
//! every backend: the embedded sled log and Kafka (a real tansu broker).
//!
//! Each case gets a fresh queue (a new sled directory, a new Kafka topic).
//! "Restart" means: every handle dropped, the queue opened again (sled recovers,
//! Kafka re-reads the topic's tail / the group's committed offset).

use std::time::{Duration, Instant};

use switchback_core::{Change, Lsn, Record, TxnHeader, Value};
use switchback_kafka::{KafkaOptions, KafkaReader, KafkaWriter, StartAt};
use switchback_queue::{QueueError, QueueReader, QueueWriter, QueuedTxn, SledLog};
use switchback_tests::{kafka_broker, unique, TempDir};

trait Backend {
    type W: QueueWriter + Send;
    type R: QueueReader + Sync;
    /// A writer on the queue as it is now (call only after `restart` once a
    /// writer was used: it recovers the writer's state).
    async fn writer(&mut self) -> Self::W;
    /// A reader that resumes where the last acknowledgement left off.
    async fn reader(&mut self) -> Self::R;
    /// Drop every handle and reopen (the caller dropped its own first).
    fn restart(&mut self);
    /// Lose everything stored (a wiped broker, a deleted directory).
    fn wipe(&mut self);
    /// Configure a small reader memory budget (large-transaction case).
    fn small_reader_memory(&mut self) {}
}

struct Sled {
    dir: TempDir,
    log: Option<SledLog>,
}

impl Sled {
    fn new() -> Sled {
        let dir = TempDir::new(&format!("conformance-sled-{}", unique()));
        let log = SledLog::open(&dir.path().join("q")).unwrap();
        Sled {
            dir,
            log: Some(log),
        }
    }
}

impl Backend for Sled {
    type W = SledLog;
    type R = SledLog;
    async fn writer(&mut self) -> SledLog {
        self.log.as_ref().unwrap().clone_writer()
    }
    async fn reader(&mut self) -> SledLog {
        self.log.as_ref().unwrap().clone()
    }
    fn restart(&mut self) {
        self.log = None;
        self.log = Some(reopen(&self.dir.path().join("q")));
    }
    fn wipe(&mut self) {
        self.log = None;
        std::fs::remove_dir_all(self.dir.path().join("q")).unwrap();
        self.log = Some(reopen(&self.dir.path().join("q")));
    }
}

/// Opens the log again in this process. sled's background flusher of the dropped
/// handle releases the directory lock when it exits, a moment after the drop (a new
/// process never waits: the old one's lock went with it).
fn reopen(path: &std::path::Path) -> SledLog {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledLog::open(path) {
            Ok(l) => return l,
            // Polled: nothing signals the flusher's exit.
            Err(QueueError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("reopening the sled log: {e}"),
        }
    }
}

trait CloneWriter {
    fn clone_writer(&self) -> Self;
}
impl CloneWriter for SledLog {
    /// `Clone` copies the writer's counters; fine right after an open.
    fn clone_writer(&self) -> Self {
        self.clone()
    }
}

struct Kafka {
    opts: KafkaOptions,
}

impl Kafka {
    fn new() -> Kafka {
        let n = unique();
        let pid = std::process::id();
        Kafka {
            opts: KafkaOptions {
                brokers: kafka_broker().addr(),
                topic: format!("conformance_{pid}_{n}"),
                group_id: format!("conformance_{pid}_{n}_apply"),
                properties: switchback_tests::kafka::tansu_properties(),
                replication_factor: 1,
                reader_memory_bytes: 64 << 20,
                json_topic: None,
            },
        }
    }
}

impl Backend for Kafka {
    type W = KafkaWriter;
    type R = KafkaReader;
    async fn writer(&mut self) -> KafkaWriter {
        KafkaWriter::open(self.opts.clone()).await.unwrap()
    }
    async fn reader(&mut self) -> KafkaReader {
        KafkaReader::open(self.opts.clone(), StartAt::Committed)
            .await
            .unwrap()
    }
    fn restart(&mut self) {}
    fn wipe(&mut self) {
        // A fresh, empty topic under the same consumer group: what a broker that
        // lost its data looks like to switchback.
        self.opts.topic = format!("{}_wiped{}", self.opts.topic, unique());
    }
    fn small_reader_memory(&mut self) {
        self.opts.reader_memory_bytes = 1 << 20;
    }
}

fn rec(tag: &str, n: usize) -> Record {
    Record::Change(Change::Insert {
        rel: 1,
        new: vec![Value::Text(format!("{tag}-{n}").into_bytes()), Value::Null],
    })
}

fn header(xid: u32, end: u64) -> TxnHeader {
    TxnHeader {
        xid,
        commit_lsn: Lsn(end - 8),
        end_lsn: Lsn(end),
        commit_time: 1,
        origin: None,
        records: 0,
        bytes: 0,
    }
}

/// Reads `n` transactions from `from` (polling: a broker delivers asynchronously),
/// then checks nothing more comes.
fn read_n<R: QueueReader>(r: &R, mut from: u64, n: usize) -> Vec<(QueuedTxn, Vec<Record>)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        match r.next_from(from).unwrap() {
            Some(t) => {
                let recs: Vec<Record> = r.records(&t).unwrap().flat_map(|c| c.unwrap()).collect();
                from = t.seq + 1;
                out.push((t, recs));
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} transactions arrived",
                    out.len()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // Nothing beyond: give a broker a moment to deliver anything extra.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        if let Some(t) = r.next_from(from).unwrap() {
            panic!("unexpected extra transaction {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Interleaved open transactions become visible in commit order, each with
/// exactly its own records; seq grows by one; prev_end_lsn chains.
async fn ordering<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    let mut ends = Vec::new();
    for i in 0..20u64 {
        let a = w.open();
        let c = w.open();
        w.append(a, 1, &[rec("a", i as usize)]).unwrap();
        w.append(c, 2, &[rec("c", i as usize), rec("c2", i as usize)])
            .unwrap();
        w.append(a, 1, &[rec("a2", i as usize)]).unwrap();
        // c commits first.
        w.commit(c, header(2, 1000 + i * 100)).unwrap();
        w.commit(a, header(1, 1000 + i * 100 + 50)).unwrap();
        ends.push(1000 + i * 100);
        ends.push(1000 + i * 100 + 50);
    }
    w.flush().await.unwrap();
    let r = b.reader().await;
    r.resume(Lsn::ZERO).unwrap();
    let got = read_n(&r, 0, 40);
    let mut prev: Option<&QueuedTxn> = None;
    for (k, (t, recs)) in got.iter().enumerate() {
        assert_eq!(t.header.end_lsn, Lsn(ends[k]));
        if let Some(p) = prev {
            assert_eq!(t.seq, p.seq + 1);
            assert_eq!(t.prev_end_lsn, Some(p.header.end_lsn));
        }
        let i = k / 2;
        let want = if k % 2 == 0 {
            vec![rec("c", i), rec("c2", i)]
        } else {
            vec![rec("a", i), rec("a2", i)]
        };
        assert_eq!(recs, &want, "records of transaction {k}");
        assert_eq!(t.header.records, want.len() as u64);
        prev = Some(t);
    }
}

/// What was flushed survives a restart: the writer knows its last end LSN and
/// continues the seq; a reader sees everything.
async fn durability_across_restart<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    assert_eq!(w.last_end_lsn(), None);
    for i in 1..=5u64 {
        let id = w.open();
        w.append(id, 1, &[rec("d", i as usize)]).unwrap();
        w.commit(id, header(i as u32, i * 100)).unwrap();
    }
    w.flush().await.unwrap();
    drop(w);
    b.restart();
    let mut w = b.writer().await;
    assert_eq!(w.last_end_lsn(), Some(Lsn(500)));
    let id = w.open();
    w.append(id, 1, &[rec("d", 6)]).unwrap();
    let seq = w.commit(id, header(6, 600)).unwrap();
    assert_eq!(seq, 6);
    w.flush().await.unwrap();
    drop(w);
    b.restart();
    let r = b.reader().await;
    let got = read_n(&r, 0, 6);
    assert_eq!(got[5].0.prev_end_lsn, Some(Lsn(500)));
    assert_eq!(got[5].1, vec![rec("d", 6)]);
}

/// A reader that crashed before acknowledging sees the same transactions again;
/// after acknowledging up to k, a restarted reader starts right after k.
async fn redelivery_after_crash<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    for i in 1..=6u64 {
        let id = w.open();
        w.append(id, 1, &[rec("r", i as usize)]).unwrap();
        w.commit(id, header(i as u32, i * 100)).unwrap();
    }
    w.flush().await.unwrap();
    drop(w);
    let r = b.reader().await;
    assert_eq!(read_n(&r, 0, 6).len(), 6);
    drop(r); // crash: nothing acknowledged
    b.restart();
    let r = b.reader().await;
    let got = read_n(&r, 0, 6);
    assert_eq!(got[0].0.seq, 1, "redelivered from the start");
    r.ack(4).unwrap();
    assert_eq!(r.acked().unwrap(), Some(4));
    drop(r);
    b.restart();
    let r = b.reader().await;
    // As apply does: the member applied up to the acknowledged transaction.
    r.resume(Lsn(400)).unwrap();
    let from = r.acked().unwrap().map_or(0, |a| a + 1);
    let got = read_n(&r, from, 2);
    assert_eq!(got[0].0.seq, 5);
    assert_eq!(got[1].1, vec![rec("r", 6)]);
}

/// Acknowledged transactions are gone for good (depth drops, a restarted reader
/// never sees them); acknowledging never moves backwards.
async fn ack_and_retention<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    for i in 1..=4u64 {
        let id = w.open();
        w.append(id, 1, &[rec("k", i as usize)]).unwrap();
        w.commit(id, header(i as u32, i * 100)).unwrap();
    }
    w.flush().await.unwrap();
    let r = b.reader().await;
    read_n(&r, 0, 4);
    assert_eq!(r.depth().unwrap().transactions, 4);
    r.ack(4).unwrap();
    r.ack(2).unwrap(); // late, smaller: no effect
    assert_eq!(r.acked().unwrap(), Some(4));
    assert_eq!(r.depth().unwrap().transactions, 0);
    drop(r);
    drop(w);
    b.restart();
    let r = b.reader().await;
    read_n(&r, 0, 0);
    assert_eq!(r.depth().unwrap().transactions, 0);
}

/// A transaction far larger than a message / the reader's memory budget, with
/// single values larger than Kafka's message limit, comes back whole and in order.
async fn large_transaction<B: Backend>(mut b: B) {
    b.small_reader_memory();
    let mut w = b.writer().await;
    let big = |i: usize| {
        Record::Change(Change::Insert {
            rel: 1,
            new: vec![Value::Text(vec![b'x' + (i % 3) as u8; 2_500_000 + i])],
        })
    };
    let id = w.open();
    let mut want = Vec::new();
    for i in 0..4 {
        w.append(id, 1, &[big(i)]).unwrap();
        want.push(big(i));
    }
    for i in 0..300 {
        let chunk: Vec<Record> = (0..50).map(|j| rec("l", i * 50 + j)).collect();
        w.append(id, 1, &chunk).unwrap();
        want.extend(chunk);
    }
    w.commit(id, header(1, 100)).unwrap();
    w.flush().await.unwrap();
    let r = b.reader().await;
    let got = read_n(&r, 0, 1);
    assert_eq!(got[0].0.header.records, want.len() as u64);
    assert!(got[0].1 == want, "large transaction differs");
    // A second read (apply replays a group after a conflict) gives the same.
    let again: Vec<Record> = r
        .records(&got[0].0)
        .unwrap()
        .flat_map(|c| c.unwrap())
        .collect();
    assert!(again == want, "second read differs");
}

/// An empty queue: nothing to read, nothing acknowledged, no last end LSN.
async fn empty_queue<B: Backend>(mut b: B) {
    let w = b.writer().await;
    assert_eq!(w.last_end_lsn(), None);
    let r = b.reader().await;
    assert_eq!(r.next_from(0).unwrap(), None);
    assert_eq!(r.acked().unwrap(), None);
    assert_eq!(r.depth().unwrap().transactions, 0);
}

/// A producer that dies mid-transaction leaves nothing visible; aborted
/// transactions and sub-transactions never show; the next producer's
/// transactions follow with the next seq.
async fn producer_restart_mid_transaction<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    let id = w.open();
    w.append(id, 1, &[rec("ok", 1)]).unwrap();
    w.commit(id, header(1, 100)).unwrap();
    let dead = w.open();
    w.append(dead, 9, &[rec("dead", 1)]).unwrap();
    w.append(dead, 9, &[rec("dead", 2)]).unwrap();
    w.flush().await.unwrap();
    drop(w); // crash with `dead` open
    b.restart();
    let mut w = b.writer().await;
    assert_eq!(w.last_end_lsn(), Some(Lsn(100)));
    let aborted = w.open();
    w.append(aborted, 3, &[rec("aborted", 1)]).unwrap();
    let t = w.open();
    w.append(t, 4, &[rec("top", 1)]).unwrap();
    w.append(t, 5, &[rec("sub", 1)]).unwrap();
    w.append(t, 4, &[rec("top", 2)]).unwrap();
    w.discard_subxact(t, 5).unwrap();
    w.discard(aborted).unwrap();
    let seq = w.commit(t, header(4, 200)).unwrap();
    assert_eq!(seq, 2);
    w.flush().await.unwrap();
    let r = b.reader().await;
    r.resume(Lsn::ZERO).unwrap();
    let got = read_n(&r, 0, 2);
    assert_eq!(got[0].1, vec![rec("ok", 1)]);
    assert_eq!(got[1].1, vec![rec("top", 1), rec("top", 2)]);
    assert_eq!(got[1].0.header.records, 2);
    assert_eq!(got[1].0.prev_end_lsn, Some(Lsn(100)));
}

/// A queue that lost transactions: the reader names the missing LSN range and
/// hands out nothing after it; a queue that starts where the member stands is fine.
async fn gap_detection<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    w.start_at(Lsn(50));
    for i in 1..=3u64 {
        let id = w.open();
        w.append(id, 1, &[rec("g", i as usize)]).unwrap();
        w.commit(id, header(i as u32, i * 100)).unwrap();
    }
    w.flush().await.unwrap();
    drop(w);
    let r = b.reader().await;
    r.resume(Lsn(0)).unwrap();
    let got = read_n(&r, 0, 3);
    assert_eq!(got[0].0.prev_end_lsn, Some(Lsn(50)));
    r.ack(3).unwrap();
    drop(r);
    // The member applied up to 300. The queue is wiped; capture restarts where
    // the slot was confirmed (500: 400 and 500 were durable before the loss).
    b.wipe();
    let mut w = b.writer().await;
    assert_eq!(w.last_end_lsn(), None);
    w.start_at(Lsn(500));
    let id = w.open();
    w.append(id, 1, &[rec("g", 6)]).unwrap();
    w.commit(id, header(6, 600)).unwrap();
    w.flush().await.unwrap();
    drop(w);
    b.restart();
    let r = b.reader().await;
    r.resume(Lsn(300)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let err = loop {
        match r.next_from(0) {
            Err(e) => break e,
            Ok(Some(t)) => panic!("a transaction after the gap was handed out: {t:?}"),
            Ok(None) => {
                assert!(Instant::now() < deadline, "no gap reported");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    match &err {
        QueueError::Gap { after, upto, .. } => {
            assert_eq!((*after, *upto), (Lsn(300), Lsn(500)));
        }
        e => panic!("expected a gap, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("0/12C") && msg.contains("0/1F4"),
        "the message names the range: {msg}"
    );
    // Still refused on the next call: never skipped.
    assert!(r.next_from(0).is_err());
    // A member that stands at 500 (e.g. re-seeded) follows it.
    let r2 = b.reader().await;
    r2.resume(Lsn(500)).unwrap();
    let got = read_n(&r2, 0, 1);
    assert_eq!(got[0].0.header.end_lsn, Lsn(600));
}

/// A reader restarted after acknowledging a transaction committed while another
/// was still open (protocol streaming interleaves them): it delivers the open one
/// whole, and nothing applied is handed out again except at or below the
/// member's progress (which apply skips).
async fn restart_mid_interleave<B: Backend>(mut b: B) {
    let mut w = b.writer().await;
    let y = w.open();
    w.append(y, 1, &[rec("y", 1)]).unwrap();
    let t = w.open();
    w.append(t, 2, &[rec("t", 1)]).unwrap();
    w.commit(y, header(1, 100)).unwrap();
    let x = w.open();
    w.append(x, 3, &[rec("x", 1)]).unwrap();
    w.commit(x, header(3, 200)).unwrap();
    w.append(t, 2, &[rec("t", 2)]).unwrap();
    w.commit(t, header(2, 300)).unwrap();
    w.flush().await.unwrap();
    drop(w);
    let r = b.reader().await;
    r.resume(Lsn::ZERO).unwrap();
    let got = read_n(&r, 0, 3);
    assert_eq!(got[2].1, vec![rec("t", 1), rec("t", 2)]);
    // The member applied y and x, then acknowledged x.
    r.ack(got[1].0.seq).unwrap();
    drop(r);
    b.restart();
    let r = b.reader().await;
    r.resume(Lsn(200)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut from = r.acked().unwrap().map_or(0, |a| a + 1);
    loop {
        match r.next_from(from).unwrap() {
            Some(txn) => {
                let recs: Vec<Record> = r.records(&txn).unwrap().flat_map(|c| c.unwrap()).collect();
                from = txn.seq + 1;
                if txn.header.end_lsn == Lsn(300) {
                    assert_eq!(recs, vec![rec("t", 1), rec("t", 2)]);
                    break;
                }
                assert!(
                    txn.header.end_lsn <= Lsn(200),
                    "only applied transactions may come again: {txn:?}"
                );
            }
            None => {
                assert!(Instant::now() < deadline, "the open transaction never came");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_eq!(r.next_from(from).unwrap(), None);
}

macro_rules! conformance {
    ($($case:ident),*) => {
        mod sled {
            $( #[test] fn $case() { super::rt().block_on(super::$case(super::Sled::new())) } )*
        }
        mod kafka {
            $( #[test] fn $case() { super::rt().block_on(super::$case(super::Kafka::new())) } )*
        }
    };
}

conformance!(
    ordering,
    durability_across_restart,
    redelivery_after_crash,
    ack_and_retention,
    large_transaction,
    empty_queue,
    producer_restart_mid_transaction,
    gap_detection,
    restart_mid_interleave
);
