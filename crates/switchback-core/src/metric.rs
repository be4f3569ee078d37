//! Metric names: the one place they are defined. Documented in `docs/metrics.md`.
//! Prometheus style: `switchback_<noun>_<unit>[_total]`. Labels stay low-cardinality
//! (`pipeline`, `kind`, `op`, never a key or a value).

/// Transactions stored in the queue by capture.
pub const CAPTURE_TRANSACTIONS_TOTAL: &str = "switchback_capture_transactions_total";
/// Row changes (and messages) stored in the queue by capture.
pub const CAPTURE_CHANGES_TOTAL: &str = "switchback_capture_changes_total";
/// Queue flushes (durability points) made by capture.
pub const CAPTURE_FLUSHES_TOTAL: &str = "switchback_capture_flushes_total";
/// Transactions the hub sent again that were already stored (dropped).
pub const CAPTURE_DUPLICATES_TOTAL: &str = "switchback_capture_duplicates_total";
/// Transactions dropped by capture because they carry the other direction's
/// replication origin (echoes of what switchback applied), label `direction`.
pub const CAPTURE_ECHOES_DROPPED_TOTAL: &str = "switchback_capture_echoes_dropped_total";
/// Reconnections of the replication stream.
pub const CAPTURE_RECONNECTS_TOTAL: &str = "switchback_capture_reconnects_total";
/// The LSN last acknowledged to the hub's slot (as a number).
pub const CAPTURE_ACKED_LSN: &str = "switchback_capture_acked_lsn";
/// Transactions applied to the member.
pub const APPLY_TRANSACTIONS_TOTAL: &str = "switchback_apply_transactions_total";
/// Row changes applied to the member, label `op` (insert, update, delete, truncate).
pub const APPLY_CHANGES_TOTAL: &str = "switchback_apply_changes_total";
/// Hub-wins conflicts, label `kind` (insert_existing, update_missing, update_missing_skipped, delete_missing).
pub const APPLY_CONFLICTS_TOTAL: &str = "switchback_apply_conflicts_total";
/// Member transactions committed by apply (each may group several hub transactions).
pub const APPLY_BATCHES_TOTAL: &str = "switchback_apply_batches_total";
/// The end LSN of the last transaction applied to the member (as a number).
pub const APPLY_LAST_LSN: &str = "switchback_apply_last_lsn";
/// Seconds between the hub commit of the last applied transaction and its apply.
pub const APPLY_LAG_SECONDS: &str = "switchback_apply_lag_seconds";
/// Transactions committed in the queue and not yet applied.
pub const QUEUE_DEPTH_TRANSACTIONS: &str = "switchback_queue_depth_transactions";
/// Bytes committed in the queue and not yet applied.
pub const QUEUE_DEPTH_BYTES: &str = "switchback_queue_depth_bytes";
/// WAL bytes between the hub's current LSN and the slot's confirmed position.
pub const HUB_SLOT_LAG_BYTES: &str = "switchback_hub_slot_lag_bytes";
/// Rows copied by seed and committed on the member.
pub const SEED_ROWS_TOTAL: &str = "switchback_seed_rows_total";
/// COPY bytes streamed by seed from hub to member.
pub const SEED_BYTES_TOTAL: &str = "switchback_seed_bytes_total";
/// Tables whose seed finished (state `done`).
pub const SEED_TABLES_DONE_TOTAL: &str = "switchback_seed_tables_done_total";
/// Cutovers and rollbacks completed, label `kind` (cutover, rollback).
pub const SWITCHES_TOTAL: &str = "switchback_switches_total";
