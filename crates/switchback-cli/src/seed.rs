//! `switchback seed` and the seed step of `run --seed`: wiring only (the logic is
//! in `switchback-seed`).

use std::process::ExitCode;

use switchback_config::Config;
use switchback_seed::{ProgressMode, SeedOptions};
use tracing::Instrument;

use crate::cli::{LogFormat, SeedArgs, SeedFlags};
use crate::signals;

fn options(f: &SeedFlags, progress: ProgressMode) -> SeedOptions {
    SeedOptions {
        jobs: f.jobs.unwrap_or_else(switchback_seed::default_jobs).max(1),
        create_schema: f.create_schema,
        truncate: f.truncate,
        chunk_pages: f.chunk_pages,
        progress,
    }
}

async fn seed_with(cfg: &Config, f: &SeedFlags, progress: ProgressMode) -> anyhow::Result<()> {
    let shutdown = signals::shutdown_on_signals();
    let span = tracing::info_span!("seed", pipeline = %cfg.pipeline.name, slot = %cfg.slot_name());
    switchback_seed::run(cfg, &options(f, progress), shutdown)
        .instrument(span)
        .await
        .map_err(|e| anyhow::Error::new(e).context("seed cannot continue"))?;
    Ok(())
}

/// JSON logs get log lines, never bars.
pub async fn seed(a: SeedArgs, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    let cfg = crate::commands::load(&a.config)?;
    crate::telemetry::init_metrics(cfg.metrics.listen.as_deref())?;
    let progress = match log_format {
        LogFormat::Json => ProgressMode::Log,
        LogFormat::Human => ProgressMode::Auto,
    };
    seed_with(&cfg, &a.seed_opts, progress).await?;
    Ok(ExitCode::SUCCESS)
}

/// The seed step of `run --seed` (a no-op once every table is seeded).
pub async fn seed_then_run(cfg: &Config, f: &SeedFlags) -> anyhow::Result<()> {
    seed_with(cfg, f, ProgressMode::Auto).await
}
