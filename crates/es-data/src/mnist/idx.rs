//! Reading one MNIST IDX file, raw or gzipped, and checking it against what it must be:
//! magic, dimensions, length, label range and the sha256 of its uncompressed bytes.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::{IMAGE_LEN, IMAGE_SIDE, MnistError, TEST_LEN, TRAIN_LEN, hex};

/// The first two bytes of every gzip stream (RFC 1952). IDX files start with two zero bytes,
/// so the two cannot be confused.
pub(super) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// What an IDX file holds, which fixes its magic number and header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// IDX3, unsigned bytes: magic 2051, dimensions `count x 28 x 28`.
    Images,
    /// IDX1, unsigned bytes: magic 2049, dimension `count`.
    Labels,
}

/// One of the four published MNIST files.
#[derive(Debug)]
pub(super) struct FileSpec {
    /// The file's name without `.gz`, as published.
    pub name: &'static str,
    pub kind: Kind,
    /// Images or labels in the file.
    pub count: usize,
    /// Lower-case hex sha256 of the uncompressed file.
    pub sha256: &'static str,
}

impl FileSpec {
    pub(super) fn magic(&self) -> u32 {
        match self.kind {
            Kind::Images => 2051,
            Kind::Labels => 2049,
        }
    }

    /// Magic plus one big-endian u32 per dimension.
    pub(super) fn header_len(&self) -> usize {
        4 + 4 * self.dims().len()
    }

    pub(super) fn dims(&self) -> Vec<u64> {
        match self.kind {
            Kind::Images => vec![self.count as u64, IMAGE_SIDE as u64, IMAGE_SIDE as u64],
            Kind::Labels => vec![self.count as u64],
        }
    }

    pub(super) fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Images => self.count * IMAGE_LEN,
            Kind::Labels => self.count,
        }
    }

    /// Length of the uncompressed file.
    pub(super) fn file_len(&self) -> u64 {
        (self.header_len() + self.payload_len()) as u64
    }
}

/// The four files in the order the data set digest hashes them. The digests are those
/// published for the uncompressed files (see shared/data/mnist/README.md).
pub(super) const FILES: [FileSpec; 4] = [
    FileSpec {
        name: "train-images-idx3-ubyte",
        kind: Kind::Images,
        count: TRAIN_LEN,
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    FileSpec {
        name: "train-labels-idx1-ubyte",
        kind: Kind::Labels,
        count: TRAIN_LEN,
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    FileSpec {
        name: "t10k-images-idx3-ubyte",
        kind: Kind::Images,
        count: TEST_LEN,
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    FileSpec {
        name: "t10k-labels-idx1-ubyte",
        kind: Kind::Labels,
        count: TEST_LEN,
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

/// A file that passed every check: its bytes after the header, and the sha256 of the
/// whole uncompressed file.
pub(super) struct Verified {
    pub payload: Vec<u8>,
    pub sha256: [u8; 32],
}

/// The file to read for `spec` in `dir`: `<name>` if it exists, else `<name>.gz`.
pub(super) fn locate(dir: &Path, spec: &FileSpec) -> Option<PathBuf> {
    let raw = dir.join(spec.name);
    if raw.is_file() {
        return Some(raw);
    }
    let gz = dir.join(format!("{}.gz", spec.name));
    gz.is_file().then_some(gz)
}

/// Reads `path` as the file `spec` describes, decompressing it if it starts with the gzip
/// magic (whatever its name says), and checks it completely.
pub(super) fn read_file(path: &Path, spec: &FileSpec) -> Result<Verified, MnistError> {
    let io_error = |source| MnistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut head = [0u8; 2];
    let got = read_full(&mut file, &mut head).map_err(io_error)?;
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    if got == head.len() && head == GZIP_MAGIC {
        // flate2 reports a bad stream, a bad CRC or length trailer, and a stream cut short
        // with these kinds; anything else comes from the file underneath.
        let gzip_error = |source: io::Error| match source.kind() {
            io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidData
            | io::ErrorKind::UnexpectedEof => MnistError::BadGzip {
                path: path.to_path_buf(),
                source,
            },
            _ => io_error(source),
        };
        // A multi-member decoder, because concatenated gzip members are one valid file.
        let reader = MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file));
        read_idx(reader, path, spec, gzip_error)
    } else {
        read_idx(file, path, spec, io_error)
    }
}

/// Reads and checks the uncompressed IDX bytes from `reader`; `read_error` turns a failed
/// read into the right error for this kind of file.
fn read_idx(
    mut reader: impl Read,
    path: &Path,
    spec: &FileSpec,
    read_error: impl Fn(io::Error) -> MnistError,
) -> Result<Verified, MnistError> {
    let truncated = |found: usize| MnistError::Truncated {
        path: path.to_path_buf(),
        expected: spec.file_len(),
        found: found as u64,
    };

    // The header first: a wrong magic or shape explains a file better than its digest.
    let mut header_buf = [0u8; 16];
    let header = &mut header_buf[..spec.header_len()];
    let got = read_full(&mut reader, header).map_err(&read_error)?;
    if got >= 4 {
        let found = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if found != spec.magic() {
            return Err(MnistError::BadMagic {
                path: path.to_path_buf(),
                found,
                expected: spec.magic(),
            });
        }
    }
    if got < header.len() {
        return Err(truncated(got));
    }
    let dims: Vec<u64> = header[4..]
        .chunks_exact(4)
        .map(|d| u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]])))
        .collect();
    if dims != spec.dims() {
        return Err(MnistError::BadShape {
            path: path.to_path_buf(),
            found: join_dims(&dims),
            expected: join_dims(&spec.dims()),
        });
    }

    // Exactly the payload the header announces, then whatever follows only to count it
    // (and, for gzip, to reach the trailer whose CRC the decoder checks).
    let len = spec.payload_len();
    let mut payload = Vec::with_capacity(len);
    reader
        .by_ref()
        .take(len as u64)
        .read_to_end(&mut payload)
        .map_err(&read_error)?;
    if payload.len() < len {
        return Err(truncated(header.len() + payload.len()));
    }
    let extra = io::copy(&mut reader, &mut io::sink()).map_err(&read_error)?;
    if extra > 0 {
        return Err(MnistError::TooLong {
            path: path.to_path_buf(),
            expected: spec.file_len(),
            found: spec.file_len() + extra,
        });
    }

    if spec.kind == Kind::Labels
        && let Some(index) = payload.iter().position(|&label| label > 9)
    {
        return Err(MnistError::BadLabel {
            path: path.to_path_buf(),
            index,
            value: payload[index],
        });
    }

    let mut hasher = Sha256::new();
    hasher.update(&*header);
    hasher.update(&payload);
    let sha256: [u8; 32] = hasher.finalize().into();
    let actual = hex(&sha256);
    if actual != spec.sha256 {
        return Err(MnistError::DigestMismatch {
            path: path.to_path_buf(),
            expected: spec.sha256.to_owned(),
            actual,
        });
    }
    Ok(Verified { payload, sha256 })
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn join_dims(dims: &[u64]) -> String {
    let parts: Vec<String> = dims.iter().map(u64::to_string).collect();
    parts.join("x")
}
