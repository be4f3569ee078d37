//! Writes, reads and acknowledges N pgbench-sized transactions through the sled
//! log and prints the time each side took (a quick check of the log's own cost).
//!   cargo run --release -p switchback-queue --example log_bench -- 20000 [FLUSH_EVERY [BATCH_BYTES]]
//! (a flush every 200 transactions and the default batch size unless given).

use std::sync::Arc;
use std::time::Instant;

use switchback_core::{Change, Column, Lsn, Record, Relation, ReplicaIdentity, TxnHeader, Value};
use switchback_queue::{QueueReader, QueueWriter, SledLog};

fn relation(oid: u32, cols: usize) -> Record {
    Record::Relation(Arc::new(Relation {
        oid,
        schema: "public".into(),
        table: format!("pgbench_table_{oid}"),
        replica_identity: ReplicaIdentity::Default,
        columns: (0..cols)
            .map(|i| Column {
                name: format!("column_{i}"),
                type_oid: 23,
                type_modifier: -1,
                is_key: i == 0,
            })
            .collect(),
    }))
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let flush_every: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let batch_bytes: usize = std::env::args()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or(switchback_queue::sled_log::BATCH_BYTES);
    let dir = std::env::temp_dir().join(format!("sb-log-bench-{}", std::process::id()));
    let mut log = SledLog::open(&dir).unwrap().with_batch_bytes(batch_bytes);
    let reader = log.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let t = Instant::now();
    for i in 0..n {
        let recs = vec![
            relation(1, 4),
            Record::Change(Change::Update {
                rel: 1,
                old: None,
                new: vec![
                    Value::Text(i.to_string().into_bytes()),
                    Value::Text(b"1".to_vec()),
                    Value::Text(b"-4242".to_vec()),
                    Value::Text(vec![b' '; 84]),
                ],
            }),
            relation(2, 6),
            Record::Change(Change::Insert {
                rel: 2,
                new: (0..6)
                    .map(|c| Value::Text(format!("{c}{i}").into_bytes()))
                    .collect(),
            }),
        ];
        let id = log.open();
        log.append(id, 1, &recs).unwrap();
        log.commit(
            id,
            TxnHeader {
                xid: i as u32,
                commit_lsn: Lsn(100 + i * 10),
                end_lsn: Lsn(101 + i * 10),
                commit_time: 0,
                origin: None,
                records: 0,
                bytes: 0,
            },
        )
        .unwrap();
        if i % flush_every == flush_every - 1 {
            rt.block_on(log.flush()).unwrap();
        }
    }
    rt.block_on(log.flush()).unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    let mut seq = 0;
    let mut records = 0;
    while let Some(txn) = reader.next_from(seq).unwrap() {
        for c in reader.records(&txn).unwrap() {
            records += c.unwrap().len();
        }
        seq = txn.seq + 1;
        if seq % 2000 == 0 {
            reader.ack(txn.seq).unwrap();
        }
    }
    reader.ack(seq - 1).unwrap();
    let read = t.elapsed();
    println!("{n} transactions: write {write:?}, read+ack {read:?} ({records} records)");
    drop((log, reader));
    let _ = std::fs::remove_dir_all(&dir);
}
