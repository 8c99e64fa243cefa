//! The `keystore-host` command line: the flags, and one module per command
//! family that turns them into calls on the library or the enclave.

pub mod agent;
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
    /// The agent `get`, `list`, `status` and `attest` talk to by default.
    #[arg(
        long,
        global = true,
        env = "KEYSTORE_AGENT",
        default_value = keystore_host::agent::DEFAULT_SOCKET_ENDPOINT,
        value_name = "ENDPOINT"
    )]
    pub agent: Endpoint,
    /// The enclave's secret port. With `get`/`list`/`status`/`attest`,
    /// talk to it directly instead of through the agent, from a privileged
    /// port (root: the operator's way in). For `agent` and `proxy`, where
    /// the agent forwards to (default vsock://16:5000).
    #[arg(long, global = true, env = "KEYSTORE_ENCLAVE", value_name = "ENDPOINT")]
    pub enclave: Option<Endpoint>,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read secrets through the agent (or `--enclave` directly): get, list,
    /// status, attest.
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Inspect and verify Nitro attestation documents.
    #[command(subcommand)]
    Attestation(attestation::AttestationCommand),
    /// Write the KMS key policy that pins this enclave build's measurements.
    Policy(policy::PolicyArgs),
    /// Run the KMS forwarder, credentials service, secrets loader and agent.
    Proxy(Box<proxy::ProxyArgs>),
    /// Run the agent alone: the unix socket and HTTP fronts applications
    /// read secrets from.
    Agent(agent::AgentArgs),
    /// Encrypt plain values of a `.env` file in place with KMS.
    Encrypt(encrypt::EncryptArgs),
}

/// Runs the chosen command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Client(cmd) => {
            let target = match cli.enclave {
                Some(enclave) => client::Target::Enclave(enclave),
                None => client::Target::Agent(cli.agent),
            };
            client::run(&target, cmd)
        }
        Command::Attestation(cmd) => attestation::run(cmd),
        Command::Policy(args) => policy::run(args),
        Command::Proxy(args) => proxy::run(cli.enclave.as_ref(), *args),
        Command::Agent(args) => agent::run(cli.enclave.as_ref(), &args),
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
