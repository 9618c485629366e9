//! Downloading missing MNIST files from mirrors: each one streamed into a hidden temporary
//! file beside its destination, verified, then renamed into place, so that no reader ever
//! sees a partial or unverified file under an MNIST name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::idx::{self, FILES, FileSpec, GZIP_MAGIC};
use super::{DownloadEvent, MirrorFailure, MnistError};

/// Progress events are sent each time this many more bytes have arrived.
const PROGRESS_STEP: u64 = 1 << 20;

/// The largest body accepted. The biggest file is 47 MB uncompressed (some servers decode
/// the gzip on the way), so anything much larger is not an MNIST file.
const MAX_BODY: u64 = 128 << 20;

/// The agent for real downloads. Timeouts bound a stalled mirror without cutting off a slow
/// but live one: connecting, each read, and the whole exchange are limited separately.
/// Proxies are taken from the usual environment variables.
pub(super) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_per_read(Some(Duration::from_secs(30)))
        .timeout_global(Some(Duration::from_secs(15 * 60)))
        .user_agent(concat!("underflow-es-data/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Downloads every MNIST file that [`idx::locate`] does not find in `dir`, trying `mirrors`
/// in order for each.
pub(super) fn fetch_missing(
    agent: &ureq::Agent,
    dir: &Path,
    mirrors: &[&str],
    progress: &mut dyn FnMut(DownloadEvent),
) -> Result<(), MnistError> {
    let missing: Vec<&FileSpec> = FILES
        .iter()
        .filter(|spec| idx::locate(dir, spec).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| MnistError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for spec in missing {
        fetch_file(agent, dir, spec, mirrors, progress)?;
    }
    Ok(())
}

/// Why one attempt failed: the mirror's fault (try the next one) or ours (stop: the next
/// mirror would fail the same way).
enum AttemptError {
    Mirror(String),
    Local(MnistError),
}

fn fetch_file(
    agent: &ureq::Agent,
    dir: &Path,
    spec: &FileSpec,
    mirrors: &[&str],
    progress: &mut dyn FnMut(DownloadEvent),
) -> Result<(), MnistError> {
    let mut attempts = Vec::new();
    for mirror in mirrors {
        let separator = if mirror.ends_with('/') { "" } else { "/" };
        let url = format!("{mirror}{separator}{}.gz", spec.name);
        progress(DownloadEvent::Started {
            file: spec.name,
            url: url.clone(),
        });
        match fetch_from(agent, dir, spec, &url, progress) {
            Ok(()) => {
                progress(DownloadEvent::Finished { file: spec.name });
                return Ok(());
            }
            Err(AttemptError::Local(error)) => return Err(error),
            Err(AttemptError::Mirror(error)) => {
                progress(DownloadEvent::MirrorFailed {
                    file: spec.name,
                    url: url.clone(),
                    error: error.clone(),
                });
                attempts.push(MirrorFailure { url, error });
            }
        }
    }
    Err(MnistError::AllMirrorsFailed {
        file: spec.name,
        dir: dir.to_path_buf(),
        attempts,
    })
}

/// One attempt: download `url` into a temporary file, verify it, rename it into place.
fn fetch_from(
    agent: &ureq::Agent,
    dir: &Path,
    spec: &FileSpec,
    url: &str,
    progress: &mut dyn FnMut(DownloadEvent),
) -> Result<(), AttemptError> {
    let (part, mut file) = PartFile::create(dir, spec.name).map_err(AttemptError::Local)?;
    let response = agent
        .get(url)
        .call()
        .map_err(|e| AttemptError::Mirror(e.to_string()))?;
    // With a Content-Encoding the announced length counts encoded bytes, not the decoded
    // ones we count, so it is no total for a progress bar.
    let encoded = response
        .headers()
        .get("content-encoding")
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let total = if encoded {
        None
    } else {
        response.body().content_length()
    };
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(MAX_BODY)
        .reader();

    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    let mut reported = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(AttemptError::Mirror(format!("reading the response: {e}"))),
        };
        file.write_all(&buf[..n]).map_err(|e| part.local_error(e))?;
        bytes += n as u64;
        if bytes - reported >= PROGRESS_STEP {
            reported = bytes;
            progress(DownloadEvent::Progress {
                file: spec.name,
                bytes,
                total,
            });
        }
    }
    if reported != bytes || bytes == 0 {
        progress(DownloadEvent::Progress {
            file: spec.name,
            bytes,
            total,
        });
    }
    // On disk before the rename, so a crash cannot leave a renamed but empty file.
    file.sync_all().map_err(|e| part.local_error(e))?;
    // Closed before the rename, which some platforms refuse on an open file.
    drop(file);

    idx::read_file(&part.path, spec).map_err(|e| AttemptError::Mirror(e.to_string()))?;

    // Some servers decode the gzip in transit (Content-Encoding); name the file for what it
    // holds so the name does not lie, though the loader goes by content anyway.
    let mut head = [0u8; 2];
    let is_gzip = File::open(&part.path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|()| head == GZIP_MAGIC)
        .map_err(|e| part.local_error(e))?;
    let name = if is_gzip {
        format!("{}.gz", spec.name)
    } else {
        spec.name.to_owned()
    };
    part.persist(&dir.join(name)).map_err(AttemptError::Local)
}

/// A temporary download, deleted on drop unless persisted. Its hidden, unique name never
/// matches an MNIST file, and concurrent downloaders (several workers on one host) each get
/// their own: the last rename wins, with identical verified content.
struct PartFile {
    path: PathBuf,
    keep: bool,
}

impl PartFile {
    fn create(dir: &Path, name: &str) -> Result<(Self, File), MnistError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!(
            ".{name}.gz.part-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| MnistError::Io {
                path: path.clone(),
                source,
            })?;
        Ok((Self { path, keep: false }, file))
    }

    fn local_error(&self, source: io::Error) -> AttemptError {
        AttemptError::Local(MnistError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn persist(mut self, to: &Path) -> Result<(), MnistError> {
        fs::rename(&self.path, to).map_err(|source| MnistError::Io {
            path: to.to_path_buf(),
            source,
        })?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the error that got us here matters more than a failed cleanup.
            let _ = fs::remove_file(&self.path);
        }
    }
}
