//! The embedded single-machine default: the coordinator's training loop with in-process
//! evaluators on all cores, no network.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use es_core::noise::NoiseSource;
use es_core::train::{Dataset, EsConfig, EsState, GenerationReport, Trainer};
use es_data::mnist::{self, DownloadEvent, Mnist};
use es_data::noise_file::{Check, NoiseFile, Outcome};
use es_kernel::{Arithmetic, Evaluation, Kernel, NetConfig};
use serde::Serialize;

use crate::RunError;
use crate::checkpoint::{Checkpoint, Checkpointer};
use crate::config::{NoiseKind, RunConfig};
use crate::monitor::{Monitor, Phase, RunInfo};
use crate::run_dir::{MetricsLine, RunDir};

/// Where a run reads and writes, and how much of the machine it uses.
#[derive(Clone, Debug)]
pub struct Environment {
    /// Directory with the MNIST files; they are downloaded there when missing.
    pub data_dir: PathBuf,
    /// Base URLs tried in order for missing MNIST files.
    pub mirrors: Vec<String>,
    /// Directory of the cached noise table.
    pub cache_dir: PathBuf,
    pub run_dir: PathBuf,
    pub threads: usize,
    pub kernel: Kernel,
    /// Where the run reports its progress as it goes (the progress line, the dashboard,
    /// `/metrics`); a default one is read by nobody.
    pub monitor: Monitor,
}

/// Loads MNIST from `env.data_dir`, downloading missing files with progress in the log.
pub fn load_data(env: &Environment) -> Result<Mnist, RunError> {
    let mirrors: Vec<&str> = env.mirrors.iter().map(String::as_str).collect();
    let mut progress = |event: DownloadEvent| match event {
        DownloadEvent::Started { file, url } => tracing::info!(file, url, "downloading"),
        DownloadEvent::Progress { file, bytes, total } => {
            tracing::info!(file, bytes, total, "download progress")
        }
        DownloadEvent::Finished { file } => tracing::info!(file, "downloaded and verified"),
        DownloadEvent::MirrorFailed { file, url, error } => {
            tracing::warn!(file, url, error, "mirror failed, trying the next")
        }
    };
    if mirrors.is_empty() {
        // Downloading disabled: a missing file is reported with how to get it.
        return Ok(mnist::load(&env.data_dir)?);
    }
    Ok(mnist::load_or_download(
        &env.data_dir,
        &mirrors,
        &mut progress,
    )?)
}

/// Opens (or creates, once per host) the noise source the config asks for.
pub fn open_noise(config: &RunConfig, env: &Environment) -> Result<NoiseSource, RunError> {
    Ok(match config.noise {
        NoiseKind::Stream => NoiseSource::Stream,
        NoiseKind::Table => {
            let started = Instant::now();
            let file = NoiseFile::open_or_create(
                &env.cache_dir,
                config.noise_seed,
                config.noise_table_len,
                Check::Quick,
            )?;
            match file.outcome() {
                Outcome::Opened => {}
                Outcome::Created => tracing::info!(
                    path = %file.path().display(),
                    secs = started.elapsed().as_secs_f64(),
                    "generated the noise table"
                ),
                Outcome::Regenerated { reason } => tracing::warn!(
                    path = %file.path().display(),
                    %reason,
                    "replaced a bad noise table file"
                ),
            }
            NoiseSource::Table(file.into_table())
        }
    })
}

/// The end of a run, also written to `summary.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunSummary {
    pub generations: u32,
    pub wall_secs: f64,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// The same final parameters evaluated with no flushing at all (IEEE gradual underflow
    /// everywhere): the control that shows how much accuracy comes from the underflow.
    pub test_accuracy_unflushed: f64,
    pub mode: String,
    pub interrupted: bool,
}

fn test_metrics(e: &Evaluation) -> (f64, f64) {
    (e.accuracy(), -e.fitness)
}

/// A fresh id for a run: its seed and the start time, so that workers can tell two runs of
/// the same seed apart.
pub fn new_run_id(seed: u64) -> String {
    format!(
        "{seed}-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

/// Where a run stands when its loop begins: its id, the optimizer state, the open run
/// directory and its checkpointer.
pub(crate) struct Begun {
    pub run_id: String,
    pub state: EsState,
    pub run_dir: RunDir,
    pub checkpointer: Checkpointer,
}

/// Starts `config` afresh, or continues `resume` after checking that it is the same run on the
/// same data; tells the monitor what the run is (`mode`: embedded or cluster).
pub(crate) fn begin(
    mode: &str,
    config: &RunConfig,
    env: &Environment,
    net: &NetConfig,
    es: &EsConfig,
    data: &Mnist,
    resume: Option<Checkpoint>,
) -> Result<Begun, RunError> {
    let mut earlier = Vec::new();
    let (run_id, state, run_dir) = match resume {
        None => {
            let run_dir = RunDir::create(&env.run_dir)?;
            run_dir.write_file("config.toml", config.to_toml().as_bytes())?;
            (
                new_run_id(config.seed),
                EsState::new(net, es, config.seed),
                run_dir,
            )
        }
        Some(checkpoint) => {
            if checkpoint.data_digest != data.digest {
                return Err(RunError::ResumeData {
                    path: env.run_dir.clone(),
                    expected: hex(&checkpoint.data_digest),
                    found: data.digest_hex(),
                });
            }
            if !config.same_run_as(&checkpoint.config) {
                return Err(RunError::ResumeConfig {
                    path: env.run_dir.clone(),
                });
            }
            let generation = checkpoint.state.generation;
            let (run_dir, dropped) = RunDir::resume(&env.run_dir, generation)?;
            run_dir.write_file("config.toml", config.to_toml().as_bytes())?;
            // The dashboard shows the whole run, not only this resumption.
            earlier = crate::run_dir::read_metrics(&env.run_dir.join("metrics.jsonl"))?;
            tracing::info!(
                run_id = checkpoint.run_id,
                generation,
                dropped_metrics_lines = dropped,
                "resuming from a checkpoint"
            );
            (checkpoint.run_id, checkpoint.state, run_dir)
        }
    };
    let checkpointer = Checkpointer::new(&env.run_dir, &run_id, config, data.digest);
    env.monitor.start(RunInfo {
        run_id: run_id.clone(),
        mode: mode.into(),
        config_toml: config.to_toml(),
        generations: config.generations,
        time_limit_secs: config.time_limit_secs,
        first_generation: state.generation,
    });
    env.monitor.preload(earlier);
    Ok(Begun {
        run_id,
        state,
        run_dir,
        checkpointer,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Trains on this machine until the config's generations or time limit, or `stop`.
pub fn run(
    config: &RunConfig,
    env: &Environment,
    stop: &AtomicBool,
) -> Result<RunSummary, RunError> {
    run_from(config, env, None, stop)
}

/// Like [`run`], continuing from `resume` when given; `config` must be the checkpoint's
/// (operational settings aside, see [`RunConfig::same_run_as`]). Writes a checkpoint every
/// `config.checkpoint_every` generations and when `stop` or the time limit ends the run early.
pub fn run_from(
    config: &RunConfig,
    env: &Environment,
    resume: Option<Checkpoint>,
    stop: &AtomicBool,
) -> Result<RunSummary, RunError> {
    let net = config.net()?;
    let es = config.es()?;
    let data = load_data(env)?;
    tracing::info!(digest = %data.digest_hex(), "mnist loaded");
    let noise = open_noise(config, env)?;
    let Begun {
        state,
        mut run_dir,
        checkpointer,
        ..
    } = begin("embedded", config, env, &net, &es, &data, resume)?;
    let train = Dataset {
        images: &data.train.images,
        labels: &data.train.labels,
    };
    let test = Dataset {
        images: &data.test.images,
        labels: &data.test.labels,
    };

    let mut trainer = Trainer::resume(
        net.clone(),
        es,
        config.seed,
        noise,
        env.kernel,
        env.threads,
        state,
    )?;
    tracing::info!(
        mode = %net.arithmetic,
        kernel = %env.kernel,
        threads = env.threads,
        population = config.population,
        batch = config.batch,
        run_dir = %env.run_dir.display(),
        "training"
    );
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut last_test: Option<Evaluation> = None;
    let mut interrupted = false;
    let mut pairs_done = 0u64;
    while trainer.state().generation < config.generations {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            tracing::info!(
                generation = trainer.state().generation,
                "stopping on signal"
            );
            break;
        }
        if config.time_limit_secs > 0.0 && started.elapsed().as_secs_f64() >= config.time_limit_secs
        {
            tracing::info!(
                generation = trainer.state().generation,
                "time limit reached"
            );
            break;
        }
        let gen_started = Instant::now();
        let report = trainer.step(train)?;
        let gen_secs = gen_started.elapsed().as_secs_f64();
        let done = trainer.state().generation;
        let evaluate = config.eval_every > 0 && done.is_multiple_of(config.eval_every);
        let test_eval = if evaluate {
            Some(trainer.evaluate(test)?)
        } else {
            None
        };
        if let Some(e) = test_eval {
            last_test = Some(e);
        }
        let line = metrics_line(&report, started, gen_secs, env.threads, test_eval);
        run_dir.append_metrics(&line)?;
        pairs_done += report.evaluations as u64 / 2;
        // The embedded run's one "worker" is this machine's evaluator pool.
        env.monitor.workers([(
            0,
            "in-process (this machine)".to_string(),
            env.threads as u32,
            pairs_done,
        )]);
        env.monitor.generation(&line, report.evaluations as u64);
        if checkpointer.due(done) {
            checkpointer.save(trainer.state())?;
        }
        if evaluate || last_log.elapsed().as_secs_f64() >= 5.0 {
            last_log = Instant::now();
            tracing::info!(
                generation = done,
                wall_secs = format!("{:.1}", line.wall_secs),
                fitness_mean = format!("{:.4}", line.fitness_mean),
                batch_accuracy = format!("{:.3}", line.batch_accuracy),
                evals_per_sec = format!("{:.0}", line.evals_per_sec),
                test_accuracy = last_test.map(|e| format!("{:.4}", e.accuracy())),
                "generation"
            );
        }
    }
    env.monitor.set_phase(Phase::Finished);
    if checkpointer.due_at_stop(trainer.state().generation) {
        checkpointer.save(trainer.state())?;
    }
    // The run's result: θ, or its running average when the run keeps one.
    let theta = trainer.state().model().to_vec();
    run_dir.write_theta("theta.f32", &theta)?;
    let final_test = trainer.evaluate(test)?;
    let unflushed = evaluate_with(&net, Arithmetic::Ieee, env, &theta, test)?;
    let (test_accuracy, test_loss) = test_metrics(&final_test);
    let summary = RunSummary {
        generations: trainer.state().generation,
        wall_secs: started.elapsed().as_secs_f64(),
        test_accuracy,
        test_loss,
        test_accuracy_unflushed: unflushed.accuracy(),
        mode: net.arithmetic.name().into(),
        interrupted,
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
    run_dir.write_file("summary.json", json.as_bytes())?;
    write_plots(&env.run_dir);
    tracing::info!(
        generations = summary.generations,
        test_accuracy = summary.test_accuracy,
        test_accuracy_unflushed = summary.test_accuracy_unflushed,
        run_dir = %env.run_dir.display(),
        "run finished"
    );
    Ok(summary)
}

/// Draws `curves.svg` and `curves.png` into the run directory. A plot that fails is logged,
/// never fatal: the run's results are already written.
pub(crate) fn write_plots(run_dir: &std::path::Path) {
    match crate::plot::write_curves(run_dir) {
        Ok([svg, png]) => {
            tracing::info!(svg = %svg.display(), png = %png.display(), "plotted the curves")
        }
        Err(error) => tracing::warn!(%error, "no plot of the curves"),
    }
}

/// Evaluates `theta` on `data` in another arithmetic (e.g. the unflushed control).
pub fn evaluate_with(
    net: &NetConfig,
    arithmetic: Arithmetic,
    env: &Environment,
    theta: &[f32],
    data: Dataset<'_>,
) -> Result<Evaluation, RunError> {
    let net = NetConfig {
        arithmetic,
        ..net.clone()
    };
    let mut pool = es_core::train::EvalPool::new(&net, env.kernel, env.threads)?;
    data.validate(&net)?;
    Ok(pool.evaluate_dataset(theta, data))
}

pub(crate) fn metrics_line(
    report: &GenerationReport,
    started: Instant,
    gen_secs: f64,
    workers: usize,
    test: Option<Evaluation>,
) -> MetricsLine {
    MetricsLine {
        generation: report.generation,
        wall_secs: started.elapsed().as_secs_f64(),
        fitness_mean: report.fitness_mean,
        fitness_max: report.fitness_max,
        batch_accuracy: report.batch_accuracy,
        evals_per_sec: report.evaluations as f64 / gen_secs.max(1e-9),
        workers,
        grad_norm: report.update.grad_norm,
        theta_norm: report.update.theta_norm,
        lr: report.update.lr,
        update_secs: report.update_secs,
        test_accuracy: test.map(|e| e.accuracy()),
        test_loss: test.map(|e| -e.fitness),
        wire_bytes_sent: None,
        wire_bytes_received: None,
        reassigned: None,
        rejected_messages: None,
        quarantined: None,
        collect_secs: None,
        cpu_secs: None,
        sums_delivered: None,
        sums_local: None,
        theta_relayed: None,
        theta_requested: None,
    }
}
