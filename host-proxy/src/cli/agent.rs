//! `keystore-host agent`, and the agent flags `keystore-host proxy` shares:
//! how applications on the parent read secrets ([`keystore_host::agent`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use keystore_host::agent::pool::DEFAULT_POOL_SIZE;
use keystore_host::agent::token::DEFAULT_TOKEN_DIR;
use keystore_host::agent::{
    Agent, AgentConfig, DEFAULT_ENCLAVE, DEFAULT_MAX_CONNECTIONS, DEFAULT_SOCKET,
};
use keystore_host::proxy::Proxy;
use keystore_shared::Endpoint;

/// The agent's flags (also accepted by `proxy`).
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The agent's unix socket (mode 0666; the caller is who SO_PEERCRED
    /// says).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Do not serve the unix socket.
    #[arg(long)]
    pub no_agent_socket: bool,
    /// Where the Secrets-Manager-Agent-compatible HTTP front listens
    /// (loopback only).
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp://127.0.0.1:2773")]
    pub agent_http: Endpoint,
    /// Do not serve HTTP.
    #[arg(long)]
    pub no_agent_http: bool,
    /// Directory of HTTP token files (`token = ...`, optional `user`/`uid`/
    /// `group`; mode 0640; re-read every 10 s and on SIGHUP).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_TOKEN_DIR)]
    pub tokens: PathBuf,
    /// Privileged connections to the enclave (requests in flight at once).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POOL_SIZE)]
    pub agent_pool: usize,
    /// Client connections each agent front serves at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub agent_max_connections: usize,
}

impl AgentArgs {
    /// The agent's configuration, forwarding to `enclave` (the secret port;
    /// the default when not given).
    pub fn config(&self, enclave: Option<&Endpoint>) -> anyhow::Result<AgentConfig> {
        let enclave = match enclave {
            Some(endpoint) => endpoint.clone(),
            None => DEFAULT_ENCLAVE
                .parse()
                .context("the default enclave endpoint")?,
        };
        let mut config = AgentConfig::new(enclave);
        config.socket = (!self.no_agent_socket).then(|| self.agent_socket.clone());
        config.http = (!self.no_agent_http).then(|| self.agent_http.clone());
        config.tokens = Some(self.tokens.clone());
        config.pool.size = self.agent_pool.max(1);
        config.max_connections = self.agent_max_connections.max(1);
        Ok(config)
    }
}

/// Runs the agent alone until SIGTERM or SIGINT.
pub fn run(enclave: Option<&Endpoint>, args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let config = args.config(enclave)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let agent = Agent::bind(config).await.context("starting the agent")?;
        let shutdown = termination().context("installing signal handlers")?;
        agent.run(shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on SIGTERM or SIGINT.
fn termination() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the agent"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the agent"),
        }
    })
}

/// Runs `proxy` and, if given, `agent` together: the agent stops after the
/// proxy does, and a failed agent stops the proxy.
pub async fn run_with_proxy(proxy: Proxy, agent: Option<Agent>) -> anyhow::Result<()> {
    let Some(agent) = agent else {
        proxy.run().await?;
        return Ok(());
    };
    let stop_proxy = proxy.shutdown_handle();
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut agent_task = tokio::spawn(agent.run(async move {
        let _ = agent_stopped.await;
    }));
    let proxy_run = proxy.run();
    tokio::pin!(proxy_run);
    tokio::select! {
        proxied = &mut proxy_run => {
            let _ = stop_agent.send(());
            let agent_result = agent_task.await.context("the agent task")?;
            proxied?;
            agent_result?;
        }
        joined = &mut agent_task => {
            tracing::error!("the agent stopped; stopping the proxy");
            stop_proxy.shutdown();
            proxy_run.await?;
            joined.context("the agent task")??;
            anyhow::bail!("the agent stopped unexpectedly");
        }
    }
    Ok(())
}
