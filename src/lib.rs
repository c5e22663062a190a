//! suppressd: a self-hosted suppression-list appliance.
//!
//! Provider webhooks (HTTPS) → provider parsers → canonical events → the store's group commit →
//! durable sled trees → the local lookup API. See ARCHITECTURE.md for the map and its invariants.

// The provider parsers and what they need build without the service's dependencies
// (`--no-default-features`), so the fuzz targets compile in a minute rather than four.
pub mod event;
pub mod phone;
pub mod providers;
pub mod secret;

#[cfg(feature = "service")]
pub mod api;
#[cfg(feature = "service")]
pub mod auth;
#[cfg(feature = "service")]
pub mod cli;
#[cfg(feature = "service")]
pub mod client;
#[cfg(feature = "service")]
pub mod cluster;
#[cfg(feature = "service")]
pub mod error;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod response;
#[cfg(feature = "service")]
pub mod serve;
#[cfg(feature = "service")]
pub mod server;
#[cfg(feature = "service")]
pub mod state;
#[cfg(feature = "service")]
pub mod store;
#[cfg(feature = "service")]
pub mod systemd;
#[cfg(feature = "service")]
pub mod tls;
#[cfg(feature = "service")]
pub mod transfer;
#[cfg(feature = "service")]
pub mod web;
#[cfg(feature = "service")]
pub mod webhooks;

#[cfg(feature = "service")]
use std::process::ExitCode;

#[cfg(feature = "service")]
use clap::Parser;

/// Parses the command line and runs the chosen command.
#[cfg(feature = "service")]
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

#[cfg(feature = "service")]
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
