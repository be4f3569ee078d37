//! Logging and the Prometheus endpoint.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::cli::{Global, LogFormat};

pub fn init_logging(g: &Global) {
    let filter = EnvFilter::try_new(&g.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match g.log_format {
        LogFormat::Human => builder.with_target(false).init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

/// Starts the Prometheus endpoint if `[metrics] listen` is set.
pub fn init_metrics(listen: Option<&str>) -> anyhow::Result<()> {
    let Some(addr) = listen else {
        return Ok(());
    };
    let addr: std::net::SocketAddr = addr.parse().with_context(|| {
        format!("[metrics] listen = {addr:?} is not an address like 127.0.0.1:9187")
    })?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}
