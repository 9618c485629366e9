//! Checkpoints: everything a coordinator needs to continue a run exactly — θ, Adam's moments
//! and step, the generation, the run's config and id, and the data digest — in one file
//! sealed by a SHA-256 digest.
//!
//! Layout (all integers and floats little-endian):
//!
//! | bytes            | content                                                  |
//! |------------------|----------------------------------------------------------|
//! | 8                | magic `UFCKPT01`                                         |
//! | 4                | header length `h` (u32)                                  |
//! | h                | header: JSON ([`Header`])                                |
//! | 12 · dim         | θ, then Adam's m, then Adam's v (f32 each)               |
//! | 4 · dim          | only when the config keeps an average: θ̄ (f32)           |
//! | 32               | SHA-256 of every byte before it                          |
//!
//! Files are `checkpoints/g00000040.ckpt` in the run directory, written atomically
//! (temporary file, fsync, rename, fsync of the directory); the newest [`KEEP`] are kept, so a
//! checkpoint found corrupt on resume still has a good predecessor beside it.
//!
//! [`decode`] checks the digest before it trusts a single length, and every length against
//! the bytes actually there before it allocates: a truncated, corrupted or hostile file is an
//! error, never a panic or a huge allocation.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use es_core::optimizer::Adam;
use es_core::train::EsState;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::RunConfig;

const MAGIC: &[u8; 8] = b"UFCKPT01";
const DIGEST_LEN: usize = 32;
/// Headers are a few hundred bytes; anything near this is not a checkpoint of ours.
const MAX_HEADER: usize = 1 << 20;
/// Checkpoints kept in the run directory.
pub const KEEP: usize = 2;
/// The checkpoints' directory inside a run directory.
pub const DIR: &str = "checkpoints";

/// The self-description at the start of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The run's id: workers of the run rejoin a resumed coordinator under it.
    pub run_id: String,
    /// Generations done: the next one to run.
    pub generation: u32,
    /// Adam's steps taken.
    pub adam_steps: u64,
    /// Parameters in θ (and in each Adam moment).
    pub dim: usize,
    /// SHA-256 of the MNIST files the run trains on, hex.
    pub data_digest: String,
    /// The run's config as TOML (the same text as the run directory's `config.toml`).
    pub config: String,
}

/// A decoded checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub run_id: String,
    pub config: RunConfig,
    pub data_digest: [u8; 32],
    pub state: EsState,
}

/// Why a checkpoint could not be read or written. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("i/o error on checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "no checkpoint in {dir}: expected files like {DIR}/g00000040.ckpt written by a run with checkpoint_every > 0"
    )]
    NoneFound { dir: PathBuf },
    #[error(
        "newest checkpoint {newest} is unusable ({reason}); the previous checkpoint {previous} verifies: resume from it with --resume {previous}"
    )]
    NewestCorrupt {
        newest: PathBuf,
        reason: String,
        previous: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Encodes a checkpoint of `state` for the run `run_id` with `config`.
pub fn encode(
    run_id: &str,
    config: &RunConfig,
    data_digest: &[u8; 32],
    state: &EsState,
) -> Vec<u8> {
    let dim = state.theta.len();
    assert!(
        state.adam.m.len() == dim && state.adam.v.len() == dim,
        "Adam's moments have θ's length"
    );
    assert!(
        state.average.is_empty() || state.average.len() == dim,
        "the running average has θ's length"
    );
    let header = Header {
        run_id: run_id.to_owned(),
        generation: state.generation,
        adam_steps: state.adam.t,
        dim,
        data_digest: hex(data_digest),
        config: config.to_toml(),
    };
    let header = serde_json::to_vec(&header).expect("the header serialises");
    let mut bytes = Vec::with_capacity(8 + 4 + header.len() + 16 * dim + DIGEST_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    for values in [&state.theta, &state.adam.m, &state.adam.v, &state.average] {
        bytes.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    }
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    bytes
}

/// Decodes and verifies a checkpoint; `path` only names it in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let minimum = MAGIC.len() + 4 + DIGEST_LEN;
    if bytes.len() < minimum {
        return Err(corrupt(format!(
            "{} bytes: expected at least {minimum} (truncated?)",
            bytes.len()
        )));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt(format!(
            "starts with {:?}: expected the magic {:?}",
            String::from_utf8_lossy(&bytes[..MAGIC.len()]),
            String::from_utf8_lossy(MAGIC)
        )));
    }
    let (body, stored) = bytes.split_at(bytes.len() - DIGEST_LEN);
    let actual = Sha256::digest(body);
    if actual.as_slice() != stored {
        return Err(corrupt(format!(
            "SHA-256 of its contents is {}, the digest it ends with is {}: truncated or damaged",
            hex(&actual),
            hex(stored)
        )));
    }
    let header_len = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let rest = &body[12..];
    if header_len > MAX_HEADER || header_len > rest.len() {
        return Err(corrupt(format!(
            "header length {header_len}: expected at most {}",
            MAX_HEADER.min(rest.len())
        )));
    }
    let (header, payload) = rest.split_at(header_len);
    let header: Header = serde_json::from_slice(header)
        .map_err(|e| corrupt(format!("header is not the expected JSON: {e}")))?;
    let config = RunConfig::from_toml(&header.config)
        .map_err(|e| corrupt(format!("its config does not parse: {e}")))?;
    let es = config
        .es()
        .map_err(|e| corrupt(format!("its config is invalid: {e}")))?;
    // θ, Adam's two moments, and the running average if the run keeps one.
    let vectors = if es.average_decay > 0.0 { 4 } else { 3 };
    let expected = header.dim.checked_mul(4 * vectors);
    if expected != Some(payload.len()) {
        return Err(corrupt(format!(
            "{} payload bytes: expected {} × dim = {} × {}",
            payload.len(),
            4 * vectors,
            4 * vectors,
            header.dim
        )));
    }
    let data_digest = unhex(&header.data_digest).ok_or_else(|| {
        corrupt(format!(
            "data digest {:?} is not 64 hex digits",
            header.data_digest
        ))
    })?;
    let floats = |part: &[u8]| -> Vec<f32> {
        part.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (theta, moments) = payload.split_at(4 * header.dim);
    let (m, rest) = moments.split_at(4 * header.dim);
    let (v, average) = rest.split_at(4 * header.dim);
    let state = EsState {
        generation: header.generation,
        theta: floats(theta),
        adam: Adam {
            config: es.adam,
            m: floats(m),
            v: floats(v),
            t: header.adam_steps,
        },
        average: floats(average),
    };
    Ok(Checkpoint {
        run_id: header.run_id,
        config,
        data_digest,
        state,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The file name of generation `generation`'s checkpoint.
pub fn file_name(generation: u32) -> String {
    format!("g{generation:08}.ckpt")
}

/// Writes `bytes` as the checkpoint of `generation` in `run_dir` atomically and removes all
/// but the newest [`KEEP`] checkpoints. Returns the file's path.
pub fn write(run_dir: &Path, generation: u32, bytes: &[u8]) -> Result<PathBuf, CheckpointError> {
    let dir = run_dir.join(DIR);
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let target = dir.join(file_name(generation));
    let tmp = dir.join(format!(".{}.tmp", file_name(generation)));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, &target).map_err(io(&target))?;
    // The rename is durable only once the directory entry is.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;
    let all = list(run_dir)?;
    for old in all.iter().rev().skip(KEEP) {
        fs::remove_file(old).map_err(io(old))?;
    }
    Ok(target)
}

/// The checkpoints in `run_dir`, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let dir = run_dir.join(DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CheckpointError::Io { path: dir, source }),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(&dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('g') && name.ends_with(".ckpt") {
            found.push(path);
        }
    }
    // Zero-padded generations: name order is generation order.
    found.sort();
    Ok(found)
}

/// Reads and verifies one checkpoint file.
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    decode(path, &bytes)
}

/// The checkpoint to resume from: `target` itself if it is a file, else the newest checkpoint
/// of the run directory `target`. A corrupt newest checkpoint is refused, naming the
/// previous one that verifies (never silently skipped: resuming from an older generation
/// is the user's call).
pub fn load_for_resume(target: &Path) -> Result<(PathBuf, Checkpoint), CheckpointError> {
    if target.is_file() {
        return Ok((target.to_owned(), read(target)?));
    }
    let all = list(target)?;
    let Some(newest) = all.last() else {
        return Err(CheckpointError::NoneFound {
            dir: target.to_owned(),
        });
    };
    match read(newest) {
        Ok(checkpoint) => Ok((newest.clone(), checkpoint)),
        Err(error) => {
            let reason = match &error {
                CheckpointError::Corrupt { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            match all.iter().rev().skip(1).find(|p| read(p).is_ok()) {
                Some(previous) => Err(CheckpointError::NewestCorrupt {
                    newest: newest.clone(),
                    reason,
                    previous: previous.clone(),
                }),
                None => Err(error),
            }
        }
    }
}

/// Writes one run's checkpoints: every `config.checkpoint_every` generations and on request
/// (a stop signal).
#[derive(Clone, Debug)]
pub struct Checkpointer {
    run_dir: PathBuf,
    run_id: String,
    config: RunConfig,
    data_digest: [u8; 32],
}

impl Checkpointer {
    pub fn new(
        run_dir: &Path,
        run_id: &str,
        config: &RunConfig,
        data_digest: [u8; 32],
    ) -> Checkpointer {
        Checkpointer {
            run_dir: run_dir.to_owned(),
            run_id: run_id.to_owned(),
            config: config.clone(),
            data_digest,
        }
    }

    /// Whether checkpoints are written at all.
    pub fn enabled(&self) -> bool {
        self.config.checkpoint_every > 0
    }

    /// Whether a run that stops with `generations_done` done must leave a checkpoint: it
    /// stopped early (a signal, or its time limit), so that `--resume` continues from where
    /// it stopped rather than from its last periodic checkpoint.
    pub fn due_at_stop(&self, generations_done: u32) -> bool {
        self.enabled() && generations_done < self.config.generations
    }

    /// Whether a checkpoint is due now that `generations_done` are done.
    pub fn due(&self, generations_done: u32) -> bool {
        self.enabled()
            && generations_done > 0
            && generations_done.is_multiple_of(self.config.checkpoint_every)
    }

    /// Writes the checkpoint of `state` and logs where and how long it took.
    pub fn save(&self, state: &EsState) -> Result<PathBuf, CheckpointError> {
        let started = std::time::Instant::now();
        let bytes = encode(&self.run_id, &self.config, &self.data_digest, state);
        let path = write(&self.run_dir, state.generation, &bytes)?;
        tracing::info!(
            generation = state.generation,
            path = %path.display(),
            bytes = bytes.len(),
            ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            "checkpoint written"
        );
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_core::train::EsConfig;

    fn state(dim: usize) -> EsState {
        let es = EsConfig::default();
        let mut adam = Adam::new(es.adam, dim);
        for i in 0..dim {
            adam.m[i] = i as f32 * 0.5 - 3.0;
            adam.v[i] = f32::from_bits(i as u32 + 1); // denormals survive bit for bit
        }
        adam.t = 41;
        EsState {
            generation: 41,
            theta: (0..dim).map(|i| (i as f32).sin()).collect(),
            adam,
            average: Vec::new(),
        }
    }

    fn sample() -> (RunConfig, [u8; 32], EsState, Vec<u8>) {
        let config = RunConfig::default();
        let digest = [7u8; 32];
        let state = state(37);
        let bytes = encode("run-1", &config, &digest, &state);
        (config, digest, state, bytes)
    }

    #[test]
    fn round_trips_bit_for_bit() {
        let (config, digest, state, bytes) = sample();
        let back = decode(Path::new("x"), &bytes).unwrap();
        assert_eq!(back.run_id, "run-1");
        assert_eq!(back.config, config);
        assert_eq!(back.data_digest, digest);
        assert_eq!(back.state.generation, 41);
        assert_eq!(back.state.adam.t, 41);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.state.theta), bits(&state.theta));
        assert_eq!(bits(&back.state.adam.m), bits(&state.adam.m));
        assert_eq!(bits(&back.state.adam.v), bits(&state.adam.v));
    }

    #[test]
    fn a_running_average_round_trips_and_its_absence_is_refused() {
        let config = RunConfig {
            average_decay: 0.99,
            ..RunConfig::default()
        };
        let digest = [7u8; 32];
        let mut state = state(37);
        state.average = (0..37).map(|i| (i as f32).cos()).collect();
        let bytes = encode("run-1", &config, &digest, &state);
        let back = decode(Path::new("x"), &bytes).unwrap();
        assert_eq!(back.config.average_decay, 0.99);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.state.average), bits(&state.average));
        assert_eq!(bits(&back.state.theta), bits(&state.theta));
        assert_eq!(back.state.model(), &state.average[..]);
        // A config that keeps an average with a payload that does not carry one.
        state.average.clear();
        let bytes = encode("run-1", &config, &digest, &state);
        let e = decode(Path::new("t.ckpt"), &bytes).unwrap_err();
        assert!(e.to_string().contains("expected 16 × dim"), "{e}");
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let (_, _, _, bytes) = sample();
        for len in 0..bytes.len() {
            let e = decode(Path::new("t.ckpt"), &bytes[..len]).unwrap_err();
            assert!(e.to_string().contains("t.ckpt is corrupt"), "{e}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                decode(Path::new("t"), &bad).is_err(),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn a_resealed_lying_header_is_refused_without_allocating_its_claims() {
        let (_, _, _, bytes) = sample();
        let reseal = |mut body: Vec<u8>| {
            let digest = Sha256::digest(&body);
            body.extend_from_slice(&digest);
            body
        };
        // A header length past the end.
        let mut body = bytes[..bytes.len() - DIGEST_LEN].to_vec();
        body[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = decode(Path::new("t"), &reseal(body)).unwrap_err();
        assert!(e.to_string().contains("header length"), "{e}");
        // A dim that does not match the payload, in a well-formed header.
        let header_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let mut header: Header = serde_json::from_slice(&bytes[12..12 + header_len]).unwrap();
        header.dim = usize::MAX / 4;
        let header = serde_json::to_vec(&header).unwrap();
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&(header.len() as u32).to_le_bytes());
        body.extend_from_slice(&header);
        body.extend_from_slice(&bytes[12 + header_len..bytes.len() - DIGEST_LEN]);
        let e = decode(Path::new("t"), &reseal(body)).unwrap_err();
        assert!(e.to_string().contains("payload bytes"), "{e}");
    }

    #[test]
    fn files_are_written_atomically_pruned_and_a_corrupt_newest_names_its_predecessor() {
        let dir = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (config, digest, mut state, _) = sample();
        for generation in [10, 20, 30] {
            state.generation = generation;
            write(&dir, generation, &encode("r", &config, &digest, &state)).unwrap();
        }
        let names: Vec<String> = list(&dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["g00000020.ckpt", "g00000030.ckpt"]);
        let (path, checkpoint) = load_for_resume(&dir).unwrap();
        assert!(path.ends_with("g00000030.ckpt"));
        assert_eq!(checkpoint.state.generation, 30);

        // Truncate the newest: resume refuses it and names the good one.
        let newest = dir.join(DIR).join("g00000030.ckpt");
        let len = fs::metadata(&newest).unwrap().len();
        File::options()
            .write(true)
            .open(&newest)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let e = load_for_resume(&dir).unwrap_err().to_string();
        assert!(e.contains("g00000030.ckpt is unusable"), "{e}");
        assert!(
            e.contains("--resume") && e.contains("g00000020.ckpt"),
            "{e}"
        );
        // Naming the previous one resumes from it.
        let previous = dir.join(DIR).join("g00000020.ckpt");
        assert_eq!(load_for_resume(&previous).unwrap().1.state.generation, 20);
        let empty = dir.join("none");
        assert!(matches!(
            load_for_resume(&empty),
            Err(CheckpointError::NoneFound { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
