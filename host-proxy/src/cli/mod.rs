//! The `keystore-host` command line: the flags, and one module per command
//! family that turns them into calls on the library or the enclave.

pub mod agent;
pub mod attestation;
pub mod audit;
pub mod client;
pub mod doctor;
pub mod encrypt;
pub mod policy;
pub mod proxy;
pub mod secrets;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
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
    /// The enclave's secret port. With `get`/`list`/`status`/`attest`
    /// (and `doctor`, default vsock://16:5000),
    /// talk to it directly instead of through the agent, from a privileged
    /// port (root: the operator's way in). For `agent` and `proxy`, where
    /// the agent forwards to (default vsock://16:5000).
    #[arg(long, global = true, env = "KEYSTORE_ENCLAVE", value_name = "ENDPOINT")]
    pub enclave: Option<Endpoint>,
    /// How log lines on stderr are written: `text` (colour only on a
    /// terminal) or `json` (one object per line: `timestamp`, `level`,
    /// `target`, `fields`).
    #[arg(
        long,
        global = true,
        env = "KEYSTORE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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
    /// Verify and read the enclave's audit log (verify, tail, grep).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Write the KMS key policy that pins this enclave build's measurements.
    Policy(policy::PolicyArgs),
    /// Run the KMS forwarder, credentials service, secrets loader and agent.
    Proxy(Box<proxy::ProxyArgs>),
    /// Run the agent alone: the unix socket and HTTP fronts applications
    /// read secrets from.
    Agent(agent::AgentArgs),
    /// Encrypt plain values of a secrets file (.env, JSON, YAML) in place.
    Encrypt(encrypt::EncryptArgs),
    /// Break-glass: print a secrets file with its values in plaintext
    /// (needs a `--rotator` principal and `--yes-print-secrets`).
    Decrypt(secrets::DecryptArgs),
    /// New data key for a file-key file (and with --key-id, a new KMS key);
    /// version + 1. Needs a `--rotator` principal.
    Rotate(secrets::RotateArgs),
    /// Check a deployment in order (enclave, daemon, allowlist, DNS, TLS,
    /// credentials, PCRs, pinned key, document, loads, audit) and say what
    /// to do about each failure. Exit 0 only when none fails.
    Doctor(Box<doctor::DoctorArgs>),
    /// Edit a sealed file's values in $EDITOR (plaintext only on tmpfs),
    /// then seal it again; version + 1. Needs a `--rotator` principal.
    Edit(secrets::EditArgs),
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
        Command::Audit(cmd) => audit::run(cmd),
        Command::Policy(args) => policy::run(args),
        Command::Proxy(args) => proxy::run(cli.enclave.as_ref(), *args),
        Command::Agent(args) => agent::run(cli.enclave.as_ref(), &args),
        Command::Encrypt(args) => encrypt::run(args),
        Command::Decrypt(args) => secrets::decrypt(args),
        Command::Rotate(args) => secrets::rotate(args),
        Command::Edit(args) => secrets::edit(args),
        Command::Doctor(args) => doctor::run(cli.enclave.as_ref(), *args),
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
