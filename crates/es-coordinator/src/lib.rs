//! The Underflow coordinator: holds θ, the optimizer and the run's progress, and drives
//! training: in the embedded single-machine mode (in-process evaluators on all cores) or as
//! the gRPC coordinator of a cluster of stateless workers.
//!
//! - [`auth`]: the shared token on every call, TLS, and no unauthenticated public listener.
//! - [`checkpoint`]: θ, Adam and the run's identity in one digest-sealed file; `--resume`.
//! - [`cluster`]: the gRPC coordinator serving remote workers.
//! - [`config`]: the run's configuration (defaults, TOML file, CLI overrides).
//! - [`embedded`]: the training loop on this machine, writing the run directory.
//! - [`export`]: parameters out of a run: detailed evaluation, safetensors, `.npy` logits.
//! - [`http`]: the HTTP port: live dashboard, its JSON, and Prometheus `/metrics`.
//! - [`limits`]: what one client may cost: connections, message rates and sizes.
//! - [`monitor`]: the live record of a run that the dashboard, `/metrics` and the progress
//!   line read.
//! - [`plot`]: `curves.svg` and `curves.png` from `metrics.jsonl` (no system libraries).
//! - [`progress`]: the live progress line on a terminal, kept intact by the log writer.
//! - [`run_dir`]: `config.toml`, `metrics.jsonl`, `theta.f32`, `summary.json`.
//! - [`scheduler`]: one generation's leases and results (synchronous; the server locks it).
//! - [`sums`]: one generation's spread update: which worker sums the noise of which share of
//!   θ, and what came back (synchronous, like `scheduler`).

use std::path::PathBuf;

pub mod auth;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod embedded;
pub mod export;
pub mod http;
pub mod limits;
pub mod monitor;
pub mod plot;
pub mod progress;
pub mod relays;
pub mod run_dir;
pub mod scheduler;
pub mod sums;

/// Why a run could not start or go on. Each message names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Net(#[from] es_kernel::ConfigError),
    #[error(transparent)]
    Train(#[from] es_core::train::TrainError),
    #[error(transparent)]
    Data(#[from] es_data::mnist::MnistError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(
        "checkpoint {path} was written for MNIST files with digest {expected}: the files in the data directory have digest {found}"
    )]
    ResumeData {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "the run to resume in {path} has other settings than its checkpoint: only the time limit, eval_every and checkpoint_every may change on --resume"
    )]
    ResumeConfig { path: PathBuf },
    #[error("export: {0}")]
    Export(String),
    #[error(transparent)]
    NoiseFile(#[from] es_data::noise_file::NoiseFileError),
    /// The coordinator would serve unauthenticated on an address other machines reach.
    #[error("{0}")]
    Exposed(String),
    #[error("cannot plot: {0}")]
    Plot(String),
    #[error("cannot serve: {0}")]
    Serve(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "parameter file {path} has {bytes} bytes: expected {expected} (the network's parameters as little-endian f32)"
    )]
    ThetaFile {
        path: PathBuf,
        bytes: usize,
        expected: usize,
    },
}
