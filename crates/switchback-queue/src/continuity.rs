//! Gap detection: a reader proves that every transaction it hands out follows the
//! one before it.
//!
//! Each stored transaction carries its `seq` (per queue, that is per pipeline and
//! direction) and `prev_end_lsn`, the `end_lsn` of the transaction committed to
//! the queue just before it (for the first one: where the hub's slot stood when
//! capture started writing, if known). A reader checks:
//!
//! * at its start, against what the member has applied (`resume`): the first
//!   transaction either was applied already (`end_lsn <= applied`), or follows
//!   something applied (`prev_end_lsn <= applied`). A first transaction without a
//!   `prev_end_lsn` is a gap. A member that never applied anything (progress 0)
//!   accepts any first transaction: there is no position to prove against.
//! * then, transaction after transaction: `seq` grows by one and `prev_end_lsn`
//!   equals the previous `end_lsn`.
//!
//! Anything else is a gap (a broker that lost data, a truncated topic, a wiped
//! sled directory): the reader stops with [`QueueError::Gap`] naming the missing
//! LSN range; it never skips.

use switchback_core::Lsn;

use crate::{QueueError, QueuedTxn};

/// The continuity state of one reader.
#[derive(Debug, Default, Clone)]
pub struct Continuity {
    applied: Option<Lsn>,
    last: Option<(u64, Lsn)>,
}

impl Continuity {
    /// The reader (re)starts after `applied`, the member's progress.
    pub fn resume(&mut self, applied: Lsn) {
        self.applied = Some(applied);
        self.last = None;
    }

    /// Checks `t`, the next transaction handed out. Re-reading a transaction
    /// already checked (a replayed group) is fine.
    pub fn check(&mut self, t: &QueuedTxn) -> Result<(), QueueError> {
        match self.last {
            Some((seq, _)) if t.seq <= seq => Ok(()),
            Some((seq, end)) => {
                if t.seq != seq + 1 || t.prev_end_lsn != Some(end) {
                    return Err(gap(end, t, Some(seq)));
                }
                self.last = Some((t.seq, t.header.end_lsn));
                Ok(())
            }
            None => {
                if let Some(applied) = self.applied {
                    // A member that never applied anything has no position to
                    // prove against: it starts wherever the queue starts.
                    let follows = applied == Lsn::ZERO
                        || t.header.end_lsn <= applied
                        || t.prev_end_lsn.is_some_and(|p| p <= applied);
                    if !follows {
                        return Err(gap(applied, t, None));
                    }
                }
                self.last = Some((t.seq, t.header.end_lsn));
                Ok(())
            }
        }
    }
}

fn gap(after: Lsn, t: &QueuedTxn, prev_seq: Option<u64>) -> QueueError {
    QueueError::Gap {
        after,
        upto: t.prev_end_lsn.unwrap_or(t.header.commit_lsn),
        next_seq: t.seq,
        missing_seqs: prev_seq.map(|p| (p + 1, t.seq.saturating_sub(1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchback_core::TxnHeader;

    fn t(seq: u64, prev: Option<u64>, end: u64) -> QueuedTxn {
        QueuedTxn {
            seq,
            prev_end_lsn: prev.map(Lsn),
            header: TxnHeader {
                xid: 1,
                commit_lsn: Lsn(end - 1),
                end_lsn: Lsn(end),
                commit_time: 0,
                origin: None,
                records: 0,
                bytes: 0,
            },
        }
    }

    #[test]
    fn chain_and_gaps() {
        let mut c = Continuity::default();
        c.resume(Lsn::ZERO);
        c.check(&t(1, None, 10)).unwrap();
        c.check(&t(2, Some(10), 20)).unwrap();
        c.check(&t(1, None, 10)).unwrap(); // replay
        assert!(matches!(
            c.check(&t(4, Some(30), 40)),
            Err(QueueError::Gap {
                after: Lsn(20),
                upto: Lsn(30),
                ..
            })
        ));
        // After a restart: the first one follows what was applied.
        let mut c = Continuity::default();
        c.resume(Lsn(20));
        c.check(&t(2, Some(10), 20)).unwrap(); // redelivered
        c.check(&t(3, Some(20), 30)).unwrap();
        let mut c = Continuity::default();
        c.resume(Lsn(20));
        assert!(c.check(&t(1, None, 50)).is_err()); // wiped queue
        let mut c = Continuity::default();
        c.resume(Lsn(20));
        assert!(c.check(&t(1, Some(40), 50)).is_err());
        c.resume(Lsn(40));
        c.check(&t(1, Some(40), 50)).unwrap();
    }
}
