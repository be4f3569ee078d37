//! One function per subcommand: build, connect, hand shutdown in.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use switchback_config::Config;
use switchback_core::{json, Classify, RelationSet};
use switchback_queue::{QueueReader, SledLog};
use tokio::sync::watch;
use tracing::Instrument;

use crate::cli::{Cli, Command, ConfigArg, DumpArgs, QueueCommand};
use crate::{signals, telemetry};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Capture(c) => capture(c).await,
        Command::Queue(QueueCommand::Dump(d)) => dump(d).await,
        Command::Run(_) | Command::Apply(_) | Command::Status(_) => {
            anyhow::bail!("not implemented yet")
        }
    }
}

fn load(c: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(&c.config)?)
}

fn open_queue(cfg: &Config) -> anyhow::Result<SledLog> {
    std::fs::create_dir_all(&cfg.queue.path)
        .with_context(|| format!("cannot create queue directory {}", cfg.queue.path.display()))?;
    Ok(SledLog::open(&cfg.queue.path)?)
}

async fn capture(c: ConfigArg) -> anyhow::Result<ExitCode> {
    let cfg = load(&c)?;
    telemetry::init_metrics(cfg.metrics.listen.as_deref())?;
    let mut queue = open_queue(&cfg)?;
    let shutdown = signals::shutdown_on_signals();
    let (progress, _) = watch::channel(Default::default());
    let span = tracing::info_span!("capture", pipeline = %cfg.pipeline.name, direction = "hub_to_member", slot = %cfg.slot_name());
    switchback_capture::run(&cfg, &mut queue, shutdown, progress)
        .instrument(span)
        .await
        .map_err(|e| {
            let transient = e.is_transient();
            anyhow::Error::new(e).context(if transient {
                "capture stopped"
            } else {
                "capture cannot continue"
            })
        })?;
    tracing::info!("capture stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

async fn dump(d: DumpArgs) -> anyhow::Result<ExitCode> {
    let cfg = load(&d.config)?;
    let queue = open_queue(&cfg)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for txn in queue.all()? {
        let mut rels = RelationSet::new();
        let mut changes = Vec::new();
        for chunk in queue.records(&txn)? {
            for rec in chunk? {
                if let Some(j) = json::change_json(&mut rels, rec) {
                    changes.push(j);
                }
            }
        }
        if d.json {
            let mut obj = json::header_json(txn.seq, &txn.header);
            obj.insert("changes".into(), serde_json::Value::Array(changes));
            serde_json::to_writer(&mut out, &obj)?;
            writeln!(out)?;
        } else {
            let h = &txn.header;
            writeln!(
                out,
                "seq {} xid {} commit {} end {} at {} origin {} — {} changes",
                txn.seq,
                h.xid,
                h.commit_lsn,
                h.end_lsn,
                switchback_core::time::format_pg_timestamp(h.commit_time),
                h.origin.as_deref().unwrap_or("-"),
                changes.len()
            )?;
            for c in changes {
                writeln!(out, "  {c}")?;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
