//! suppressd: a self-hosted suppression-list appliance.
//!
//! Provider webhooks (HTTPS) → provider parsers → canonical events → the store's group commit →
//! durable sled trees → the local lookup API. See ARCHITECTURE.md for the map and its invariants.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod error;
pub mod event;
pub mod metrics;
pub mod phone;
pub mod providers;
pub mod serve;
pub mod server;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod transfer;
pub mod web;
pub mod webhooks;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line and runs the chosen command.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Serve(args) => {
            init_logging(args.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("suppressd: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve::serve(*args, cli.api_token_file.as_deref())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("suppressd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        cli::Command::GenerateAssets { dir } => match cli::write_assets(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("suppressd: cannot write to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        _ => client::run(&cli),
    }
}

fn init_logging(format: cli::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
}
