//! Shared helpers of Underflow's end-to-end tests: where the test data is, scratch
//! directories, small run configurations that finish in seconds, real processes
//! ([`processes`]), a TCP proxy that can blackhole a link ([`proxy`]) and a worker made of
//! bare protocol messages ([`raw_worker`]).

pub mod processes;
pub mod proxy;
pub mod raw_worker;

use std::path::PathBuf;

use es_coordinator::config::RunConfig;
use es_coordinator::embedded::Environment;
use es_kernel::Kernel;

/// The MNIST copy the tests read: `$UNDERFLOW_TEST_MNIST`, else `$UNDERFLOW_DATA`, else
/// `../shared/data/mnist` beside the checkout (where CI puts it). Tests never download.
pub fn mnist_dir() -> PathBuf {
    for var in ["UNDERFLOW_TEST_MNIST", "UNDERFLOW_DATA"] {
        if let Some(dir) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/mnist"
    ))
}

/// A fresh scratch directory, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "underflow-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    /// Removes the directory, unless the test failed and `UNDERFLOW_KEEP_SCRATCH` is set (to
    /// read its logs).
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("UNDERFLOW_KEEP_SCRATCH").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A run small enough for a test: 16 pairs, 64 images, a 4 Mi-value noise table.
pub fn small_run(generations: u32) -> RunConfig {
    RunConfig {
        generations,
        population: 16,
        batch: 64,
        eval_every: 5,
        noise_table_len: 1 << 22,
        ..RunConfig::default()
    }
}

/// An environment in `scratch` reading the test MNIST copy, never downloading.
pub fn environment(scratch: &Scratch, run: &str, threads: usize) -> Environment {
    Environment {
        data_dir: mnist_dir(),
        mirrors: Vec::new(),
        cache_dir: scratch.path().join("cache"),
        run_dir: scratch.path().join(run),
        threads,
        kernel: Kernel::detect().expect("a usable kernel"),
        monitor: Default::default(),
    }
}

/// Where cargo put this workspace's binaries: beside the test executable's `deps` folder.
/// `cargo test --workspace` builds `coordinator` and `worker` there because their packages
/// have integration tests of their own.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --bin {name}`, which `cargo test --workspace` does)",
        path.display()
    );
    path
}
