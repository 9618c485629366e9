//! Tests of the MNIST module: the real shared copy (gzipped and raw), each error on files
//! in a temporary directory, and downloads from a tiny local HTTP server.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use super::*;

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
const NAMES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];

/// The project's shared copy (four .gz files), or `$UNDERFLOW_TEST_MNIST`.
fn shared_dir() -> PathBuf {
    std::env::var_os("UNDERFLOW_TEST_MNIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/data/mnist"
            ))
        })
}

/// The shared copy, loaded once for all tests that compare against it.
fn shared() -> &'static Mnist {
    static SHARED: OnceLock<Mnist> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = shared_dir();
        load(&dir).unwrap_or_else(|e| panic!("loading the shared copy in {}: {e}", dir.display()))
    })
}

/// The bytes of a shared file as stored (gzip, or raw if the override holds raw files).
fn stored(name: &str) -> Vec<u8> {
    let dir = shared_dir();
    let path = idx::locate(
        &dir,
        FILES.iter().find(|s| s.name == name).expect("known name"),
    )
    .unwrap_or_else(|| panic!("{name} is missing from {}", dir.display()));
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The uncompressed bytes of a shared file.
fn raw(name: &str) -> Vec<u8> {
    let bytes = stored(name);
    if !bytes.starts_with(&idx::GZIP_MAGIC) {
        return bytes;
    }
    let mut out = Vec::new();
    GzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .expect("shared gzip decodes");
    out
}

/// A shared file gzipped: as stored when the shared copy is gzipped (no recompression).
fn stored_gz(name: &str) -> Vec<u8> {
    let bytes = stored(name);
    if bytes.starts_with(&idx::GZIP_MAGIC) {
        bytes
    } else {
        gzip(&bytes)
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// A temporary directory holding the shared copy's files except `except`.
fn dir_without(except: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in NAMES.iter().filter(|n| !except.contains(n)) {
        fs::write(dir.path().join(format!("{name}.gz")), stored(name)).expect("copy");
    }
    dir
}

/// A temporary directory holding the shared copy with `name` replaced by raw `bytes`.
fn dir_with_raw(name: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = dir_without(&[name]);
    fs::write(dir.path().join(name), bytes).expect("write bad file");
    dir
}

fn load_err(dir: &Path) -> MnistError {
    match load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

fn label_counts(labels: &[u8]) -> [usize; 10] {
    let mut counts = [0; 10];
    for &l in labels {
        counts[usize::from(l)] += 1;
    }
    counts
}

/// Lists the names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn loads_the_shared_copy() {
    let started = Instant::now();
    let mnist = load(&shared_dir()).expect("shared copy loads");
    eprintln!("loading the shared copy took {:?}", started.elapsed());

    assert_eq!(mnist.train.len(), TRAIN_LEN);
    assert_eq!(mnist.test.len(), TEST_LEN);
    assert_eq!(mnist.train.images.len(), TRAIN_LEN * IMAGE_LEN);
    assert_eq!(mnist.test.images.len(), TEST_LEN * IMAGE_LEN);
    assert!(!mnist.train.is_empty());
    assert_eq!(
        label_counts(&mnist.train.labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        label_counts(&mnist.test.labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(mnist.train.labels[..5], [5, 0, 4, 1, 9]);
    assert_eq!(mnist.test.labels[..5], [7, 2, 1, 0, 4]);

    // Images are 28x28 with a blank border and ink in the middle.
    let first = mnist.train.image(0);
    assert_eq!(first.len(), IMAGE_LEN);
    assert!(first[..IMAGE_SIDE].iter().all(|&p| p == 0));
    assert!(first.contains(&255));
    assert_eq!(mnist.test.image(TEST_LEN - 1).len(), IMAGE_LEN);

    // The digest is a function of the published files alone.
    let mut hasher = Sha256::new();
    for spec in &FILES {
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&spec.sha256[2 * i..2 * i + 2], 16).expect("hex");
        }
        hasher.update(digest);
    }
    let expected: [u8; 32] = hasher.finalize().into();
    assert_eq!(mnist.digest, expected);
    assert_eq!(mnist.digest_hex(), hex(&expected));
    assert_eq!(mnist.digest_hex().len(), 64);
}

#[test]
fn loads_raw_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in NAMES {
        fs::write(dir.path().join(name), raw(name)).expect("write raw");
    }
    assert_eq!(&load(dir.path()).expect("raw files load"), shared());
}

#[test]
fn detects_gzip_by_content_not_name() {
    let dir = dir_without(&[TRAIN_LABELS, TEST_LABELS]);
    // Raw bytes under the .gz name, gzip bytes under the raw name.
    fs::write(
        dir.path().join(format!("{TRAIN_LABELS}.gz")),
        raw(TRAIN_LABELS),
    )
    .expect("write");
    fs::write(dir.path().join(TEST_LABELS), gzip(&raw(TEST_LABELS))).expect("write");
    assert_eq!(&load(dir.path()).expect("loads by content"), shared());
}

#[test]
fn prefers_the_raw_file_when_both_exist() {
    // The .gz is good; the raw one is empty and must be the one read.
    let dir = dir_without(&[]);
    let raw_path = dir.path().join(TEST_LABELS);
    fs::write(&raw_path, b"").expect("write");
    match load_err(dir.path()) {
        MnistError::Truncated { path, found: 0, .. } => assert_eq!(path, raw_path),
        other => panic!("expected the raw file to be read, got {other}"),
    }
}

#[test]
fn missing_file_says_which_and_how_to_get_it() {
    let dir = dir_without(&[TRAIN_LABELS]);
    let err = load_err(dir.path());
    assert!(
        matches!(
            err,
            MnistError::Missing {
                name: TRAIN_LABELS,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    for needle in [TRAIN_LABELS, "UNDERFLOW_DATA", "--data", "mirrors"] {
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn truncated_file_reports_expected_and_found_sizes() {
    let bytes = raw(TEST_LABELS);
    let dir = dir_with_raw(TEST_LABELS, &bytes[..5000]);
    let err = load_err(dir.path());
    assert!(
        matches!(
            err,
            MnistError::Truncated {
                expected: 10_008,
                found: 5000,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("truncated: expected 10008 bytes, found 5000"),
        "{message}"
    );
    assert!(message.contains(TEST_LABELS), "{message}");

    // A file cut inside its header is truncated too, once its magic is known to be right.
    let dir = dir_with_raw(TEST_LABELS, &bytes[..6]);
    let err = load_err(dir.path());
    assert!(
        matches!(err, MnistError::Truncated { found: 6, .. }),
        "{err:?}"
    );
}

#[test]
fn overlong_file_is_rejected() {
    let mut bytes = raw(TEST_LABELS);
    bytes.push(0);
    let dir = dir_with_raw(TEST_LABELS, &bytes);
    let err = load_err(dir.path());
    assert!(
        matches!(
            err,
            MnistError::TooLong {
                expected: 10_008,
                found: 10_009,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn wrong_magic_reports_found_and_expected() {
    let mut bytes = raw(TRAIN_LABELS);
    bytes[..4].copy_from_slice(&2051u32.to_be_bytes());
    let dir = dir_with_raw(TRAIN_LABELS, &bytes);
    let err = load_err(dir.path());
    assert!(
        matches!(
            err,
            MnistError::BadMagic {
                found: 2051,
                expected: 2049,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("2051") && message.contains("2049"),
        "{message}"
    );
    assert!(message.contains(TRAIN_LABELS), "{message}");
}

#[test]
fn wrong_dimensions_are_reported() {
    let mut bytes = raw(TEST_IMAGES);
    bytes[8..12].copy_from_slice(&29u32.to_be_bytes());
    let dir = dir_with_raw(TEST_IMAGES, &bytes);
    let err = load_err(dir.path());
    let message = err.to_string();
    assert!(matches!(err, MnistError::BadShape { .. }), "{err:?}");
    assert!(
        message.contains("10000x29x28") && message.contains("10000x28x28"),
        "{message}"
    );
}

#[test]
fn out_of_range_label_is_reported() {
    let mut bytes = raw(TEST_LABELS);
    bytes[8 + 3] = 10;
    let dir = dir_with_raw(TEST_LABELS, &bytes);
    let err = load_err(dir.path());
    assert!(
        matches!(
            err,
            MnistError::BadLabel {
                index: 3,
                value: 10,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn corrupt_gzip_is_reported() {
    let mut bytes = stored_gz(TEST_LABELS);
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 8] {
        *byte ^= 0x5a;
    }
    let dir = dir_without(&[TEST_LABELS]);
    let path = dir.path().join(format!("{TEST_LABELS}.gz"));
    fs::write(&path, &bytes).expect("write");
    let err = load_err(dir.path());
    assert!(
        matches!(&err, MnistError::BadGzip { path: p, .. } if *p == path),
        "{err:?}"
    );

    // A gzip stream cut short is bad gzip as well.
    let whole = stored_gz(TEST_LABELS);
    fs::write(&path, &whole[..whole.len() / 2]).expect("write");
    let err = load_err(dir.path());
    assert!(matches!(err, MnistError::BadGzip { .. }), "{err:?}");
}

#[test]
fn flipped_byte_fails_the_digest() {
    let mut bytes = raw(TEST_IMAGES);
    bytes[16 + 5000] ^= 0x01;
    let dir = dir_with_raw(TEST_IMAGES, &bytes);
    let err = load_err(dir.path());
    let MnistError::DigestMismatch {
        expected, actual, ..
    } = &err
    else {
        panic!("expected a digest mismatch, got {err:?}");
    };
    assert_eq!(
        expected,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    );
    assert_ne!(actual, expected);
    let message = err.to_string();
    assert!(
        message.contains(expected.as_str()) && message.contains(actual.as_str()),
        "{message}"
    );
    assert!(message.contains(TEST_IMAGES), "{message}");
}

#[test]
fn default_data_dir_precedence() {
    let some = |s: &str| Some(std::ffi::OsString::from(s));
    assert_eq!(
        data_dir_from(some("/d"), some("/x"), some("/h")),
        PathBuf::from("/d")
    );
    assert_eq!(
        data_dir_from(None, some("/x"), some("/h")),
        PathBuf::from("/x/underflow/mnist")
    );
    assert_eq!(
        data_dir_from(some(""), some(""), some("/h")),
        Path::new("/h/.cache/underflow/mnist")
    );
    // A relative XDG_CACHE_HOME is invalid by the spec and ignored.
    assert_eq!(
        data_dir_from(None, some("rel"), some("/h")),
        Path::new("/h/.cache/underflow/mnist")
    );
    assert!(data_dir_from(None, None, None).ends_with("underflow/mnist"));
}

/// What the test server answers for one path.
struct Route {
    body: Vec<u8>,
    /// Sent as `Content-Encoding: gzip`, which ureq decodes in transit.
    gzip_encoded: bool,
}

/// A minimal HTTP/1.1 server on 127.0.0.1:0: answers each request from `routes` (404
/// otherwise), one request per connection, and exits after `max_requests` requests or a
/// deadline. Returns its base URL and a handle yielding the paths requested, in order.
fn serve(routes: HashMap<String, Route>, max_requests: usize) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    listener.set_nonblocking(true).expect("nonblocking");
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut requested = Vec::new();
        while requested.len() < max_requests && Instant::now() < deadline {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            stream.set_nonblocking(false).expect("blocking");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers; a GET has no body.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_owned();
            let mut stream = reader.into_inner();
            let (status, body, encoding) = match routes.get(&path) {
                Some(route) => (
                    "200 OK",
                    &route.body[..],
                    if route.gzip_encoded {
                        "Content-Encoding: gzip\r\n"
                    } else {
                        ""
                    },
                ),
                None => ("404 Not Found", &b"not found"[..], ""),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{encoding}\
                 Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            // The client may hang up on a response it rejects; that is its right.
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(body));
            requested.push(path);
        }
        requested
    });
    (base, handle)
}

fn route(body: Vec<u8>) -> Route {
    Route {
        body,
        gzip_encoded: false,
    }
}

/// Proxies from the environment must not intercept requests to the local test server.
fn test_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

fn fetch_and_load(
    dir: &Path,
    mirrors: &[&str],
    events: &mut Vec<DownloadEvent>,
) -> Result<Mnist, MnistError> {
    download::fetch_missing(&test_agent(), dir, mirrors, &mut |e| events.push(e))?;
    load(dir)
}

fn count(events: &[DownloadEvent], pred: impl Fn(&DownloadEvent) -> bool) -> usize {
    events.iter().filter(|e| pred(e)).count()
}

#[test]
fn downloads_from_the_next_mirror_after_a_404() {
    let served: Vec<Vec<u8>> = NAMES.iter().map(|n| stored_gz(n)).collect();
    let routes = NAMES
        .iter()
        .zip(&served)
        .map(|(n, body)| (format!("/good/{n}.gz"), route(body.clone())))
        .collect();
    let (base, server) = serve(routes, 8);
    let empty = format!("{base}/empty/");
    // The second mirror lacks its trailing slash, which is tolerated.
    let good = format!("{base}/good");
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("new").join("mnist");

    let mut events = Vec::new();
    let mnist = fetch_and_load(&dir, &[&empty, &good], &mut events).expect("download");
    assert_eq!(&mnist, shared());
    assert_eq!(server.join().expect("server").len(), 8);

    let mut expected: Vec<String> = NAMES.iter().map(|n| format!("{n}.gz")).collect();
    expected.sort();
    assert_eq!(
        names_in(&dir),
        expected,
        "only the four verified files are left"
    );
    assert_eq!(
        count(&events, |e| matches!(e, DownloadEvent::Started { .. })),
        8
    );
    assert_eq!(
        count(&events, |e| matches!(e, DownloadEvent::Finished { .. })),
        4
    );
    let failed = |e: &DownloadEvent| {
        matches!(e, DownloadEvent::MirrorFailed { url, error, .. }
            if url.starts_with(&empty) && error.contains("404"))
    };
    assert_eq!(count(&events, failed), 4);
    // Progress is throttled: one event per MiB, plus at most one per file at its end.
    let progress = count(&events, |e| matches!(e, DownloadEvent::Progress { .. }));
    let mib: usize = served.iter().map(|body| body.len() >> 20).sum();
    assert!(
        (mib..=mib + 4).contains(&progress),
        "{progress} progress events for {mib} MiB"
    );
    assert!(events.iter().any(|e| matches!(e,
        DownloadEvent::Progress { file: TRAIN_IMAGES, bytes, total: Some(total) }
            if bytes == total && *total == served[0].len() as u64)));

    // Everything is present now: no request is made (the server is gone anyway).
    let mut again = Vec::new();
    let reloaded = load_or_download(&dir, &[&good], &mut |e| again.push(e)).expect("reload");
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(&reloaded, shared());
}

/// The bad mirror's version of each file, each wrong in its own way.
fn corrupt_routes(prefix: &str) -> HashMap<String, Route> {
    let mut flipped = stored_gz(TRAIN_IMAGES);
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    let mut relabelled = raw(TRAIN_LABELS);
    relabelled[8] = if relabelled[8] == 3 { 4 } else { 3 };
    let cut = stored_gz(TEST_IMAGES);
    let html = b"<html><body>moved</body></html>".to_vec();
    [
        (TRAIN_IMAGES, flipped),
        (TRAIN_LABELS, gzip(&relabelled)),
        (TEST_IMAGES, cut[..cut.len() - 1000].to_vec()),
        (TEST_LABELS, html),
    ]
    .into_iter()
    .map(|(name, body)| (format!("{prefix}{name}.gz"), route(body)))
    .collect()
}

#[test]
fn corrupt_mirror_is_rejected_and_the_next_one_used() {
    let mut routes = corrupt_routes("/bad/");
    routes.extend(
        NAMES
            .iter()
            .map(|n| (format!("/good/{n}.gz"), route(stored_gz(n)))),
    );
    let (base, server) = serve(routes, 8);
    let bad = format!("{base}/bad/");
    let good = format!("{base}/good/");
    let dir = tempfile::tempdir().expect("temp dir");

    let mut events = Vec::new();
    let mnist = fetch_and_load(dir.path(), &[&bad, &good], &mut events).expect("download");
    assert_eq!(&mnist, shared());
    assert_eq!(server.join().expect("server").len(), 8);

    let failures: HashMap<&str, &str> = events
        .iter()
        .filter_map(|e| match e {
            DownloadEvent::MirrorFailed { file, url, error } => {
                assert!(url.starts_with(&bad), "{url}");
                Some((*file, error.as_str()))
            }
            _ => None,
        })
        .collect();
    assert!(
        failures[TRAIN_IMAGES].contains("gzip"),
        "{}",
        failures[TRAIN_IMAGES]
    );
    assert!(
        failures[TRAIN_LABELS].contains("sha256"),
        "{}",
        failures[TRAIN_LABELS]
    );
    assert!(
        failures[TEST_IMAGES].contains("gzip"),
        "{}",
        failures[TEST_IMAGES]
    );
    assert!(
        failures[TEST_LABELS].contains("magic"),
        "{}",
        failures[TEST_LABELS]
    );
    assert_eq!(names_in(dir.path()).len(), 4, "{:?}", names_in(dir.path()));
}

#[test]
fn all_mirrors_failing_lists_each_and_leaves_nothing() {
    let (base, server) = serve(corrupt_routes("/bad/"), 1);
    let bad = format!("{base}/bad/");
    // Nothing listens on port 1 on a test machine: the connection is refused at once.
    let refused = "http://127.0.0.1:1/";
    let dir = tempfile::tempdir().expect("temp dir");

    let mut events = Vec::new();
    let err = match fetch_and_load(dir.path(), &[&bad, refused], &mut events) {
        Ok(_) => panic!("a corrupt mirror must not yield data"),
        Err(e) => e,
    };
    assert_eq!(
        server.join().expect("server"),
        [format!("/bad/{TRAIN_IMAGES}.gz")]
    );
    let MnistError::AllMirrorsFailed { file, attempts, .. } = &err else {
        panic!("expected every mirror to fail, got {err:?}");
    };
    assert_eq!(*file, TRAIN_IMAGES);
    assert_eq!(attempts.len(), 2);
    let message = err.to_string();
    assert!(
        message.contains(&format!("{bad}{TRAIN_IMAGES}.gz")),
        "{message}"
    );
    assert!(
        message.contains(&format!("{refused}{TRAIN_IMAGES}.gz")),
        "{message}"
    );
    assert!(
        names_in(dir.path()).is_empty(),
        "left behind: {:?}",
        names_in(dir.path())
    );
    assert_eq!(
        count(&events, |e| matches!(e, DownloadEvent::MirrorFailed { .. })),
        2
    );
    assert_eq!(
        count(&events, |e| matches!(e, DownloadEvent::Finished { .. })),
        0
    );
}

#[test]
fn gzip_decoded_in_transit_is_kept_raw() {
    // A server that sets Content-Encoding: gzip has ureq hand over the decoded IDX bytes.
    let routes = [TRAIN_LABELS, TEST_LABELS]
        .into_iter()
        .map(|n| {
            (
                format!("/enc/{n}.gz"),
                Route {
                    body: stored_gz(n),
                    gzip_encoded: true,
                },
            )
        })
        .collect();
    let (base, server) = serve(routes, 2);
    let dir = dir_without(&[TRAIN_LABELS, TEST_LABELS]);

    let mut events = Vec::new();
    let mnist =
        fetch_and_load(dir.path(), &[&format!("{base}/enc/")], &mut events).expect("download");
    assert_eq!(&mnist, shared());
    assert_eq!(server.join().expect("server").len(), 2);
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, DownloadEvent::Progress { total: Some(_), .. }))
    );
    let names = names_in(dir.path());
    assert!(names.contains(&TRAIN_LABELS.to_owned()), "{names:?}");
    assert!(names.contains(&TEST_LABELS.to_owned()), "{names:?}");
}
