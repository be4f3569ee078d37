//! Typed, strict configuration of a switchback pipeline.
//!
//! Loaded from a TOML file (unknown keys are rejected), then environment
//! overrides. Secrets never come from the command line: a password is taken from
//! the URL, from `SWITCHBACK_HUB_PASSWORD` / `SWITCHBACK_MEMBER_PASSWORD`, or from
//! the file named by `password_file`.
//!
//! ```toml
//! [hub]
//! url = "postgres://switchback@10.0.0.1:5432/app"
//! [member]
//! url = "postgres://switchback@10.0.0.2:5432/app"
//! password_file = "/run/secrets/member-password"
//! [pipeline]
//! name = "release_42"          # slot, publication and origin names derive from it
//! [queue]
//! kind = "sled"                # or "kafka" (then brokers = "host:9092", topic, [queue.kafka])
//! path = "/var/lib/switchback/release_42"
//! [tables]
//! include = ["public.*"]
//! exclude = ["public.audit_*"]
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use switchback_core::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("[{section}] url is not a valid PostgreSQL URL or connection string: {message}")]
    Url {
        section: &'static str,
        message: String,
    },
    #[error("cannot read [{section}] password_file {path}: {source}")]
    PasswordFile {
        section: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Classify for ConfigError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Definite
    }
}

fn default_queue_kind() -> QueueKind {
    QueueKind::Sled
}
fn default_include() -> Vec<String> {
    vec!["*.*".to_string()]
}
fn default_true() -> bool {
    true
}
fn default_batch_txns() -> usize {
    2000
}
fn default_batch_changes() -> usize {
    20_000
}
fn default_status_interval_ms() -> u64 {
    1000
}
fn default_wal_sender_timeout_ms() -> u64 {
    60_000
}
fn default_chunk_bytes() -> usize {
    // sled 0.34 keeps large values in memory: peak RSS grew ~110 MB per million
    // queued rows with 256 KiB chunks, and stayed flat (~137 MB at 4M rows) at 16 KiB.
    16 * 1024
}

/// A switchback pipeline's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The production database (blue): the source of changes.
    pub hub: Endpoint,
    /// The database being prepared (green): the target of changes.
    pub member: Endpoint,
    pub pipeline: Pipeline,
    pub queue: Queue,
    #[serde(default)]
    pub tables: Tables,
    #[serde(default)]
    pub apply: Apply,
    #[serde(default)]
    pub capture: Capture,
    #[serde(default)]
    pub metrics: Metrics,
    /// Cutover and rollback (`switchback cutover` / `rollback`).
    #[serde(default)]
    pub cutover: Cutover,
    /// Which way this config's hub → member points: `Forward` as loaded;
    /// [`Config::reversed`] gives the member → hub view used by the reverse direction.
    #[serde(skip)]
    pub direction: Direction,
    /// The hub → member rules while this config is the reversed view (so that
    /// reversing back gives them exactly).
    #[serde(skip)]
    pub forward_tables: Option<Tables>,
}

/// Which way changes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// hub → member (before cutover, and after rollback).
    #[default]
    HubToMember,
    /// member → hub (after cutover: the member is the primary).
    MemberToHub,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::HubToMember => "hub_to_member",
            Direction::MemberToHub => "member_to_hub",
        }
    }
    pub fn opposite(self) -> Direction {
        match self {
            Direction::HubToMember => Direction::MemberToHub,
            Direction::MemberToHub => Direction::HubToMember,
        }
    }
}

/// How the old primary is fenced against application writes during a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceKind {
    /// `ALTER DATABASE ... SET default_transaction_read_only = on` and end the
    /// application sessions (every session whose application_name does not start
    /// with `switchback`).
    #[default]
    ReadOnly,
    /// `REVOKE CONNECT ON DATABASE` from `fence_roles` and end their sessions.
    RevokeConnect,
    /// Run `fence_hook` (e.g. pause a connection pooler); `unfence_hook` lifts it.
    Hook,
}

/// Whether one direction runs at a time, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// One direction at a time; `cutover` and `rollback` switch it.
    #[default]
    OneWay,
    /// Both directions at once (canary releases: some users write to the member);
    /// each capture drops the other direction's echoes; hub wins on conflicts.
    ActiveActive,
}

fn default_max_lag_bytes() -> i64 {
    64 * 1024 * 1024
}
fn default_sequence_margin() -> i64 {
    1000
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cutover {
    /// Preflight refuses when the source's slot is further behind than this (WAL bytes).
    #[serde(default = "default_max_lag_bytes")]
    pub max_lag_bytes: i64,
    #[serde(default)]
    pub fence: FenceKind,
    /// Roles fenced by `fence = "revoke-connect"`.
    #[serde(default)]
    pub fence_roles: Vec<String>,
    /// Shell command for `fence = "hook"`; gets SWITCHBACK_SIDE (hub | member).
    #[serde(default)]
    pub fence_hook: Option<String>,
    /// Shell command lifting a hook fence; gets SWITCHBACK_SIDE.
    #[serde(default)]
    pub unfence_hook: Option<String>,
    /// Shell command run once the new primary is open (switch DNS, the pooler...);
    /// gets SWITCHBACK_PRIMARY (hub | member) and SWITCHBACK_EPOCH.
    #[serde(default)]
    pub open_hook: Option<String>,
    /// Sequences move to at least the source's last_value plus this margin.
    #[serde(default = "default_sequence_margin")]
    pub sequence_margin: i64,
    /// How long to wait for apply to reach the fence position before undoing.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    #[serde(default)]
    pub mode: SyncMode,
}

impl Default for Cutover {
    fn default() -> Self {
        Cutover {
            max_lag_bytes: default_max_lag_bytes(),
            fence: FenceKind::default(),
            fence_roles: Vec::new(),
            fence_hook: None,
            unfence_hook: None,
            open_hook: None,
            sequence_margin: default_sequence_margin(),
            drain_timeout_ms: default_drain_timeout_ms(),
            mode: SyncMode::default(),
        }
    }
}

/// How to reach one database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// libpq-style URL (`postgres://user@host:port/db`) or `key=value` string.
    pub url: String,
    /// A file holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Lowercase letters, digits and underscores; the slot, publication and
    /// replication origin are named `switchback_<name>`.
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// The embedded sled log (capture and apply in one process, `switchback run`).
    Sled,
    /// A Kafka topic: `switchback capture` and `switchback apply` as separate processes.
    Kafka,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    #[serde(default = "default_queue_kind")]
    pub kind: QueueKind,
    /// Directory of the sled log. With Kafka: where the status file is kept.
    pub path: PathBuf,
    /// Kafka: `bootstrap.servers`, e.g. `"10.0.0.3:9092,10.0.0.4:9092"`.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Kafka: topic name (default `switchback_<pipeline>_hub_to_member`). One
    /// partition: switchback creates it when missing.
    #[serde(default)]
    pub topic: Option<String>,
    /// Kafka: replication factor when switchback creates the topic (-1 = broker default).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Kafka: bytes of chunk data apply keeps in memory; beyond, it reads them back.
    #[serde(default = "default_reader_memory_bytes")]
    pub reader_memory_bytes: usize,
    /// Kafka: librdkafka properties passed through (`"security.protocol" = "SASL_SSL"`).
    /// A value `env:NAME` is read from the environment variable NAME, `file:PATH`
    /// from a file (secrets stay out of the config file).
    #[serde(default)]
    pub kafka: std::collections::BTreeMap<String, String>,
    /// Kafka: `"json"` also produces every committed transaction as JSON to the
    /// topic `<topic>_json`, for consumers other than switchback (apply keeps
    /// reading the bincode topic). Default `"bincode"`: the bincode topic only.
    #[serde(default)]
    pub format: QueueFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueFormat {
    /// The bincode topic only.
    #[default]
    Bincode,
    /// The bincode topic, and a JSON copy in `<topic>_json`.
    Json,
}

fn default_replication_factor() -> i32 {
    -1
}
fn default_reader_memory_bytes() -> usize {
    64 * 1024 * 1024
}

impl Queue {
    /// The librdkafka properties, `env:` and `file:` values resolved.
    pub fn kafka_properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.kafka
            .iter()
            .map(|(k, v)| {
                let value = if let Some(var) = v.strip_prefix("env:") {
                    std::env::var(var).map_err(|_| {
                        ConfigError::Invalid(format!(
                            "[queue.kafka] {k:?} names the environment variable {var}, which is not set"
                        ))
                    })?
                } else if let Some(path) = v.strip_prefix("file:") {
                    std::fs::read_to_string(path)
                        .map_err(|e| {
                            ConfigError::Invalid(format!(
                                "[queue.kafka] {k:?}: cannot read file {path}: {e}"
                            ))
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_string()
                } else {
                    v.clone()
                };
                Ok((k.clone(), value))
            })
            .collect()
    }
}

/// What to do with a published table that has neither a primary key nor a replica
/// identity: once it is in a publication that publishes UPDATE/DELETE, the hub's
/// own UPDATE and DELETE on it fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NoKeyPolicy {
    /// Refuse to start and name the tables (default).
    #[default]
    Refuse,
    /// `ALTER TABLE ... REPLICA IDENTITY FULL` on the hub (old rows are then sent whole).
    ReplicaIdentityFull,
    /// Leave such tables out of the UPDATE/DELETE publication: only inserts replicate.
    InsertOnly,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tables {
    /// Globs on `schema.table` (`*` any run of characters, `?` one character).
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub no_key: NoKeyPolicy,
    /// What happens to a hub column the member has no column for (a column added
    /// on the hub while running, or one missing from the start).
    #[serde(default)]
    pub drift: DriftPolicy,
    /// Per-table rules (`[[tables.table]]`): target, renames, filters.
    #[serde(default)]
    pub table: Vec<TableRule>,
}

impl Default for Tables {
    fn default() -> Self {
        Tables {
            include: default_include(),
            exclude: Vec::new(),
            no_key: NoKeyPolicy::default(),
            drift: DriftPolicy::default(),
            table: Vec::new(),
        }
    }
}

/// Schema drift policy: a hub column without a member column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DriftPolicy {
    /// Stop with an error naming the table and column; nothing past it is applied
    /// (default). Fix the member or the mapping, then start again.
    #[default]
    Stop,
    /// Leave such columns out (their values are not replicated).
    IgnoreNewColumns,
    /// `ALTER TABLE ... ADD COLUMN` (nullable, the hub's type) on the member, then continue.
    AddColumns,
}

/// A row operation that can be replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Truncate,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        }
    }
}

fn default_public() -> String {
    "public".into()
}

/// The rule of one hub table (`[[tables.table]]`). Names are exact (not globs,
/// not quoted): `schema = "Sales Ops"`, `name = "Order"`.
///
/// ```toml
/// [[tables.table]]
/// schema = "public"
/// name = "person"
/// target_schema = "public"          # default: the hub's schema
/// target_name = "person"            # default: the hub's name
/// operations = ["insert", "update", "delete", "truncate"]   # default: all four
/// row_filter = "id < 1000"          # PG15 publication WHERE, evaluated on the hub
/// exclude_columns = ["secret"]      # hub columns never written to the member
/// [tables.table.rename]             # hub column = member column
/// last_name = "surname"
/// [tables.table.constants]          # member column = value (text), set on insert
/// source = "hub"
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    #[serde(default = "default_public")]
    pub schema: String,
    pub name: String,
    #[serde(default)]
    pub target_schema: Option<String>,
    #[serde(default)]
    pub target_name: Option<String>,
    #[serde(default)]
    pub operations: Option<Vec<Operation>>,
    #[serde(default)]
    pub row_filter: Option<String>,
    #[serde(default)]
    pub exclude_columns: Vec<String>,
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub constants: std::collections::BTreeMap<String, String>,
}

impl TableRule {
    /// The identity rule of a table without `[[tables.table]]` entry.
    pub fn identity(schema: &str, name: &str) -> TableRule {
        TableRule {
            schema: schema.into(),
            name: name.into(),
            target_schema: None,
            target_name: None,
            operations: None,
            row_filter: None,
            exclude_columns: Vec::new(),
            rename: Default::default(),
            constants: Default::default(),
        }
    }
    /// `(schema, table)` on the member.
    pub fn target(&self) -> (&str, &str) {
        (
            self.target_schema.as_deref().unwrap_or(&self.schema),
            self.target_name.as_deref().unwrap_or(&self.name),
        )
    }
    /// Replicated operations, sorted, without duplicates.
    pub fn ops(&self) -> Vec<Operation> {
        let mut o = self
            .operations
            .clone()
            .unwrap_or_else(|| Operation::ALL.to_vec());
        o.sort();
        o.dedup();
        o
    }
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl Tables {
    /// Whether `schema.table` is in scope.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        self.include.iter().any(|g| glob_match(g, &name))
            && !self.exclude.iter().any(|g| glob_match(g, &name))
    }

    /// The rules of the reverse direction (member → hub), derived from these: each
    /// rule's target becomes its source, renames are inverted, member columns filled
    /// with a constant are not sent back, and row filters (written on the hub's
    /// columns) are dropped. Renamed target tables are added to `include`.
    pub fn reversed(&self) -> Tables {
        let mut t = self.clone();
        t.table = self
            .table
            .iter()
            .map(|r| {
                let (ts, tn) = r.target();
                TableRule {
                    schema: ts.to_string(),
                    name: tn.to_string(),
                    target_schema: Some(r.schema.clone()),
                    target_name: Some(r.name.clone()),
                    operations: r.operations.clone(),
                    row_filter: None,
                    exclude_columns: r.constants.keys().cloned().collect(),
                    rename: r
                        .rename
                        .iter()
                        .map(|(a, b)| (b.clone(), a.clone()))
                        .collect(),
                    constants: Default::default(),
                }
            })
            .collect();
        for r in &t.table {
            if !t.matches(&r.schema, &r.name) {
                t.include.push(format!("{}.{}", r.schema, r.name));
            }
        }
        t
    }

    /// The rule of `schema.table`: its `[[tables.table]]` entry, or the identity.
    pub fn rule(&self, schema: &str, table: &str) -> TableRule {
        self.table
            .iter()
            .find(|r| r.schema == schema && r.name == table)
            .cloned()
            .unwrap_or_else(|| TableRule::identity(schema, table))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for r in &self.table {
            let t = r.display();
            let bad = |m: String| Err(ConfigError::Invalid(format!("[[tables.table]] {t}: {m}")));
            if !seen.insert((r.schema.clone(), r.name.clone())) {
                return bad("listed twice; merge the two entries".into());
            }
            if r.operations.as_ref().is_some_and(|o| o.is_empty()) {
                return bad(
                    "operations is empty; exclude the table with [tables] exclude instead".into(),
                );
            }
            if r.row_filter.as_deref().is_some_and(|f| f.trim().is_empty()) {
                return bad("row_filter is empty; remove it to replicate every row".into());
            }
            for c in &r.exclude_columns {
                if r.rename.contains_key(c) {
                    return bad(format!(
                        "column {c:?} is both renamed and excluded; keep one"
                    ));
                }
            }
            let mut targets = std::collections::HashSet::new();
            for (from, to) in &r.rename {
                if !targets.insert(to) {
                    return bad(format!(
                        "two hub columns are renamed to {to:?} (one is {from:?}); each member column takes one source"
                    ));
                }
                if r.constants.contains_key(to) {
                    return bad(format!(
                        "member column {to:?} has both a source ({from:?}) and a constant; keep one"
                    ));
                }
            }
            if !self.matches(&r.schema, &r.name) {
                return bad(
                    "is not in scope of [tables] include/exclude; include it or remove the entry"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    /// Use protocol 2 streaming of large in-progress transactions (PG14+): the hub
    /// sends them before commit instead of spilling them to its own disk.
    #[serde(default)]
    pub streaming: bool,
    /// Changes are written to the log in chunks of about this many bytes (16 KiB:
    /// larger sled values cost memory that grows with the transaction).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: usize,
    /// Longest pause between two status updates to the hub, in milliseconds. Kept
    /// under a third of the hub's `wal_sender_timeout` automatically.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Assumed `wal_sender_timeout` when the hub does not say (ms).
    #[serde(default = "default_wal_sender_timeout_ms")]
    pub wal_sender_timeout_ms: u64,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            streaming: false,
            chunk_bytes: default_chunk_bytes(),
            status_interval_ms: default_status_interval_ms(),
            wal_sender_timeout_ms: default_wal_sender_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    /// Consecutive hub transactions grouped into one member transaction, at most.
    /// Only what is already queued is grouped: under light load groups stay small.
    #[serde(default = "default_batch_txns")]
    pub batch_txns: usize,
    /// Row changes per member transaction before a group is closed (a single larger
    /// hub transaction is never split).
    #[serde(default = "default_batch_changes")]
    pub batch_changes: usize,
    /// Set `session_replication_role = replica` on apply sessions (skips member
    /// triggers and FK checks, as PostgreSQL's own apply worker does).
    #[serde(default = "default_true")]
    pub replica_role: bool,
}

impl Default for Apply {
    fn default() -> Self {
        Apply {
            batch_txns: default_batch_txns(),
            batch_changes: default_batch_changes(),
            replica_role: true,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address of the Prometheus endpoint (`127.0.0.1:9187`); off when absent.
    #[serde(default)]
    pub listen: Option<String>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.pipeline.name;
        if n.is_empty()
            || n.len() > 40
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ConfigError::Invalid(format!(
                "[pipeline] name {n:?} must be 1 to 40 lowercase letters, digits or underscores \
                 (it names the replication slot)"
            )));
        }
        if self.apply.batch_txns == 0 || self.apply.batch_changes == 0 {
            return Err(ConfigError::Invalid(
                "[apply] batch_txns and batch_changes must be at least 1".into(),
            ));
        }
        self.tables.validate()?;
        if self.cutover.fence == FenceKind::RevokeConnect && self.cutover.fence_roles.is_empty() {
            return Err(ConfigError::Invalid(
                "[cutover] fence = \"revoke-connect\" needs fence_roles (the application roles)"
                    .into(),
            ));
        }
        if self.cutover.fence == FenceKind::Hook && self.cutover.fence_hook.is_none() {
            return Err(ConfigError::Invalid(
                "[cutover] fence = \"hook\" needs fence_hook (a shell command)".into(),
            ));
        }
        if self.cutover.sequence_margin < 0 || self.cutover.max_lag_bytes < 0 {
            return Err(ConfigError::Invalid(
                "[cutover] sequence_margin and max_lag_bytes must not be negative".into(),
            ));
        }
        if self.queue.format == QueueFormat::Json && self.queue.kind != QueueKind::Kafka {
            return Err(ConfigError::Invalid(
                "[queue] format = \"json\" needs kind = \"kafka\" (JSON records go to the topic <topic>_json); remove format or set kind = \"kafka\"".into(),
            ));
        }
        if self.queue.kind == QueueKind::Kafka && self.queue.brokers.is_none() {
            return Err(ConfigError::Invalid(
                "[queue] kind = \"kafka\" needs brokers = \"host:port,...\"".into(),
            ));
        }
        self.hub_pg()?;
        self.member_pg()?;
        Ok(())
    }

    /// `switchback_<name>`, plus `_rev` for the member → hub direction.
    fn direction_name(&self, direction: Direction) -> String {
        match direction {
            Direction::HubToMember => format!("switchback_{}", self.pipeline.name),
            Direction::MemberToHub => format!("switchback_{}_rev", self.pipeline.name),
        }
    }

    /// Kafka topic of this direction: `topic` (default
    /// `switchback_<name>_hub_to_member`), and for member → hub the same with `_rev`
    /// (default `switchback_<name>_member_to_hub`).
    pub fn kafka_topic(&self) -> String {
        match (self.direction, &self.queue.topic) {
            (Direction::HubToMember, Some(t)) => t.clone(),
            (Direction::HubToMember, None) => {
                format!("switchback_{}_hub_to_member", self.pipeline.name)
            }
            (Direction::MemberToHub, Some(t)) => format!("{t}_rev"),
            (Direction::MemberToHub, None) => {
                format!("switchback_{}_member_to_hub", self.pipeline.name)
            }
        }
    }

    /// Kafka topic of this direction's JSON records (`format = "json"`):
    /// `<topic>_json`; `None` with the default format.
    pub fn kafka_json_topic(&self) -> Option<String> {
        (self.queue.format == QueueFormat::Json).then(|| format!("{}_json", self.kafka_topic()))
    }

    /// Kafka consumer group of this direction's apply.
    pub fn kafka_group(&self) -> String {
        format!("{}_apply", self.direction_name(self.direction))
    }

    /// Name of the source's replication slot (the hub's, or the member's in the
    /// reverse direction).
    pub fn slot_name(&self) -> String {
        self.direction_name(self.direction)
    }

    /// Name of the source's publication.
    pub fn publication_name(&self) -> String {
        self.direction_name(self.direction)
    }

    /// Name of the target's replication origin (apply progress).
    pub fn origin_name(&self) -> String {
        self.direction_name(self.direction)
    }

    /// The origin the other direction's apply stamps its writes with: capture drops
    /// transactions carrying it (they are echoes of what this pipeline applied).
    pub fn echo_origin(&self) -> String {
        self.direction_name(self.direction.opposite())
    }

    /// The same pipeline seen from the other direction: hub and member swapped,
    /// names suffixed `_rev`, its own queue (`<queue.path>-reverse`).
    pub fn reversed(&self) -> Config {
        let mut c = self.clone();
        std::mem::swap(&mut c.hub, &mut c.member);
        c.direction = self.direction.opposite();
        match c.direction {
            Direction::MemberToHub => {
                c.forward_tables = Some(self.tables.clone());
                c.tables = self.tables.reversed();
            }
            Direction::HubToMember => {
                c.tables = self
                    .forward_tables
                    .clone()
                    .unwrap_or_else(|| self.tables.reversed());
                c.forward_tables = None;
            }
        }
        c.queue.path = match c.direction {
            Direction::MemberToHub => {
                let mut p = self.queue.path.clone().into_os_string();
                p.push("-reverse");
                PathBuf::from(p)
            }
            Direction::HubToMember => {
                let s = self.queue.path.to_string_lossy();
                PathBuf::from(s.strip_suffix("-reverse").unwrap_or(&s).to_string())
            }
        };
        c
    }

    /// The config of the given direction (this one, or [`Config::reversed`]).
    pub fn for_direction(&self, direction: Direction) -> Config {
        if direction == self.direction {
            self.clone()
        } else {
            self.reversed()
        }
    }

    /// Connection settings of the hub, password resolved.
    pub fn hub_pg(&self) -> Result<tokio_postgres::Config, ConfigError> {
        pg_config("hub", &self.hub)
    }

    /// Connection settings of the member, password resolved.
    pub fn member_pg(&self) -> Result<tokio_postgres::Config, ConfigError> {
        pg_config("member", &self.member)
    }
}

fn pg_config(section: &'static str, ep: &Endpoint) -> Result<tokio_postgres::Config, ConfigError> {
    let mut cfg = tokio_postgres::Config::from_str(&ep.url).map_err(|e| ConfigError::Url {
        section,
        message: e.to_string(),
    })?;
    if cfg.get_password().is_none() {
        let var = format!("SWITCHBACK_{}_PASSWORD", section.to_uppercase());
        if let Ok(pw) = std::env::var(&var) {
            cfg.password(pw);
        } else if let Some(path) = &ep.password_file {
            let pw = std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                section,
                path: path.clone(),
                source,
            })?;
            cfg.password(pw.trim_end_matches(['\n', '\r']));
        }
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("switchback");
    }
    // switchback's own sessions are never fenced: a read-only fence sets
    // default_transaction_read_only on the database, the session overrides it.
    let opts = match cfg.get_options() {
        Some(o) => format!("{o} -c default_transaction_read_only=off"),
        None => "-c default_transaction_read_only=off".to_string(),
    };
    cfg.options(&opts);
    Ok(cfg)
}

/// Glob match with `*` (any run, possibly empty) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [hub]
        url = "postgres://u@127.0.0.1:5432/db"
        [member]
        url = "host=127.0.0.1 port=5433 user=u dbname=db"
        [pipeline]
        name = "p1"
        [queue]
        path = "/tmp/q"
    "#;

    #[test]
    fn parses_minimal_config_with_defaults() {
        let c = Config::parse(MIN, Path::new("x.toml")).unwrap();
        assert_eq!(c.slot_name(), "switchback_p1");
        assert_eq!(c.queue.kind, QueueKind::Sled);
        assert!(c.tables.matches("public", "t"));
        assert_eq!(c.member_pg().unwrap().get_ports(), &[5433]);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_names() {
        let bad = MIN.replace("name = \"p1\"", "name = \"p1\"\nslot = \"x\"");
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let bad = MIN.replace("\"p1\"", "\"P-1\"");
        assert!(Config::parse(&bad, Path::new("x.toml")).is_err());
    }

    #[test]
    fn table_rules() {
        let text = format!(
            "{MIN}\n[tables]\ndrift = \"add-columns\"\n[[tables.table]]\nschema = \"Sales Ops\"\nname = \"Order\"\n\
             target_name = \"Orders\"\noperations = [\"insert\"]\nrow_filter = \"id < 10\"\n\
             [tables.table.rename]\nlast_name = \"surname\"\n[tables.table.constants]\nsource = \"hub\"\n"
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(c.tables.drift, DriftPolicy::AddColumns);
        let r = c.tables.rule("Sales Ops", "Order");
        assert_eq!(r.target(), ("Sales Ops", "Orders"));
        assert_eq!(r.ops(), vec![Operation::Insert]);
        assert_eq!(r.rename["last_name"], "surname");
        assert_eq!(c.tables.rule("public", "x").ops().len(), 4);
        let bad = text.replace("row_filter", "row_filtr");
        assert!(Config::parse(&bad, Path::new("x.toml")).is_err());
        let bad = text.replace(
            "[tables.table.constants]\nsource",
            "[tables.table.constants]\nsurname",
        );
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("both a source"), "{e}");
    }

    #[test]
    fn reversed_inverts_table_rules() {
        let text = format!(
            "{MIN}\n[[tables.table]]\nname = \"person\"\ntarget_name = \"people\"\nrow_filter = \"id < 10\"\n\
             exclude_columns = [\"secret\"]\n[tables.table.rename]\nlast_name = \"surname\"\n\
             [tables.table.constants]\nsource = \"hub\"\n"
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        let r = c.reversed();
        let rule = r.tables.rule("public", "people");
        assert_eq!(rule.target(), ("public", "person"));
        assert_eq!(rule.rename["surname"], "last_name");
        assert_eq!(rule.exclude_columns, vec!["source".to_string()]);
        assert_eq!(rule.row_filter, None);
        assert!(r.tables.matches("public", "people"));
        let back = r.reversed();
        assert_eq!(
            back.tables.rule("public", "person").row_filter.as_deref(),
            Some("id < 10")
        );
        assert_eq!(
            back.tables.rule("public", "person").target(),
            ("public", "people")
        );
    }

    #[test]
    fn reversed_swaps_sides_and_names() {
        let c = Config::parse(MIN, Path::new("x.toml")).unwrap();
        let r = c.reversed();
        assert_eq!(r.slot_name(), "switchback_p1_rev");
        assert_eq!(r.echo_origin(), "switchback_p1");
        assert_eq!(c.echo_origin(), "switchback_p1_rev");
        assert_eq!(r.hub_pg().unwrap().get_ports(), &[5433]);
        assert_eq!(r.queue.path, PathBuf::from("/tmp/q-reverse"));
        let back = r.reversed();
        assert_eq!(back.queue.path, PathBuf::from("/tmp/q"));
        assert_eq!(back.slot_name(), "switchback_p1");
    }

    #[test]
    fn kafka_queue() {
        let k = MIN.replace(
            "path = \"/tmp/q\"",
            "path = \"/tmp/q\"\nkind = \"kafka\"\nbrokers = \"b:9092\"\n[queue.kafka]\n\"sasl.password\" = \"env:SB_TEST_KAFKA_PW\"\n\"client.id\" = \"x\"",
        );
        let c = Config::parse(&k, Path::new("x.toml")).unwrap();
        assert_eq!(c.kafka_topic(), "switchback_p1_hub_to_member");
        let e = c.queue.kafka_properties().unwrap_err();
        assert!(e.to_string().contains("SB_TEST_KAFKA_PW"), "{e}");
        std::env::set_var("SB_TEST_KAFKA_PW", "s3cret");
        let p = c.queue.kafka_properties().unwrap();
        assert!(p.contains(&("sasl.password".into(), "s3cret".into())));
        let no_brokers = MIN.replace("path = \"/tmp/q\"", "path = \"/tmp/q\"\nkind = \"kafka\"");
        assert!(Config::parse(&no_brokers, Path::new("x.toml")).is_err());
    }

    #[test]
    fn queue_format() {
        let c = Config::parse(MIN, Path::new("x.toml")).unwrap();
        assert_eq!(c.queue.format, QueueFormat::Bincode);
        assert_eq!(c.kafka_json_topic(), None);
        let k = MIN.replace(
            "path = \"/tmp/q\"",
            "path = \"/tmp/q\"\nkind = \"kafka\"\nbrokers = \"b:9092\"\nformat = \"json\"",
        );
        let c = Config::parse(&k, Path::new("x.toml")).unwrap();
        assert_eq!(
            c.kafka_json_topic().as_deref(),
            Some("switchback_p1_hub_to_member_json")
        );
        let sled = MIN.replace("path = \"/tmp/q\"", "path = \"/tmp/q\"\nformat = \"json\"");
        let e = Config::parse(&sled, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("needs kind = \"kafka\""), "{e}");
        let bad = MIN.replace("path = \"/tmp/q\"", "path = \"/tmp/q\"\nformat = \"avro\"");
        assert!(Config::parse(&bad, Path::new("x.toml")).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("public.*", "public.orders"));
        assert!(!glob_match("public.*", "sales.orders"));
        assert!(glob_match("*.audit_?", "x.audit_1"));
        assert!(glob_match("*", ""));
        let t = Tables {
            include: vec!["public.*".into()],
            exclude: vec!["public.audit*".into()],
            no_key: NoKeyPolicy::Refuse,
            ..Tables::default()
        };
        assert!(t.matches("public", "orders"));
        assert!(!t.matches("public", "audit_log"));
    }
}
