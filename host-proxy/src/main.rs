//! `keystore-host`: client, proxy and operator commands on the parent instance.
#![forbid(unsafe_code)]

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use cli::LogFormat;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing(cli.log_format);
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the whole context chain.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs go to stderr, `warn` unless `RUST_LOG` says otherwise, so stdout
/// stays machine-readable. Colour only on a terminal: journald and log
/// files get plain text (or JSON with stable field names).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
