//! The run directory: `config.toml`, `metrics.jsonl` (one line per generation), the final
//! parameters `theta.f32` and `summary.json`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RunError;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine {
    pub generation: u32,
    /// Seconds since the run (or this resumption) started.
    pub wall_secs: f64,
    pub fitness_mean: f64,
    pub fitness_max: f64,
    /// Mean accuracy of the perturbed networks on the generation's minibatch.
    pub batch_accuracy: f64,
    pub evals_per_sec: f64,
    /// Evaluator threads (embedded) or connected workers (cluster).
    pub workers: usize,
    pub grad_norm: f64,
    pub theta_norm: f64,
    pub lr: f32,
    /// Seconds the update (and a due checkpoint, in the cluster) took.
    #[serde(default)]
    pub update_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Protobuf payload bytes the coordinator sent to workers this generation (cluster only;
    /// HTTP/2 and TLS framing not included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes_sent: Option<u64>,
    /// Protobuf payload bytes received from workers this generation (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes_received: Option<u64>,
    /// Evaluations handed out a second time this generation after a worker was lost or late
    /// (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reassigned: Option<u32>,
    /// Worker messages (or results within them) refused this generation (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_messages: Option<u64>,
    /// Workers quarantined this generation for results the coordinator computes otherwise
    /// (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<u64>,
    /// Seconds from announcing the generation until its last result and check were in
    /// (cluster only): broadcast, the workers' evaluation, bookkeeping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collect_secs: Option<f64>,
    /// CPU seconds the coordinator process used during the generation, all its threads
    /// (cluster only, where the OS reports it): its own cost apart from the workers' time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_secs: Option<f64>,
    /// Ranges of θ whose noise sums workers delivered for the update, and ranges the
    /// coordinator summed itself (no worker could, one was lost or late, or an audit found
    /// wrong sums) (cluster only, with a spread update).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sums_delivered: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sums_local: Option<u32>,
    /// Workers told to fetch this generation's θ from another worker's relay instead of
    /// being sent its bytes (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theta_relayed: Option<u32>,
    /// `ThetaRequest`s answered with θ's bytes this generation: workers that lost their θ, or
    /// whose fetch from a relay failed (cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theta_requested: Option<u32>,
}

/// Writes into one run directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    metrics: BufWriter<File>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_owned(),
        source,
    }
}

impl RunDir {
    /// Creates the directory (and parents) and opens `metrics.jsonl` for appending.
    pub fn create(path: &Path) -> Result<RunDir, RunError> {
        fs::create_dir_all(path).map_err(io_error(path))?;
        let metrics_path = path.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io_error(&metrics_path))?;
        Ok(RunDir {
            path: path.to_owned(),
            metrics: BufWriter::new(file),
        })
    }

    /// Opens the directory of a run resumed at `generation`: lines of `metrics.jsonl` for
    /// generations at or past it (written after the checkpoint, before a crash) are dropped,
    /// since the resumed run writes them again. Lines that do not parse are dropped too (a
    /// crash can cut the last one short). Returns the directory and the lines dropped.
    pub fn resume(path: &Path, generation: u32) -> Result<(RunDir, usize), RunError> {
        fs::create_dir_all(path).map_err(io_error(path))?;
        let metrics_path = path.join("metrics.jsonl");
        let text = match fs::read_to_string(&metrics_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(RunError::Io {
                    path: metrics_path,
                    source,
                });
            }
        };
        let mut kept = String::new();
        let mut dropped = 0;
        for line in text.lines() {
            let before = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("generation").and_then(|g| g.as_u64()))
                .is_some_and(|g| g < u64::from(generation));
            if before {
                kept.push_str(line);
                kept.push('\n');
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            write_atomic(path, "metrics.jsonl", kept.as_bytes())?;
        }
        RunDir::create(path).map(|run| (run, dropped))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` atomically: a temporary file, fsync, rename.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), RunError> {
        write_atomic(&self.path, name, bytes)
    }

    /// Appends one line to `metrics.jsonl` and flushes it, so a crash loses at most the line
    /// being written.
    pub fn append_metrics(&mut self, line: &MetricsLine) -> Result<(), RunError> {
        let path = self.path.join("metrics.jsonl");
        let json = serde_json::to_string(line).expect("metrics always serialise");
        writeln!(self.metrics, "{json}").map_err(io_error(&path))?;
        self.metrics.flush().map_err(io_error(&path))
    }

    /// Saves θ as little-endian f32 in the layout of DESIGN.md §1.
    pub fn write_theta(&self, name: &str, theta: &[f32]) -> Result<(), RunError> {
        let bytes: Vec<u8> = theta.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write_file(name, &bytes)
    }
}

/// Reads `metrics.jsonl`, skipping a line cut short by a crash.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>, RunError> {
    let text = std::fs::read_to_string(path).map_err(|source| RunError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Writes `dir/name` atomically: a temporary file, fsync, rename.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), RunError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    fs::rename(&tmp, &target).map_err(io_error(&target))
}

/// Reads a θ file written by [`RunDir::write_theta`], checking its length.
pub fn read_theta(path: &Path, expected_len: usize) -> Result<Vec<f32>, RunError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    if bytes.len() != expected_len * 4 {
        return Err(RunError::ThetaFile {
            path: path.to_owned(),
            bytes: bytes.len(),
            expected: expected_len * 4,
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A metrics line for generation `generation` at `wall_secs`.
    pub(crate) fn line(generation: u32, wall_secs: f64) -> MetricsLine {
        MetricsLine {
            generation,
            wall_secs,
            fitness_mean: -2.0 + f64::from(generation) * 0.01,
            fitness_max: -1.5 + f64::from(generation) * 0.01,
            batch_accuracy: 0.1 + f64::from(generation) * 0.001,
            evals_per_sec: 100.0,
            workers: 2,
            grad_norm: 0.1,
            theta_norm: 80.0,
            lr: 0.01,
            update_secs: 0.05,
            test_accuracy: None,
            test_loss: None,
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

    #[test]
    fn theta_round_trips_and_metrics_append() {
        let dir = std::env::temp_dir().join(format!("underflow-rundir-{}", std::process::id()));
        let mut run = RunDir::create(&dir).unwrap();
        let theta = vec![1.5f32, -0.0, f32::MIN_POSITIVE];
        run.write_theta("theta.f32", &theta).unwrap();
        let back = read_theta(&dir.join("theta.f32"), 3).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            theta.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let err = read_theta(&dir.join("theta.f32"), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("12 bytes") && err.contains("expected 16"),
            "{err}"
        );
        let line = line(0, 1.0);
        run.append_metrics(&line).unwrap();
        run.append_metrics(&MetricsLine {
            generation: 1,
            test_accuracy: Some(0.9),
            ..line
        })
        .unwrap();
        let text = fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(!lines[0].contains("test_accuracy") && lines[1].contains("\"test_accuracy\":0.9"));
        for generation in 2..5 {
            run.append_metrics(&MetricsLine { generation, ..line })
                .unwrap();
        }
        drop(run);
        // A crash cut the last line short.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.join("metrics.jsonl"))
            .unwrap();
        write!(file, "{{\"generation\":5,\"wall").unwrap();
        drop(file);
        let (mut run, dropped) = RunDir::resume(&dir, 3).unwrap();
        assert_eq!(dropped, 3, "generations 3, 4 and the cut line");
        run.append_metrics(&MetricsLine {
            generation: 3,
            ..line
        })
        .unwrap();
        let text = fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let generations: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["generation"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(generations, [0, 1, 2, 3]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
