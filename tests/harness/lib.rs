//! End-to-end test harness: throwaway PostgreSQL clusters and `switchback` pipelines.
//!
//! * [`hub()`] / [`member()`]: one shared cluster each per test binary, started on
//!   first use. Every test makes its own database ([`Cluster::create_db`]) and its own
//!   pipeline (unique name), so tests run in parallel on them.
//! * [`Cluster::new_dedicated`]: a private cluster with special settings, removed on
//!   drop.
//! * Every cluster has a *reaper*: a `sh` child in its own process group whose stdin
//!   is a pipe only this process holds. When the test process ends — normally,
//!   by panic, or by `kill -9` — the pipe closes, `read` returns, and the reaper
//!   stops the server (`pg_ctl -m immediate`) and deletes its directory.
//! * [`Pipeline`]: a config file, a queue directory and the `switchback` binary.
//! * [`wait_until`] / [`wait_for`]: polling of real conditions with a timeout and a
//!   clear panic message; no sleeps stand in for synchronisation.
//!
//! Everything is synchronous: SQL goes through `psql` (or [`Cluster::client`] for
//! tests that want a tokio-postgres client inside their own runtime).

use std::collections::HashMap;
use std::fmt;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
pub use switchback_core::Lsn;

pub mod cutover;
pub mod seed;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A number unique within this test process.
pub fn unique() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed) + 1
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// How long the long tests run: `SWITCHBACK_TEST_SCALE=ci` (default) or `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Ci,
    Full,
}

pub fn scale() -> Scale {
    match std::env::var("SWITCHBACK_TEST_SCALE").as_deref() {
        Ok("full") => Scale::Full,
        Ok("ci") | Ok("") | Err(_) => Scale::Ci,
        Ok(other) => panic!("SWITCHBACK_TEST_SCALE={other:?}: expected `ci` or `full`"),
    }
}

/// `ci` value or `full` value, by [`scale()`].
pub fn by_scale<T>(ci: T, full: T) -> T {
    match scale() {
        Scale::Ci => ci,
        Scale::Full => full,
    }
}

/// Polls `cond` (every 20 ms at first, backing off to 250 ms) until it holds;
/// panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// Polls `f` until it returns `Some`, with [`wait_until`]'s schedule.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
        pause = (pause * 3 / 2).min(Duration::from_millis(250));
    }
}

/// Peak resident set size (`VmHWM`) of a live process, in kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    proc_status_field(pid, "VmHWM:")
}

/// Current resident set size (`VmRSS`) of a live process, in kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    proc_status_field(pid, "VmRSS:")
}

fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// Sends a signal with `kill(1)`.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the process's scratch root (which the scratch reaper
    /// removes when the process ends, however it ends).
    pub fn new(prefix: &str) -> TempDir {
        let p = scratch_root().join(format!("{prefix}-{}", unique()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A reaper child: `sh -c 'read _; <script>'` with its stdin held by this process.
struct Reaper {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Reaper {
    fn spawn(script: &str, args: &[&str]) -> Reaper {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _ ; {script}"))
            .arg("reaper")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C aimed at the tests must not kill it.
            .process_group(0)
            .spawn()
            .expect("spawn reaper");
        let stdin = child.stdin.take();
        Reaper { child, stdin }
    }

    /// Runs the cleanup now and waits for it.
    fn run_now(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        let _ = self.child.wait();
    }
}

struct Scratch {
    root: PathBuf,
    _reaper: Reaper,
}

static SCRATCH: OnceLock<Scratch> = OnceLock::new();

/// This process's scratch directory (pipelines' configs, queues and logs).
pub fn scratch_root() -> &'static Path {
    &SCRATCH
        .get_or_init(|| {
            let root = std::env::temp_dir().join(format!(
                "switchback-e2e-{}-{}",
                std::process::id(),
                nanos()
            ));
            std::fs::create_dir_all(&root).expect("create scratch root");
            let reaper = Reaper::spawn("rm -rf \"$1\"", &[root.to_str().unwrap()]);
            Scratch {
                root,
                _reaper: reaper,
            }
        })
        .root
}

// ---------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------

fn pg_bindir() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(d) = std::env::var("SWITCHBACK_PG_BIN") {
            return PathBuf::from(d);
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && d.join("initdb").exists() && d.join("pg_ctl").exists() {
                return d;
            }
        }
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("no PostgreSQL found: neither pg_config --bindir nor /usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, p)| p.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop().expect("no /usr/lib/postgresql/*/bin/initdb").1
    })
}

fn pg_tool(name: &str) -> PathBuf {
    pg_bindir().join(name)
}

/// A command that runs as the `postgres` OS user when we are root (initdb refuses root).
fn as_postgres(program: &Path) -> Command {
    if euid() == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn run_checked(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Settings of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `wal_level` (default `logical`).
    pub wal_level: String,
    /// Extra `postgresql.conf` lines, e.g. `"max_slot_wal_keep_size = 1MB"`.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical".into(),
            extra_conf: Vec::new(),
        }
    }
}

impl ClusterOptions {
    pub fn conf(mut self, line: &str) -> Self {
        self.extra_conf.push(line.to_string());
        self
    }
    pub fn wal_level(mut self, level: &str) -> Self {
        self.wal_level = level.to_string();
        self
    }
}

/// A throwaway PostgreSQL cluster on 127.0.0.1, trust authentication.
pub struct Cluster {
    name: String,
    root: PathBuf,
    data: PathBuf,
    port: Mutex<u16>,
    reaper: Mutex<Option<Reaper>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cluster({} on port {})", self.name, self.port())
    }
}

static HUB: OnceLock<Cluster> = OnceLock::new();
static MEMBER: OnceLock<Cluster> = OnceLock::new();

/// The shared source cluster of this test binary.
pub fn hub() -> &'static Cluster {
    HUB.get_or_init(|| Cluster::launch("hub", ClusterOptions::default()))
}

/// The shared target cluster of this test binary.
pub fn member() -> &'static Cluster {
    MEMBER.get_or_init(|| Cluster::launch("member", ClusterOptions::default()))
}

impl Cluster {
    /// A private cluster with its own settings; stopped and removed on drop.
    pub fn new_dedicated(name: &str, opts: ClusterOptions) -> Cluster {
        Cluster::launch(name, opts)
    }

    fn launch(name: &str, opts: ClusterOptions) -> Cluster {
        let root = std::env::temp_dir().join(format!(
            "switchback-pg-{name}-{}-{}-{}",
            std::process::id(),
            unique(),
            nanos()
        ));
        std::fs::create_dir_all(&root).expect("create cluster root");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777))
            .expect("chmod cluster root");
        let data = root.join("data");
        // The reaper exists before the server does: whatever happens next, the
        // directory goes away with this process.
        let as_pg = if euid() == 0 {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let reaper = Reaper::spawn(
            &format!("{as_pg}\"$1\" -D \"$2\" -m immediate -w stop >/dev/null 2>&1; rm -rf \"$3\""),
            &[
                pg_tool("pg_ctl").to_str().unwrap(),
                data.to_str().unwrap(),
                root.to_str().unwrap(),
            ],
        );
        let mut initdb = as_postgres(&pg_tool("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .process_group(0);
        run_checked(initdb, &format!("initdb of cluster {name}"));
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", root.display()),
            format!("wal_level = {}", opts.wal_level),
            "max_replication_slots = 64".into(),
            "max_wal_senders = 64".into(),
            "wal_sender_timeout = 10s".into(),
            "fsync = on".into(),
            "synchronous_commit = on".into(),
            "shared_buffers = 128MB".into(),
            "max_connections = 200".into(),
            "logging_collector = off".into(),
            "log_min_messages = warning".into(),
        ];
        conf.extend(opts.extra_conf.iter().cloned());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(f, "\n# switchback e2e harness\n{}", conf.join("\n")).unwrap();
        drop(f);

        let cluster = Cluster {
            name: name.to_string(),
            root,
            data,
            port: Mutex::new(0),
            reaper: Mutex::new(Some(reaper)),
        };
        // A port found free may be taken before the server binds it: retry.
        let mut last_err = String::new();
        for _ in 0..5 {
            *cluster.port.lock().unwrap() = free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(e) => last_err = e,
            }
        }
        panic!("cannot start cluster {name}: {last_err}");
    }

    fn try_start(&self) -> Result<(), String> {
        let out = as_postgres(&pg_tool("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-w", "-t", "120", "-o"])
            .arg(format!("-p {}", self.port()))
            .arg("start")
            .stdin(Stdio::null())
            .process_group(0)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start: {}{}\nserver log tail:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(20)
            ))
        }
    }

    /// The last lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn port(&self) -> u16 {
        *self.port.lock().unwrap()
    }
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
    /// The directory holding the data directory, the server log and the socket.
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`
    pub fn url(&self, db: &str) -> String {
        self.url_as("postgres", db)
    }
    pub fn url_as(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port())
    }

    /// Stops the server at once (like a crash); [`start`](Self::start) brings it back.
    pub fn stop_immediate(&self) {
        let mut c = as_postgres(&pg_tool("pg_ctl"));
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .process_group(0);
        run_checked(c, &format!("pg_ctl stop of {}", self.name));
    }

    /// Starts the server again on the same port.
    pub fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("cannot restart cluster {}: {e}", self.name);
        }
    }

    /// A database of its own: `<prefix>_<n>`.
    pub fn create_db(&self, prefix: &str) -> String {
        let name = format!("{}_{}", sanitize(prefix), unique());
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// A tokio-postgres client; its connection task is spawned on the current runtime.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url(db)));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    fn psql_cmd(&self, user: &str, db: &str) -> Command {
        let mut c = Command::new(pg_tool("psql"));
        c.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.port().to_string())
        .args(["-U", user, "-d", db, "-f", "-"])
        .env("PGCONNECT_TIMEOUT", "20")
        .env_remove("PGPASSWORD")
        .env_remove("PGOPTIONS");
        c
    }

    /// Runs SQL through `psql` as `user`. Statements run one by one (each its own
    /// transaction unless the script says BEGIN). Returns stdout (unaligned,
    /// tuples only, `|` between fields) without the trailing newline.
    pub fn try_psql_as(&self, user: &str, db: &str, sql: &str) -> Result<String, String> {
        let mut child = self
            .psql_cmd(user, db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        let mut stdin = child.stdin.take().unwrap();
        let sql_owned = sql.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(sql_owned.as_bytes());
        });
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_string())
        } else {
            Err(format!(
                "psql on {}/{db} as {user} failed ({}): {}\nSQL: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                truncate(sql, 500)
            ))
        }
    }

    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.try_psql_as("postgres", db, sql)
    }

    /// [`try_psql`](Self::try_psql), panicking on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// One value (first line of the output).
    pub fn query_value(&self, db: &str, sql: &str) -> String {
        self.psql(db, sql).lines().next().unwrap_or("").to_string()
    }

    pub fn current_wal_lsn(&self) -> Lsn {
        self.query_value("postgres", "SELECT pg_current_wal_lsn()")
            .parse()
            .expect("pg_current_wal_lsn")
    }

    /// The state of a replication slot, if it exists.
    pub fn slot(&self, slot: &str) -> Option<SlotInfo> {
        let out = self.psql(
            "postgres",
            &format!(
                "SELECT active, coalesce(confirmed_flush_lsn::text, ''), \
                        coalesce(restart_lsn::text, ''), coalesce(wal_status, '') \
                 FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ),
        );
        let line = out.lines().next()?;
        let f: Vec<&str> = line.split('|').collect();
        Some(SlotInfo {
            active: f[0] == "t",
            confirmed_flush: f[1].parse().ok(),
            restart_lsn: f[2].parse().ok(),
            wal_status: f[3].to_string(),
        })
    }

    /// Waits until a walsender streams from `slot`.
    pub fn wait_slot_active(&self, slot: &str, timeout: Duration) {
        // Active alone is not enough: while CREATE_REPLICATION_SLOT waits for a
        // consistent point the slot is active with no confirmed_flush_lsn, and
        // changes committed in that window are never decoded.
        wait_until(
            timeout,
            &format!("slot {slot} to be active and consistent"),
            || {
                self.slot(slot)
                    .is_some_and(|s| s.active && s.confirmed_flush.is_some())
            },
        );
    }

    /// Waits until `slot`'s confirmed_flush_lsn reaches `target`.
    pub fn wait_slot_confirmed(&self, slot: &str, target: Lsn, timeout: Duration) -> Lsn {
        let mut last = None;
        let what = format!("slot {slot} confirmed_flush_lsn >= {target}");
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let s = self.slot(slot);
            if let Some(c) = s.as_ref().and_then(|s| s.confirmed_flush) {
                if c >= target {
                    return c;
                }
            }
            last = s.or(last);
            if start.elapsed() >= timeout {
                panic!("timed out after {timeout:?} waiting for {what}; last state {last:?}");
            }
            std::thread::sleep(pause);
            pause = (pause * 3 / 2).min(Duration::from_millis(250));
        }
    }

    /// Terminates walsenders (of one database, or all).
    pub fn terminate_walsenders(&self, db: Option<&str>) -> u32 {
        let filter = db
            .map(|d| format!(" AND datname = {}", quote_literal(d)))
            .unwrap_or_default();
        let out = self.psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE backend_type = 'walsender'{filter}"
            ),
        );
        out.trim().parse().unwrap_or(0)
    }

    /// Drops a slot if it exists and is not in use (best effort).
    pub fn drop_slot_if_inactive(&self, slot: &str) {
        let _ = self.try_psql(
            "postgres",
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = {} AND NOT active",
                quote_literal(slot)
            ),
        );
    }

    /// Rows of a table, every column as its text output (as the hub's stream carries
    /// them) or JSON null, in `order_by` order.
    pub fn rows_as_text(&self, db: &str, table: &str, order_by: &str) -> Vec<Map<String, Value>> {
        let cols = self.psql(
            db,
            &format!(
                "SELECT attname FROM pg_attribute WHERE attrelid = {}::regclass \
                 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                quote_literal(table)
            ),
        );
        let fields: Vec<String> = cols
            .lines()
            .map(|c| format!("{}, {}::text", quote_literal(c), quote_ident(c)))
            .collect();
        let out = self.psql(
            db,
            &format!(
                "SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3;\n\
                 SELECT json_build_object({}) FROM {table} ORDER BY {order_by}",
                fields.join(", ")
            ),
        );
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| match serde_json::from_str(l) {
                Ok(Value::Object(m)) => m,
                other => panic!("unexpected row JSON {l:?}: {other:?}"),
            })
            .collect()
    }

    /// `pgbench -i -s scale`, then gives pgbench_history a primary key (`hid`).
    pub fn pgbench_init(&self, db: &str, scale: u32) {
        let mut c = Command::new(pg_tool("pgbench"));
        c.args(["-i", "-q", "-s", &scale.to_string(), "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port().to_string())
            .args(["-U", "postgres", db]);
        run_checked(c, "pgbench -i");
        self.psql(
            db,
            "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY",
        );
    }

    /// `pgbench -n -c clients -j min(clients, 2) -T seconds` plus `extra` (tpcb-like
    /// by default). `-n` matters: without it pgbench truncates pgbench_history.
    pub fn pgbench(&self, db: &str, clients: u32, seconds: u32, extra: &[&str]) -> PgbenchResult {
        let mut c = Command::new(pg_tool("pgbench"));
        c.args(["-n", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port().to_string())
            .args(["-U", "postgres"])
            .arg("-c")
            .arg(clients.to_string())
            .arg("-j")
            .arg(clients.clamp(1, 2).to_string())
            .arg("-T")
            .arg(seconds.to_string())
            .args(extra)
            .arg(db);
        let out = run_checked(c, "pgbench");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let num = |label: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(label))
                .and_then(|v| v.trim().split(['/', ' ']).next())
                .and_then(|v| v.parse().ok())
        };
        let transactions = num("number of transactions actually processed:")
            .unwrap_or_else(|| panic!("cannot parse pgbench output:\n{text}"));
        let failed = num("number of failed transactions:").unwrap_or(0);
        PgbenchResult {
            transactions,
            failed,
            output: text,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut r) = self.reaper.lock().unwrap().take() {
            r.run_now();
        }
    }
}

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub active: bool,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: String,
}

#[derive(Debug, Clone)]
pub struct PgbenchResult {
    /// "number of transactions actually processed".
    pub transactions: u64,
    /// "number of failed transactions" (0 when absent).
    pub failed: u64,
    pub output: String,
}

fn sanitize(s: &str) -> String {
    let s: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    s.chars().take(24).collect()
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

// ---------------------------------------------------------------------------
// Comparing tables across the two clusters
// ---------------------------------------------------------------------------

/// Session settings that make text output comparable between the two clusters
/// (the member's database may have another TimeZone).
pub const PIN: &str = "SET datestyle = ISO; SET intervalstyle = postgres; \
                       SET extra_float_digits = 3; SET TimeZone = 'UTC';";

/// The pgbench tables and their keys.
pub const BENCH_TABLES: [(&str, &str); 4] = [
    ("pgbench_accounts", "aid"),
    ("pgbench_branches", "bid"),
    ("pgbench_tellers", "tid"),
    ("pgbench_history", "hid"),
];

/// The query behind [`fingerprint`]: row count and an md5 over the rows of `table`
/// ordered by `order_by`, text output pinned by [`PIN`].
fn fingerprint_sql(table: &str, order_by: &str) -> String {
    format!(
        "{PIN}\nSELECT count(*), md5(coalesce(string_agg(md5(t::text), '' ORDER BY {order_by}), '')) \
         FROM {table} t"
    )
}

fn parse_fingerprint(out: &str) -> Option<(u64, String)> {
    let (n, md5) = out.lines().last()?.split_once('|')?;
    Some((n.parse().ok()?, md5.to_string()))
}

/// Row count and an md5 over the rows of `table` ordered by `order_by`.
pub fn fingerprint(c: &Cluster, db: &str, table: &str, order_by: &str) -> (u64, String) {
    let out = c.psql(db, &fingerprint_sql(table, order_by));
    parse_fingerprint(&out)
        .unwrap_or_else(|| panic!("fingerprint of {table}: unexpected output {out:?}"))
}

/// [`fingerprint`], or None when the query fails (e.g. the cluster is down).
pub fn try_fingerprint(
    c: &Cluster,
    db: &str,
    table: &str,
    order_by: &str,
) -> Option<(u64, String)> {
    parse_fingerprint(&c.try_psql(db, &fingerprint_sql(table, order_by)).ok()?)
}

// ---------------------------------------------------------------------------
// The switchback binary and pipelines
// ---------------------------------------------------------------------------

/// The checkout under test: `cargo test` sets CARGO_MANIFEST_DIR when it runs the
/// test binary. The compile-time value is only a fallback: a test binary reused
/// from a shared target directory may have been compiled in another checkout.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `switchback` binary, built once per test process (`cargo build -p
/// switchback-cli` into this test's target directory, so it is never stale), or
/// `$SWITCHBACK_BIN`.
pub fn switchback_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(b) = std::env::var("SWITCHBACK_BIN") {
            return PathBuf::from(b);
        }
        // target/<profile>/deps/e2e-<hash>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("test executable outside target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let bin = profile_dir.join("switchback");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = repo_root().join("Cargo.toml");
        let mut c = Command::new(cargo);
        c.args(["build", "-q", "-p", "switchback-cli", "--manifest-path"])
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            c.arg("--release");
        }
        let out = c.stdin(Stdio::null()).output().expect("run cargo build");
        // Never fall back to an older binary: a test must run the code it is
        // built with (a stale binary once hid a fixed bug, and could hide a new one).
        assert!(
            out.status.success(),
            "cargo build -p switchback-cli failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// A running `switchback` process; killed (-9) on drop if still running.
pub struct Spawned {
    pub child: Child,
    pub log: PathBuf,
    pub args: Vec<String>,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's stderr (logs) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let s = self.log_text();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.try_wait() {
            panic!(
                "switchback {:?} exited unexpectedly ({st}); log:\n{}",
                self.args,
                self.log_tail(40)
            );
        }
    }

    /// Waits for the exit, at most `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let args = self.args.clone();
        let st = wait_for(timeout, &format!("switchback {args:?} to exit"), || {
            self.child.try_wait().expect("try_wait")
        });
        st
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(st) = self.try_wait() {
            return st;
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait after kill")
    }

    /// SIGINT, then waits (at most 60 s) for the exit.
    pub fn sigint_and_wait(&mut self) -> ExitStatus {
        if let Some(st) = self.try_wait() {
            panic!(
                "switchback {:?} had already exited ({st}) before SIGINT; log:\n{}",
                self.args,
                self.log_tail(40)
            );
        }
        send_signal(self.pid(), "INT");
        self.wait_timeout(Duration::from_secs(60))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One transaction of `queue dump --json`, without its changes.
#[derive(Debug, Clone, Default)]
pub struct DumpTxn {
    pub seq: u64,
    pub xid: u64,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: String,
    pub origin: Option<String>,
    pub changes: u64,
}

/// What [`Pipeline::dump_stream`] reports.
#[derive(Debug)]
pub enum DumpItem {
    /// One change of the transaction being read.
    Change(Value),
    /// The transaction whose changes were just reported has ended.
    End(DumpTxn),
}

/// A pipeline: config file, queue directory, logs, and the `switchback` binary.
pub struct Pipeline {
    dir: TempDir,
    name: String,
    config: PathBuf,
    hub_url: String,
    /// Logs of spawned processes, printed if the test panics.
    logs: Mutex<Vec<PathBuf>>,
    /// Cluster whose slot is dropped on drop (best effort).
    cleanup_slot_on: Option<&'static Cluster>,
}

/// A member URL for capture-only tests: nothing listens there, so any attempt to
/// use the member fails loudly.
pub const NO_MEMBER_URL: &str = "postgres://postgres@127.0.0.1:9/no_member_in_capture_tests";

impl Pipeline {
    /// A pipeline named `<prefix>_<n>` with the given URLs; `extra_toml` is appended
    /// to the config file (e.g. `"[capture]\nstreaming = true\n"`).
    pub fn new(prefix: &str, hub_url: &str, member_url: &str, extra_toml: &str) -> Pipeline {
        let name = format!("{}_{}", sanitize(prefix), unique());
        let dir = TempDir::new(&format!("pipe-{name}"));
        let config = dir.path().join("switchback.toml");
        let queue = dir.path().join("queue");
        let text = format!(
            "[hub]\nurl = {}\n\n[member]\nurl = {}\n\n[pipeline]\nname = {}\n\n[queue]\npath = {}\n\n{}\n",
            toml_str(hub_url),
            toml_str(member_url),
            toml_str(&name),
            toml_str(queue.to_str().unwrap()),
            extra_toml
        );
        std::fs::write(&config, text).expect("write config");
        Pipeline {
            dir,
            name,
            config,
            hub_url: hub_url.to_string(),
            logs: Mutex::new(Vec::new()),
            cleanup_slot_on: None,
        }
    }

    /// A capture-only pipeline from `db` of `hub` (no member). When `hub` is the
    /// shared hub, the slot is dropped when the pipeline is dropped.
    pub fn capture_only(prefix: &str, hub: &Cluster, db: &str, extra_toml: &str) -> Pipeline {
        let mut p = Pipeline::new(prefix, &hub.url(db), NO_MEMBER_URL, extra_toml);
        if let Some(h) = HUB.get() {
            if std::ptr::eq(h, hub) {
                p.cleanup_slot_on = Some(h);
            }
        }
        p
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// `switchback_<name>`: the slot and publication.
    pub fn slot(&self) -> String {
        format!("switchback_{}", self.name)
    }
    pub fn config_path(&self) -> &Path {
        &self.config
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn queue_path(&self) -> PathBuf {
        self.dir.path().join("queue")
    }
    pub fn hub_url(&self) -> &str {
        &self.hub_url
    }

    /// Appends TOML text to the config file.
    pub fn append_config(&self, extra_toml: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .unwrap();
        writeln!(f, "{extra_toml}").unwrap();
    }

    /// `switchback <args> --config <file>`. Run under `setpriv --pdeathsig KILL`
    /// when available, so the process dies with the thread that started it (even if
    /// the test process is killed -9).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match setpriv() {
            Some(sp) => {
                let mut c = Command::new(sp);
                c.args(["--pdeathsig", "KILL", "--"]).arg(switchback_bin());
                c
            }
            None => Command::new(switchback_bin()),
        };
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("SWITCHBACK_CONFIG")
            .env_remove("SWITCHBACK_HUB_PASSWORD")
            .env_remove("SWITCHBACK_MEMBER_PASSWORD")
            .env_remove("SWITCHBACK_LOG_FORMAT")
            .env("SWITCHBACK_LOG", "info")
            .env("NO_COLOR", "1");
        c
    }

    /// Starts `switchback <args>`; stderr and stdout go to a log file.
    pub fn spawn(&self, args: &[&str]) -> Spawned {
        let log = self
            .dir
            .path()
            .join(format!("{}-{}.log", args.join("-"), unique()));
        let f = std::fs::File::create(&log).expect("create log");
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn switchback");
        self.logs.lock().unwrap().push(log.clone());
        Spawned {
            child,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `switchback capture`, then waits until its slot is active on `hub`.
    pub fn start_capture(&self, hub: &Cluster) -> Spawned {
        let mut c = self.spawn(&["capture"]);
        let slot = self.slot();
        wait_until(
            Duration::from_secs(60),
            &format!("capture to stream from slot {slot}"),
            || {
                c.assert_running();
                // Consistent too (see wait_slot_active).
                hub.slot(&slot)
                    .is_some_and(|s| s.active && s.confirmed_flush.is_some())
            },
        );
        c
    }

    /// Runs `switchback <args>` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run switchback")
    }

    /// Runs `switchback <args>` and asserts success.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "switchback {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn kill9(&self, child: &mut Spawned) -> ExitStatus {
        child.kill9()
    }

    pub fn sigint_and_wait(&self, child: &mut Spawned) -> ExitStatus {
        child.sigint_and_wait()
    }

    /// `switchback queue dump --json`, every line parsed.
    pub fn dump(&self) -> Vec<Value> {
        let out = self.run_ok(&["queue", "dump", "--json"]);
        String::from_utf8(out.stdout)
            .expect("dump is UTF-8")
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("dump line is not JSON ({e}): {}", truncate(l, 300)))
            })
            .collect()
    }

    /// `switchback queue dump --json` parsed as a stream, never holding more than
    /// one change: `visit` gets [`DumpItem::Change`] for each change of a transaction
    /// (its header may come after its changes in the JSON object), then
    /// [`DumpItem::End`] with the header and change count once the transaction's
    /// object has ended.
    ///
    /// Returns the dump process's peak RSS in kB as last sampled (every 4096 changes
    /// and at each transaction's end), for reporting.
    pub fn dump_stream(&self, mut visit: impl FnMut(DumpItem)) -> u64 {
        let mut child = self
            .command(&["queue", "dump", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dump");
        let mut stderr = child.stderr.take().unwrap();
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let r = BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
        let mut de = serde_json::Deserializer::from_reader(r);
        let pid = child.id();
        let mut peak = 0u64;
        let mut items = 0u64;
        let mut visit = |item: DumpItem| {
            items += 1;
            if items % 4096 == 1 || matches!(item, DumpItem::End(_)) {
                peak = peak.max(peak_rss_kb(pid).unwrap_or(0));
            }
            visit(item)
        };
        let parsed: Result<(), String> = (|| loop {
            // Only whitespace left: the end.
            if de.end().is_ok() {
                return Ok(());
            }
            let t = TxnSeed { visit: &mut visit }
                .deserialize(&mut de)
                .map_err(|e| format!("dump JSON: {e}"))?;
            visit(DumpItem::End(t));
        })();
        let status = child.wait().expect("wait dump");
        let err = err_reader.join().unwrap_or_default();
        if let Err(e) = parsed {
            panic!("{e}; dump stderr: {err}");
        }
        assert!(status.success(), "queue dump failed ({status}): {err}");
        peak
    }

    /// Parsed dump headers (changes counted, not kept) plus, per transaction, the
    /// changes that `keep` selects.
    pub fn dump_filtered(
        &self,
        mut keep: impl FnMut(&Value) -> bool,
    ) -> Vec<(DumpTxn, Vec<Value>)> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        self.dump_stream(|item| match item {
            DumpItem::Change(c) => {
                if keep(&c) {
                    cur.push(c)
                }
            }
            DumpItem::End(t) => out.push((t, std::mem::take(&mut cur))),
        });
        out
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in self.logs.lock().unwrap().iter() {
                let s = std::fs::read_to_string(log).unwrap_or_default();
                let v: Vec<&str> = s.lines().collect();
                eprintln!(
                    "---- {} (last 40 lines) ----\n{}",
                    log.display(),
                    v[v.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        if let Some(h) = self.cleanup_slot_on {
            // The walsender of a process just stopped may take a moment to exit.
            let slot = self.slot();
            let deadline = Instant::now() + Duration::from_secs(10);
            // (No panicking calls here: this may run while a test unwinds.)
            let active = || {
                h.try_psql(
                    "postgres",
                    &format!(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = {}",
                        quote_literal(&slot)
                    ),
                )
                .is_ok_and(|o| o.trim() == "t")
            };
            while active() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            h.drop_slot_if_inactive(&slot);
        }
    }
}

/// util-linux `setpriv`, if it supports `--pdeathsig`.
fn setpriv() -> Option<&'static Path> {
    static SP: OnceLock<Option<PathBuf>> = OnceLock::new();
    SP.get_or_init(|| {
        let ok = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| PathBuf::from("setpriv"))
    })
    .as_deref()
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// Streaming parse of one dump object.

struct TxnSeed<'a, F> {
    visit: &'a mut F,
}

impl<'de, F: FnMut(DumpItem)> DeserializeSeed<'de> for TxnSeed<'_, F> {
    type Value = DumpTxn;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<DumpTxn, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(DumpItem)> Visitor<'de> for TxnSeed<'_, F> {
    type Value = DumpTxn;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a transaction object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DumpTxn, A::Error> {
        use serde::de::Error;
        let mut t = DumpTxn::default();
        let mut seen: HashMap<&'static str, bool> = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "changes" => {
                    t.changes = map.next_value_seed(ChangesSeed {
                        visit: &mut *self.visit,
                    })?;
                    seen.insert("changes", true);
                }
                "seq" => {
                    t.seq = map.next_value()?;
                    seen.insert("seq", true);
                }
                "xid" => {
                    t.xid = map.next_value()?;
                    seen.insert("xid", true);
                }
                "commit_lsn" | "end_lsn" => {
                    let s: String = map.next_value()?;
                    let l: Lsn = s.parse().map_err(A::Error::custom)?;
                    if key == "commit_lsn" {
                        t.commit_lsn = l;
                        seen.insert("commit_lsn", true);
                    } else {
                        t.end_lsn = l;
                        seen.insert("end_lsn", true);
                    }
                }
                "commit_time" => {
                    t.commit_time = map.next_value()?;
                    seen.insert("commit_time", true);
                }
                "origin" => {
                    t.origin = map.next_value()?;
                    seen.insert("origin", true);
                }
                other => return Err(A::Error::custom(format!("unexpected key {other:?}"))),
            }
        }
        for k in [
            "changes",
            "seq",
            "xid",
            "commit_lsn",
            "end_lsn",
            "commit_time",
            "origin",
        ] {
            if !seen.contains_key(k) {
                return Err(A::Error::custom(format!("missing key {k:?}")));
            }
        }
        Ok(t)
    }
}

struct ChangesSeed<'a, F> {
    visit: &'a mut F,
}

impl<'de, F: FnMut(DumpItem)> DeserializeSeed<'de> for ChangesSeed<'_, F> {
    type Value = u64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(DumpItem)> Visitor<'de> for ChangesSeed<'_, F> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of changes")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while let Some(v) = seq.next_element::<Value>()? {
            n += 1;
            (self.visit)(DumpItem::Change(v));
        }
        Ok(n)
    }
}

/// Parses the header fields of a dump line obtained with [`Pipeline::dump`].
pub fn txn_header(v: &Value) -> DumpTxn {
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {v}"))
            .to_string()
    };
    DumpTxn {
        seq: v["seq"].as_u64().expect("seq"),
        xid: v["xid"].as_u64().expect("xid"),
        commit_lsn: s("commit_lsn").parse().expect("commit_lsn"),
        end_lsn: s("end_lsn").parse().expect("end_lsn"),
        commit_time: s("commit_time"),
        origin: v["origin"].as_str().map(str::to_string),
        changes: v["changes"].as_array().map_or(0, |a| a.len() as u64),
    }
}

/// Checks the order invariants of a dump: `seq` and `end_lsn` strictly increasing,
/// `commit_lsn < end_lsn`, xids unique.
pub fn assert_dump_order(txns: &[DumpTxn]) {
    let mut xids = std::collections::HashSet::new();
    for (i, t) in txns.iter().enumerate() {
        assert!(
            t.commit_lsn < t.end_lsn,
            "txn seq {} commit_lsn {} >= end_lsn {}",
            t.seq,
            t.commit_lsn,
            t.end_lsn
        );
        assert!(
            xids.insert(t.xid),
            "xid {} stored twice (seq {})",
            t.xid,
            t.seq
        );
        if i > 0 {
            let p = &txns[i - 1];
            assert!(
                p.seq < t.seq,
                "seq not increasing: {} then {}",
                p.seq,
                t.seq
            );
            assert!(
                p.end_lsn < t.end_lsn,
                "end_lsn not strictly increasing: seq {} {} then seq {} {}",
                p.seq,
                p.end_lsn,
                t.seq,
                t.end_lsn
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Kafka (tansu) broker
// ---------------------------------------------------------------------------

pub mod kafka;
pub use kafka::{kafka_broker, Broker};

/// Prints how long a test took (and whether it failed) when dropped: `TIMING name
/// passed in 12.3 s` in the test's output.
pub struct Timed(pub &'static str, pub Instant);

impl Timed {
    pub fn start(name: &'static str) -> Timed {
        Timed(name, Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        let how = if std::thread::panicking() {
            "FAILED"
        } else {
            "passed"
        };
        eprintln!(
            "TIMING {} {how} in {:.1} s",
            self.0,
            self.1.elapsed().as_secs_f64()
        );
    }
}

/// Drops a test's replication slot at the end of the test (after its process let
/// go of it), so the shared hub does not keep WAL for it.
pub struct DropSlot<'a> {
    pub hub: &'a Cluster,
    pub slot: String,
}

impl Drop for DropSlot<'_> {
    fn drop(&mut self) {
        // No panicking calls: this may run while a test unwinds.
        let active = || {
            self.hub
                .try_psql(
                    "postgres",
                    &format!(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = {}",
                        quote_literal(&self.slot)
                    ),
                )
                .is_ok_and(|o| o.trim() == "t")
        };
        // Polled: the slot's holder exits on its own schedule.
        let deadline = Instant::now() + Duration::from_secs(10);
        while active() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.hub.drop_slot_if_inactive(&self.slot);
    }
}
