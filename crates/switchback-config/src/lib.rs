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
}

impl Default for Tables {
    fn default() -> Self {
        Tables {
            include: default_include(),
            exclude: Vec::new(),
            no_key: NoKeyPolicy::default(),
        }
    }
}

impl Tables {
    /// Whether `schema.table` is in scope.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        self.include.iter().any(|g| glob_match(g, &name))
            && !self.exclude.iter().any(|g| glob_match(g, &name))
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
        if self.queue.kind == QueueKind::Kafka && self.queue.brokers.is_none() {
            return Err(ConfigError::Invalid(
                "[queue] kind = \"kafka\" needs brokers = \"host:port,...\"".into(),
            ));
        }
        self.hub_pg()?;
        self.member_pg()?;
        Ok(())
    }

    /// Kafka topic of the hub → member direction.
    pub fn kafka_topic(&self) -> String {
        self.queue
            .topic
            .clone()
            .unwrap_or_else(|| format!("switchback_{}_hub_to_member", self.pipeline.name))
    }

    /// Kafka consumer group of apply.
    pub fn kafka_group(&self) -> String {
        format!("switchback_{}_apply", self.pipeline.name)
    }

    /// Name of the hub's replication slot.
    pub fn slot_name(&self) -> String {
        format!("switchback_{}", self.pipeline.name)
    }

    /// Name of the hub's publication.
    pub fn publication_name(&self) -> String {
        format!("switchback_{}", self.pipeline.name)
    }

    /// Name of the member's replication origin (apply progress).
    pub fn origin_name(&self) -> String {
        format!("switchback_{}", self.pipeline.name)
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
    fn globs() {
        assert!(glob_match("public.*", "public.orders"));
        assert!(!glob_match("public.*", "sales.orders"));
        assert!(glob_match("*.audit_?", "x.audit_1"));
        assert!(glob_match("*", ""));
        let t = Tables {
            include: vec!["public.*".into()],
            exclude: vec!["public.audit*".into()],
            no_key: NoKeyPolicy::Refuse,
        };
        assert!(t.matches("public", "orders"));
        assert!(!t.matches("public", "audit_log"));
    }
}
