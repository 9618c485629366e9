//! What a worker is told at start: where the coordinator is, its data, its cache, its threads,
//! and how patiently it reconnects.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use es_data::mnist::Mnist;
use es_kernel::Kernel;
use tokio::sync::Semaphore;

/// Everything [`crate::run`] needs. Build it with [`WorkerOptions::new`] and override fields.
/// Its `Debug` leaves out the token and the TLS key.
#[derive(Clone)]
pub struct WorkerOptions {
    /// The coordinator's URI, e.g. `http://127.0.0.1:50051` (`https://` with [`Self::tls`]).
    pub endpoint: String,
    /// The cluster's shared token, sent on every call as `authorization: Bearer <token>`
    /// ([`AUTHORIZATION_KEY`]); `None` sends no such header.
    pub token: Option<String>,
    /// TLS to the coordinator; `None` speaks plain HTTP/2.
    pub tls: Option<ClientTls>,
    /// Threads the worker evaluates on (at least 1; 0 counts as 1).
    pub threads: usize,
    /// The MNIST files, already loaded or to be loaded from a directory.
    pub data: DataSource,
    /// The directory of the cached noise table (shared with other processes of the host).
    pub cache_dir: PathBuf,
    /// A human-readable name for the coordinator's logs.
    pub name: String,
    /// The forward kernel to evaluate with.
    pub kernel: Kernel,
    /// How to reconnect after a transport failure or a stopping coordinator.
    pub reconnect: Backoff,
    /// Interval of HTTP/2 keep-alive pings; a connection whose ping goes unanswered for
    /// twice as long is dead (a coordinator that vanished, a cut network) and is replaced.
    pub keepalive: Duration,
    /// Load testing only: answer every assigned index with a fake fitness (a pure function
    /// of generation and index) instead of evaluating it. The golden proof is still computed
    /// honestly, so the worker joins like any other; its first result would then fail the
    /// coordinator's audit, so a load test runs the coordinator with `--audit-every 0`.
    pub fake_fitness: bool,
    /// Shared by the connections of one process (a load test's many fake workers) so that at
    /// most this many golden proofs are computed at once: each holds several copies of θ.
    /// `None`: no limit.
    pub proof_permits: Option<Arc<Semaphore>>,
    /// Serve the θ this worker receives to other workers of the run (`ThetaRelay`), so the
    /// coordinator need not send it to every worker; `None`: relay nothing. Fetching θ from
    /// another worker's relay, when the coordinator says so, needs no option.
    pub relay: Option<crate::RelayOptions>,
    /// Hand the work on instead of computing it (a hub: see [`crate::delegate`]); `None`:
    /// evaluate on this worker's threads. `threads` then declares the threads of the workers
    /// behind it.
    pub delegate: Option<Arc<dyn crate::delegate::Delegate>>,
}

impl WorkerOptions {
    /// Options for a worker of `endpoint` on `data`, with the defaults: all cores, the default
    /// cache directory ([`es_data::noise_file::default_cache_dir`]), [`default_name`], the
    /// fastest kernel this CPU supports, no token, and [`Backoff::default`].
    pub fn new(endpoint: impl Into<String>, data: DataSource) -> WorkerOptions {
        WorkerOptions {
            endpoint: endpoint.into(),
            token: None,
            tls: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            data,
            cache_dir: es_data::noise_file::default_cache_dir(),
            name: default_name(),
            kernel: *Kernel::supported()
                .last()
                .expect("the portable kernel is always supported"),
            reconnect: Backoff::default(),
            keepalive: Duration::from_secs(10),
            fake_fitness: false,
            proof_permits: None,
            relay: None,
            delegate: None,
        }
    }
}

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("threads", &self.threads)
            .field("data", &self.data)
            .field("cache_dir", &self.cache_dir)
            .field("name", &self.name)
            .field("kernel", &self.kernel)
            .field("reconnect", &self.reconnect)
            .field("keepalive", &self.keepalive)
            .field("fake_fitness", &self.fake_fitness)
            .field(
                "proof_permits",
                &self.proof_permits.as_ref().map(|s| s.available_permits()),
            )
            .field("relay", &self.relay)
            .field("delegate", &self.delegate)
            .finish()
    }
}

/// How the worker speaks TLS to the coordinator: the CA that signed the coordinator's
/// certificate, and for mutual TLS the worker's own certificate and key (all PEM). Its
/// `Debug` leaves out the key.
#[derive(Clone)]
pub struct ClientTls {
    /// The CA the coordinator's certificate must chain to (no system roots are trusted).
    pub ca_pem: Vec<u8>,
    /// The worker's certificate chain and private key, for a coordinator that requires
    /// client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the coordinator's certificate must carry, when it differs from the
    /// endpoint's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

/// The metadata key of the shared token; its value is `Bearer <token>`.
pub use es_proto::auth::AUTHORIZATION_KEY;

/// Where the worker's MNIST comes from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// Already loaded (tests and in-process workers share one copy).
    Loaded(Arc<Mnist>),
    /// Loaded from `dir` at start. Missing files are downloaded from `mirrors` (tried in
    /// order) only if it is not empty: by default a worker never downloads.
    Dir { dir: PathBuf, mirrors: Vec<String> },
}

/// When to try again after a failure: exponential backoff from `initial`, doubling up to
/// `max`, reset once a stream is accepted again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry.
    pub initial: Duration,
    /// The longest delay between two attempts.
    pub max: Duration,
    /// Give up once failures have gone on this long without a successful stream in between;
    /// `None` retries forever.
    pub give_up_after: Option<Duration>,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 5 s, forever.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            give_up_after: None,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based): `initial · 2^attempt`, at most `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Whether failures that began `elapsed` ago should still be retried.
    pub fn keeps_trying(&self, elapsed: Duration) -> bool {
        self.give_up_after.is_none_or(|limit| elapsed < limit)
    }
}

/// The default worker name: the host name and the process id (several workers may share a
/// host), e.g. `node-3/4711`.
pub fn default_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".to_owned());
    format!("{}/{}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100_ms_up_to_5_s() {
        let b = Backoff::default();
        let delays: Vec<u128> = (0..10).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
        assert!(b.keeps_trying(Duration::from_secs(1_000_000)));
    }

    #[test]
    fn backoff_gives_up_after_its_limit() {
        let b = Backoff {
            give_up_after: Some(Duration::from_secs(2)),
            ..Backoff::default()
        };
        assert!(b.keeps_trying(Duration::from_millis(1999)));
        assert!(!b.keeps_trying(Duration::from_secs(2)));
    }

    #[test]
    fn backoff_never_overflows() {
        let b = Backoff {
            initial: Duration::from_secs(u64::MAX / 2),
            max: Duration::MAX,
            give_up_after: None,
        };
        assert_eq!(b.delay(40), Duration::MAX);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let data = DataSource::Dir {
            dir: "/data".into(),
            mirrors: Vec::new(),
        };
        let mut options = WorkerOptions::new("https://c:1", data);
        options.token = Some("hunter2".into());
        options.tls = Some(ClientTls {
            ca_pem: b"CA".to_vec(),
            identity: Some((b"CERT".to_vec(), b"KEY hunter2".to_vec())),
            domain: Some("coordinator".into()),
        });
        let shown = format!("{options:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("https://c:1"), "{shown}");
    }

    #[test]
    fn the_default_name_is_not_empty() {
        let name = default_name();
        assert!(
            name.ends_with(&format!("/{}", std::process::id())),
            "{name}"
        );
        assert!(name.len() > 2, "{name}");
    }
}
