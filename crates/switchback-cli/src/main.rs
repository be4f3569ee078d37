//! The `switchback` command: parses arguments, loads the config, connects and
//! hands shutdown in. The logic lives in the library crates.

mod cli;
mod commands;
mod signals;
mod status;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    telemetry::init_logging(&args.global);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            // Errors are printed with their whole chain: which table, which fix.
            eprintln!("error: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "switchback stopped");
            ExitCode::FAILURE
        }
    }
}
