//! `worker`: joins an Underflow coordinator and evaluates perturbations for it until the run
//! is over (exit 0), SIGINT/SIGTERM (exit 0), a refusal (exit 2) or another error (exit 1).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use es_data::mnist;
use es_kernel::Kernel;
use es_worker::{Backoff, DataSource, WorkerExit, WorkerOptions};

/// Evaluate evolution-strategies perturbations for an Underflow coordinator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The coordinator's address, host:port (or a URI such as http://host:port).
    #[arg(long, value_name = "HOST:PORT")]
    connect: String,
    /// Evaluator threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Directory with the MNIST files (default: $UNDERFLOW_DATA, else the user cache).
    #[arg(long, env = "UNDERFLOW_DATA")]
    data: Option<PathBuf>,
    /// Base URL to download missing MNIST files from, tried in order (repeatable). Without
    /// it the worker never downloads.
    #[arg(long = "mirror", value_name = "URL")]
    mirrors: Vec<String>,
    /// Directory of the cached noise table, shared by the workers of a host (default:
    /// $UNDERFLOW_CACHE, else the user cache).
    #[arg(long, env = "UNDERFLOW_CACHE")]
    cache_dir: Option<PathBuf>,
    /// A name for the coordinator's logs (default: host name/process id).
    #[arg(long)]
    name: Option<String>,
    /// Force a kernel: portable, avx2 or avx512 (default: the fastest this CPU runs).
    #[arg(long, env = es_kernel::kernels::KERNEL_ENV)]
    kernel: Option<String>,
    /// The cluster's shared token, sent on every call.
    #[arg(long, env = "UNDERFLOW_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Give up when the coordinator stays unreachable this many seconds (default: never).
    #[arg(long, value_name = "SECONDS")]
    give_up_after: Option<f64>,
    /// Seconds between HTTP/2 keep-alive pings; a connection silent for twice as long is
    /// replaced (detects a vanished coordinator or a cut network).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    keepalive: f64,
}

impl Cli {
    fn options(self) -> anyhow::Result<WorkerOptions> {
        let kernel = match &self.kernel {
            Some(name) if !name.is_empty() => name.parse::<Kernel>()?,
            _ => Kernel::detect()?,
        };
        let endpoint = if self.connect.contains("://") {
            self.connect
        } else {
            format!("http://{}", self.connect)
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
        options.token = self.token.filter(|t| !t.is_empty());
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let options = Cli::parse().options()?;
    tracing::info!(
        endpoint = %options.endpoint,
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
