//! The Kafka queue: capture and apply on different machines, with the same
//! guarantees as the embedded sled log (see the contract in `switchback-queue`).
//!
//! # Layout
//!
//! One topic per pipeline and direction, **one partition** (partition 0): Kafka
//! keeps the order of a partition, so commit order is the partition's order.
//! Every message value is one or more *frames*, each `head_len (u32 BE) ++
//! body_len (u32 BE) ++ envelope(Head) ++ body` (envelope = the versioned bincode
//! record format of `switchback-core`). The writer packs frames into a message
//! until it is full or capture flushes: small transactions share messages.
//!
//! * `Chunk { writer, open, subxid, part, parts }`: a piece of an in-progress
//!   transaction. The body is a slice of `envelope(Vec<Record>)`, one capture
//!   chunk. A chunk larger than the message limit (`message.max.bytes`, less room
//!   for the frame) is cut into `parts` consecutive messages, reassembled by
//!   concatenation before decoding.
//! * `DiscardSubxact { writer, open, subxid }`, `Discard { writer, open }`: a
//!   sub-transaction or the whole transaction was aborted on the hub.
//! * `Commit { writer, open, seq, prev_end_lsn, chunks, header }`: the transaction
//!   becomes visible, after every commit before it. `chunks` lets the reader check
//!   it has every chunk; `seq` and `prev_end_lsn` let it prove nothing is missing
//!   before it (gap detection).
//!
//! `writer` is a random id per writer process: a producer that restarts
//! mid-transaction leaves chunks without a commit; the reader drops them when the
//! next writer's first message arrives.
//!
//! # Durability point
//!
//! The producer is idempotent with `acks=all`; [`KafkaWriter::flush`] waits for the
//! delivery report of every message sent. Capture acknowledges the hub's slot only
//! after that. A delivery failure stops capture (definite error): the topic's tail
//! is re-read on restart, so nothing the hub did not see acknowledged is assumed.
//!
//! # Reading
//!
//! The reader consumes the partition in order, keeps the chunks of open
//! transactions in memory up to a budget and only their offsets beyond it (read
//! back at apply time with a second consumer): memory is bounded whatever the
//! transaction size. Acknowledging `seq` commits the consumer group offset of the
//! earliest message still needed (the first chunk of any transaction still open
//! then, else just past the commit), so a restart re-reads every chunk it needs;
//! apply deduplicates redelivered transactions by LSN.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use switchback_core::{record, Lsn, Record, RelationSet, TxnHeader};
use switchback_queue::{
    Continuity, Depth, OpenId, QueueError, QueueReader, QueueWriter, QueuedTxn, RecordChunks,
};

/// The partition every message goes to.
const PARTITION: i32 = 0;
/// Room left in a message for the frame head and Kafka's own overhead.
const FRAME_ROOM: usize = 16 * 1024;
/// Committed transactions a reader holds before it stops reading ahead.
const MAX_READY: usize = 20_000;
/// How long a blocking broker request may take before it is reported.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to reach the topic.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// Consumer group of the reader (its committed offset is the restart point).
    pub group_id: String,
    /// librdkafka properties passed through (security, timeouts, …); they win over
    /// switchback's defaults except where correctness needs a value.
    pub properties: Vec<(String, String)>,
    /// Replication factor when switchback creates the topic (-1: broker default).
    pub replication_factor: i32,
    /// Bytes of chunk data a reader keeps in memory; beyond, only offsets.
    pub reader_memory_bytes: usize,
    /// `[queue] format = "json"`: the writer also produces every committed
    /// transaction as JSON to this topic (see `schemas/record-format.md`).
    pub json_topic: Option<String>,
}

impl KafkaOptions {
    fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// Largest message body: `message.max.bytes` (librdkafka's default 1000000)
    /// less room for the frame.
    fn part_bytes(&self) -> usize {
        let max = self
            .property("message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1_000_000);
        max.saturating_sub(FRAME_ROOM).max(1024)
    }

    fn consumer(&self, group: &str, eof: bool) -> Result<BaseConsumer, QueueError> {
        let mut c = self.client_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", if eof { "true" } else { "false" });
        c.create()
            .map_err(|e| self.err("cannot create a consumer", e))
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> QueueError {
        QueueError::Storage {
            path: format!("kafka topic {} at {}", self.topic, self.brokers),
            message: format!("{what}: {e}"),
        }
    }

    /// Creates the topic (and the JSON topic when configured; one partition
    /// each) unless they exist.
    pub async fn ensure_topic(&self) -> Result<(), QueueError> {
        self.ensure_named_topic(&self.topic).await?;
        if let Some(t) = &self.json_topic {
            self.ensure_named_topic(t).await?;
        }
        Ok(())
    }

    async fn ensure_named_topic(&self, name: &str) -> Result<(), QueueError> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|e| self.err("cannot create an admin client", e))?;
        let topic = NewTopic::new(name, 1, TopicReplication::Fixed(self.replication_factor));
        let opts = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let res = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| self.err("cannot create the topic", e))?;
        for r in res {
            match r {
                Ok(_) => tracing::info!(topic = %name, "created kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(self.err(
                        "cannot create the topic (create it with one partition, or fix the broker's permissions)",
                        code,
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The head of a frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Head {
    Chunk {
        writer: u64,
        open: u64,
        subxid: u32,
        part: u32,
        parts: u32,
    },
    DiscardSubxact {
        writer: u64,
        open: u64,
        subxid: u32,
    },
    Discard {
        writer: u64,
        open: u64,
    },
    Commit {
        writer: u64,
        open: u64,
        seq: u64,
        prev_end_lsn: Option<Lsn>,
        chunks: u32,
        header: TxnHeader,
    },
}

/// Appends one frame: `head_len (u32 BE) ++ body_len (u32 BE) ++ envelope(head) ++ body`.
fn frame_into(out: &mut Vec<u8>, head: &Head, body: &[u8]) -> Result<(), QueueError> {
    let h = record::encode(head)?;
    out.reserve(8 + h.len() + body.len());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    Ok(())
}

/// The frames of one message, in order.
fn unframe(mut v: &[u8]) -> impl Iterator<Item = Result<(Head, &[u8]), QueueError>> {
    std::iter::from_fn(move || {
        if v.is_empty() {
            return None;
        }
        let corrupt = || QueueError::Corrupt("kafka message shorter than its frame".into());
        let r = (|| {
            let hl = u32::from_be_bytes(v.get(..4).ok_or_else(corrupt)?.try_into().unwrap());
            let bl = u32::from_be_bytes(v.get(4..8).ok_or_else(corrupt)?.try_into().unwrap());
            let (hl, bl) = (hl as usize, bl as usize);
            let head = v.get(8..8 + hl).ok_or_else(corrupt)?;
            let body = v.get(8 + hl..8 + hl + bl).ok_or_else(corrupt)?;
            let head = record::decode(head)?;
            v = &v[8 + hl + bl..];
            Ok((head, body))
        })();
        if r.is_err() {
            v = &[];
        }
        Some(r)
    })
}

/// A fresh id per writer process.
fn writer_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ fastrand_u64()
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

// ---------------------------------------------------------------------------
// Writer

struct WOpen {
    /// Per sub-transaction: chunks, records, bytes stored.
    subx: HashMap<u32, (u32, u64, u64)>,
    /// `format = "json"`: the JSON of the changes appended so far, with their
    /// sub-transaction (dropped with it).
    json: Vec<(u32, String)>,
}

/// The JSON side of a writer (`format = "json"`).
struct JsonOut {
    topic: String,
    /// Relations seen, to name tables and columns (a transaction's records are
    /// self-contained, so this only grows).
    rels: RelationSet,
}

/// The error for a change whose JSON does not fit in a message (names the table,
/// never the values).
fn json_too_large(opts: &KafkaOptions, changes: &[(u32, String)], limit: usize) -> QueueError {
    let (_, big) = changes
        .iter()
        .max_by_key(|(_, c)| c.len())
        .expect("a message too large holds a change");
    let what = serde_json::from_str::<serde_json::Value>(big)
        .ok()
        .map(|v| match (v["schema"].as_str(), v["table"].as_str()) {
            (Some(s), Some(t)) => format!("a change of table {s}.{t}"),
            _ => format!("a {} change", v["op"].as_str().unwrap_or("?")),
        })
        .unwrap_or_else(|| "a change".into());
    opts.err(
        "cannot produce a JSON record",
        format!(
            "{what} is {} bytes as JSON, more than fits in one message ({limit} bytes: \
             message.max.bytes less 16 KiB); raise \"message.max.bytes\" in [queue.kafka] \
             (and the broker's limit for topic {}), or remove format = \"json\"",
            big.len(),
            opts.json_topic.as_deref().unwrap_or_default()
        ),
    )
}

/// Builds the JSON messages of one committed transaction: the header with
/// `prev_end_lsn`, `part`, `parts` and a slice of `changes`, each message at most
/// `max` bytes (one change larger than that is a message of its own).
fn json_messages(
    seq: u64,
    prev_end_lsn: Option<Lsn>,
    header: &TxnHeader,
    changes: &[(u32, String)],
    max: usize,
) -> Vec<String> {
    let mut head = switchback_core::json::header_json(seq, header);
    head.insert(
        "prev_end_lsn".into(),
        prev_end_lsn.map_or(serde_json::Value::Null, |l| l.to_string().into()),
    );
    // Reserve room for part numbers and the closing brackets.
    let head_len = serde_json::to_string(&head).map_or(256, |h| h.len()) + 64;
    let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
    let mut size = head_len;
    for (_, c) in changes {
        let last = groups.last_mut().expect("never empty");
        if !last.is_empty() && size + c.len() + 1 > max {
            groups.push(vec![c.as_str()]);
            size = head_len + c.len() + 1;
        } else {
            last.push(c.as_str());
            size += c.len() + 1;
        }
    }
    let parts = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let mut h = head.clone();
            h.insert("part".into(), i.into());
            h.insert("parts".into(), parts.into());
            let h = serde_json::to_string(&h).expect("a map of strings and numbers");
            // `h` ends with `}`: splice the changes in as the last key.
            let mut out =
                String::with_capacity(h.len() + g.iter().map(|c| c.len() + 1).sum::<usize>() + 16);
            out.push_str(&h[..h.len() - 1]);
            out.push_str(",\"changes\":[");
            out.push_str(&g.join(","));
            out.push_str("]}");
            out
        })
        .collect()
}

/// The capture side: an idempotent producer.
pub struct KafkaWriter {
    opts: KafkaOptions,
    producer: FutureProducer,
    writer: u64,
    next_open: OpenId,
    open: HashMap<OpenId, WOpen>,
    pending: VecDeque<DeliveryFuture>,
    /// Frames not sent yet: several per message, up to `part_bytes`.
    buf: Vec<u8>,
    next_seq: u64,
    last_end: Option<Lsn>,
    start: Option<Lsn>,
    part_bytes: usize,
    json: Option<JsonOut>,
}

impl KafkaWriter {
    /// Connects, creates the topic if needed and reads its tail: the last
    /// committed transaction's seq and end LSN.
    pub async fn open(opts: KafkaOptions) -> Result<KafkaWriter, QueueError> {
        opts.ensure_topic().await?;
        let mut c = opts.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5");
        if opts.property("queue.buffering.max.messages").is_none() {
            c.set("queue.buffering.max.messages", "1000000");
        }
        if opts.property("queue.buffering.max.kbytes").is_none() {
            c.set("queue.buffering.max.kbytes", "262144");
        }
        if opts.property("linger.ms").is_none() {
            c.set("linger.ms", "1");
        }
        let producer: FutureProducer = c
            .create()
            .map_err(|e| opts.err("cannot create a producer", e))?;
        let tail = {
            let opts = opts.clone();
            tokio::task::spawn_blocking(move || read_tail(&opts))
                .await
                .map_err(|e| QueueError::Corrupt(format!("tail reader panicked: {e}")))??
        };
        let (next_seq, last_end) = match tail {
            Some((seq, end)) => (seq + 1, Some(end)),
            None => (1, None),
        };
        tracing::info!(topic = %opts.topic, next_seq, last_end = ?last_end.map(|l| l.to_string()), "kafka queue writer ready");
        Ok(KafkaWriter {
            part_bytes: opts.part_bytes(),
            json: opts.json_topic.clone().map(|topic| JsonOut {
                topic,
                rels: RelationSet::default(),
            }),
            opts,
            producer,
            writer: writer_id(),
            next_open: 1,
            open: HashMap::new(),
            pending: VecDeque::new(),
            buf: Vec::new(),
            next_seq,
            last_end,
            start: None,
        })
    }

    /// Adds a frame to the message being built; sends it when full.
    fn push(&mut self, head: &Head, body: &[u8]) -> Result<(), QueueError> {
        if !self.buf.is_empty() && self.buf.len() + body.len() + 256 > self.part_bytes {
            self.send_buf()?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        frame_into(&mut buf, head, body)?;
        self.buf = buf;
        if self.buf.len() >= self.part_bytes {
            self.send_buf()?;
        }
        Ok(())
    }

    fn send_buf(&mut self) -> Result<(), QueueError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.buf);
        self.send(&payload)
    }

    fn send(&mut self, payload: &[u8]) -> Result<(), QueueError> {
        let topic = self.opts.topic.clone();
        self.send_to(&topic, payload)
    }

    fn send_to(&mut self, topic: &str, payload: &[u8]) -> Result<(), QueueError> {
        let mut backoff = Duration::from_millis(1);
        loop {
            let rec = FutureRecord::<(), [u8]>::to(topic)
                .partition(PARTITION)
                .payload(payload);
            match self.producer.send_result(rec) {
                Ok(f) => {
                    self.pending.push_back(f);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The local queue is full (bounded by queue.buffering.max.*):
                    // librdkafka's own thread drains it as the broker answers.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(self.opts.err("cannot produce", e)),
            }
        }
    }
}

/// The last `Commit` in the topic: `(seq, end_lsn)`.
fn read_tail(opts: &KafkaOptions) -> Result<Option<(u64, Lsn)>, QueueError> {
    let c = opts.consumer(&format!("{}-tail", opts.group_id), true)?;
    let (low, high) = c
        .fetch_watermarks(&opts.topic, PARTITION, REQUEST_TIMEOUT)
        .map_err(|e| opts.err("cannot read the topic's offsets", e))?;
    const WINDOW: i64 = 2000;
    let mut hi = high;
    while hi > low {
        let lo = (hi - WINDOW).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&opts.topic, PARTITION, Offset::Offset(lo))
            .map_err(|e| opts.err("cannot position the consumer", e))?;
        c.assign(&tpl)
            .map_err(|e| opts.err("cannot position the consumer", e))?;
        let mut last = None;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if m.offset() >= hi {
                        break;
                    }
                    for f in unframe(m.payload().unwrap_or_default()) {
                        if let (Head::Commit { seq, header, .. }, _) = f? {
                            last = Some((seq, header.end_lsn));
                        }
                    }
                    if m.offset() == hi - 1 {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => tracing::debug!(error = %e, "kafka consumer"),
                None if Instant::now() > deadline => {
                    return Err(opts.err(
                        "reading the topic's tail",
                        format!("no message between offsets {lo} and {hi} arrived in time"),
                    ))
                }
                None => {}
            }
        }
        if last.is_some() {
            return Ok(last);
        }
        hi = lo;
    }
    Ok(None)
}

impl QueueWriter for KafkaWriter {
    fn open(&mut self) -> OpenId {
        let id = self.next_open;
        self.next_open += 1;
        self.open.insert(
            id,
            WOpen {
                subx: HashMap::new(),
                json: Vec::new(),
            },
        );
        id
    }

    fn append(&mut self, id: OpenId, subxid: u32, records: &[Record]) -> Result<(), QueueError> {
        if records.is_empty() {
            return Ok(());
        }
        if !self.open.contains_key(&id) {
            return Err(QueueError::UnknownOpen(id));
        }
        let body = record::encode(&records)?;
        let parts: Vec<&[u8]> = body.chunks(self.part_bytes).collect();
        let n = parts.len() as u32;
        for (i, p) in parts.into_iter().enumerate() {
            self.push(
                &Head::Chunk {
                    writer: self.writer,
                    open: id,
                    subxid,
                    part: i as u32,
                    parts: n,
                },
                p,
            )?;
        }
        let t = self.open.get_mut(&id).ok_or(QueueError::UnknownOpen(id))?;
        let e = t.subx.entry(subxid).or_default();
        e.0 += 1;
        e.1 += records.len() as u64;
        e.2 += body.len() as u64;
        if let Some(j) = &mut self.json {
            for r in records {
                if let Some(c) = switchback_core::json::change_json(&mut j.rels, r.clone()) {
                    t.json.push((subxid, c.to_string()));
                }
            }
        }
        Ok(())
    }

    fn discard(&mut self, id: OpenId) -> Result<(), QueueError> {
        self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        self.push(
            &Head::Discard {
                writer: self.writer,
                open: id,
            },
            &[],
        )
    }

    fn discard_subxact(&mut self, id: OpenId, subxid: u32) -> Result<(), QueueError> {
        let t = self.open.get_mut(&id).ok_or(QueueError::UnknownOpen(id))?;
        if t.subx.remove(&subxid).is_none() {
            return Ok(());
        }
        t.json.retain(|(s, _)| *s != subxid);
        self.push(
            &Head::DiscardSubxact {
                writer: self.writer,
                open: id,
                subxid,
            },
            &[],
        )
    }

    fn commit(&mut self, id: OpenId, mut header: TxnHeader) -> Result<u64, QueueError> {
        let t = self.open.remove(&id).ok_or(QueueError::UnknownOpen(id))?;
        if let Some(last) = self.last_end {
            if header.end_lsn <= last {
                return Err(QueueError::Corrupt(format!(
                    "transaction ending at {} committed after one ending at {last}: capture must drop it",
                    header.end_lsn
                )));
            }
        }
        let (chunks, records, bytes) = t
            .subx
            .values()
            .fold((0u32, 0u64, 0u64), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2));
        header.records = records;
        header.bytes = bytes;
        let seq = self.next_seq;
        let end = header.end_lsn;
        let prev_end_lsn = self.last_end.or(self.start);
        if let Some(topic) = self.json.as_ref().map(|j| j.topic.clone()) {
            let msgs = json_messages(seq, prev_end_lsn, &header, &t.json, self.part_bytes);
            if msgs.iter().any(|m| m.len() > self.part_bytes) {
                return Err(json_too_large(&self.opts, &t.json, self.part_bytes));
            }
            for m in msgs {
                self.send_to(&topic, m.as_bytes())?;
            }
        }
        self.push(
            &Head::Commit {
                writer: self.writer,
                open: id,
                seq,
                prev_end_lsn,
                chunks,
                header,
            },
            &[],
        )?;
        self.next_seq += 1;
        self.last_end = Some(end);
        Ok(seq)
    }

    async fn flush(&mut self) -> Result<(), QueueError> {
        self.send_buf()?;
        while let Some(f) = self.pending.pop_front() {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(self.opts.err(
                        "a message was not delivered; capture stops so that its restart re-reads what the topic holds",
                        e,
                    ))
                }
                Err(_) => return Err(self.opts.err("delivery", "the producer went away")),
            }
        }
        Ok(())
    }

    fn last_end_lsn(&self) -> Option<Lsn> {
        self.last_end
    }

    fn start_at(&mut self, lsn: Lsn) {
        self.start = Some(lsn);
    }
}

// ---------------------------------------------------------------------------
// Reader

enum Piece {
    Mem(Vec<u8>),
    /// Offset of the message, index of the frame in it.
    At(i64, usize),
}

struct RChunk {
    subxid: u32,
    pieces: Vec<Piece>,
    mem: usize,
}

#[derive(Default)]
struct ROpen {
    first_offset: i64,
    chunks: Vec<RChunk>,
    partial: Option<RChunk>,
}

impl ROpen {
    fn mem(&self) -> usize {
        self.chunks
            .iter()
            .chain(self.partial.iter())
            .map(|c| c.mem)
            .sum()
    }
}

struct Ready {
    txn: QueuedTxn,
    chunks: Vec<RChunk>,
    /// Offset to restart from once this transaction is acknowledged.
    restart: i64,
}

struct State {
    topic: String,
    writer: Option<u64>,
    open: HashMap<(u64, u64), ROpen>,
    ready: VecDeque<Ready>,
    mem: usize,
    mem_limit: usize,
    /// The last consumer event was the end of the partition.
    at_end: bool,
    /// The end of the partition was reached at least once.
    seen_end: bool,
    acked: Option<u64>,
    continuity: Continuity,
    /// The member's progress, once apply said it (`resume`).
    applied: Option<Lsn>,
}

struct Fetcher {
    consumer: BaseConsumer,
    next: i64,
    /// The last message read back (its other frames are likely next).
    last: Option<(i64, std::sync::Arc<Vec<u8>>)>,
}

struct Inner {
    consumer: BaseConsumer,
    fetcher: Option<Fetcher>,
    s: State,
    /// Offset acknowledged and not committed to the group yet.
    uncommitted: Option<i64>,
    last_commit: Instant,
}

/// Group offset commits are asynchronous and at most this often (and once more,
/// synchronously, when the reader is dropped): a lost one only means redelivery,
/// which apply deduplicates by LSN.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

impl Inner {
    fn commit_offset(&mut self, opts: &KafkaOptions, mode: CommitMode) {
        let Some(offset) = self.uncommitted.take() else {
            return;
        };
        self.last_commit = Instant::now();
        let mut tpl = TopicPartitionList::new();
        let r = tpl
            .add_partition_offset(&opts.topic, PARTITION, Offset::Offset(offset))
            .and_then(|()| self.consumer.commit(&tpl, mode));
        if let Err(e) = r {
            tracing::warn!(error = %e, topic = %opts.topic, "cannot commit the consumer offset");
        }
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        let opts = self.opts.clone();
        self.lock().commit_offset(&opts, CommitMode::Sync);
    }
}

/// The apply side: a consumer of the topic's single partition.
pub struct KafkaReader {
    opts: KafkaOptions,
    readonly: bool,
    inner: Mutex<Inner>,
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The consumer group's committed offset (apply).
    Committed,
    /// The first retained message, committing nothing (`queue dump`, tests).
    Beginning,
}

impl KafkaReader {
    pub async fn open(opts: KafkaOptions, start: StartAt) -> Result<KafkaReader, QueueError> {
        opts.ensure_topic().await?;
        let consumer = opts.consumer(&opts.group_id, true)?;
        let mut tpl = TopicPartitionList::new();
        let offset = match start {
            StartAt::Committed => Offset::Stored,
            StartAt::Beginning => Offset::Beginning,
        };
        tpl.add_partition_offset(&opts.topic, PARTITION, offset)
            .map_err(|e| opts.err("cannot position the consumer", e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| opts.err("cannot position the consumer", e))?;
        Ok(KafkaReader {
            inner: Mutex::new(Inner {
                consumer,
                fetcher: None,
                uncommitted: None,
                last_commit: Instant::now(),
                s: State {
                    topic: opts.topic.clone(),
                    writer: None,
                    open: HashMap::new(),
                    ready: VecDeque::new(),
                    mem: 0,
                    mem_limit: opts.reader_memory_bytes,
                    at_end: false,
                    seen_end: false,
                    acked: None,
                    continuity: Continuity::default(),
                    applied: None,
                },
            }),
            opts,
            readonly: start == StartAt::Beginning,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn ready(&self, seq: u64) -> Option<&Ready> {
        let i = self.ready.partition_point(|r| r.txn.seq < seq);
        self.ready.get(i).filter(|r| r.txn.seq == seq)
    }

    fn ingest(&mut self, offset: i64, payload: &[u8]) -> Result<(), QueueError> {
        let mut frames = unframe(payload).enumerate().peekable();
        while let Some((index, f)) = frames.next() {
            let (head, body) = f?;
            let last = frames.peek().is_none();
            self.ingest_frame(offset, index, last, head, body)?;
        }
        Ok(())
    }

    fn ingest_frame(
        &mut self,
        offset: i64,
        index: usize,
        last: bool,
        head: Head,
        body: &[u8],
    ) -> Result<(), QueueError> {
        let w = match &head {
            Head::Chunk { writer, .. }
            | Head::DiscardSubxact { writer, .. }
            | Head::Discard { writer, .. }
            | Head::Commit { writer, .. } => *writer,
        };
        if self.writer != Some(w) {
            // A new writer: what the previous one left open will never commit.
            let before = self.open.len();
            let mut freed = 0;
            self.open.retain(|k, o| {
                let keep = k.0 == w;
                if !keep {
                    freed += o.mem();
                }
                keep
            });
            self.mem -= freed;
            if self.writer.is_some() && before > self.open.len() {
                tracing::info!(
                    dropped = before - self.open.len(),
                    "dropped transactions a previous capture left unfinished"
                );
            }
            self.writer = Some(w);
        }
        match head {
            Head::Chunk {
                open,
                subxid,
                part,
                parts,
                ..
            } => {
                let o = self.open.entry((w, open)).or_insert_with(|| ROpen {
                    first_offset: offset,
                    ..Default::default()
                });
                let (piece, mem) = if self.mem + body.len() <= self.mem_limit {
                    (Piece::Mem(body.to_vec()), body.len())
                } else {
                    (Piece::At(offset, index), 0)
                };
                self.mem += mem;
                if part == 0 {
                    o.partial = Some(RChunk {
                        subxid,
                        pieces: Vec::new(),
                        mem: 0,
                    });
                }
                let Some(c) = o.partial.as_mut().filter(|c| c.subxid == subxid) else {
                    return Err(QueueError::Corrupt(format!(
                        "kafka message at offset {offset} continues a chunk whose start is missing"
                    )));
                };
                c.pieces.push(piece);
                c.mem += mem;
                if part + 1 >= parts {
                    let c = o.partial.take().expect("checked above");
                    o.chunks.push(c);
                }
            }
            Head::DiscardSubxact { open, subxid, .. } => {
                if let Some(o) = self.open.get_mut(&(w, open)) {
                    let mut freed = 0;
                    o.chunks.retain(|c| {
                        if c.subxid == subxid {
                            freed += c.mem;
                        }
                        c.subxid != subxid
                    });
                    self.mem -= freed;
                }
            }
            Head::Discard { open, .. } => {
                if let Some(o) = self.open.remove(&(w, open)) {
                    self.mem -= o.mem();
                }
            }
            Head::Commit {
                open,
                seq,
                prev_end_lsn,
                chunks,
                header,
                ..
            } => {
                let o = self.open.remove(&(w, open)).unwrap_or_default();
                let complete = o.chunks.len() == chunks as usize && o.partial.is_none();
                if self.applied.is_some_and(|a| header.end_lsn <= a) {
                    // Applied already (re-read after a restart: the group offset
                    // is per message, and its chunks may even precede it).
                    self.mem -= o.mem();
                    return Ok(());
                }
                if !complete {
                    return Err(QueueError::Corrupt(format!(
                        "topic {}: transaction seq {seq} (ending at {}) has {} of its {chunks} chunks: \
                         the topic lost messages; re-seed the member",
                        self.topic,
                        header.end_lsn,
                        o.chunks.len()
                    )));
                }
                if let Some(last) = self.ready.back() {
                    if seq <= last.txn.seq {
                        // A writer started over on a topic that lost its tail.
                        return Err(QueueError::Gap {
                            after: last.txn.header.end_lsn,
                            upto: prev_end_lsn.unwrap_or(header.commit_lsn),
                            next_seq: seq,
                            missing_seqs: None,
                        });
                    }
                }
                let restart = self
                    .open
                    .values()
                    .map(|o| o.first_offset)
                    .min()
                    .unwrap_or(i64::MAX)
                    // Frames after this commit in the same message are needed
                    // again: restart at the message then.
                    .min(if last { offset + 1 } else { offset });
                self.ready.push_back(Ready {
                    txn: QueuedTxn {
                        seq,
                        prev_end_lsn,
                        header,
                    },
                    chunks: o.chunks,
                    restart,
                });
            }
        }
        Ok(())
    }
}

impl Fetcher {
    /// Reads back the message at `offset` (chunks kept by offset only).
    fn fetch(
        &mut self,
        opts: &KafkaOptions,
        offset: i64,
    ) -> Result<std::sync::Arc<Vec<u8>>, QueueError> {
        if let Some((o, m)) = &self.last {
            if *o == offset {
                return Ok(m.clone());
            }
        }
        if self.next != offset {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&opts.topic, PARTITION, Offset::Offset(offset))
                .map_err(|e| opts.err("cannot position the consumer", e))?;
            self.consumer
                .assign(&tpl)
                .map_err(|e| opts.err("cannot position the consumer", e))?;
            self.next = offset;
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match self.consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) if m.offset() == offset => {
                    self.next = offset + 1;
                    let m = std::sync::Arc::new(m.payload().unwrap_or_default().to_vec());
                    self.last = Some((offset, m.clone()));
                    return Ok(m);
                }
                Some(Ok(m)) if m.offset() < offset => {}
                Some(Ok(m)) => {
                    return Err(QueueError::Corrupt(format!(
                        "topic {}: message at offset {offset} is gone (next is {})",
                        opts.topic,
                        m.offset()
                    )))
                }
                Some(Err(e)) => tracing::debug!(error = %e, "kafka fetcher"),
                None if Instant::now() > deadline => {
                    return Err(opts.err(
                        "reading back a large transaction",
                        format!("offset {offset} did not arrive in time"),
                    ))
                }
                None => {}
            }
        }
    }
}

impl QueueReader for KafkaReader {
    fn next_from(&self, from: u64) -> Result<Option<QueuedTxn>, QueueError> {
        let mut g = self.lock();
        if g.uncommitted.is_some() && g.last_commit.elapsed() >= COMMIT_INTERVAL {
            g.commit_offset(&self.opts, CommitMode::Async);
        }
        let Inner { consumer, s, .. } = &mut *g;
        let started = Instant::now();
        loop {
            // `ready` is in seq order.
            let i = s.ready.partition_point(|r| r.txn.seq < from);
            if let Some(r) = s.ready.get(i) {
                let t = r.txn.clone();
                s.continuity.check(&t)?;
                return Ok(Some(t));
            }
            if s.ready.len() >= MAX_READY {
                return Ok(None);
            }
            // At the end of the partition: nothing more now. Otherwise more is
            // on its way (the fetch after this one): wait for it a little rather
            // than have apply sleep; until the end was reached once, "nothing
            // yet" must not read as "empty" (`apply --until-empty`).
            let wait = if s.at_end {
                Duration::ZERO
            } else {
                Duration::from_millis(20)
            };
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    s.at_end = false;
                    let offset = m.offset();
                    s.ingest(offset, m.payload().unwrap_or_default())?;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    s.at_end = true;
                    s.seen_end = true;
                    return Ok(None);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = %s.topic, "kafka consumer");
                    return Ok(None);
                }
                None if s.at_end => return Ok(None),
                None if s.seen_end && started.elapsed() > Duration::from_millis(200) => {
                    return Ok(None)
                }
                None if started.elapsed() > REQUEST_TIMEOUT => return Ok(None),
                None => {}
            }
        }
    }

    fn records(&self, txn: &QueuedTxn) -> Result<RecordChunks<'_>, QueueError> {
        let seq = txn.seq;
        let n = {
            let g = self.lock();
            g.s.ready(seq).map(|r| r.chunks.len()).ok_or_else(|| {
                QueueError::Corrupt(format!("transaction seq {seq} is not in the reader"))
            })?
        };
        let mut i = 0;
        Ok(Box::new(std::iter::from_fn(move || {
            if i >= n {
                return None;
            }
            i += 1;
            let mut g = self.lock();
            let Inner { fetcher, s, .. } = &mut *g;
            let Some(r) = s.ready(seq) else {
                return Some(Err(QueueError::Corrupt(format!(
                    "transaction seq {seq} was acknowledged while being read"
                ))));
            };
            let chunk = &r.chunks[i - 1];
            let body = if let [Piece::Mem(b)] = chunk.pieces.as_slice() {
                return Some(record::decode(b).map_err(QueueError::from));
            } else {
                let mut body = Vec::new();
                for p in &chunk.pieces {
                    match p {
                        Piece::Mem(b) => body.extend_from_slice(b),
                        Piece::At(off, index) => {
                            let f = match fetcher {
                                Some(f) => f,
                                None => {
                                    let c = match self
                                        .opts
                                        .consumer(&format!("{}-fetch", self.opts.group_id), false)
                                    {
                                        Ok(c) => c,
                                        Err(e) => return Some(Err(e)),
                                    };
                                    fetcher.insert(Fetcher {
                                        consumer: c,
                                        next: -1,
                                        last: None,
                                    })
                                }
                            };
                            let msg = match f.fetch(&self.opts, *off) {
                                Ok(m) => m,
                                Err(e) => return Some(Err(e)),
                            };
                            let frame = unframe(&msg).nth(*index);
                            match frame {
                                Some(Ok((_, b))) => body.extend_from_slice(b),
                                Some(Err(e)) => return Some(Err(e)),
                                None => {
                                    return Some(Err(QueueError::Corrupt(format!(
                                        "kafka message at offset {off} has no frame {index}"
                                    ))))
                                }
                            }
                        }
                    }
                }
                body
            };
            Some(record::decode(&body).map_err(QueueError::from))
        })))
    }

    fn ack(&self, upto: u64) -> Result<(), QueueError> {
        let mut g = self.lock();
        let s = &mut g.s;
        let mut restart = None;
        while s.ready.front().is_some_and(|r| r.txn.seq <= upto) {
            let r = s.ready.pop_front().expect("checked");
            s.mem -= r.chunks.iter().map(|c| c.mem).sum::<usize>();
            restart = Some(r.restart);
        }
        s.acked = s.acked.max(Some(upto));
        if let (Some(restart), false) = (restart, self.readonly) {
            g.uncommitted = Some(restart);
            if g.last_commit.elapsed() >= COMMIT_INTERVAL {
                g.commit_offset(&self.opts, CommitMode::Async);
            }
        }
        Ok(())
    }

    fn acked(&self) -> Result<Option<u64>, QueueError> {
        Ok(self.lock().s.acked)
    }

    fn depth(&self) -> Result<Depth, QueueError> {
        let g = self.lock();
        let mut d = Depth::default();
        for r in &g.s.ready {
            d.transactions += 1;
            d.bytes += r.txn.header.bytes;
            d.first_seq.get_or_insert(r.txn.seq);
            d.last_seq = Some(r.txn.seq);
            d.last_end_lsn = Some(r.txn.header.end_lsn);
        }
        Ok(d)
    }

    fn resume(&self, applied: Lsn) -> Result<(), QueueError> {
        let mut g = self.lock();
        g.s.continuity.resume(applied);
        g.s.applied = Some(applied);
        Ok(())
    }
}

/// Messages in the topic after the consumer group's committed offset (what apply
/// has not acknowledged yet), for `switchback status`.
pub fn backlog_messages(opts: &KafkaOptions) -> Result<i64, QueueError> {
    // `status` must answer even when the broker does not.
    const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
    let c = opts.consumer(&opts.group_id, false)?;
    let (low, high) = c
        .fetch_watermarks(&opts.topic, PARTITION, STATUS_TIMEOUT)
        .map_err(|e| opts.err("cannot read the topic's offsets", e))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&opts.topic, PARTITION);
    let committed = c
        .committed_offsets(tpl, STATUS_TIMEOUT)
        .map_err(|e| opts.err("cannot read the committed offset", e))?;
    let at = match committed
        .find_partition(&opts.topic, PARTITION)
        .map(|p| p.offset())
    {
        Some(Offset::Offset(o)) => o.max(low),
        _ => low,
    };
    Ok((high - at).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip() {
        let h = Head::Chunk {
            writer: 1,
            open: 2,
            subxid: 3,
            part: 0,
            parts: 1,
        };
        let mut f = Vec::new();
        frame_into(&mut f, &h, b"body").unwrap();
        frame_into(&mut f, &Head::Discard { writer: 1, open: 2 }, b"").unwrap();
        let got: Vec<_> = unframe(&f).map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0].0, Head::Chunk { open: 2, .. }));
        assert_eq!(got[0].1, b"body");
        assert!(matches!(got[1].0, Head::Discard { open: 2, .. }));
        assert!(got[1].1.is_empty());
        let cut: Vec<_> = unframe(&f[..f.len() - 1]).collect();
        assert!(cut[1].is_err());
    }

    #[test]
    fn json_messages_split_and_parse() {
        let header = TxnHeader {
            xid: 9,
            commit_lsn: Lsn(0x10),
            end_lsn: Lsn(0x20),
            commit_time: 0,
            origin: None,
            records: 0,
            bytes: 0,
        };
        let changes: Vec<(u32, String)> = (0..10)
            .map(|i| {
                (
                    0,
                    format!(
                        "{{\"op\":\"message\",\"prefix\":\"p\",\"content\":\"{}\"}}",
                        "x".repeat(100 + i)
                    ),
                )
            })
            .collect();
        let one = json_messages(3, Some(Lsn(0x8)), &header, &changes, 1 << 20);
        assert_eq!(one.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&one[0]).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["prev_end_lsn"], "0/8");
        assert_eq!(
            (v["part"].clone(), v["parts"].clone()),
            (0.into(), 1.into())
        );
        assert_eq!(v["changes"].as_array().unwrap().len(), 10);
        // Small messages: several parts, every change once, in order.
        let many = json_messages(3, None, &header, &changes, 600);
        assert!(many.len() > 2, "{}", many.len());
        let mut seen = Vec::new();
        for (i, m) in many.iter().enumerate() {
            assert!(m.len() <= 600, "part {i} is {} bytes", m.len());
            let v: serde_json::Value = serde_json::from_str(m).unwrap();
            assert_eq!(v["part"], i);
            assert_eq!(v["parts"], many.len());
            assert_eq!(v["prev_end_lsn"], serde_json::Value::Null);
            seen.extend(v["changes"].as_array().unwrap().iter().cloned());
        }
        let all: Vec<serde_json::Value> = changes
            .iter()
            .map(|(_, c)| serde_json::from_str(c).unwrap())
            .collect();
        assert_eq!(seen, all);
        // No changes (a transaction of filtered records only): one empty part.
        let empty = json_messages(4, None, &header, &[], 600);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].ends_with(",\"changes\":[]}"), "{}", empty[0]);
    }
}
