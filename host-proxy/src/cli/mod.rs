//! The `keystore-host` command line: the flags, and one module per command
//! family that turns them into calls on the library or the enclave.

pub mod attestation;
pub mod client;
pub mod encrypt;
pub mod policy;
pub mod proxy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keystore_shared::Endpoint;

/// nitro-keystore on the parent instance.
///
/// Exit status: 0 success, 1 the checked thing is invalid, 2 usage or I/O error.
#[derive(Debug, Parser)]
#[command(name = "keystore-host", version, about, long_about)]
pub struct Cli {
    /// The enclave's secret server.
    #[arg(
        long,
        global = true,
        env = "KEYSTORE_ENCLAVE",
        default_value = "vsock://16:5000",
        value_name = "ENDPOINT"
    )]
    pub enclave: Endpoint,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to the enclave: get, list, status, attest.
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Inspect and verify Nitro attestation documents.
    #[command(subcommand)]
    Attestation(attestation::AttestationCommand),
    /// Write the KMS key policy that pins this enclave build's measurements.
    Policy(policy::PolicyArgs),
    /// Run the KMS forwarder, credentials service and secrets loader.
    Proxy(proxy::ProxyArgs),
    /// Encrypt plain values of a `.env` file in place with KMS.
    Encrypt(encrypt::EncryptArgs),
}

/// Runs the chosen command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Client(cmd) => client::run(&cli.enclave, cmd),
        Command::Attestation(cmd) => attestation::run(cmd),
        Command::Policy(args) => policy::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Encrypt(args) => encrypt::run(args),
    }
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
