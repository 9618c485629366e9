//! `underflow`: takes results out of a run. `evaluate` scores a run's final parameters or a
//! checkpoint on the MNIST test set or the training set (accuracy, per-class accuracy,
//! confusion matrix, loss; optionally every image's logits as `.npy`); `export` writes θ as
//! safetensors; `plot` draws a run's training curves into `curves.svg` and `curves.png`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use es_coordinator::export::{self, Parameters};
use es_core::train::Dataset;
use es_data::mnist;
use es_kernel::{Arithmetic, Kernel};

/// Evaluate, export and plot the results of an Underflow run.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Score parameters on the 10,000 MNIST test images (or the 60,000 training images).
    Evaluate {
        /// A run directory (its theta.f32, else its newest checkpoint), a checkpoint file
        /// (.ckpt) or a theta.f32 beside its config.toml.
        run: PathBuf,
        /// Evaluate in another arithmetic than the run's: ftz, seed or ieee (no flushing at
        /// all: the control that shows what the underflow contributes).
        #[arg(long)]
        mode: Option<String>,
        /// Which images: test (the 10,000 held-out ones) or train (the 60,000 ES trained
        /// on, for the train accuracy beside the test accuracy).
        #[arg(long, value_enum, default_value = "test")]
        split: Split,
        /// Also write every image's logits here as a NumPy .npy array [images, 10].
        #[arg(long, value_name = "FILE.npy")]
        logits: Option<PathBuf>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Directory with the MNIST files.
        #[arg(long, env = "UNDERFLOW_DATA")]
        data: Option<PathBuf>,
        /// Force a kernel: portable, avx2 or avx512.
        #[arg(long, env = es_kernel::kernels::KERNEL_ENV)]
        kernel: Option<String>,
    },
    /// Write θ as safetensors: w1, b1, w2, b2, … ([fan_in, fan_out] and [fan_out], f32),
    /// with the arithmetic mode, widths and scale exponents as metadata.
    Export {
        /// A run directory, checkpoint or theta.f32 (as for evaluate).
        run: PathBuf,
        /// The file to write.
        #[arg(long, short, value_name = "FILE.safetensors")]
        out: PathBuf,
    },
    /// Draw the training curves (fitness and accuracy against generations and wall time)
    /// from RUN_DIR/metrics.jsonl into RUN_DIR/curves.svg and RUN_DIR/curves.png; works on a
    /// run that is still going.
    Plot {
        /// The run directory.
        run: PathBuf,
    },
}

/// The MNIST images `evaluate` scores.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    Test,
    Train,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Train => "train",
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Evaluate {
            run,
            mode,
            split,
            logits,
            json,
            data,
            kernel,
        } => evaluate(run, mode, split, logits, json, data, kernel),
        Command::Plot { run } => {
            for path in es_coordinator::plot::write_curves(&run)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Export { run, out } => {
            let Parameters {
                config,
                theta,
                source,
                ..
            } = export::load_parameters(&run)?;
            let net = config.net()?;
            let bytes = export::to_safetensors(&net, &theta)?;
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {} ({} bytes) from {}",
                out.display(),
                bytes.len(),
                source.display()
            );
            Ok(())
        }
    }
}

fn evaluate(
    run: PathBuf,
    mode: Option<String>,
    split: Split,
    logits: Option<PathBuf>,
    json: bool,
    data: Option<PathBuf>,
    kernel: Option<String>,
) -> anyhow::Result<()> {
    let params = export::load_parameters(&run)?;
    let mut net = params.config.net()?;
    if let Some(mode) = mode {
        net.arithmetic = mode.parse::<Arithmetic>()?;
    }
    let kernel = match kernel {
        Some(name) if !name.is_empty() => name.parse::<Kernel>()?,
        _ => Kernel::detect()?,
    };
    let data_dir = data.unwrap_or_else(mnist::default_data_dir);
    let mnist = mnist::load(&data_dir)?;
    let images = match split {
        Split::Test => &mnist.test,
        Split::Train => &mnist.train,
    };
    let data = Dataset {
        images: &images.images,
        labels: &images.labels,
    };
    let report = export::evaluate(&net, kernel, &params.theta, data)?;
    if let Some(path) = &logits {
        let bytes = export::npy_f32(&[report.samples, net.outputs], &report.logits);
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let per_class = report.per_class_accuracy();
    if json {
        let value = serde_json::json!({
            "source": params.source,
            "generation": params.generation,
            "mode": net.arithmetic.name(),
            "split": split.name(),
            "samples": report.samples,
            "accuracy": report.accuracy(),
            "loss": report.loss,
            "per_class_accuracy": per_class,
            "confusion": report.confusion,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "{} ({} arithmetic{}): {} accuracy {:.4}, loss {:.4} on {} images",
        params.source.display(),
        net.arithmetic.name(),
        params
            .generation
            .map(|g| format!(", generation {g}"))
            .unwrap_or_default(),
        split.name(),
        report.accuracy(),
        report.loss,
        report.samples
    );
    println!("\nclass  accuracy   confusion (rows: label, columns: predicted)");
    for (label, row) in report.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:5}")).collect();
        println!("{label:5}  {:8.4}  {}", per_class[label], cells.join(""));
    }
    Ok(())
}
