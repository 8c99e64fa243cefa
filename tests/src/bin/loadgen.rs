//! `loadgen`: the load generator behind `scripts/bench.sh`.
//!
//! - `loadgen run`: many connections sending `Get`/`List`/`Status` for a
//!   while, to any framed endpoint (the enclave's secret port, `--privileged`
//!   for its privileged-only rule; the agent's unix socket speaks the same
//!   framing) or to the agent's HTTP port (`http://127.0.0.1:2773` with
//!   `--token-file`, HTTP/1.1 keep-alive). Reports requests/s, p50/p99/p99.9
//!   and errors by kind, as text or `--json`.
//! - `loadgen echo-server` / `loadgen echo`: an echo upstream and a burst of
//!   connections each doing one request/response, to measure the forwarder.
//! - `loadgen crypto`: RSA key generation and `cms::open` per call.
//!
//! Every wait is bounded (`--timeout`); a failed connection is counted and
//! replaced, never retried in a tight loop without a pause.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use keystore_shared::Endpoint;
use keystore_shared::endpoint::Stream;
use keystore_shared::frame::{Connection, FrameLimits, encode_frame};
use keystore_shared::protocol::{
    DEFAULT_MAX_REQUEST_FRAME, DEFAULT_MAX_RESPONSE_FRAME, Request, RequestOp, Response,
    ResponseBody,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// Most connections one run opens (each is a task and a socket).
const MAX_CONNECTIONS: usize = 10_000;
/// Deepest pipeline accepted.
const MAX_DEPTH: usize = 1024;
/// Longest run.
const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Pause after a failed connect before the worker tries again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Largest HTTP answer body read.
const MAX_HTTP_BODY: usize = 2 * 1024 * 1024;
/// Largest echo payload.
const MAX_ECHO_SIZE: usize = 1024 * 1024;
/// Histogram range: 1 µs to 60 s, 3 significant digits.
const MAX_LATENCY_US: u64 = 60_000_000;

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "nitro-keystore load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send Get/List/Status from many connections and report throughput and latency.
    Run(RunArgs),
    /// Serve an echo upstream (each connection: bytes read are written back).
    EchoServer(EchoServerArgs),
    /// Open N connections at once, each writing one message and reading it back.
    Echo(EchoArgs),
    /// Time RSA key generation and `cms::open` per call.
    Crypto(CryptoArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// `tcp://`, `unix://`, `vsock://` (framed protocol) or `http://HOST:PORT` (the agent's HTTP).
    #[arg(long)]
    target: String,
    /// Connect from a source port below 1024 (the enclave's secret port serves only privileged peers).
    #[arg(long)]
    privileged: bool,
    /// File holding the agent's HTTP token (`X-Aws-Parameters-Secrets-Token`).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long to measure (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Run this long first without recording.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Request mix as weights, e.g. `get=90,list=5,status=5` (HTTP: get only).
    #[arg(long, default_value = "get=100", value_parser = parse_mix)]
    mix: Mix,
    /// A secret name to `Get` (repeatable; cycled). Without any, the names a `List` returns.
    #[arg(long = "name")]
    names: Vec<String>,
    /// Requests written before reading their answers (framed targets only).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Bound on connecting and on each batch of answers.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct EchoServerArgs {
    /// Where to listen (`tcp://127.0.0.1:0` picks a port).
    #[arg(long)]
    listen: Endpoint,
    /// Write the bound endpoint here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct EchoArgs {
    /// Where to connect (e.g. the forwarder's listen address).
    #[arg(long)]
    target: Endpoint,
    /// Connections opened at once.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Bytes each connection writes and expects back.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Rounds (each round opens `connections` connections); latencies are pooled.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Bound on each connection's exchange, connect included.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CryptoArgs {
    /// RSA sizes to generate (repeatable).
    #[arg(long = "bits", default_values_t = [2048u32, 3072, 4096])]
    bits: Vec<u32>,
    /// Key generations per size.
    #[arg(long, default_value_t = 3)]
    keygens: usize,
    /// `cms::open` calls per size.
    #[arg(long, default_value_t = 200)]
    opens: usize,
    /// Plaintext size sealed for `cms::open`.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Request weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mix {
    get: u32,
    list: u32,
    status: u32,
}

impl Mix {
    fn total(&self) -> u32 {
        self.get + self.list + self.status
    }

    /// The operation for a draw in `0..total`.
    fn pick(&self, draw: u32) -> OpKind {
        if draw < self.get {
            OpKind::Get
        } else if draw < self.get + self.list {
            OpKind::List
        } else {
            OpKind::Status
        }
    }
}

fn parse_mix(text: &str) -> Result<Mix, String> {
    let mut mix = Mix {
        get: 0,
        list: 0,
        status: 0,
    };
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (op, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected OP=WEIGHT"))?;
        let weight: u32 = weight
            .parse()
            .map_err(|_| format!("`{part}`: weight is not a number"))?;
        if weight > 1_000_000 {
            return Err(format!("`{part}`: weight above 1000000"));
        }
        match op {
            "get" => mix.get = weight,
            "list" => mix.list = weight,
            "status" => mix.status = weight,
            other => return Err(format!("unknown operation `{other}` (get, list, status)")),
        }
    }
    if mix.total() == 0 {
        return Err("the mix has no weight".into());
    }
    Ok(mix)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Get,
    List,
    Status,
}

/// Where a run sends its requests.
#[derive(Debug, Clone)]
enum Target {
    Framed {
        endpoint: Endpoint,
        privileged: bool,
    },
    Http {
        authority: String,
        token: Arc<str>,
    },
}

/// What one worker measured.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    bytes: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Result<Self> {
        Ok(Tally {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            ok: 0,
            bytes: 0,
            errors: BTreeMap::new(),
        })
    }

    fn error(&mut self, kind: impl Into<String>, n: u64) {
        *self.errors.entry(kind.into()).or_default() += n;
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.latency.add(&other.latency)?;
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (kind, n) in other.errors {
            self.error(kind, n);
        }
        Ok(())
    }

    fn record(&mut self, since: Instant) {
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Latency {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[derive(Debug, Serialize)]
struct RunReport {
    target: String,
    connections: usize,
    depth: usize,
    duration_s: f64,
    requests_ok: u64,
    requests_per_s: f64,
    value_bytes_per_ok: f64,
    errors: BTreeMap<String, u64>,
    latency_us: Latency,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::EchoServer(args) => runtime.block_on(echo_server(args)),
        Command::Echo(args) => runtime.block_on(echo(args)),
        Command::Crypto(args) => crypto(&args),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if args.depth == 0 || args.depth > MAX_DEPTH {
        bail!("--depth must be 1..={MAX_DEPTH}");
    }
    if args.duration.is_zero() || args.duration + args.warmup > MAX_DURATION {
        bail!("--duration must be positive and, with --warmup, at most 1 h");
    }
    let target = if let Some(authority) = args.target.strip_prefix("http://") {
        let authority = authority.trim_end_matches('/').to_owned();
        if args.mix.list != 0 || args.mix.status != 0 {
            bail!("the agent's HTTP port answers Get only: use --mix get=100");
        }
        if args.depth != 1 {
            bail!("--depth applies to framed targets only");
        }
        let file = args
            .token_file
            .as_ref()
            .ok_or_else(|| anyhow!("an http:// target needs --token-file"))?;
        let token = Zeroizing::new(
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
        );
        Target::Http {
            authority,
            token: Arc::from(token.trim()),
        }
    } else {
        let endpoint: Endpoint = args
            .target
            .parse()
            .with_context(|| format!("--target {}", args.target))?;
        Target::Framed {
            endpoint,
            privileged: args.privileged,
        }
    };
    let names = if args.names.is_empty() {
        discover_names(&target, args.timeout).await?
    } else {
        args.names.clone()
    };
    if names.is_empty() && args.mix.get != 0 {
        bail!("no secret names to Get: the target lists none; pass --name");
    }
    let names: Arc<[String]> = names.into();

    let start = Instant::now();
    let record_from = start + args.warmup;
    let stop = record_from + args.duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.connections {
        let target = target.clone();
        let names = Arc::clone(&names);
        let mix = args.mix;
        let (depth, timeout) = (args.depth, args.timeout);
        workers.spawn(async move {
            let mut w = Worker {
                target,
                names,
                mix,
                depth,
                timeout,
                record_from,
                stop,
                cursor: worker,
                draw: (worker as u32).wrapping_mul(2_654_435_761),
                tally: Tally::new()?,
            };
            w.run().await;
            Ok::<Tally, anyhow::Error>(w.tally)
        });
    }
    let mut total = Tally::new()?;
    while let Some(joined) = workers.join_next().await {
        total.merge(joined.context("a worker panicked")??)?;
    }
    let measured = args.duration.as_secs_f64();
    let report = RunReport {
        target: args.target.clone(),
        connections: args.connections,
        depth: args.depth,
        duration_s: measured,
        requests_ok: total.ok,
        requests_per_s: total.ok as f64 / measured,
        value_bytes_per_ok: if total.ok == 0 {
            0.0
        } else {
            total.bytes as f64 / total.ok as f64
        },
        errors: total.errors,
        latency_us: Latency::of(&total.latency),
    };
    print_run(&report, args.json)
}

fn print_run(r: &RunReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{}: {} connections, depth {}, {:.1} s",
        r.target, r.connections, r.depth, r.duration_s
    );
    println!(
        "  {:.0} requests/s ({} ok, {:.0} value bytes each)",
        r.requests_per_s, r.requests_ok, r.value_bytes_per_ok
    );
    println!(
        "  latency µs: p50 {} p99 {} p99.9 {} max {} mean {:.0}",
        r.latency_us.p50, r.latency_us.p99, r.latency_us.p999, r.latency_us.max, r.latency_us.mean
    );
    if r.errors.is_empty() {
        println!("  errors: none");
    } else {
        for (kind, n) in &r.errors {
            println!("  errors {kind}: {n}");
        }
    }
    Ok(())
}

/// The names `List` returns, through one connection.
async fn discover_names(target: &Target, timeout: Duration) -> Result<Vec<String>> {
    match target {
        Target::Http { .. } => bail!("an http:// target needs --name (HTTP has no List)"),
        Target::Framed {
            endpoint,
            privileged,
        } => {
            let config = keystore_shared::ClientConfig {
                privileged: *privileged,
                connect_timeout: timeout,
                request_timeout: timeout,
                ..Default::default()
            };
            let mut client = keystore_shared::Client::connect_with(endpoint, config)
                .await
                .with_context(|| format!("connecting to {endpoint}"))?;
            Ok(client.list().await.context("List")?)
        }
    }
}

/// One connection's loop.
struct Worker {
    target: Target,
    names: Arc<[String]>,
    mix: Mix,
    depth: usize,
    timeout: Duration,
    record_from: Instant,
    stop: Instant,
    cursor: usize,
    draw: u32,
    tally: Tally,
}

impl Worker {
    async fn run(&mut self) {
        while Instant::now() < self.stop {
            let result = match self.target.clone() {
                Target::Framed {
                    endpoint,
                    privileged,
                } => self.framed(&endpoint, privileged).await,
                Target::Http { authority, token } => self.http(&authority, &token).await,
            };
            if let Err(kind) = result {
                self.count_error(kind);
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }

    fn recording(&self) -> bool {
        Instant::now() >= self.record_from
    }

    fn count_error(&mut self, kind: &str) {
        if self.recording() {
            self.tally.error(kind, 1);
        }
    }

    fn next_op(&mut self) -> RequestOp {
        // A Weyl-sequence draw: cheap, deterministic per worker, well spread.
        self.draw = self.draw.wrapping_add(2_654_435_769);
        match self.mix.pick(self.draw % self.mix.total()) {
            OpKind::Get => RequestOp::Get {
                name: self.next_name().to_owned(),
            },
            OpKind::List => RequestOp::List,
            OpKind::Status => RequestOp::Status,
        }
    }

    fn next_name(&mut self) -> &str {
        self.cursor = self.cursor.wrapping_add(1);
        &self.names[self.cursor % self.names.len()]
    }

    /// Serves one connection until the end of the run or its first
    /// connection-level failure (returned as an error kind).
    async fn framed(&mut self, endpoint: &Endpoint, privileged: bool) -> Result<(), &'static str> {
        let connecting = async {
            if privileged {
                endpoint.connect_privileged().await
            } else {
                endpoint.connect().await
            }
        };
        let stream: Stream = match tokio::time::timeout(self.timeout, connecting).await {
            Err(_) => return Err("connect-timeout"),
            Ok(Err(_)) => return Err("connect"),
            Ok(Ok(stream)) => stream,
        };
        let mut conn = Connection::with_limits(
            stream,
            FrameLimits::new(DEFAULT_MAX_RESPONSE_FRAME, DEFAULT_MAX_REQUEST_FRAME),
        );
        let mut next_id: u64 = 1;
        let mut batch = Vec::new();
        let mut pending: Vec<(u64, &'static str)> = Vec::with_capacity(self.depth);
        while Instant::now() < self.stop {
            batch.clear();
            pending.clear();
            for _ in 0..self.depth {
                let op = self.next_op();
                let expected = op.answer_kind();
                let request = Request::new(next_id, op);
                let frame =
                    encode_frame(&request, DEFAULT_MAX_REQUEST_FRAME).map_err(|_| "encode")?;
                batch.extend_from_slice(&frame);
                pending.push((next_id, expected));
                next_id = next_id.wrapping_add(1);
            }
            let sent = Instant::now();
            let recording = sent >= self.record_from;
            let exchange = async {
                conn.get_mut()
                    .write_all(&batch)
                    .await
                    .map_err(|_| "write")?;
                let mut answers = Vec::with_capacity(pending.len());
                for _ in 0..pending.len() {
                    match conn.read_message::<Response>().await {
                        Ok(Some(response)) => answers.push((response, sent.elapsed())),
                        Ok(None) => return Err("closed"),
                        Err(_) => return Err("frame"),
                    }
                }
                Ok(answers)
            };
            let answers = match tokio::time::timeout(self.timeout, exchange).await {
                Err(_) => {
                    if recording {
                        self.tally.error("timeout", pending.len() as u64);
                    }
                    return Ok(());
                }
                Ok(Err(kind)) => return Err(kind),
                Ok(Ok(answers)) => answers,
            };
            // The server answers in order; a mismatched id means the
            // connection is out of step, so it is dropped.
            for ((response, elapsed), (id, expected)) in answers.into_iter().zip(&pending) {
                if response.id != *id {
                    return Err("id-mismatch");
                }
                if !recording {
                    continue;
                }
                match response.result {
                    ResponseBody::Error { code, .. } => self.tally.error(code.as_str(), 1),
                    body if body.kind() == *expected => {
                        if let ResponseBody::Secret { value, .. } = &body {
                            self.tally.bytes += value.len() as u64;
                        }
                        self.tally.ok += 1;
                        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
                        self.tally
                            .latency
                            .saturating_record(us.clamp(1, MAX_LATENCY_US));
                    }
                    _ => self.tally.error("unexpected-answer", 1),
                }
            }
        }
        Ok(())
    }

    /// One keep-alive HTTP/1.1 connection to the agent.
    async fn http(&mut self, authority: &str, token: &str) -> Result<(), &'static str> {
        let connecting = tokio::net::TcpStream::connect(authority);
        let tcp = match tokio::time::timeout(self.timeout, connecting).await {
            Err(_) => return Err("connect-timeout"),
            Ok(Err(_)) => return Err("connect"),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(tcp);
        let (mut sender, connection) =
            match tokio::time::timeout(self.timeout, hyper::client::conn::http1::handshake(io))
                .await
            {
                Err(_) => return Err("connect-timeout"),
                Ok(Err(_)) => return Err("http-handshake"),
                Ok(Ok(pair)) => pair,
            };
        let driver = tokio::spawn(connection);
        let result = self.http_loop(&mut sender, authority, token).await;
        driver.abort();
        result
    }

    async fn http_loop(
        &mut self,
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        authority: &str,
        token: &str,
    ) -> Result<(), &'static str> {
        while Instant::now() < self.stop {
            let name = self.next_name().to_owned();
            let request = http::Request::get(format!("/secretsmanager/get?secretId={name}"))
                .header(http::header::HOST, authority)
                .header("X-Aws-Parameters-Secrets-Token", token)
                .body(Empty::<Bytes>::new())
                .map_err(|_| "http-request")?;
            let sent = Instant::now();
            let exchange = async {
                let response = sender.send_request(request).await.map_err(|_| "http-io")?;
                let status = response.status();
                let body = http_body_util::Limited::new(response.into_body(), MAX_HTTP_BODY)
                    .collect()
                    .await
                    .map_err(|_| "http-body")?
                    .to_bytes();
                Ok::<_, &'static str>((status, body.len()))
            };
            let (status, len) = match tokio::time::timeout(self.timeout, exchange).await {
                Err(_) => {
                    self.count_error("timeout");
                    return Ok(());
                }
                Ok(Err(kind)) => return Err(kind),
                Ok(Ok(answer)) => answer,
            };
            if !self.recording() {
                continue;
            }
            if status.is_success() {
                self.tally.ok += 1;
                self.tally.bytes += len as u64;
                self.tally.record(sent);
            } else {
                self.tally.error(format!("http-{}", status.as_u16()), 1);
            }
        }
        Ok(())
    }
}

async fn echo_server(args: EchoServerArgs) -> Result<()> {
    let listener = args.listen.bind().await.context("binding")?;
    let bound = listener.local_endpoint().clone();
    if let Some(file) = &args.ready_file {
        std::fs::write(file, format!("{bound}\n"))
            .with_context(|| format!("writing {}", file.display()))?;
    }
    eprintln!("echo server on {bound}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The project's one accept loop (scripts/check-layout.sh), sized for the
    // burst case's 1000 connections at once.
    let config = keystore_shared::serve::ServeConfig {
        max_connections: 4096,
        ..keystore_shared::serve::ServeConfig::named("echo")
    };
    let handler = keystore_shared::serve::handler_fn(|mut conn| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match conn.stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let stop = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    keystore_shared::serve::serve(
        listener,
        std::sync::Arc::new(handler),
        std::sync::Arc::new(keystore_shared::serve::AnyPeer),
        config,
        stop,
    )
    .await
    .context("echo server")
}

#[derive(Debug, Serialize)]
struct EchoReport {
    target: String,
    connections: usize,
    rounds: usize,
    completed: u64,
    errors: BTreeMap<String, u64>,
    latency_us: Latency,
}

async fn echo(args: EchoArgs) -> Result<()> {
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if args.size == 0 || args.size > MAX_ECHO_SIZE {
        bail!("--size must be 1..={MAX_ECHO_SIZE}");
    }
    if args.rounds == 0 || args.rounds > 1000 {
        bail!("--rounds must be 1..=1000");
    }
    let mut total = Tally::new()?;
    let payload: Arc<[u8]> = (0..args.size).map(|i| (i % 251) as u8).collect();
    for _ in 0..args.rounds {
        // Every connection waits at the barrier, so all of them are open
        // (or failed) before the first byte is written.
        let barrier = Arc::new(tokio::sync::Barrier::new(args.connections));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..args.connections {
            let target = args.target.clone();
            let payload = Arc::clone(&payload);
            let barrier = Arc::clone(&barrier);
            let timeout = args.timeout;
            set.spawn(async move {
                let connected = tokio::time::timeout(timeout, target.connect()).await;
                barrier.wait().await;
                let mut stream = match connected {
                    Err(_) => return Err("connect-timeout"),
                    Ok(Err(_)) => return Err("connect"),
                    Ok(Ok(stream)) => stream,
                };
                let started = Instant::now();
                let exchange = async {
                    stream.write_all(&payload).await.map_err(|_| "write")?;
                    let mut back = vec![0u8; payload.len()];
                    stream.read_exact(&mut back).await.map_err(|_| "read")?;
                    if back[..] != payload[..] {
                        return Err("corrupt");
                    }
                    Ok(())
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Err(_) => Err("timeout"),
                    Ok(Err(kind)) => Err(kind),
                    Ok(Ok(())) => Ok(started.elapsed()),
                }
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined.context("an echo task panicked")? {
                Ok(elapsed) => {
                    total.ok += 1;
                    let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
                    total.latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
                }
                Err(kind) => total.error(kind, 1),
            }
        }
    }
    let report = EchoReport {
        target: args.target.to_string(),
        connections: args.connections,
        rounds: args.rounds,
        completed: total.ok,
        errors: total.errors,
        latency_us: Latency::of(&total.latency),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} connections x {} rounds: {} completed; latency µs p50 {} p99 {} max {}; errors {:?}",
            report.target,
            report.connections,
            report.rounds,
            report.completed,
            report.latency_us.p50,
            report.latency_us.p99,
            report.latency_us.max,
            report.errors
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct CryptoRow {
    bits: u32,
    keygen_ms_median: f64,
    keygen_ms_all: Vec<f64>,
    open_us_median: f64,
    open_per_s: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn crypto(args: &CryptoArgs) -> Result<()> {
    if args.keygens == 0 || args.keygens > 100 || args.opens == 0 || args.opens > 1_000_000 {
        bail!("--keygens must be 1..=100 and --opens 1..=1000000");
    }
    let mut rng = rand::rng();
    let plaintext = vec![0x5au8; args.size];
    let mut rows = Vec::new();
    for &bits in &args.bits {
        if !matches!(bits, 2048 | 3072 | 4096) {
            bail!("--bits must be 2048, 3072 or 4096");
        }
        let mut keygen = Vec::with_capacity(args.keygens);
        let mut key = None;
        for _ in 0..args.keygens {
            let started = Instant::now();
            let k = rsa::PrivateKey::new(&mut rng, bits as usize).context("RSA keygen")?;
            keygen.push(started.elapsed().as_secs_f64() * 1e3);
            key = Some(k);
        }
        let key = key.ok_or_else(|| anyhow!("no key generated"))?;
        let blob = keystore_cms::seal_for_recipient(&plaintext, &key.to_public_key(), &mut rng)
            .context("sealing")?;
        let mut opens = Vec::with_capacity(args.opens);
        let all = Instant::now();
        for _ in 0..args.opens {
            let started = Instant::now();
            let opened = keystore_cms::open(&blob, &key).context("cms::open")?;
            opens.push(started.elapsed().as_secs_f64() * 1e6);
            if opened.len() != plaintext.len() {
                bail!("cms::open returned {} bytes", opened.len());
            }
        }
        let per_s = args.opens as f64 / all.elapsed().as_secs_f64();
        let keygen_all = keygen.clone();
        rows.push(CryptoRow {
            bits,
            keygen_ms_median: median(&mut keygen),
            keygen_ms_all: keygen_all,
            open_us_median: median(&mut opens),
            open_per_s: per_s,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        for row in &rows {
            println!(
                "RSA-{}: keygen median {:.0} ms ({:?}); cms::open median {:.0} µs, {:.0}/s",
                row.bits,
                row.keygen_ms_median,
                row.keygen_ms_all,
                row.open_us_median,
                row.open_per_s
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let mix = parse_mix("get=90,list=5,status=5").unwrap();
        assert_eq!((mix.get, mix.list, mix.status), (90, 5, 5));
        assert_eq!(mix.pick(0), OpKind::Get);
        assert_eq!(mix.pick(89), OpKind::Get);
        assert_eq!(mix.pick(90), OpKind::List);
        assert_eq!(mix.pick(95), OpKind::Status);
        assert!(parse_mix("get=0").is_err());
        assert!(parse_mix("put=1").is_err());
        assert!(parse_mix("get").is_err());
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
