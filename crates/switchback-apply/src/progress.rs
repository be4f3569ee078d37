//! Apply progress in the member: a replication origin per pipeline.
//!
//! `pg_replication_origin_xact_setup(end_lsn, commit_time)` inside each member
//! transaction records the hub position atomically with the rows (it is written
//! in the commit record and restored by crash recovery), and tags the rows with
//! the origin so a reverse stream can recognise and drop them.

use switchback_core::{quote_literal, Lsn};
use switchback_pg::pipeline::PipelineConn;
use tokio_postgres::Client;

use crate::ApplyError;

/// Creates the origin if needed, binds this session to it and returns the last
/// applied hub position.
pub async fn setup(conn: &mut PipelineConn, origin: &str) -> Result<Lsn, ApplyError> {
    let lit = quote_literal(origin);
    let err = |e: switchback_pg::PgError| ApplyError::Member {
        transient: switchback_core::Classify::is_transient(&e),
        message: format!(
            "{e}. The apply role must be able to use replication origins: connect as a superuser, \
             or GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
             pg_replication_origin_session_setup(text), \
             pg_replication_origin_xact_setup(pg_lsn, timestamptz) TO the apply role"
        ),
    };
    let rows = conn
        .simple_query(&format!(
            "SELECT CASE WHEN pg_replication_origin_oid({lit}) IS NULL \
                    THEN pg_replication_origin_create({lit}) END"
        ))
        .await
        .map_err(err)?;
    if rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .is_some()
    {
        tracing::info!(origin, "created replication origin on the member");
    }
    conn.simple_query(&format!(
        "SELECT pg_replication_origin_session_setup({lit})"
    ))
    .await
    .map_err(err)?;
    let rows = conn
        .simple_query("SELECT pg_replication_origin_session_progress(false)::text")
        .await
        .map_err(err)?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|l| l.parse().ok())
        .unwrap_or(Lsn::ZERO))
}

/// Reads an origin's progress from any session (for status).
pub async fn read(member: &Client, origin: &str) -> Result<Option<Lsn>, ApplyError> {
    let row = member
        .query_one(
            "SELECT CASE WHEN pg_replication_origin_oid($1) IS NULL THEN NULL \
                    ELSE pg_replication_origin_progress($1, false)::text END",
            &[&origin],
        )
        .await
        .map_err(ApplyError::member)?;
    Ok(row.get::<_, Option<String>>(0).and_then(|l| l.parse().ok()))
}

/// The statement that stamps the current member transaction with the hub position.
pub fn stamp(end_lsn: Lsn, commit_time: i64) -> String {
    let ts = switchback_core::time::format_pg_timestamp(commit_time);
    format!(
        "SELECT pg_replication_origin_xact_setup({}::pg_lsn, {}::timestamptz)",
        quote_literal(&end_lsn.to_string()),
        quote_literal(&ts)
    )
}
