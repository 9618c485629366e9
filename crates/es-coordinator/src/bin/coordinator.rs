//! `coordinator`: trains the float-underflow network; with no `--workers`, on this machine
//! with in-process workers on all cores (the embedded default); with `--workers N`, as the
//! gRPC coordinator of N remote `worker` processes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use es_coordinator::auth::{ServerTls, Token};
use es_coordinator::checkpoint::{self, Checkpoint};
use es_coordinator::cluster::{self, ClusterOptions};
use es_coordinator::config::{NoiseKind, RunConfig};
use es_coordinator::embedded::{self, Environment};
use es_coordinator::http;
use es_coordinator::monitor::Monitor;
use es_coordinator::progress::{LogWriter, Progress};
use es_data::{mnist, noise_file};
use es_kernel::Kernel;

/// Train an activation-free MNIST network with evolution strategies, where the only
/// nonlinearity is f32 underflow.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Serve gRPC and wait for this many remote workers instead of training in-process.
    /// With --hub: the workers the hub waits for before it joins the root's generations
    /// (default: none, it joins at once and its workers join as they come).
    #[arg(help_heading = "Cluster", long)]
    workers: Option<usize>,
    /// Be a hub of the coordinator at this URI (e.g. http://root:50051) instead of training:
    /// to it, one worker of --hub-threads threads; to the workers that connect to --listen,
    /// their coordinator. The root then serves a few hubs instead of every worker.
    #[arg(
        help_heading = "Cluster",
        long,
        value_name = "URI",
        requires = "hub_threads",
        conflicts_with_all = RUN_SETTINGS
    )]
    hub: Option<String>,
    /// With --hub: the threads of the workers expected behind this hub (the root sizes the
    /// hub's chunks by them).
    #[arg(help_heading = "Cluster", long, value_name = "N", requires = "hub")]
    hub_threads: Option<usize>,
    /// With --hub: hand the θ this hub receives on to other hubs of the run, listening on
    /// this address (e.g. 0.0.0.0:50053): the root then sends θ to --relay-fanout hubs per
    /// generation and the others fetch it from them (as `worker --relay-listen`). A listener
    /// reachable from other machines needs the token.
    #[arg(
        help_heading = "Cluster",
        long,
        value_name = "HOST:PORT",
        requires = "hub"
    )]
    relay_listen: Option<std::net::SocketAddr>,
    /// With --relay-listen: the host other hubs reach it at (default: the address the root
    /// sees this hub at).
    #[arg(
        help_heading = "Cluster",
        long,
        value_name = "HOST",
        requires = "relay_listen"
    )]
    relay_host: Option<String>,
    /// Address to serve on with --workers (default: loopback only). Any other address needs
    /// a token or mutual TLS, or --insecure.
    #[arg(help_heading = "Cluster", long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// The cluster's shared token, required on every call (never logged).
    #[arg(
        help_heading = "Security",
        long,
        env = "UNDERFLOW_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<Token>,
    /// A file holding the shared token (e.g. a mounted secret).
    #[arg(
        help_heading = "Security",
        long,
        env = "UNDERFLOW_TOKEN_FILE",
        value_name = "PATH"
    )]
    token_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate (chain); needs --tls-key.
    #[arg(
        help_heading = "Security",
        long,
        requires = "tls_key",
        value_name = "PEM"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        help_heading = "Security",
        long,
        requires = "tls_cert",
        value_name = "PEM"
    )]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: every worker must present a certificate signed by this PEM CA.
    #[arg(
        help_heading = "Security",
        long,
        requires = "tls_cert",
        value_name = "PEM"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Serve unauthenticated (no token, no mutual TLS) on an address other than loopback.
    #[arg(help_heading = "Security", long)]
    insecure: bool,
    /// Workers joined or working at once; more are refused (FULL).
    #[arg(help_heading = "Cluster", long, default_value_t = 64)]
    max_workers: usize,
    /// Open connections at once; more are closed as they arrive.
    #[arg(help_heading = "Cluster", long, default_value_t = 128)]
    max_connections: usize,
    /// Results (and theta requests) per second one worker may send; more are rejected.
    #[arg(help_heading = "Cluster", long, default_value_t = 1000.0)]
    max_results_per_sec: f64,
    /// Seconds a chunk may take beyond its expected time (measured on the previous
    /// generation) before it is handed to another worker.
    #[arg(help_heading = "Cluster", long, default_value_t = 5.0)]
    lease: f64,
    /// Seconds between worker heartbeats; a worker silent for three is dropped.
    #[arg(help_heading = "Cluster", long, default_value_t = 2.0)]
    heartbeat: f64,
    /// Every K generations the coordinator re-evaluates one result of each worker itself and
    /// quarantines workers that computed other bits (0: no audits).
    #[arg(help_heading = "Cluster", long, default_value_t = 1)]
    audit_every: u32,
    /// Compute the whole update on the coordinator. By default the workers each sum the
    /// noise of a share of θ (with a noise table; the coordinator checks samples of every
    /// share in audited generations) and the coordinator only steps Adam: the same bits.
    #[arg(help_heading = "Cluster", long)]
    local_update: bool,
    /// Send θ's bytes to at most this many workers per generation: the others fetch it from
    /// workers that relay it (worker --relay-listen, or hubs with --relay-listen), each
    /// relaying to at most this many (0: send θ to every worker). Workers that do not relay
    /// get it as before.
    #[arg(help_heading = "Cluster", long, default_value_t = 8, value_name = "K")]
    relay_fanout: usize,
    /// Continue the run in this run directory from its newest checkpoint (or from this
    /// checkpoint file), with the run's own settings.
    #[arg(help_heading = "Checkpoints and resuming", long, conflicts_with_all = RUN_SETTINGS)]
    resume: Option<PathBuf>,
    /// Only ask the coordinator at HOST:PORT whether it serves (gRPC health check) and exit
    /// 0 if it does, 1 if not: a container health check.
    #[arg(help_heading = "Cluster", long, value_name = "HOST:PORT")]
    probe: Option<String>,
    /// Resume from the run directory's newest checkpoint if it has one, else start the run
    /// the flags describe (for restarts by a supervisor: Compose, Kubernetes). The flags
    /// must describe the checkpoint's run.
    #[arg(
        help_heading = "Checkpoints and resuming",
        long,
        conflicts_with = "resume"
    )]
    auto_resume: bool,
    /// Write a checkpoint every K generations (0: never); also on SIGINT/SIGTERM and when
    /// --time-limit stops the run.
    #[arg(help_heading = "Checkpoints and resuming", long)]
    checkpoint_every: Option<u32>,
    /// Print the run settings the other flags resolve to (as the run's config.toml would
    /// hold them) and exit without training.
    #[arg(help_heading = "Run settings", long)]
    print_config: bool,
    /// TOML file with run settings; flags given here override it. Keys it leaves out take
    /// the first release's defaults (so a saved config.toml keeps its meaning); without it,
    /// the run starts from the recommended recipe (RunConfig::recommended).
    #[arg(help_heading = "Run settings", long)]
    config: Option<PathBuf>,
    /// The seed every random choice of the run derives from.
    #[arg(help_heading = "Run settings", long)]
    seed: Option<u64>,
    /// Generations to train (schedules span them).
    #[arg(help_heading = "Run settings", long)]
    generations: Option<u32>,
    /// Stop after this many seconds of training (checked between generations).
    #[arg(help_heading = "Run settings", long)]
    time_limit: Option<f64>,
    /// Mirrored pairs per generation. Given without --layer-populations (and without
    /// --config), every pair perturbs every layer: the recipe's split belongs to its own
    /// population.
    #[arg(help_heading = "Run settings", long)]
    population: Option<usize>,
    /// Training images per generation (at generation 0, with a batch schedule).
    #[arg(help_heading = "Run settings", long)]
    batch: Option<usize>,
    /// Schedule of the batch: constant, linear:FRACTION or cosine:FRACTION (from --batch to
    /// --batch × FRACTION over the run, e.g. linear:4).
    #[arg(help_heading = "Run settings", long)]
    batch_schedule: Option<String>,
    /// Shift each training image of a minibatch by up to this many pixels in x and y, each
    /// image and generation its own shift (0: none). Augments the 60,000 training images.
    #[arg(help_heading = "Run settings", long, value_name = "PIXELS")]
    image_shift: Option<usize>,
    /// Report, evaluate and export a running average of θ instead of θ: after each update
    /// avg += (1 - DECAY)·(θ - avg), an average over about the last 1/(1 - DECAY)
    /// generations (e.g. 0.999: a thousand). 0: θ itself.
    #[arg(help_heading = "Run settings", long, value_name = "DECAY")]
    average_decay: Option<f32>,
    /// Perturbation scale, relative to each layer's init standard deviation.
    #[arg(help_heading = "Run settings", long)]
    sigma: Option<f32>,
    /// Schedule of σ: constant, linear:FRACTION, cosine:FRACTION or step:FACTOR:EVERY.
    #[arg(help_heading = "Run settings", long)]
    sigma_schedule: Option<String>,
    /// Adam's learning rate.
    #[arg(help_heading = "Run settings", long)]
    lr: Option<f32>,
    /// Schedule of the learning rate: constant, linear:FRACTION, cosine:FRACTION or
    /// step:FACTOR:EVERY.
    #[arg(help_heading = "Run settings", long)]
    lr_schedule: Option<String>,
    /// Weight decay added to the gradient estimate (0: none).
    #[arg(help_heading = "Run settings", long)]
    l2: Option<f32>,
    /// Arithmetic: ftz (flush-to-zero everywhere) or seed (OpenAI's TF/cuBLAS).
    #[arg(help_heading = "Run settings", long)]
    mode: Option<String>,
    /// Per-layer multipliers of the He init std, comma-separated (e.g. 1,8,8).
    #[arg(help_heading = "Run settings", long, value_delimiter = ',')]
    init_multipliers: Option<Vec<f32>>,
    /// Per-layer multipliers of σ, comma-separated.
    #[arg(help_heading = "Run settings", long, value_delimiter = ',')]
    sigma_multipliers: Option<Vec<f32>>,
    /// Per-layer multipliers of Adam's step, comma-separated.
    #[arg(help_heading = "Run settings", long, value_delimiter = ',')]
    lr_multipliers: Option<Vec<f32>>,
    /// Mirrored pairs per layer, comma-separated, summing to the population: the first pairs
    /// perturb only layer 1, the next only layer 2, and so on (default: every pair perturbs
    /// every layer).
    #[arg(help_heading = "Run settings", long, value_delimiter = ',')]
    layer_populations: Option<Vec<usize>>,
    /// Per layer, the groups its neurons are split into, comma-separated (with
    /// --layer-populations; each divides its layer's pairs): a pair then perturbs one group's
    /// incoming weights and biases, and costs that share of its layer (default: all 1).
    #[arg(help_heading = "Run settings", long, value_delimiter = ',')]
    neuron_groups: Option<Vec<usize>>,
    /// Per-hidden-layer scale exponents, comma-separated (e.g. 125,125).
    #[arg(help_heading = "Run settings", long, value_delimiter = ',')]
    scale_exponents: Option<Vec<i32>>,
    /// Scale exponent of the logits (a softmax temperature of 2^e).
    #[arg(help_heading = "Run settings", long, allow_hyphen_values = true)]
    output_exponent: Option<i32>,
    /// Noise source: table (shared, cached file) or stream.
    #[arg(help_heading = "Run settings", long, value_enum)]
    noise: Option<NoiseArg>,
    /// Values in the shared noise table.
    #[arg(help_heading = "Run settings", long)]
    noise_table_len: Option<usize>,
    /// Evaluate on the full test set every K generations (0: only at the end).
    #[arg(help_heading = "Run settings", long)]
    eval_every: Option<u32>,
    /// Directory with the MNIST files (downloaded there if missing).
    #[arg(help_heading = "Data and machine", long, env = "UNDERFLOW_DATA")]
    data: Option<PathBuf>,
    /// Base URL to download missing MNIST files from, tried in order (repeatable; default:
    /// the usual public mirrors). `--mirror none` disables downloading.
    #[arg(
        help_heading = "Data and machine",
        long = "mirror",
        env = "UNDERFLOW_MIRRORS",
        value_delimiter = ','
    )]
    mirrors: Vec<String>,
    /// Where config.toml, metrics.jsonl, checkpoints and the final parameters go
    /// (default: runs/latest, or the directory given to --resume).
    #[arg(help_heading = "Data and machine", long)]
    run_dir: Option<PathBuf>,
    /// Directory of the cached noise table.
    #[arg(help_heading = "Data and machine", long, env = "UNDERFLOW_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Evaluator threads (default: all cores).
    #[arg(help_heading = "Data and machine", long)]
    threads: Option<usize>,
    /// Force a kernel: portable, avx2 or avx512 (default: the fastest this CPU runs).
    #[arg(help_heading = "Data and machine", long, env = es_kernel::kernels::KERNEL_ENV)]
    kernel: Option<String>,
    /// Log lines as text (under a live progress line when stderr is a terminal; plain
    /// otherwise) or as JSON objects, one per line. `RUST_LOG` sets the level (default:
    /// info).
    #[arg(
        help_heading = "Monitoring",
        long,
        value_enum,
        default_value = "text",
        env = "UNDERFLOW_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Serve the live dashboard (/) and Prometheus metrics (/metrics) on this address, or
    /// `off`. Default: 127.0.0.1:9464, skipped with a warning if that port is taken; a
    /// port given here that is taken is an error. Read-only and unauthenticated: bind
    /// beyond loopback only on a network you trust.
    #[arg(
        help_heading = "Monitoring",
        long,
        env = "UNDERFLOW_HTTP",
        value_name = "ADDR|off"
    )]
    http: Option<String>,
}

/// Flags that define a run's arithmetic: a resumed run keeps its checkpoint's.
const RUN_SETTINGS: &[&str] = &[
    "config",
    "seed",
    "generations",
    "population",
    "batch",
    "batch_schedule",
    "image_shift",
    "average_decay",
    "sigma",
    "sigma_schedule",
    "lr",
    "lr_schedule",
    "l2",
    "mode",
    "init_multipliers",
    "sigma_multipliers",
    "lr_multipliers",
    "layer_populations",
    "neuron_groups",
    "scale_exponents",
    "output_exponent",
    "noise",
    "noise_table_len",
];

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum NoiseArg {
    Table,
    Stream,
}

impl Cli {
    fn run_config(&self) -> anyhow::Result<RunConfig> {
        let mut c = match &self.config {
            Some(path) => RunConfig::from_file(path)?,
            None => RunConfig::recommended(),
        };
        // The recipe splits its own population over layers and neuron groups; a population
        // given alone replaces the recipe's split with the plain one (every pair perturbs
        // every layer) instead of failing against a split the caller never chose.
        if self.config.is_none() && self.population.is_some() && self.layer_populations.is_none() {
            c.layer_populations.clear();
            c.neuron_groups.clear();
        }
        macro_rules! set {
            ($($field:ident => $target:ident),* $(,)?) => {
                $(if let Some(v) = &self.$field { c.$target = v.clone(); })*
            };
        }
        set!(seed => seed, generations => generations,
             population => population, batch => batch, batch_schedule => batch_schedule, sigma => sigma,
             sigma_schedule => sigma_schedule, lr => lr, lr_schedule => lr_schedule, l2 => l2,
             mode => mode, init_multipliers => init_multipliers,
             scale_exponents => scale_exponents, output_exponent => output_exponent, sigma_multipliers => sigma_multipliers,
             lr_multipliers => lr_multipliers, layer_populations => layer_populations,
             neuron_groups => neuron_groups, image_shift => image_shift,
             average_decay => average_decay,
             noise_table_len => noise_table_len);
        self.set_operational(&mut c);
        if let Some(noise) = self.noise {
            c.noise = match noise {
                NoiseArg::Table => NoiseKind::Table,
                NoiseArg::Stream => NoiseKind::Stream,
            };
        }
        // Resolve now so that a bad value is reported before any data is loaded.
        c.net()?;
        c.es()?;
        Ok(c)
    }

    /// The settings a resumed run may change: they never change θ.
    fn set_operational(&self, c: &mut RunConfig) {
        if let Some(v) = self.time_limit {
            c.time_limit_secs = v;
        }
        if let Some(v) = self.eval_every {
            c.eval_every = v;
        }
        if let Some(v) = self.checkpoint_every {
            c.checkpoint_every = v;
        }
    }

    /// The config and checkpoint to resume from, and the run directory.
    fn resumed(&self) -> anyhow::Result<(RunConfig, Checkpoint, PathBuf)> {
        let target = self.resume.as_ref().expect("called with --resume");
        let (path, checkpoint) = checkpoint::load_for_resume(target)?;
        // A checkpoint file lives in RUN_DIR/checkpoints/.
        let run_dir = match &self.run_dir {
            Some(dir) => dir.clone(),
            None if target.is_file() => path
                .parent()
                .and_then(|p| p.parent())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".")),
            None => target.clone(),
        };
        let mut config = checkpoint.config.clone();
        self.set_operational(&mut config);
        eprintln!(
            "resuming run {} at generation {} from {}",
            checkpoint.run_id,
            checkpoint.state.generation,
            path.display()
        );
        Ok((config, checkpoint, run_dir))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(address) = &cli.probe {
        init_logging(cli.log_format, LogWriter::default());
        return probe(address);
    }
    if cli.print_config {
        print!("{}", cli.run_config()?.to_toml());
        return Ok(());
    }
    let monitor = Monitor::default();
    // The live line only where a person watches text logs; elsewhere the log lines alone.
    let progress = (matches!(cli.log_format, LogFormat::Text) && std::io::stderr().is_terminal())
        .then(|| Progress::start(monitor.clone()));
    init_logging(
        cli.log_format,
        progress
            .as_ref()
            .map_or_else(LogWriter::default, Progress::log_writer),
    );
    if let Some(upstream) = &cli.hub {
        return run_hub(&cli, upstream);
    }
    let result = train(&cli, monitor);
    if let Some(progress) = progress {
        progress.finish();
    }
    let summary = result?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Binds the HTTP port `--http` asks for: `None` when it is off, or when the default port
/// is taken (a run must not fail for want of its dashboard).
fn bind_http(cli: &Cli) -> anyhow::Result<Option<std::net::TcpListener>> {
    match cli.http.as_deref() {
        Some("off") => Ok(None),
        Some(addr) => Ok(Some(http::bind(addr)?)),
        None => match http::bind(http::DEFAULT_ADDR) {
            Ok(listener) => Ok(Some(listener)),
            Err(error) => {
                tracing::warn!(%error, "no dashboard for this run");
                Ok(None)
            }
        },
    }
}

/// The MNIST mirrors `--mirror` names: the usual public ones by default, none for `none`.
fn mirrors(cli: &Cli) -> Vec<String> {
    match cli.mirrors.as_slice() {
        [] => mnist::DEFAULT_MIRRORS
            .iter()
            .map(|m| m.to_string())
            .collect(),
        [none] if none == "none" => Vec::new(),
        given => given.to_vec(),
    }
}

/// Runs the coordinator the flags describe, in the embedded or the cluster mode.
fn train(cli: &Cli, monitor: Monitor) -> anyhow::Result<embedded::RunSummary> {
    let (config, resume, run_dir) = match &cli.resume {
        Some(_) => {
            let (config, checkpoint, run_dir) = cli.resumed()?;
            (config, Some(checkpoint), run_dir)
        }
        None => {
            let config = cli.run_config()?;
            let run_dir = cli
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/latest"));
            let resume = if cli.auto_resume && !checkpoint::list(&run_dir)?.is_empty() {
                let (path, checkpoint) = checkpoint::load_for_resume(&run_dir)?;
                eprintln!(
                    "--auto-resume: resuming run {} at generation {} from {}",
                    checkpoint.run_id,
                    checkpoint.state.generation,
                    path.display()
                );
                Some(checkpoint)
            } else {
                None
            };
            (config, resume, run_dir)
        }
    };
    let kernel = match &cli.kernel {
        Some(name) if !name.is_empty() => name.parse::<Kernel>()?,
        _ => Kernel::detect()?,
    };
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let env = Environment {
        data_dir: cli.data.clone().unwrap_or_else(mnist::default_data_dir),
        mirrors: mirrors(cli),
        cache_dir: cli
            .cache_dir
            .clone()
            .unwrap_or_else(noise_file::default_cache_dir),
        run_dir,
        threads,
        kernel,
        monitor,
    };
    let http = bind_http(cli)?;
    if let Some(workers) = cli.workers {
        return run_cluster(config, env, workers, cli, resume, http);
    }
    if let Some(listener) = http {
        let addr = listener.local_addr()?;
        http::spawn_thread(listener, env.monitor.clone())?;
        http::announce(addr);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    Ok(embedded::run_from(&config, &env, resume, &stop)?)
}

/// Cluster mode: a tokio runtime around `cluster::run` (and the HTTP port, when there is
/// one); SIGINT and SIGTERM stop it between generations.
fn run_cluster(
    config: RunConfig,
    env: Environment,
    workers: usize,
    cli: &Cli,
    resume: Option<Checkpoint>,
    http: Option<std::net::TcpListener>,
) -> anyhow::Result<embedded::RunSummary> {
    let options = ClusterOptions {
        workers: workers.max(1),
        max_workers: cli.max_workers.max(workers),
        ..cluster_options(cli)?
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(listener) = http {
            let addr = listener.local_addr()?;
            let monitor = env.monitor.clone();
            tokio::spawn(async move {
                if let Err(error) = http::serve(listener, monitor, std::future::pending()).await {
                    tracing::error!(%error, "the HTTP server stopped");
                }
            });
            http::announce(addr);
        }
        let listener = tokio::net::TcpListener::bind(&cli.listen)
            .await
            .with_context(|| format!("cannot listen on {}: is another coordinator running there? choose another address with --listen", cli.listen))?;
        let shutdown = Box::pin(stop_signal());
        Ok(cluster::run_from(config, env, options, listener, shutdown, resume).await?)
    })
}

/// The coordinator's side of the cluster flags (security, limits, leases, audits, the
/// spread update, relays), for a root or a hub.
fn cluster_options(cli: &Cli) -> anyhow::Result<ClusterOptions> {
    let seconds = |flag: &str, value: f64| {
        anyhow::ensure!(
            value.is_finite() && value > 0.0,
            "--{flag} {value}: expected a positive number of seconds"
        );
        Ok(Duration::from_secs_f64(value))
    };
    let token = match (&cli.token, &cli.token_file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "the token is given twice (--token or UNDERFLOW_TOKEN, and --token-file): give it once"
        ),
        (Some(token), None) => Some(token.clone()),
        (None, Some(path)) => Some(Token::from_file(path)?),
        (None, None) => None,
    };
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::from_files(
            cert,
            key,
            cli.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    anyhow::ensure!(
        cli.max_results_per_sec.is_finite() && cli.max_results_per_sec >= 1.0,
        "--max-results-per-sec {}: expected at least 1",
        cli.max_results_per_sec
    );
    Ok(ClusterOptions {
        lease: seconds("lease", cli.lease)?,
        heartbeat: seconds("heartbeat", cli.heartbeat)?,
        audit_every: cli.audit_every,
        token,
        tls,
        insecure: cli.insecure,
        max_workers: cli.max_workers,
        max_connections: cli.max_connections.max(1),
        results_per_sec: cli.max_results_per_sec,
        spread_update: !cli.local_update,
        relay_fanout: cli.relay_fanout,
        ..ClusterOptions::default()
    })
}

/// Hub mode: a worker session towards `upstream` whose work is handed on to the workers that
/// connect to `--listen`; SIGINT and SIGTERM stop it.
fn run_hub(cli: &Cli, upstream: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !upstream.starts_with("https://"),
        "--hub {upstream}: a hub reaches its coordinator over plain HTTP/2 in this release (its own workers may use TLS); expected http://HOST:PORT"
    );
    let options = ClusterOptions {
        workers: cli.workers.unwrap_or(0),
        ..cluster_options(cli)?
    };
    let hub_threads = cli.hub_threads.expect("clap requires --hub-threads").max(1);
    let listen: std::net::SocketAddr = cli.listen.parse().with_context(|| {
        format!(
            "--listen {}: a hub listens on an IP address and port, e.g. 0.0.0.0:50052",
            cli.listen
        )
    })?;
    let kernel = match &cli.kernel {
        Some(name) if !name.is_empty() => name.parse::<Kernel>()?,
        _ => Kernel::detect()?,
    };
    let token = options.token.as_ref().map(|t| t.expose().to_owned());
    let hub = cluster::Hub::new(cluster::HubOptions {
        cluster: options,
        listen,
        threads: cli
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    });
    let data = es_worker::DataSource::Dir {
        dir: cli.data.clone().unwrap_or_else(mnist::default_data_dir),
        mirrors: mirrors(cli),
    };
    let mut worker = es_worker::WorkerOptions::new(upstream, data);
    worker.threads = hub_threads;
    worker.kernel = kernel;
    worker.token = token;
    worker.name = format!("hub-{}", es_worker::default_name());
    if let Some(dir) = &cli.cache_dir {
        worker.cache_dir = dir.clone();
    }
    if let Some(listen) = cli.relay_listen {
        worker.relay = Some(
            es_worker::RelayOptions::new(listen, cli.relay_host.clone()).context("--relay-host")?,
        );
    }
    worker.delegate = Some(Arc::new(hub));
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let exit = runtime.block_on(es_worker::run(worker, stop_signal()))?;
    tracing::info!(?exit, "hub stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping on signal");
}

/// Asks the gRPC health service at `address` about the Coordinator service.
fn probe(address: &str) -> anyhow::Result<()> {
    use es_proto::tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(uri.clone())
            .with_context(|| format!("--probe {address}: expected HOST:PORT"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("no coordinator answers at {uri}"))?;
        let service = <es_proto::pb::coordinator_server::CoordinatorServer<()> as tonic::server::NamedService>::NAME;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .with_context(|| format!("health check of {uri} failed"))?
            .into_inner();
        anyhow::ensure!(
            reply.status() == ServingStatus::Serving,
            "{uri} reports {:?} for {service}: expected SERVING",
            reply.status()
        );
        println!("{uri}: {service} is serving");
        Ok(())
    })
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr (stdout is for results) at `RUST_LOG`'s level, default info, through
/// `writer` (which keeps a progress line intact).
fn init_logging(format: LogFormat, writer: LogWriter) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
