//! MNIST for the trainer: reads the four IDX files (raw or gzipped) from a directory,
//! verifies each against its published sha256, and downloads missing ones from mirrors.
//!
//! We read IDX ourselves instead of using the `mnist` crate: it panics on missing or corrupt
//! files and cannot read gzip.
//!
//! Every file is checked in the order that gives the most useful error: IDX magic, then
//! dimensions, then length (so a cut-short file says "truncated", not just "digest
//! mismatch"), then label range, then the sha256 of its uncompressed bytes. The digests are
//! the contract: two processes that loaded MNIST through this module hold the same bytes,
//! which [`Mnist::digest`] summarises for the cluster's join check.

mod download;
mod idx;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use idx::{FILES, FileSpec, Verified};

/// Width and height of an MNIST image in pixels.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image, one byte each (0 = background, 255 = ink).
pub const IMAGE_LEN: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Number of images in the training split.
pub const TRAIN_LEN: usize = 60_000;
/// Number of images in the test split.
pub const TEST_LEN: usize = 10_000;

/// Public mirrors of the canonical gzipped IDX files, tried in order. Each is a base URL
/// ending in `/`; the file's name plus `.gz` is appended.
pub const DEFAULT_MIRRORS: &[&str] = &[
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// One split of MNIST: images and their labels, in file order.
#[derive(Clone, PartialEq, Eq)]
pub struct Split {
    /// `len() * IMAGE_LEN` pixels, row-major, one image after another.
    pub images: Vec<u8>,
    /// One label per image, each in `0..=9`.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of images (and labels).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `IMAGE_LEN` pixels of image `i`. Panics if `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_LEN..(i + 1) * IMAGE_LEN]
    }
}

// Printing 47 MB of pixels helps nobody; show the shape instead.
impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// The whole verified data set.
#[derive(Clone, PartialEq, Eq)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
    /// sha256 over the four files' uncompressed sha256 digests in the order train-images,
    /// train-labels, t10k-images, t10k-labels
    pub digest: [u8; 32],
}

impl Mnist {
    /// [`Mnist::digest`] as 64 lower-case hex digits.
    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }
}

impl fmt::Debug for Mnist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mnist")
            .field("train", &self.train)
            .field("test", &self.test)
            .field("digest", &self.digest_hex())
            .finish()
    }
}

/// What [`load_or_download`] is doing, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadEvent {
    /// A request for `file` (an IDX file name without `.gz`) is about to go to `url`.
    Started { file: &'static str, url: String },
    /// `bytes` of the response body have arrived; `total` is its announced length, if any.
    /// Sent about every MiB and once at the end.
    Progress {
        file: &'static str,
        bytes: u64,
        total: Option<u64>,
    },
    /// `file` was downloaded, verified and moved to its final name.
    Finished { file: &'static str },
    /// `url` did not deliver a valid `file`; nothing of it was kept and the next mirror is
    /// tried.
    MirrorFailed {
        file: &'static str,
        url: String,
        error: String,
    },
}

/// One mirror's failure to deliver a file, as listed by [`MnistError::AllMirrorsFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorFailure {
    pub url: String,
    pub error: String,
}

/// Why MNIST could not be loaded. Every message names the file and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum MnistError {
    #[error(
        "mnist file {name} not found in {dir} (looked for {name} and {name}.gz): \
         load_or_download fetches missing files from the public mirrors, \
         or set UNDERFLOW_DATA or --data to a directory containing the four mnist files"
    )]
    Missing { name: &'static str, dir: PathBuf },

    #[error("mnist file {path} is truncated: expected {expected} bytes, found {found}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error("mnist file {path} is too long: expected {expected} bytes, found {found}")]
    TooLong {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error(
        "mnist file {path} has idx magic {found} ({found:#010x}), \
         expected {expected} ({expected:#010x})"
    )]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error("mnist file {path} has dimensions {found}, expected {expected}")]
    BadShape {
        path: PathBuf,
        found: String,
        expected: String,
    },

    #[error("mnist file {path} has label {value} at index {index}, expected 0..=9")]
    BadLabel {
        path: PathBuf,
        index: usize,
        value: u8,
    },

    #[error("mnist file {path} is not valid gzip (corrupt or cut short): {source}")]
    BadGzip { path: PathBuf, source: io::Error },

    #[error(
        "mnist file {path} has sha256 {actual} (uncompressed), expected {expected}: \
         the file is corrupt or not the published one"
    )]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error("could not download mnist file {file} into {dir}: {}", list_failures(.attempts))]
    AllMirrorsFailed {
        file: &'static str,
        dir: PathBuf,
        attempts: Vec<MirrorFailure>,
    },
}

fn list_failures(attempts: &[MirrorFailure]) -> String {
    if attempts.is_empty() {
        return "no mirror was given".to_owned();
    }
    let listed: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.url, a.error))
        .collect();
    format!("every mirror failed ({})", listed.join("; "))
}

/// Loads and verifies MNIST from `dir`, without touching the network.
///
/// Each of the four IDX files may be raw or gzipped (`<name>` or `<name>.gz`; the raw one
/// wins when both exist). Gzip is recognised by its magic bytes, whatever the name says.
/// Takes about 0.15 s for the gzipped set (the four files are read on parallel threads).
///
/// # Errors
///
/// [`MnistError::Missing`] if a file is in neither form; otherwise the first problem found,
/// in file order: I/O, bad gzip, bad magic or shape, wrong length, a label above 9, or a
/// digest mismatch.
pub fn load(dir: &Path) -> Result<Mnist, MnistError> {
    // Find all four before reading any, so a missing file is reported at once instead of
    // after decompressing the others.
    let [p0, p1, p2, p3] = FILES
        .each_ref()
        .map(|spec| idx::locate(dir, spec).ok_or_else(|| missing(dir, spec)));
    let paths = [p0?, p1?, p2?, p3?];
    // The files are independent and decompressing + hashing is CPU-bound: one thread each.
    // Errors are reported in file order, so the same bad directory always gives the same
    // message.
    let [r0, r1, r2, r3] = std::thread::scope(|scope| {
        let paths = &paths;
        let handles: [_; 4] =
            std::array::from_fn(|i| scope.spawn(move || idx::read_file(&paths[i], &FILES[i])));
        handles.map(|h| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    });
    Ok(assemble([r0?, r1?, r2?, r3?]))
}

/// Like [`load`], but first downloads every missing file from `mirrors` (tried in order,
/// see [`DEFAULT_MIRRORS`]) into `dir`, creating it if needed. A download is verified
/// before it is moved to its final name, so `dir` never holds a partial or unverified file
/// under an MNIST name. Files already present are not re-downloaded, even when corrupt:
/// their error is returned so that a human looks at them.
///
/// # Errors
///
/// [`MnistError::AllMirrorsFailed`] for the first file no mirror delivered intact (each
/// mirror's failure is also reported through `progress` as it happens),
/// [`MnistError::Io`] if `dir` or a file in it cannot be written, and any error of [`load`].
pub fn load_or_download(
    dir: &Path,
    mirrors: &[&str],
    progress: &mut dyn FnMut(DownloadEvent),
) -> Result<Mnist, MnistError> {
    download::fetch_missing(&download::agent(), dir, mirrors, progress)?;
    load(dir)
}

/// Where MNIST is kept by default: `$UNDERFLOW_DATA` if set, else
/// `$XDG_CACHE_HOME/underflow/mnist`, else `$HOME/.cache/underflow/mnist`, else (no home at
/// all) `underflow/mnist` under the system's temporary directory.
pub fn default_data_dir() -> PathBuf {
    data_dir_from(
        std::env::var_os("UNDERFLOW_DATA"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`default_data_dir`] as a pure function of the three variables, so tests need not
/// mutate the process environment.
fn data_dir_from(
    underflow_data: Option<std::ffi::OsString>,
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    let set = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(underflow_data) {
        return dir;
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(cache) = set(xdg_cache_home).filter(|p| p.is_absolute()) {
        return cache.join("underflow").join("mnist");
    }
    if let Some(home) = set(home) {
        return home.join(".cache").join("underflow").join("mnist");
    }
    std::env::temp_dir().join("underflow").join("mnist")
}

fn missing(dir: &Path, spec: &FileSpec) -> MnistError {
    MnistError::Missing {
        name: spec.name,
        dir: dir.to_path_buf(),
    }
}

/// Builds the splits from the four verified files, in [`FILES`] order.
fn assemble(verified: [Verified; 4]) -> Mnist {
    let mut hasher = Sha256::new();
    for v in &verified {
        hasher.update(v.sha256);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    let [train_images, train_labels, test_images, test_labels] = verified.map(|v| v.payload);
    Mnist {
        train: Split {
            images: train_images,
            labels: train_labels,
        },
        test: Split {
            images: test_images,
            labels: test_labels,
        },
        digest,
    }
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}
