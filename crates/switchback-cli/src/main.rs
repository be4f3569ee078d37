//! The `switchback` command: parses arguments, loads the config, connects and
//! hands shutdown in. The logic lives in the library crates.

mod cli;
mod commands;
mod seed;
mod signals;
mod status;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    telemetry::init_logging(&args.global);
    let json_logs = args.global.log_format == cli::LogFormat::Json;
    // One worker thread by default: the connection tasks then write many pipelined
    // statements per syscall instead of racing the producer one message at a time
    // (measured: fewer syscalls, faster apply). SWITCHBACK_WORKER_THREADS overrides.
    let threads = std::env::var("SWITCHBACK_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            // Errors are printed once, with their whole chain: which table, which fix.
            if json_logs {
                tracing::error!(error = %format!("{e:#}"), "switchback stopped");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
