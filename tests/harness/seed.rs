//! Helpers for the seed tests: a psql session that holds a transaction open (a lock
//! on the member, or an xid on the hub that makes slot creation wait) until released.

use std::io::Write;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{quote_literal, unique, wait_until, Cluster};

/// An open transaction in a psql session; released (COMMIT) on [`Holder::release`]
/// or killed on drop.
pub struct Holder {
    child: Child,
}

impl Holder {
    /// Opens a transaction on `db` running `sql` (e.g. `LOCK TABLE t IN SHARE MODE`,
    /// or `SELECT txid_current()`), and waits until the session is idle in that
    /// transaction (`pg_stat_activity`), so that whatever `sql` took is held.
    pub fn open(cluster: &Cluster, db: &str, sql: &str) -> Holder {
        let app = format!("sb_holder_{}", unique());
        let mut child = cluster
            .psql_cmd("postgres", db)
            .env("PGAPPNAME", &app)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let stdin = child.stdin.as_mut().expect("psql stdin");
        writeln!(stdin, "BEGIN;\n{sql};").expect("write to psql");
        stdin.flush().expect("flush psql stdin");
        let q = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = {} \
             AND state = 'idle in transaction'",
            quote_literal(&app)
        );
        wait_until(
            Duration::from_secs(30),
            &format!("psql session {app} to hold its transaction"),
            || cluster.query_value("postgres", &q) == "1",
        );
        Holder { child }
    }

    /// Commits and waits for the session to end.
    pub fn release(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = writeln!(stdin, "COMMIT;");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
