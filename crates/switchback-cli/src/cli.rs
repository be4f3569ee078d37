//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// switchback — PostgreSQL change-data-capture for blue/green database releases.
///
/// The hub (blue, production) keeps serving while switchback keeps the member
/// (green) in sync: capture reads the hub's committed changes through logical
/// replication, stores them durably in a queue, and apply writes them into the
/// member exactly once, hub wins.
///
/// Typical use:
///   switchback check --config sync.toml      # validate both sides first
///   switchback run --config sync.toml        # capture + apply in one process
///   switchback status --config sync.toml     # lag, queue depth, conflicts
#[derive(Parser, Debug)]
#[command(name = "switchback", version, about, long_about, verbatim_doc_comment)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// Log format: human-readable lines, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SWITCHBACK_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing syntax), e.g. `info` or `switchback_apply=debug`.
    #[arg(long, global = true, default_value = "info", env = "SWITCHBACK_LOG")]
    pub log: String,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// Pipeline configuration file (TOML). See README.md for every key.
    #[arg(long, short = 'c', env = "SWITCHBACK_CONFIG")]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Capture and apply in one process over the embedded queue (the default deployment).
    ///
    /// Runs until SIGINT or SIGTERM, then stops gracefully: the queue is flushed, the
    /// hub's slot acknowledged and the member's progress committed.
    Run(RunArgs),
    /// Capture only: stream the hub's changes into the queue until SIGINT/SIGTERM.
    ///
    /// Creates the publication and the replication slot on first start. The slot is
    /// acknowledged only for transactions that are durable in the queue.
    Capture(ConfigArg),
    /// Apply only: write the queued transactions into the member, then keep following.
    Apply(ApplyArgs),
    /// Show slot lag on the hub, queue depth, last applied position, lag and conflicts.
    Status(StatusArgs),
    /// Inspect the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Validate the pipeline against hub and member before anything runs.
    ///
    /// Checks privileges, wal_level, replica identity, row filters, that every
    /// mapped table and column exists on the member with a type that holds the hub's
    /// values, member NOT NULL columns without source or default, and a key on the
    /// member. Prints the tables, columns and mappings (with the derived reverse
    /// mapping), lists every problem with its fix, and exits with status 1 if any.
    /// `run` and `capture` run the same checks at start.
    Check(ConfigArg),
    /// Copy the hub's tables into the member at a consistent snapshot, handed over to the stream.
    ///
    /// Creates the slot with an exported snapshot and copies every table in scope with
    /// parallel COPY (large tables in ctid ranges). Resumable: run it again after an
    /// interruption and only the unfinished tables are copied again (at a new snapshot).
    /// Then `switchback run` continues from the slot without a gap.
    Seed(SeedArgs),
    /// Make the member the primary: fence the hub, drain to the fence, move sequences
    /// forward, start member → hub, open the member. Needs `switchback run` running.
    ///
    /// Run it again after a crash: it resumes from the recorded step.
    Cutover(SwitchArgs),
    /// Make the hub the primary again (the same steps the other way); also undoes
    /// an interrupted cutover.
    Rollback(SwitchArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Seed first (as `switchback seed`), then run.
    #[arg(long)]
    pub seed: bool,
    #[command(flatten)]
    pub seed_opts: SeedFlags,
}

#[derive(Args, Debug)]
pub struct SeedArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub seed_opts: SeedFlags,
}

#[derive(Args, Debug, Clone)]
pub struct SeedFlags {
    /// Parallel copy jobs (default: the number of CPUs, at least 2).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Create missing member tables from the hub's definitions (columns and primary
    /// key before the data, other indexes after).
    #[arg(long)]
    pub create_schema: bool,
    /// Empty non-empty member tables before copying (otherwise seed refuses them).
    #[arg(long)]
    pub truncate: bool,
    /// Heap pages per ctid range of a large table (default: from its size and --jobs).
    #[arg(long)]
    pub chunk_pages: Option<u64>,
}

#[derive(Args, Debug)]
pub struct SwitchArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Run the checks and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Stop once the queue is empty instead of following it.
    #[arg(long)]
    pub until_empty: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Print the stored transactions, oldest first.
    ///
    /// With --json: one JSON object per line with xid, commit_lsn, end_lsn,
    /// commit_time, origin and changes (op, schema, table, new, old, unchanged).
    /// Values are printed: mind where the output goes.
    Dump(DumpArgs),
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// One JSON object per transaction and line.
    #[arg(long)]
    pub json: bool,
}
