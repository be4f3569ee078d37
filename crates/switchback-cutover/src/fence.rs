//! Fencing a database against application writes, and lifting the fence.
//!
//! switchback's own sessions are never fenced: they are recognised by their
//! application_name (`switchback…`) and they override the read-only default at
//! connection time (`-c default_transaction_read_only=off`, see switchback-config).

use switchback_config::{Config, FenceKind};
use switchback_core::quote_ident;
use switchback_pg::hub::Session;

use crate::hooks::run_hook;
use crate::state::Side;
use crate::CutoverError;

/// Sessions that are not switchback's, in this database.
const APP_SESSIONS: &str = "datname = current_database() AND pid <> pg_backend_pid() \
     AND backend_type = 'client backend' AND coalesce(application_name, '') NOT LIKE 'switchback%'";

async fn database(s: &Session) -> Result<String, CutoverError> {
    let row = s
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| s.err(e))?;
    Ok(row.get(0))
}

/// Ends the application sessions: signals them all at once, then waits (up to 5 s)
/// until every one is gone, so no transaction of theirs commits after the fence
/// marker. Returns how many.
async fn end_sessions(s: &Session, roles: Option<&[String]>) -> Result<i64, CutoverError> {
    let filter = match roles {
        None => APP_SESSIONS.to_string(),
        Some(_) => format!("{APP_SESSIONS} AND usename::text = ANY($1)"),
    };
    let sql = format!(
        "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{{}}') \
         FROM pg_stat_activity WHERE {filter}"
    );
    let row = match roles {
        None => s.client.query_one(&sql, &[]).await,
        Some(r) => s.client.query_one(&sql, &[&r]).await,
    }
    .map_err(|e| s.err(e))?;
    let pids: Vec<i32> = row.get(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left: i64 = s
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .map_err(|e| s.err(e))?
            .get(0);
        if left == 0 {
            return Ok(pids.len() as i64);
        }
        if std::time::Instant::now() > deadline {
            // A session still alive could commit after the fence marker: stop here;
            // running the command again resumes with the fence.
            return Err(CutoverError::Failed(format!(
                "{}: {left} application session(s) did not end within 5 s of pg_terminate_backend; \
                 the fence is not complete. Run the command again to retry (or `rollback` to undo)",
                s.endpoint
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Fences `side` (reached through `session`).
pub async fn fence(cfg: &Config, side: Side, s: &Session) -> Result<(), CutoverError> {
    match cfg.cutover.fence {
        FenceKind::ReadOnly => {
            let db = database(s).await?;
            s.client
                .batch_execute(&format!(
                    "ALTER DATABASE {} SET default_transaction_read_only = on",
                    quote_ident(&db)
                ))
                .await
                .map_err(|e| s.err(e))?;
            let n = end_sessions(s, None).await?;
            tracing::info!(side = side.as_str(), database = %db, ended_sessions = n, "fenced: database read-only for applications");
        }
        FenceKind::RevokeConnect => {
            let db = connect_privilege(s, cfg, false).await?;
            let n = end_sessions(s, Some(&cfg.cutover.fence_roles)).await?;
            tracing::info!(side = side.as_str(), database = %db, ended_sessions = n, "fenced: CONNECT revoked from the application roles");
        }
        FenceKind::Hook => {
            let cmd = cfg.cutover.fence_hook.as_deref().unwrap_or_default();
            run_hook("fence_hook", cmd, &[("SWITCHBACK_SIDE", side.as_str())]).await?;
            tracing::info!(side = side.as_str(), "fenced: fence_hook ran");
        }
    }
    Ok(())
}

/// `GRANT` (or `REVOKE`) CONNECT on the session's database to (from) the fence
/// roles; returns the database's name.
async fn connect_privilege(s: &Session, cfg: &Config, grant: bool) -> Result<String, CutoverError> {
    let db = database(s).await?;
    let roles: Vec<String> = cfg
        .cutover
        .fence_roles
        .iter()
        .map(|r| quote_ident(r))
        .collect();
    let (verb, prep) = if grant {
        ("GRANT", "TO")
    } else {
        ("REVOKE", "FROM")
    };
    s.client
        .batch_execute(&format!(
            "{verb} CONNECT ON DATABASE {} {prep} {}",
            quote_ident(&db),
            roles.join(", ")
        ))
        .await
        .map_err(|e| s.err(e))?;
    Ok(db)
}

/// Lifts the fence from `side`.
pub async fn unfence(cfg: &Config, side: Side, s: &Session) -> Result<(), CutoverError> {
    match cfg.cutover.fence {
        FenceKind::ReadOnly => {
            let db = database(s).await?;
            s.client
                .batch_execute(&format!(
                    "ALTER DATABASE {} RESET default_transaction_read_only",
                    quote_ident(&db)
                ))
                .await
                .map_err(|e| s.err(e))?;
        }
        FenceKind::RevokeConnect => {
            connect_privilege(s, cfg, true).await?;
        }
        FenceKind::Hook => {
            if let Some(cmd) = cfg.cutover.unfence_hook.as_deref() {
                run_hook("unfence_hook", cmd, &[("SWITCHBACK_SIDE", side.as_str())]).await?;
            }
        }
    }
    tracing::info!(side = side.as_str(), "fence lifted");
    Ok(())
}

/// Preflight for the fence on `side`: every reason it would not hold.
pub async fn check(cfg: &Config, side: Side, s: &Session) -> Result<Vec<String>, CutoverError> {
    let mut reasons = Vec::new();
    if cfg.cutover.fence == FenceKind::RevokeConnect {
        let row = s
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database d, \
                   aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a \
                 WHERE d.datname = current_database() AND a.grantee = 0 AND a.privilege_type = 'CONNECT')",
                &[],
            )
            .await
            .map_err(|e| s.err(e))?;
        if row.get::<_, bool>(0) {
            reasons.push(format!(
                "{}: PUBLIC has CONNECT on the database, so revoking it from [cutover] fence_roles \
                 would not fence them. Fix: REVOKE CONNECT ON DATABASE ... FROM PUBLIC and GRANT it \
                 to the roles that need it, or use fence = \"read-only\"",
                side.as_str()
            ));
        }
        for r in &cfg.cutover.fence_roles {
            let row = s
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
                    &[r],
                )
                .await
                .map_err(|e| s.err(e))?;
            if !row.get::<_, bool>(0) {
                reasons.push(format!(
                    "{}: [cutover] fence_roles names role {r:?}, which does not exist",
                    side.as_str()
                ));
            }
        }
    }
    Ok(reasons)
}
