//! `keystore-host`: client, proxy and operator commands on the parent instance.
#![forbid(unsafe_code)]

mod attestation_cmd;
mod client_cmd;
mod encrypt_cmd;
mod policy_cmd;
mod proxy_cmd;
mod rfc3339;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keystore_shared::Endpoint;

/// nitro-keystore on the parent instance.
///
/// Exit status: 0 success, 1 the checked thing is invalid, 2 usage or I/O error.
#[derive(Debug, Parser)]
#[command(name = "keystore-host", version, about, long_about)]
struct Cli {
    /// The enclave's secret server.
    #[arg(
        long,
        global = true,
        env = "KEYSTORE_ENCLAVE",
        default_value = "vsock://16:5000",
        value_name = "ENDPOINT"
    )]
    enclave: Endpoint,
    #[command(subcommand)]
    command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to the enclave: get, list, status, attest.
    #[command(flatten)]
    Client(client_cmd::ClientCommand),
    /// Inspect and verify Nitro attestation documents.
    #[command(subcommand)]
    Attestation(attestation_cmd::AttestationCommand),
    /// Write the KMS key policy that pins this enclave build's measurements.
    Policy(policy_cmd::PolicyArgs),
    /// Run the KMS forwarder, credentials service and secrets loader.
    Proxy(proxy_cmd::ProxyArgs),
    /// Encrypt plain values of a `.env` file in place with KMS.
    Encrypt(encrypt_cmd::EncryptArgs),
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the whole context chain.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Client(cmd) => client_cmd::run(&cli.enclave, cmd),
        Command::Attestation(cmd) => attestation_cmd::run(cmd),
        Command::Policy(args) => policy_cmd::run(args),
        Command::Proxy(args) => proxy_cmd::run(args),
        Command::Encrypt(args) => encrypt_cmd::run(args),
    }
}

/// Logs go to stderr, `warn` unless `RUST_LOG` says otherwise, so stdout
/// stays machine-readable.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
