//! `worker`: joins an Underflow coordinator and evaluates perturbations for it until the run
//! is over (exit 0), SIGINT/SIGTERM (exit 0), a refusal (exit 2) or another error (exit 1).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use es_data::mnist;
use es_kernel::Kernel;
use es_worker::{Backoff, ClientTls, DataSource, WorkerExit, WorkerOptions};

/// Evaluate evolution-strategies perturbations for an Underflow coordinator.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// The coordinator's address, host:port (or a URI such as http://host:port).
    #[arg(help_heading = "Connection", long, value_name = "HOST:PORT")]
    connect: String,
    /// Evaluator threads (default: all cores).
    #[arg(help_heading = "Evaluation", long)]
    threads: Option<usize>,
    /// Directory with the MNIST files (default: $UNDERFLOW_DATA, else the user cache).
    #[arg(help_heading = "Data", long, env = "UNDERFLOW_DATA")]
    data: Option<PathBuf>,
    /// Base URL to download missing MNIST files from, tried in order (repeatable). Without
    /// it the worker never downloads.
    #[arg(help_heading = "Data", long = "mirror", value_name = "URL")]
    mirrors: Vec<String>,
    /// Directory of the cached noise table, shared by the workers of a host (default:
    /// $UNDERFLOW_CACHE, else the user cache).
    #[arg(help_heading = "Data", long, env = "UNDERFLOW_CACHE")]
    cache_dir: Option<PathBuf>,
    /// A name for the coordinator's logs (default: host name/process id).
    #[arg(help_heading = "Evaluation", long)]
    name: Option<String>,
    /// Force a kernel: portable, avx2 or avx512 (default: the fastest this CPU runs).
    #[arg(help_heading = "Evaluation", long, env = es_kernel::kernels::KERNEL_ENV)]
    kernel: Option<String>,
    /// The cluster's shared token, sent on every call (never logged).
    #[arg(
        help_heading = "Security",
        long,
        env = "UNDERFLOW_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file holding the shared token (e.g. a mounted secret).
    #[arg(
        help_heading = "Security",
        long,
        env = "UNDERFLOW_TOKEN_FILE",
        value_name = "PATH"
    )]
    token_file: Option<PathBuf>,
    /// Speak TLS, trusting only this PEM CA for the coordinator's certificate.
    #[arg(help_heading = "Security", long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: this worker's PEM certificate (needs --tls-key and --tls-ca).
    #[arg(help_heading = "Security", long, requires_all = ["tls_key", "tls_ca"], value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        help_heading = "Security",
        long,
        requires = "tls_cert",
        value_name = "PEM"
    )]
    tls_key: Option<PathBuf>,
    /// The name the coordinator's certificate carries, if not the host of --connect.
    #[arg(
        help_heading = "Security",
        long,
        requires = "tls_ca",
        value_name = "NAME"
    )]
    tls_domain: Option<String>,
    /// Give up when the coordinator stays unreachable this many seconds (default: never).
    #[arg(help_heading = "Connection", long, value_name = "SECONDS")]
    give_up_after: Option<f64>,
    /// Seconds between HTTP/2 keep-alive pings; a connection silent for twice as long is
    /// replaced (detects a vanished coordinator or a cut network).
    #[arg(
        help_heading = "Connection",
        long,
        value_name = "SECONDS",
        default_value_t = 10.0
    )]
    keepalive: f64,
    /// Log lines as text (plain when stderr is not a terminal) or as JSON objects, one per
    /// line. `RUST_LOG` sets the level (default: info).
    #[arg(
        help_heading = "Logging",
        long,
        value_enum,
        default_value = "text",
        env = "UNDERFLOW_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Hand the θ this worker receives on to other workers of the run, listening on this
    /// address (e.g. 0.0.0.0:50052; port 0 picks a free one): the coordinator then sends θ to
    /// a few workers per generation instead of to all (see its --relay-fanout). A listener
    /// reachable from other machines needs the token.
    #[arg(help_heading = "Relay", long, value_name = "HOST:PORT")]
    relay_listen: Option<std::net::SocketAddr>,
    /// The host other workers reach --relay-listen at (default: the address the coordinator
    /// sees this worker at, right on a flat cluster network; set it behind a proxy or NAT).
    #[arg(
        help_heading = "Relay",
        long,
        requires = "relay_listen",
        value_name = "HOST"
    )]
    relay_host: Option<String>,
    /// Load testing only: answer every assigned index with a deterministic fake fitness (a
    /// pure function of generation and index) instead of evaluating it. The golden proof is
    /// still computed honestly; the coordinator must run with --audit-every 0, since its
    /// audit would (rightly) quarantine a worker whose results are fake.
    #[arg(help_heading = "Testing", long)]
    fake_fitness: bool,
    /// Load testing only: open this many worker connections from this one process, each
    /// joining, proving and serving on its own (needs --fake-fitness).
    #[arg(
        help_heading = "Testing",
        long,
        default_value_t = 1,
        requires = "fake_fitness",
        value_name = "N"
    )]
    connections: usize,
}

impl Cli {
    fn options(self) -> anyhow::Result<WorkerOptions> {
        let kernel = match &self.kernel {
            Some(name) if !name.is_empty() => name.parse::<Kernel>()?,
            _ => Kernel::detect()?,
        };
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("--{flag} {}", path.display()))
        };
        let tls = match &self.tls_ca {
            None => None,
            Some(ca) => Some(ClientTls {
                ca_pem: read("tls-ca", ca)?,
                identity: match (&self.tls_cert, &self.tls_key) {
                    (Some(cert), Some(key)) => {
                        Some((read("tls-cert", cert)?, read("tls-key", key)?))
                    }
                    _ => None,
                },
                domain: self.tls_domain.clone(),
            }),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = if self.connect.contains("://") {
            self.connect
        } else {
            format!("{scheme}://{}", self.connect)
        };
        let token = match (self.token.filter(|t| !t.is_empty()), &self.token_file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "the token is given twice (--token or UNDERFLOW_TOKEN, and --token-file): give it once"
            ),
            (Some(token), None) => Some(token),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--token-file {}", path.display()))?;
                Some(text.trim().to_owned()).filter(|t| !t.is_empty())
            }
            (None, None) => None,
        };
        let data = DataSource::Dir {
            dir: self.data.unwrap_or_else(mnist::default_data_dir),
            mirrors: self.mirrors,
        };
        let give_up_after = self
            .give_up_after
            .map(|secs| {
                Duration::try_from_secs_f64(secs).with_context(|| {
                    format!("--give-up-after {secs}: expected a non-negative number of seconds")
                })
            })
            .transpose()?;
        let mut options = WorkerOptions::new(endpoint, data);
        if let Some(threads) = self.threads {
            anyhow::ensure!(threads >= 1, "--threads 0: expected at least 1");
            options.threads = threads;
        }
        // The default (`$UNDERFLOW_CACHE`, else the user cache) is WorkerOptions::new's.
        if let Some(dir) = self.cache_dir {
            options.cache_dir = dir;
        }
        if let Some(name) = self.name {
            options.name = name;
        }
        options.kernel = kernel;
        options.token = token;
        options.tls = tls;
        options.reconnect = Backoff {
            give_up_after,
            ..Backoff::default()
        };
        anyhow::ensure!(
            self.keepalive.is_finite() && self.keepalive > 0.0,
            "--keepalive {}: expected a positive number of seconds",
            self.keepalive
        );
        options.keepalive = Duration::from_secs_f64(self.keepalive);
        options.fake_fitness = self.fake_fitness;
        if let Some(listen) = self.relay_listen {
            anyhow::ensure!(
                self.connections == 1 || listen.port() == 0,
                "--relay-listen {listen} with --connections {}: each connection listens on its own port, so give port 0",
                self.connections
            );
            options.relay = Some(
                es_worker::RelayOptions::new(listen, self.relay_host).context("--relay-host")?,
            );
        }
        Ok(options)
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!(signal = "SIGINT", "signal received"),
        () = terminate => tracing::info!(signal = "SIGTERM", "signal received"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let connections = cli.connections;
    anyhow::ensure!(connections >= 1, "--connections 0: expected at least 1");
    let options = cli.options()?;
    if options.fake_fitness {
        tracing::warn!(
            connections,
            "fake fitnesses: this worker evaluates nothing (load testing only)"
        );
    }
    if connections > 1 {
        return many(options, connections).await;
    }
    tracing::info!(
        endpoint = %options.endpoint,
        tls = options.tls.is_some(),
        token = options.token.is_some(),
        threads = options.threads,
        kernel = %options.kernel,
        cache_dir = %options.cache_dir.display(),
        "starting"
    );
    // Errors of the run are printed as their message alone: it already holds its causes.
    match es_worker::run(options, shutdown_signal()).await {
        Ok(WorkerExit::Finished | WorkerExit::Shutdown) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = %e, "worker stopped");
            eprintln!("error: {e}");
            Ok(ExitCode::from(if e.is_refusal() { 2 } else { 1 }))
        }
    }
}

/// Runs `connections` workers of `options` in this process until all have ended (or
/// SIGINT/SIGTERM): one copy of MNIST, one connection and one session each, named
/// `NAME#i`. Golden proofs run at most one per core at once (each holds copies of θ).
async fn many(mut options: WorkerOptions, connections: usize) -> anyhow::Result<ExitCode> {
    if let DataSource::Dir { dir, mirrors } = &options.data {
        anyhow::ensure!(
            mirrors.is_empty(),
            "--connections loads MNIST once, before connecting: --mirror is not supported with it"
        );
        let dir = dir.clone();
        let data = tokio::task::spawn_blocking(move || mnist::load(&dir))
            .await
            .context("loading mnist")??;
        options.data = DataSource::Loaded(std::sync::Arc::new(data));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    options.proof_permits = Some(std::sync::Arc::new(tokio::sync::Semaphore::new(cores)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let mut options = options.clone();
        options.name = format!("{}#{i}", options.name);
        let mut stopped = stopped.clone();
        tasks.spawn(es_worker::run(options, async move {
            let _ = stopped.wait_for(|&stop| stop).await;
        }));
    }
    tracing::info!(connections, endpoint = %options.endpoint, "started the connections");
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let (mut ended, mut failed, mut refused) = (0usize, 0usize, 0usize);
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a connection's task panicked")? {
            Ok(_) => ended += 1,
            Err(e) => {
                failed += 1;
                refused += usize::from(e.is_refusal());
                if failed <= 3 {
                    tracing::error!(error = %e, "connection stopped");
                }
            }
        }
    }
    signal.abort();
    tracing::info!(ended, failed, "all connections ended");
    if failed > 0 {
        eprintln!("error: {failed} of {connections} connections failed ({refused} refused)");
        return Ok(ExitCode::from(if refused == failed { 2 } else { 1 }));
    }
    Ok(ExitCode::SUCCESS)
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr (stdout is for results) at `RUST_LOG`'s level, default info.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
