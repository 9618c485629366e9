//! The shared noise table cached as a file: generated once per host, then mapped read-only
//! by every process that needs it, so N workers on one machine hold one copy in the page
//! cache instead of N private ones.
//!
//! # Format (version 1)
//!
//! The file `noise-s{noise_seed}-n{len}.f32` in the cache directory holds a 64-byte header
//! and then the `len` table values as `f32` little-endian, so the data starts 64-byte aligned
//! in a page-aligned mapping and can be read as `&[f32]` in place:
//!
//! | bytes   | field |
//! |---------|-------|
//! | 0..8    | magic `b"UFNOISE\0"` |
//! | 8..12   | format version, `u32` LE (1) |
//! | 12..16  | data offset, `u32` LE (64) |
//! | 16..24  | `noise_seed`, `u64` LE |
//! | 24..32  | `len`, number of values, `u64` LE |
//! | 32..64  | sha256 of the data bytes |
//!
//! The format version also stands for the generator: [`es_core::noise::NoiseTable::generate`]
//! producing other values for the same seed (new sampler, chunking or ChaCha) must bump it.
//!
//! # What is checked when
//!
//! - Every open: all header fields against the requested seed and length, the file length,
//!   and [`NoiseTable::spot_check`] (the first values of the first and last chunk
//!   regenerated and compared, which also catches a generator change that forgot to bump
//!   the version). This costs tens of microseconds, independent of the table size.
//! - With [`Check::Full`] or [`NoiseFile::verify`]: the sha256 of all data against the
//!   header, about 0.2 s for the default 256 MiB table with SHA extensions (longer without).
//! - At creation the digest is computed while writing, so a fresh file is right by
//!   construction.
//!
//! # Concurrency
//!
//! A file is written under a temporary name in the same directory, synced, then renamed over
//! the final name, so readers only ever see complete files. Concurrent creators each write
//! their own temporary file and the last rename wins; both results are valid and identical.
//! A process that mapped an older file keeps that inode alive until it unmaps it.

use std::env;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use es_core::noise::{MAX_TABLE_LEN, NoiseError, NoiseTable};
use memmap2::Mmap;
use sha2::{Digest, Sha256};

/// The file magic, bytes 0..8 of the header.
pub const MAGIC: [u8; 8] = *b"UFNOISE\0";
/// The format version this module reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Header length and data offset in bytes: a multiple of 64, so the data keeps the mapping's
/// page alignment for any SIMD width.
pub const HEADER_LEN: usize = 64;

/// Values converted to bytes per write or hash call: 1 MiB of bytes, large enough that
/// call overhead vanishes, small enough to stay in cache.
const IO_BLOCK_VALUES: usize = 1 << 18;

/// Temporary files older than this are left over from a creator that died; they are
/// removed when the next file is created. A live creator needs seconds, not an hour.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// How much of an existing file [`NoiseFile::open`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Header fields, file length and the spot check: tens of microseconds.
    Quick,
    /// Also the sha256 of all data: reads the whole file.
    Full,
}

/// What [`NoiseFile::open_or_create`] found in the cache.
#[derive(Debug)]
pub enum Outcome {
    /// A valid file was there and is mapped.
    Opened,
    /// There was no file; one was generated and written.
    Created,
    /// The file there was rejected for `reason` and replaced by a new one.
    Regenerated {
        /// Why the existing file was rejected.
        reason: NoiseFileError,
    },
}

/// Why a noise file could not be opened or created. Each message names the file and what
/// was expected of it.
#[derive(Debug, thiserror::Error)]
pub enum NoiseFileError {
    /// An operating-system call failed.
    #[error("i/o error while {action} {path}: {source}")]
    Io {
        /// What was being done, as a gerund ("opening", "writing", …).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is shorter or longer than its header and data must be.
    #[error(
        "noise file {path} is {found} bytes long, expected {expected} \
         (a {HEADER_LEN}-byte header and {len} f32 values)"
    )]
    WrongLength {
        /// The file.
        path: PathBuf,
        /// Number of table values requested.
        len: usize,
        /// Required file length in bytes.
        expected: u64,
        /// Actual file length in bytes.
        found: u64,
    },
    /// A header field does not hold what the request or the format requires.
    #[error("noise file {path} has header {field} {found}, expected {expected}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// The header field.
        field: &'static str,
        /// What the field must hold.
        expected: String,
        /// What it holds.
        found: String,
    },
    /// The data's sha256 differs from the one in the header: the data was damaged.
    #[error(
        "noise file {path} has data sha256 {found}, expected {expected} from its header: \
         the file is corrupt"
    )]
    DigestMismatch {
        /// The file.
        path: PathBuf,
        /// The digest recorded in the header, hex.
        expected: String,
        /// The digest of the data, hex.
        found: String,
    },
    /// The values differ from what the seed generates (spot check).
    #[error("noise file {path} does not hold the table its header names: {source}")]
    WrongValues {
        /// The file.
        path: PathBuf,
        /// The first differing value.
        source: NoiseError,
    },
    /// The requested length is beyond what the table's chunk indices can address.
    #[error("noise table length {len} is too large, expected at most {MAX_TABLE_LEN} values")]
    TooLong {
        /// The requested length.
        len: usize,
    },
}

impl NoiseFileError {
    /// Whether the error says the file's content is wrong (so replacing it helps), as
    /// opposed to the file being unreachable or the request being impossible.
    fn is_bad_content(&self) -> bool {
        matches!(
            self,
            Self::WrongLength { .. }
                | Self::BadHeader { .. }
                | Self::DigestMismatch { .. }
                | Self::WrongValues { .. }
        )
    }
}

/// A noise table held by a cache file, with the file's recorded digest for [`verify`].
///
/// [`verify`]: NoiseFile::verify
#[derive(Debug)]
pub struct NoiseFile {
    path: PathBuf,
    table: Arc<NoiseTable>,
    digest: [u8; 32],
    outcome: Outcome,
}

/// The table for `(noise_seed, len)` from `cache_dir`, created there if missing and replaced
/// if corrupt, with the quick checks (see the module docs); the file's fate is dropped, use
/// [`NoiseFile::open_or_create`] to learn it.
pub fn open_or_create(
    cache_dir: &Path,
    noise_seed: u64,
    len: usize,
) -> Result<Arc<NoiseTable>, NoiseFileError> {
    Ok(NoiseFile::open_or_create(cache_dir, noise_seed, len, Check::Quick)?.into_table())
}

/// The cache directory: `$UNDERFLOW_CACHE`, else `$XDG_CACHE_HOME/underflow` (if absolute,
/// as the XDG spec requires), else `$HOME/.cache/underflow`, else `underflow` in the system
/// temporary directory. Empty variables count as unset.
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(|name| env::var_os(name))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("UNDERFLOW_CACHE") {
        dir
    } else if let Some(dir) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        dir.join("underflow")
    } else if let Some(home) = var("HOME") {
        home.join(".cache").join("underflow")
    } else {
        env::temp_dir().join("underflow")
    }
}

/// The cache file name for `(noise_seed, len)`.
#[must_use]
pub fn file_name(noise_seed: u64, len: usize) -> String {
    format!("noise-s{noise_seed}-n{len}.f32")
}

impl NoiseFile {
    /// Opens the file at `path`, which must hold the table for `(noise_seed, len)`, and maps
    /// it read-only. Checks what `check` says (see the module docs).
    pub fn open(
        path: &Path,
        noise_seed: u64,
        len: usize,
        check: Check,
    ) -> Result<Self, NoiseFileError> {
        let expected_len = file_len_for(len)?;
        let mut file = File::open(path).map_err(io_error("opening", path))?;
        let found = file
            .metadata()
            .map_err(io_error("reading the metadata of", path))?
            .len();
        let wrong_length = || NoiseFileError::WrongLength {
            path: path.to_owned(),
            len,
            expected: expected_len,
            found,
        };
        // A short file is reported by its length, not by whatever half-header it holds.
        if found < HEADER_LEN as u64 {
            return Err(wrong_length());
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header)
            .map_err(io_error("reading the header of", path))?;
        let digest = check_header(&header, path, noise_seed, len)?;
        if found != expected_len {
            return Err(wrong_length());
        }
        let values = load_values(&file, path, len)?;
        let table = NoiseTable::from_storage(noise_seed, values);
        table
            .spot_check()
            .map_err(|source| NoiseFileError::WrongValues {
                path: path.to_owned(),
                source,
            })?;
        let noise_file = Self {
            path: path.to_owned(),
            table: Arc::new(table),
            digest,
            outcome: Outcome::Opened,
        };
        if check == Check::Full {
            noise_file.verify()?;
        }
        Ok(noise_file)
    }

    /// The table for `(noise_seed, len)` from its file in `cache_dir`: opened if present and
    /// sound under `check`, else generated (on the current rayon pool) and written, then
    /// mapped. [`NoiseFile::outcome`] tells which. A file rejected for its content is
    /// replaced; an i/o error (e.g. permissions) is returned as is.
    pub fn open_or_create(
        cache_dir: &Path,
        noise_seed: u64,
        len: usize,
        check: Check,
    ) -> Result<Self, NoiseFileError> {
        let path = cache_dir.join(file_name(noise_seed, len));
        let reason = match Self::open(&path, noise_seed, len, check) {
            Ok(opened) => return Ok(opened),
            Err(NoiseFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(e) if e.is_bad_content() => Some(e),
            Err(e) => return Err(e),
        };
        let mut created = Self::create(cache_dir, noise_seed, len)?;
        created.outcome = match reason {
            Some(reason) => Outcome::Regenerated { reason },
            None => Outcome::Created,
        };
        Ok(created)
    }

    /// Generates the table, writes it atomically to its cache file in `cache_dir` (replacing
    /// any file there) and maps the written file.
    fn create(cache_dir: &Path, noise_seed: u64, len: usize) -> Result<Self, NoiseFileError> {
        file_len_for(len)?;
        fs::create_dir_all(cache_dir).map_err(io_error("creating the directory", cache_dir))?;
        let name = file_name(noise_seed, len);
        let path = cache_dir.join(&name);
        remove_stale_temps(cache_dir, &name);

        let generated = NoiseTable::generate(noise_seed, len);
        let (temp_path, mut file) = create_temp(cache_dir, &name)?;
        let temp = TempGuard(Some(temp_path));
        let temp_path = temp.path();

        // Header last: the digest is computed while the data is written.
        file.write_all(&[0u8; HEADER_LEN])
            .map_err(io_error("writing", temp_path))?;
        let mut hasher = Sha256::new();
        let mut bytes = Vec::with_capacity(IO_BLOCK_VALUES * 4);
        for block in generated.as_slice().chunks(IO_BLOCK_VALUES) {
            le_bytes(block, &mut bytes);
            hasher.update(&bytes);
            file.write_all(&bytes)
                .map_err(io_error("writing", temp_path))?;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header_bytes(noise_seed, len, &digest)))
            .map_err(io_error("writing the header of", temp_path))?;
        file.sync_all().map_err(io_error("syncing", temp_path))?;
        drop(generated);

        fs::rename(temp_path, &path).map_err(io_error("renaming into place", &path))?;
        temp.disarm();
        // Make the rename itself durable. Best effort: if it is lost in a crash, the next
        // open finds no file (or the old one) and creates it again.
        if let Ok(dir) = File::open(cache_dir) {
            let _ = dir.sync_all();
        }

        // Map our own handle, not the path: another creator may rename its (identical) file
        // over ours meanwhile, and what we wrote and hashed is what we should hand out.
        let values = load_values(&file, &path, len)?;
        Ok(Self {
            path,
            table: Arc::new(NoiseTable::from_storage(noise_seed, values)),
            digest,
            outcome: Outcome::Created,
        })
    }

    /// Hashes all data and compares it with the digest recorded in the header. Reads the
    /// whole table (about 0.2 s for 256 MiB with SHA extensions).
    pub fn verify(&self) -> Result<(), NoiseFileError> {
        let mut hasher = Sha256::new();
        let mut bytes = Vec::with_capacity(IO_BLOCK_VALUES * 4);
        for block in self.table.as_slice().chunks(IO_BLOCK_VALUES) {
            le_bytes(block, &mut bytes);
            hasher.update(&bytes);
        }
        let found: [u8; 32] = hasher.finalize().into();
        if found == self.digest {
            Ok(())
        } else {
            Err(NoiseFileError::DigestMismatch {
                path: self.path.clone(),
                expected: hex(&self.digest),
                found: hex(&found),
            })
        }
    }

    /// The table.
    #[must_use]
    pub fn table(&self) -> &Arc<NoiseTable> {
        &self.table
    }

    /// The table, keeping the mapping alive for as long as it is shared.
    #[must_use]
    pub fn into_table(self) -> Arc<NoiseTable> {
        self.table
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened, created or regenerated.
    #[must_use]
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }
}

/// The file length for `len` values, or `TooLong` if the table could not be generated.
fn file_len_for(len: usize) -> Result<u64, NoiseFileError> {
    if len > MAX_TABLE_LEN {
        return Err(NoiseFileError::TooLong { len });
    }
    // len <= 2^44, so this cannot overflow.
    Ok(HEADER_LEN as u64 + 4 * len as u64)
}

fn header_bytes(noise_seed: u64, len: usize, digest: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&noise_seed.to_le_bytes());
    h[24..32].copy_from_slice(&(len as u64).to_le_bytes());
    h[32..64].copy_from_slice(digest);
    h
}

/// Checks every header field against the request and returns the recorded digest.
fn check_header(
    h: &[u8; HEADER_LEN],
    path: &Path,
    noise_seed: u64,
    len: usize,
) -> Result<[u8; 32], NoiseFileError> {
    let bad = |field, expected: String, found: String| NoiseFileError::BadHeader {
        path: path.to_owned(),
        field,
        expected,
        found,
    };
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if h[0..8] != MAGIC {
        return Err(bad(
            "magic",
            format!("\"{}\"", MAGIC.escape_ascii()),
            format!("\"{}\"", h[0..8].escape_ascii()),
        ));
    }
    let checks: [(&'static str, u64, u64); 4] = [
        ("format version", FORMAT_VERSION.into(), u32_at(8).into()),
        ("data offset", HEADER_LEN as u64, u32_at(12).into()),
        ("noise seed", noise_seed, u64_at(16)),
        ("length", len as u64, u64_at(24)),
    ];
    for (field, expected, found) in checks {
        if expected != found {
            return Err(bad(field, expected.to_string(), found.to_string()));
        }
    }
    Ok(h[32..64].try_into().expect("32 bytes"))
}

/// The file's values as table storage: mapped in place where the host's layout matches the
/// file's (little-endian, aligned), else read into memory.
fn load_values(
    file: &File,
    path: &Path,
    len: usize,
) -> Result<Box<dyn AsRef<[f32]> + Send + Sync>, NoiseFileError> {
    // SAFETY: the mapping is read-only and this module never writes a file after renaming it
    // into place: regeneration renames a new inode over the name, which leaves this mapping
    // on the old one intact. Only a process outside this module could change the file under
    // us: writing into it in place would change the values we read (detected by
    // `NoiseFile::verify`); truncating it would make reads past the new end fault with
    // SIGBUS and kill the process rather than return wrong values. The cache directory
    // belongs to the user running Underflow; we accept that risk, as every mmap user must.
    let map = unsafe { Mmap::map(file) }.map_err(io_error("mapping", path))?;
    match MappedValues::new(map, len) {
        Ok(mapped) => Ok(Box::new(mapped)),
        Err(map) => {
            // Big-endian host (or a mapping we cannot reinterpret): decode a private copy.
            let bytes = map.get(HEADER_LEN..HEADER_LEN + 4 * len).ok_or_else(|| {
                NoiseFileError::WrongLength {
                    path: path.to_owned(),
                    len,
                    expected: HEADER_LEN as u64 + 4 * len as u64,
                    found: map.len() as u64,
                }
            })?;
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Ok(Box::new(values))
        }
    }
}

/// The data part of a mapped noise file, viewed as `f32` in place.
struct MappedValues {
    map: Mmap,
    len: usize,
}

impl MappedValues {
    /// Wraps `map` if its data part can be read as `len` native `f32` values: the host is
    /// little-endian like the file, the data is aligned for `f32` and the mapping is long
    /// enough. Otherwise gives the mapping back.
    fn new(map: Mmap, len: usize) -> Result<Self, Mmap> {
        let data = map.as_ptr().wrapping_add(HEADER_LEN);
        let fits = map.len() >= HEADER_LEN && (map.len() - HEADER_LEN) / 4 >= len;
        if cfg!(target_endian = "little") && data.align_offset(align_of::<f32>()) == 0 && fits {
            Ok(Self { map, len })
        } else {
            Err(map)
        }
    }
}

impl AsRef<[f32]> for MappedValues {
    fn as_ref(&self) -> &[f32] {
        // SAFETY: `new` checked that the mapping holds `HEADER_LEN + 4 * len` bytes and that
        // the data part is aligned for f32; every bit pattern is a valid f32, and on the
        // little-endian host `new` requires, the file's byte order is the native one. The
        // mapping is read-only, lives as long as `self` (so as long as the returned borrow),
        // and is never written through (see the SAFETY note on the mapping in
        // `load_values` for writers outside this module).
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(HEADER_LEN).cast::<f32>(), self.len)
        }
    }
}

/// `values` as little-endian bytes into `out` (replacing its contents).
fn le_bytes(values: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NoiseFileError {
    let path = path.to_owned();
    move |source| NoiseFileError::Io {
        action,
        path,
        source,
    }
}

/// A new, exclusively created temporary file next to the final one. The name holds the
/// process id and a per-process counter; `create_new` makes a clash (a stale file from an
/// earlier process with the same id) move on to the next counter instead of sharing a file.
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File), NoiseFileError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error("creating", &path)(e)),
        }
    }
}

/// Removes temporary files for `name` that a dead creator left behind. Errors are ignored:
/// this is housekeeping, and a file another process removes first is fine.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let is_ours = entry.file_name().to_string_lossy().starts_with(&prefix);
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok());
        if is_ours && age.is_some_and(|age| age > STALE_TEMP_AGE) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes the temporary file on drop unless disarmed, so a failed creation leaves no
/// partial file behind.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("an armed guard holds its path")
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_core::noise::CHUNK_LEN;

    /// Crosses a chunk boundary and ends in a partial chunk, and stays fast in debug builds.
    const LEN: usize = CHUNK_LEN + 12_345;

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn same_as_generated(table: &NoiseTable, seed: u64, len: usize) {
        let generated = NoiseTable::generate(seed, len);
        assert_eq!(table.len(), len);
        assert_eq!(table.noise_seed(), seed);
        assert!(bits(table.as_slice()) == bits(generated.as_slice()));
    }

    #[test]
    fn noise_file_create_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let created = NoiseFile::open_or_create(dir.path(), 123, LEN, Check::Quick).unwrap();
        assert!(matches!(created.outcome(), Outcome::Created));
        assert_eq!(created.path(), dir.path().join("noise-s123-n1060921.f32"));
        same_as_generated(created.table(), 123, LEN);
        created.verify().unwrap();

        let opened = NoiseFile::open_or_create(dir.path(), 123, LEN, Check::Full).unwrap();
        assert!(matches!(opened.outcome(), Outcome::Opened));
        same_as_generated(opened.table(), 123, LEN);
        let table = open_or_create(dir.path(), 123, LEN).unwrap();
        same_as_generated(&table, 123, LEN);

        let len = fs::metadata(created.path()).unwrap().len();
        assert_eq!(len, 64 + 4 * LEN as u64);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn noise_file_empty_and_tiny_tables() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 7] {
            let created = NoiseFile::open_or_create(dir.path(), 5, len, Check::Full).unwrap();
            assert!(matches!(created.outcome(), Outcome::Created));
            let opened = NoiseFile::open_or_create(dir.path(), 5, len, Check::Full).unwrap();
            assert!(matches!(opened.outcome(), Outcome::Opened));
            same_as_generated(opened.table(), 5, len);
        }
    }

    fn create(dir: &Path) -> PathBuf {
        NoiseFile::open_or_create(dir, 9, LEN, Check::Quick)
            .unwrap()
            .path()
            .to_owned()
    }

    fn reopen(dir: &Path) -> NoiseFile {
        NoiseFile::open_or_create(dir, 9, LEN, Check::Quick).unwrap()
    }

    #[test]
    fn noise_file_truncated_is_detected_and_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path());
        let full = 64 + 4 * LEN as u64;
        for cut in [full - 4, 100, 10, 0] {
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let err = NoiseFile::open(&path, 9, LEN, Check::Quick).unwrap_err();
            let expected = format!(
                "noise file {} is {cut} bytes long, expected {full} (a 64-byte header and {LEN} f32 values)",
                path.display()
            );
            assert_eq!(err.to_string(), expected);
            let again = reopen(dir.path());
            assert!(
                matches!(again.outcome(), Outcome::Regenerated { reason: NoiseFileError::WrongLength { found, .. } } if *found == cut),
                "{:?}",
                again.outcome()
            );
            same_as_generated(again.table(), 9, LEN);
        }
    }

    fn flip_byte(path: &Path, at: u64) {
        let mut file = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut b).unwrap();
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&[b[0] ^ 0x10]).unwrap();
    }

    #[test]
    fn noise_file_bad_header_is_detected_and_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path());
        let cases: [(u64, &str); 5] = [
            (2, "magic"),
            (8, "format version"),
            (12, "data offset"),
            (16, "noise seed"),
            (24, "length"),
        ];
        for (at, field) in cases {
            flip_byte(&path, at);
            let err = NoiseFile::open(&path, 9, LEN, Check::Quick).unwrap_err();
            assert!(
                matches!(&err, NoiseFileError::BadHeader { field: f, .. } if *f == field),
                "{err}"
            );
            assert!(err.to_string().contains(&path.display().to_string()));
            let again = reopen(dir.path());
            assert!(matches!(again.outcome(), Outcome::Regenerated { .. }));
            same_as_generated(again.table(), 9, LEN);
        }
        flip_byte(&path, 2);
        assert_eq!(
            NoiseFile::open(&path, 9, LEN, Check::Quick)
                .unwrap_err()
                .to_string(),
            format!(
                "noise file {} has header magic \"UF^OISE\\x00\", expected \"UFNOISE\\x00\"",
                path.display()
            )
        );
        reopen(dir.path());
        flip_byte(&path, 16);
        assert_eq!(
            NoiseFile::open(&path, 9, LEN, Check::Quick)
                .unwrap_err()
                .to_string(),
            format!(
                "noise file {} has header noise seed 25, expected 9",
                path.display()
            )
        );
    }

    #[test]
    fn noise_file_corrupt_data_is_found_by_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path());
        // Far from the spot-checked chunk starts: only the digest can see it.
        flip_byte(&path, 64 + 4 * 500_000 + 1);
        let quick = NoiseFile::open(&path, 9, LEN, Check::Quick).unwrap();
        assert!(matches!(
            quick.verify(),
            Err(NoiseFileError::DigestMismatch { .. })
        ));
        drop(quick);
        let err = NoiseFile::open(&path, 9, LEN, Check::Full).unwrap_err();
        assert!(err.to_string().contains("the file is corrupt"), "{err}");
        let again = NoiseFile::open_or_create(dir.path(), 9, LEN, Check::Full).unwrap();
        assert!(matches!(
            again.outcome(),
            Outcome::Regenerated {
                reason: NoiseFileError::DigestMismatch { .. }
            }
        ));
        same_as_generated(again.table(), 9, LEN);

        // A damaged first value is caught by the spot check on every open.
        flip_byte(&path, 64 + 2);
        let err = NoiseFile::open(&path, 9, LEN, Check::Quick).unwrap_err();
        assert!(matches!(&err, NoiseFileError::WrongValues { .. }), "{err}");
    }

    #[test]
    fn noise_file_replaced_while_mapped_keeps_old_mapping_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path());
        let held = NoiseFile::open(&path, 9, LEN, Check::Quick).unwrap();
        flip_byte(&path, 24);
        let replaced = reopen(dir.path());
        assert!(matches!(replaced.outcome(), Outcome::Regenerated { .. }));
        // The held table maps the old inode, whose data the header flip did not touch.
        same_as_generated(held.table(), 9, LEN);
    }

    #[test]
    fn noise_file_concurrent_creators_both_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let tables: Vec<Arc<NoiseTable>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| open_or_create(dir.path(), 77, LEN).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for table in &tables {
            same_as_generated(table, 77, LEN);
        }
        let opened = NoiseFile::open_or_create(dir.path(), 77, LEN, Check::Full).unwrap();
        assert!(matches!(opened.outcome(), Outcome::Opened));
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn noise_file_errors_that_are_not_content_are_returned() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            NoiseFile::open_or_create(dir.path(), 1, MAX_TABLE_LEN + 1, Check::Quick).unwrap_err();
        assert!(matches!(err, NoiseFileError::TooLong { .. }), "{err}");

        // A cache "directory" that is a file cannot be created.
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = open_or_create(&file, 1, 10).unwrap_err();
        assert!(matches!(err, NoiseFileError::Io { .. }), "{err}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }

    #[test]
    fn noise_file_stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let name = file_name(3, 10);
        let stale = dir.path().join(format!(".{name}.tmp-1-0"));
        let fresh = dir.path().join(format!(".{name}.tmp-2-0"));
        let other = dir.path().join(".unrelated.tmp-1-0");
        for p in [&stale, &fresh, &other] {
            fs::write(p, b"partial").unwrap();
        }
        let old = SystemTime::now() - 2 * STALE_TEMP_AGE;
        for p in [&stale, &other] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        open_or_create(dir.path(), 3, 10).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists());
        assert!(other.exists());
    }

    #[test]
    fn noise_file_default_cache_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = &[
            ("UNDERFLOW_CACHE", "/u"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(all)), PathBuf::from("/u"));
        let xdg = &[
            ("UNDERFLOW_CACHE", ""),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(xdg)), PathBuf::from("/x/underflow"));
        let relative_xdg = &[("XDG_CACHE_HOME", "x"), ("HOME", "/h")];
        assert_eq!(
            cache_dir_from(env(relative_xdg)),
            PathBuf::from("/h/.cache/underflow")
        );
        assert_eq!(cache_dir_from(env(&[])), env::temp_dir().join("underflow"));
    }

    /// Timing for the docs; run with
    /// `cargo test -p es-data --release -- --ignored --nocapture noise_file_measure`.
    #[test]
    #[ignore = "timing, run in release"]
    fn noise_file_measure() {
        use es_core::noise::DEFAULT_TABLE_LEN;
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let created =
            NoiseFile::open_or_create(dir.path(), 123, DEFAULT_TABLE_LEN, Check::Quick).unwrap();
        println!(
            "create (generate + write + sync): {:.3} s",
            t.elapsed().as_secs_f64()
        );
        drop(created);
        let t = Instant::now();
        let opened =
            NoiseFile::open_or_create(dir.path(), 123, DEFAULT_TABLE_LEN, Check::Quick).unwrap();
        println!(
            "open, quick checks: {:.1} µs",
            t.elapsed().as_secs_f64() * 1e6
        );
        let t = Instant::now();
        opened.verify().unwrap();
        println!(
            "verify (sha256 of 256 MiB): {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }
}
