//! One function per subcommand: build, connect, hand shutdown in.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use std::sync::Arc;

use switchback_config::{Config, QueueKind};
use switchback_core::{json, Classify, RelationSet};
use switchback_kafka::{KafkaOptions, KafkaReader, KafkaWriter, StartAt};
use switchback_queue::{QueueReader, SledLog};
use tokio::sync::watch;
use tracing::Instrument;

use crate::cli::{ApplyArgs, Cli, Command, ConfigArg, DumpArgs, QueueCommand, RunArgs, SwitchArgs};
use crate::{signals, telemetry};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Capture(c) => capture(c).await,
        Command::Queue(QueueCommand::Dump(d)) => dump(d).await,
        Command::Run(c) => run(c).await,
        Command::Apply(a) => apply(a).await,
        Command::Status(s) => crate::status::status(s).await,
        Command::Check(c) => check(c).await,
        Command::Seed(s) => crate::seed::seed(s, cli.global.log_format).await,
        Command::Cutover(a) => switch(a, switchback_cutover::state::SwitchKind::Cutover).await,
        Command::Rollback(a) => switch(a, switchback_cutover::state::SwitchKind::Rollback).await,
    }
}

/// `switchback check`: the report on stdout; exit status 1 on any problem.
async fn check(c: ConfigArg) -> anyhow::Result<ExitCode> {
    let cfg = load(&c)?;
    let report =
        switchback_mapping::check::check(&cfg, switchback_mapping::check::Sides::Both).await;
    print!("{}", report.render());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The checks of `switchback check` before `run` (both sides) or `capture` (hub).
async fn check_before_start(
    cfg: &Config,
    sides: switchback_mapping::check::Sides,
) -> anyhow::Result<()> {
    let report = switchback_mapping::check::check(cfg, sides).await;
    for n in &report.notes {
        tracing::info!(note = %n, "check");
    }
    if !report.ok() && report.ok_but_unreachable() {
        for p in &report.problems {
            tracing::warn!(problem = %p, "cannot check before start; starting anyway (connections are retried)");
        }
        return Ok(());
    }
    anyhow::ensure!(report.ok(), "{}", report.error_text());
    Ok(())
}

/// `cutover` / `rollback`: the steps live in switchback-cutover.
async fn switch(
    a: SwitchArgs,
    kind: switchback_cutover::state::SwitchKind,
) -> anyhow::Result<ExitCode> {
    use switchback_cutover::Outcome;
    let cfg = load(&a.config)?;
    let span = tracing::info_span!("switch", pipeline = %cfg.pipeline.name, kind = kind.as_str());
    let outcome = switchback_cutover::switch(&cfg, kind, a.dry_run, &mut |m| println!("{m}"))
        .instrument(span)
        .await?;
    match outcome {
        Outcome::Planned(steps) => {
            println!("{} plan (dry run, preflight passed):", kind.as_str());
            for s in steps {
                println!("  {s}");
            }
        }
        Outcome::Undone { .. } => {}
        Outcome::Completed(r) => {
            println!(
                "{} complete: epoch {}, fence LSN {}, writes paused {} ms, {} sequence(s) moved",
                kind.as_str(),
                r.epoch,
                r.fence_lsn,
                r.write_pause_ms,
                r.sequences.len()
            );
            for m in &r.sequences {
                println!("  sequence {}: {} -> {}", m.sequence, m.from, m.to);
            }
            println!("report: {}", serde_json::to_string(&r)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn load(c: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(&c.config)?)
}

/// The config of the direction recorded in the pipeline state (member → hub after
/// a cutover). `capture`, `apply` and `queue dump` read it at start.
fn load_current(c: &ConfigArg) -> anyhow::Result<Config> {
    let cfg = load(c)?;
    let state = switchback_cutover::state::load(&switchback_cutover::state::path(&cfg))?;
    Ok(cfg.for_direction(state.direction))
}

pub fn open_queue(cfg: &Config) -> anyhow::Result<SledLog> {
    std::fs::create_dir_all(&cfg.queue.path)
        .with_context(|| format!("cannot create queue directory {}", cfg.queue.path.display()))?;
    let started = std::time::Instant::now();
    let log = SledLog::open(&cfg.queue.path)?;
    tracing::debug!(path = %cfg.queue.path.display(), took = ?started.elapsed(), "queue opened");
    Ok(log)
}

/// After a clean stop, once every handle of the queue is dropped: lets sled
/// record where its log ends, so the next start does not replay it (see
/// [`SledLog::checkpoint_closed`]).
fn checkpoint_queue(cfg: &Config) {
    if cfg.queue.kind != QueueKind::Sled {
        return;
    }
    let started = std::time::Instant::now();
    match SledLog::checkpoint_closed(&cfg.queue.path) {
        Ok(()) => {
            tracing::debug!(took = ?started.elapsed(), "queue checkpointed for the next start")
        }
        Err(e) => tracing::debug!(error = %e, "queue not checkpointed"),
    }
}

/// The Kafka settings of the hub → member direction.
pub fn kafka_options(cfg: &Config) -> anyhow::Result<KafkaOptions> {
    Ok(KafkaOptions {
        brokers: cfg.queue.brokers.clone().unwrap_or_default(),
        topic: cfg.kafka_topic(),
        group_id: cfg.kafka_group(),
        properties: cfg.queue.kafka_properties()?,
        replication_factor: cfg.queue.replication_factor,
        reader_memory_bytes: cfg.queue.reader_memory_bytes,
        json_topic: cfg.kafka_json_topic(),
    })
}

async fn capture(c: ConfigArg) -> anyhow::Result<ExitCode> {
    let cfg = load_current(&c)?;
    if cfg.direction == switchback_config::Direction::HubToMember {
        check_before_start(&cfg, switchback_mapping::check::Sides::Hub).await?;
    }
    telemetry::init_metrics(cfg.metrics.listen.as_deref())?;
    if cfg.queue.kind == QueueKind::Kafka {
        let queue = KafkaWriter::open(kafka_options(&cfg)?).await?;
        return capture_with(cfg, queue, None).await;
    }
    let queue = open_queue(&cfg)?;
    let reader: Arc<dyn QueueReader + Send + Sync> = Arc::new(queue.clone());
    let code = capture_with(cfg.clone(), queue, Some(reader)).await?;
    checkpoint_queue(&cfg);
    Ok(code)
}

async fn capture_with<Q: switchback_queue::QueueWriter + Send>(
    cfg: Config,
    mut queue: Q,
    reader: Option<Arc<dyn QueueReader + Send + Sync>>,
) -> anyhow::Result<ExitCode> {
    let shutdown = signals::shutdown_on_signals();
    let (progress, cap_rx) = watch::channel(Default::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let status_task = tokio::spawn(crate::status::publish(
        cfg.clone(),
        reader,
        cap_rx,
        None,
        stop_rx,
    ));
    let span = tracing::info_span!("capture", pipeline = %cfg.pipeline.name, direction = cfg.direction.as_str(), slot = %cfg.slot_name());
    let r = switchback_capture::run(&cfg, &mut queue, shutdown, progress)
        .instrument(span)
        .await;
    let _ = stop_tx.send(true);
    let _ = status_task.await;
    r.map_err(|e| {
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
    let cfg = load_current(&d.config)?;
    if cfg.queue.kind == QueueKind::Kafka {
        let queue = KafkaReader::open(kafka_options(&cfg)?, StartAt::Beginning).await?;
        // Every retained transaction, oldest first; `ack` only frees memory here.
        let mut from = 0;
        let txns = std::iter::from_fn(|| {
            let t = queue.next_from(from).transpose()?;
            if let Ok(t) = &t {
                from = t.seq + 1;
                let _ = queue.ack(t.seq.saturating_sub(1));
            }
            Some(t)
        });
        return dump_txns(&d, &queue, txns);
    }
    let queue = open_queue(&cfg)?;
    let txns = queue.all()?.into_iter().map(Ok);
    dump_txns(&d, &queue, txns)
}

fn dump_txns<R: QueueReader>(
    d: &DumpArgs,
    queue: &R,
    txns: impl Iterator<Item = Result<switchback_queue::QueuedTxn, switchback_queue::QueueError>>,
) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for txn in txns {
        let txn = txn?;
        let mut rels = RelationSet::new();
        if d.json {
            // Streamed change by change: a huge transaction never sits in memory.
            let head = serde_json::to_string(&json::header_json(txn.seq, &txn.header))?;
            write!(out, "{},\"changes\":[", head.trim_end_matches('}'))?;
            let mut first = true;
            for chunk in queue.records(&txn)? {
                for rec in chunk? {
                    if let Some(j) = json::change_json(&mut rels, rec) {
                        if !first {
                            out.write_all(b",")?;
                        }
                        first = false;
                        serde_json::to_writer(&mut out, &j)?;
                    }
                }
            }
            writeln!(out, "]}}")?;
        } else {
            let h = &txn.header;
            writeln!(
                out,
                "seq {} xid {} commit {} end {} at {} origin {} — {} records",
                txn.seq,
                h.xid,
                h.commit_lsn,
                h.end_lsn,
                switchback_core::time::format_pg_timestamp(h.commit_time),
                h.origin.as_deref().unwrap_or("-"),
                h.records
            )?;
            for chunk in queue.records(&txn)? {
                for rec in chunk? {
                    if let Some(j) = json::change_json(&mut rels, rec) {
                        writeln!(out, "  {j}")?;
                    }
                }
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Capture and apply in one process over the embedded sled log, in the direction
/// the pipeline state records (both at once in active-active mode). When a cutover
/// or rollback switches the direction, the running direction stops gracefully and
/// the new one starts.
async fn run(r: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = load(&r.config)?;
    if cfg.queue.kind != QueueKind::Sled {
        anyhow::bail!("`switchback run` uses the embedded sled log; with [queue] kind = \"kafka\" run `switchback capture` and `switchback apply` as two processes");
    }
    telemetry::init_metrics(cfg.metrics.listen.as_deref())?;
    let forward_only =
        switchback_cutover::run_directions(&cfg)? == [switchback_config::Direction::HubToMember];
    // The plain forward case starts at once: the queue opens (sled recovery, a
    // blocking read) and capture reads the hub while the check runs; capture
    // changes the hub and apply starts only once the check has passed (`go`).
    let early =
        forward_only && !r.seed && cfg.direction == switchback_config::Direction::HubToMember;
    let mut opening = early.then(|| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_queue(&cfg))
    });
    let (go_tx, go) = watch::channel(None::<bool>);
    let mut checking = None;
    let mut preparing = None;
    let mut connecting = None;
    if early {
        let c = cfg.clone();
        checking = Some(tokio::spawn(async move {
            let r = check_before_start(&c, switchback_mapping::check::Sides::Both).await;
            let _ = go_tx.send(Some(r.is_ok()));
            r
        }));
        let (c, passed) = (cfg.clone(), go.clone());
        preparing = Some(tokio::spawn(async move {
            // The replication connection opens while the hub is read; the stream
            // starts as soon as the plan is known, from the slot's position: the
            // walsender decodes while the queue still opens (and, on a restart that
            // changes nothing on the hub, while the check still runs). Failing here
            // only means the session starts its own stream (and reports what fails).
            let (plan, conn) = tokio::join!(
                switchback_capture::setup::prepare_after(&c, true, check_passed(passed)),
                switchback_capture::stream::connect(&c)
            );
            let plan = plan?;
            let started = match conn {
                Ok(conn) => switchback_capture::stream::start_on(conn, &plan, plan.slot_start)
                    .await
                    .inspect_err(|e| tracing::debug!(error = %e, "early stream start failed"))
                    .ok(),
                Err(e) => {
                    tracing::debug!(error = %e, "early replication connection failed");
                    None
                }
            };
            Ok((plan, started))
        }));
        // Apply's member sessions connect meanwhile too, and bind their replication
        // origin once the check has passed (a failure here is retried by apply itself).
        let (c, passed) = (cfg.clone(), go.clone());
        connecting = Some(tokio::spawn(async move {
            switchback_apply::connect_after(&c, check_passed(passed))
                .await
                .inspect_err(|e| tracing::debug!(error = %e, "early apply connect failed"))
                .ok()
                .flatten()
        }));
    } else {
        if forward_only {
            check_before_start(&cfg, switchback_mapping::check::Sides::Both).await?;
            if r.seed {
                crate::seed::seed_then_run(&cfg, &r.seed_opts).await?;
            }
        } else {
            anyhow::ensure!(!r.seed, "--seed is only for the hub → member direction");
        }
        let _ = go_tx.send(Some(true));
    }
    let shutdown = signals::shutdown_on_signals();
    loop {
        let dirs = switchback_cutover::run_directions(&cfg)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = {
            let mut s = shutdown.clone();
            let stop_tx = stop_tx.clone();
            let cfg = cfg.clone();
            let dirs = dirs.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = s.wait_for(|v| *v) => { let _ = r; let _ = stop_tx.send(true); return; }
                        _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                            if switchback_cutover::run_directions(&cfg).is_ok_and(|d| d != dirs) {
                                tracing::info!("the recorded direction changed; switching");
                                let _ = stop_tx.send(true);
                                return;
                            }
                        }
                    }
                }
            })
        };
        let mut tasks = Vec::new();
        for d in &dirs {
            let dcfg = cfg.for_direction(*d);
            let (stop_tx, stop_rx) = (stop_tx.clone(), stop_rx.clone());
            let queue = match opening.take() {
                Some(q) if *d == cfg.direction => {
                    Some(q.await.context("opening the queue panicked")??)
                }
                _ => None,
            };
            let (prepared, connected) = if *d == cfg.direction {
                (preparing.take(), connecting.take())
            } else {
                (None, None)
            };
            let go = go.clone();
            tasks.push(tokio::spawn(async move {
                let early = Early {
                    prepared,
                    connected,
                };
                let r = run_direction(dcfg, queue, early, go, stop_tx.clone(), stop_rx).await;
                if r.is_err() {
                    let _ = stop_tx.send(true);
                }
                r
            }));
        }
        let mut first_err = None;
        for t in tasks {
            if let Err(e) = t.await.context("pipeline task panicked")? {
                first_err.get_or_insert(e);
            }
        }
        watcher.abort();
        // A failed check explains a stop better than what it stopped.
        if let Some(c) = checking.take() {
            c.await.context("the check panicked")??;
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if *shutdown.borrow() {
            for d in &dirs {
                checkpoint_queue(&cfg.for_direction(*d));
            }
            tracing::info!("stopped cleanly");
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Capture's hub preparation and its stream, started by `run` before its queue
/// has opened.
type Prepared = tokio::task::JoinHandle<
    Result<
        (
            switchback_capture::setup::Plan,
            Option<switchback_capture::stream::Started>,
        ),
        switchback_capture::CaptureError,
    >,
>;

/// What `run` starts for its first direction while the queue opens.
struct Early {
    prepared: Option<Prepared>,
    connected: Option<tokio::task::JoinHandle<Option<switchback_apply::Connected>>>,
}

/// Resolves once `run`'s check before start has finished: whether it passed.
async fn check_passed(mut go: watch::Receiver<Option<bool>>) -> bool {
    go.wait_for(Option::is_some)
        .await
        .is_ok_and(|v| *v == Some(true))
}

/// One direction of `run` until `stop_rx` turns true or a half fails.
async fn run_direction(
    cfg: Config,
    queue: Option<SledLog>,
    early: Early,
    // The check before start: apply waits for it to pass.
    go: watch::Receiver<Option<bool>>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Apply runs in this process: it takes capture's records as they were.
    let mut writer = match queue {
        Some(q) => q,
        None => open_queue(&cfg)?,
    }
    .keep_decoded();
    let reader = writer.clone();
    let direction = cfg.direction.as_str();
    let (cap_tx, cap_rx) = watch::channel(switchback_capture::CaptureProgress::default());
    let (apply_tx, apply_rx) = watch::channel(switchback_apply::ApplyStatus::default());
    let (wake_tx, wake_rx) = watch::channel(());
    {
        let mut cap_rx = cap_rx.clone();
        tokio::spawn(async move {
            while cap_rx.changed().await.is_ok() {
                let _ = wake_tx.send(());
            }
        });
    }
    let status_task = tokio::spawn(crate::status::publish(
        cfg.clone(),
        Some(Arc::new(reader.clone())),
        cap_rx.clone(),
        Some(apply_rx.clone()),
        stop_rx.clone(),
    ));

    let capture = {
        let cfg = cfg.clone();
        let stop_rx = stop_rx.clone();
        let stop_tx = stop_tx.clone();
        let span = tracing::info_span!("capture", pipeline = %cfg.pipeline.name, direction, slot = %cfg.slot_name());
        tokio::spawn(
            async move {
                let r = match early.prepared {
                    Some(p) => match p.await {
                        Ok(Ok((plan, started))) => {
                            switchback_capture::run_prepared(
                                &cfg,
                                plan,
                                started,
                                &mut writer,
                                stop_rx,
                                cap_tx,
                            )
                            .await
                        }
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(switchback_capture::CaptureError::Setup(format!(
                            "preparing the hub panicked: {e}"
                        ))),
                    },
                    // The check has passed already (`run` prepares the first direction).
                    None => switchback_capture::run(&cfg, &mut writer, stop_rx, cap_tx).await,
                };
                if r.is_err() {
                    let _ = stop_tx.send(true);
                }
                r
            }
            .instrument(span),
        )
    };
    let apply = {
        let cfg = cfg.clone();
        let stop_rx = stop_rx.clone();
        let stop_tx = stop_tx.clone();
        let span = tracing::info_span!("apply", pipeline = %cfg.pipeline.name, direction, origin = %cfg.origin_name());
        tokio::spawn(
            async move {
                if !check_passed(go).await {
                    // Capture may be streaming already (it changed nothing on
                    // the hub): it stops too, and `run` reports the check.
                    let _ = stop_tx.send(true);
                    return Ok(());
                }
                let opts = switchback_apply::ApplyOptions {
                    until_empty: false,
                    wake: Some(wake_rx),
                };
                let connected = match early.connected {
                    Some(c) => c.await.ok().flatten(),
                    None => None,
                };
                let r = switchback_apply::run_connected(
                    &cfg, connected, &reader, stop_rx, opts, apply_tx,
                )
                .await;
                if r.is_err() {
                    let _ = stop_tx.send(true);
                }
                r
            }
            .instrument(span),
        )
    };
    let (cap_res, apply_res) = tokio::join!(capture, apply);
    let _ = status_task.await;
    let cap_res = cap_res.context("capture task panicked")?;
    let apply_res = apply_res.context("apply task panicked")?;
    match (cap_res, apply_res) {
        (Err(e), _) => {
            Err(anyhow::Error::new(e).context(format!("capture ({direction}) cannot continue")))
        }
        (_, Err(e)) => Err(anyhow::Error::new(e).context(format!(
            "apply ({direction}) cannot continue; the queue keeps every transaction not applied"
        ))),
        _ => {
            tracing::info!(direction, "direction stopped cleanly");
            Ok(())
        }
    }
}

/// Apply alone, from the queue.
async fn apply(a: ApplyArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_current(&a.config)?;
    telemetry::init_metrics(cfg.metrics.listen.as_deref())?;
    if cfg.queue.kind == QueueKind::Kafka {
        let reader = KafkaReader::open(kafka_options(&cfg)?, StartAt::Committed).await?;
        return apply_with(a, cfg, Arc::new(reader)).await;
    }
    let reader = open_queue(&cfg)?;
    let code = apply_with(a, cfg.clone(), Arc::new(reader)).await?;
    checkpoint_queue(&cfg);
    Ok(code)
}

async fn apply_with<R: QueueReader + Send + Sync + 'static>(
    a: ApplyArgs,
    cfg: Config,
    reader: Arc<R>,
) -> anyhow::Result<ExitCode> {
    let shutdown = signals::shutdown_on_signals();
    let (apply_tx, apply_rx) = watch::channel(switchback_apply::ApplyStatus::default());
    let (_cap_tx, cap_rx) = watch::channel(switchback_capture::CaptureProgress::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let status_task = tokio::spawn(crate::status::publish(
        cfg.clone(),
        Some(reader.clone() as Arc<dyn QueueReader + Send + Sync>),
        cap_rx,
        Some(apply_rx),
        stop_rx,
    ));
    let span = tracing::info_span!("apply", pipeline = %cfg.pipeline.name, direction = cfg.direction.as_str(), origin = %cfg.origin_name());
    let opts = switchback_apply::ApplyOptions {
        until_empty: a.until_empty,
        wake: None,
    };
    let r = switchback_apply::run(&cfg, &*reader, shutdown, opts, apply_tx)
        .instrument(span)
        .await;
    let _ = stop_tx.send(true);
    let _ = status_task.await;
    r.map_err(|e| {
        anyhow::Error::new(e)
            .context("apply cannot continue; the queue keeps every transaction not applied")
    })?;
    Ok(ExitCode::SUCCESS)
}
