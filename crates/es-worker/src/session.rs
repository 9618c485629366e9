//! The worker's life (see the `.proto` for the protocol): load the data, then over and over
//! join, prove the golden task and serve one `Work` stream, reconnecting with backoff when
//! the transport fails or the coordinator stops, until the run is over, the worker is
//! refused, or `shutdown` resolves.
//!
//! The caches of a run (its context with the mapped noise table, the compute thread and the
//! last θ) survive reconnects to the same run and are dropped on `RUN_MISMATCH`.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::train::Perturbation;
use es_data::mnist::{self, Mnist};
use es_proto::pb::coordinator_client::CoordinatorClient;
use es_proto::pb::{self, RefusalReason};
use es_proto::{Digest, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, RunSpec};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::compute::{
    Backend, ChunkDone, ChunkJob, ChunkOutcome, ComputeThread, Fitnesses, SumsDone, SumsOutcome,
};
use crate::context::RunContext;
use crate::delegate::{DelegatedRun, SumsRequest};
use crate::error::WorkerError;
use crate::options::{AUTHORIZATION_KEY, DataSource, WorkerOptions};
use crate::relay::{self, Board};

/// How a worker's [`run`] ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// The coordinator said the run is over (`Shutdown { finished: true }`).
    Finished,
    /// The `shutdown` future resolved (e.g. SIGTERM).
    Shutdown,
}

/// HTTP/2 flow-control window of the worker's connection: room for a whole θ message.
pub(crate) const HTTP2_WINDOW: u32 = 8 << 20;
/// How long a `Join` call may take before it counts as a transport failure.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages the worker may queue on its `Work` stream before sending waits.
const OUTBOX: usize = 64;
/// Credits the worker grants per evaluation thread for each generation: enough queued work
/// that a thread seldom waits for the network between chunks. The coordinator hands out at
/// most half the credits per chunk (and otherwise about four chunks per thread of the run),
/// so 64 allows chunks of up to 32 pairs per thread with a second chunk queued. Pairs differ
/// in cost by more than 10×: 16 gave the recommended recipe's cheap pairs (one group of one
/// layer's neurons) chunks of about 1.5 ms of work on one thread, and a generation of 2 local
/// workers 0.071 s against 0.048 s with 64 (P = 256, B = 100, session 23); pairs that perturb
/// all of θ took the same time either way. 4 gave chunks of 2 and one round trip per 6 ms.
pub(crate) const CREDITS_PER_THREAD: u32 = 64;

/// Runs a worker until the run is over ([`WorkerExit::Finished`]), `shutdown` resolves
/// ([`WorkerExit::Shutdown`]), or a final error: a refusal, a coordinator that breaks the
/// protocol, data or a run the worker cannot evaluate, or (with
/// [`crate::Backoff::give_up_after`]) a coordinator that stays away too long.
///
/// Transport failures and a stopping coordinator (`Shutdown { finished: false }`) are
/// retried with [`WorkerOptions::reconnect`]'s backoff; `RUN_MISMATCH` drops the run's caches
/// and joins afresh. Forward passes run on a dedicated compute thread, never on the executor;
/// loading MNIST from a directory and opening the noise table run on `spawn_blocking`.
pub async fn run(
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerExit, WorkerError> {
    let span = info_span!("worker", name = %options.name);
    run_inner(options, shutdown).instrument(span).await
}

async fn run_inner(
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerExit, WorkerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let client = client(&options)?;
    let token = token_metadata(&options)?;
    // The relay server lives as long as this function: dropping the guard stops it.
    let (relay, _relay_server) = match &options.relay {
        Some(relay_options) => {
            let board = Board::new();
            let (port, server) =
                relay::bind(relay_options, options.token.as_deref(), board.clone()).await?;
            let server = AbortOnDrop(tokio::spawn(server));
            (Some(Relaying { port, board }), Some(server))
        }
        None => (None, None),
    };
    let data = tokio::select! {
        biased;
        () = &mut shutdown => return Ok(WorkerExit::Shutdown),
        data = load_data(options.data.clone()) => data?,
    };
    let mut worker = Worker {
        options,
        data,
        client,
        token,
        relay,
        cache: None,
        // Never 0, which means "no key".
        join_key: rand::random::<u64>().max(1),
        next_ticket: 1,
        pairs_sent: 0,
        failures: Failures::default(),
    };
    loop {
        let end = tokio::select! {
            biased;
            () = &mut shutdown => {
                info!("shutting down");
                return Ok(WorkerExit::Shutdown);
            }
            end = worker.session() => end?,
        };
        let (reason, drop_caches) = match end {
            SessionEnd::Finished => {
                info!(pairs_sent = worker.pairs_sent, "run finished");
                if let Some(cache) = &worker.cache {
                    cache.compute.run_finished().await;
                }
                return Ok(WorkerExit::Finished);
            }
            SessionEnd::Retry {
                reason,
                drop_caches,
            } => (reason, drop_caches),
        };
        if drop_caches && worker.cache.take().is_some() {
            info!("dropped the run's caches");
        }
        let delay =
            worker
                .failures
                .record(&worker.options.endpoint, &worker.options.reconnect, reason)?;
        warn!(
            attempt = worker.failures.attempts,
            delay_ms = delay.as_millis() as u64,
            endpoint = %worker.options.endpoint,
            error = %worker.failures.last_error,
            "reconnecting"
        );
        tokio::select! {
            biased;
            () = &mut shutdown => {
                info!("shutting down");
                return Ok(WorkerExit::Shutdown);
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The relay this worker serves: the port it announces and the θ it hands on.
struct Relaying {
    port: u16,
    board: Board,
}

/// Adds the shared token to every call.
#[derive(Clone, Debug)]
pub(crate) struct Auth(pub(crate) Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert(AUTHORIZATION_KEY, token.clone());
        }
        Ok(request)
    }
}

/// A client of `options.endpoint` on a lazily connected channel: it connects at the first
/// call and reconnects at the next call after a failure. HTTP/2 keep-alive pings detect a
/// coordinator that vanished without closing its connection.
fn client(options: &WorkerOptions) -> Result<Client, WorkerError> {
    let endpoint = Endpoint::from_shared(options.endpoint.clone())
        .map_err(|source| WorkerError::Endpoint {
            endpoint: options.endpoint.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // θ is 2.7 MB per generation: with HTTP/2's default 64 KiB windows it would arrive
        // in dozens of flow-control round trips.
        .initial_stream_window_size(HTTP2_WINDOW)
        .initial_connection_window_size(HTTP2_WINDOW)
        .max_frame_size(es_proto::HTTP2_MAX_FRAME_BYTES)
        .http2_keep_alive_interval(options.keepalive)
        .keep_alive_timeout(options.keepalive * 2)
        .keep_alive_while_idle(true);
    let endpoint = match &options.tls {
        None => endpoint,
        Some(tls) => {
            let failed = |reason: String| WorkerError::Tls {
                endpoint: options.endpoint.clone(),
                reason,
            };
            if endpoint.uri().scheme_str() != Some("https") {
                return Err(failed(
                    "the endpoint is not https://: TLS needs an https:// URI".into(),
                ));
            }
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint
                .tls_config(config)
                .map_err(|e| failed(e.to_string()))?
        }
    };
    let token = token_metadata(options)?;
    Ok(
        CoordinatorClient::with_interceptor(endpoint.connect_lazy(), Auth(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// The `authorization` metadata value of `options.token`, if any.
fn token_metadata(options: &WorkerOptions) -> Result<Option<AsciiMetadataValue>, WorkerError> {
    options
        .token
        .as_ref()
        .map(|token| {
            MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| WorkerError::InvalidToken)
        })
        .transpose()
}

async fn load_data(source: DataSource) -> Result<Arc<Mnist>, WorkerError> {
    let (dir, mirrors) = match source {
        DataSource::Loaded(data) => return Ok(data),
        DataSource::Dir { dir, mirrors } => (dir, mirrors),
    };
    let task_dir = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let result = if mirrors.is_empty() {
            mnist::load(&task_dir)
        } else {
            let mirrors: Vec<&str> = mirrors.iter().map(String::as_str).collect();
            mnist::load_or_download(&task_dir, &mirrors, &mut |event| {
                if let mnist::DownloadEvent::Started { file, url } = event {
                    info!(file, url = %url, "downloading mnist");
                }
            })
        };
        if result.is_ok() {
            info!(
                dir = %task_dir.display(),
                millis = started.elapsed().as_millis() as u64,
                "loaded mnist"
            );
        }
        result
    })
    .await
    .map_err(|source| WorkerError::Task {
        what: "mnist loading",
        source,
    })?;
    loaded
        .map(Arc::new)
        .map_err(|source| WorkerError::Data { dir, source })
}

/// Consecutive failures since the last accepted stream.
#[derive(Debug, Default)]
struct Failures {
    attempts: u32,
    since: Option<Instant>,
    last_error: String,
}

impl Failures {
    /// Records a failure: the delay before the next attempt, or the error of giving up.
    fn record(
        &mut self,
        endpoint: &str,
        policy: &crate::Backoff,
        error: String,
    ) -> Result<Duration, WorkerError> {
        let since = *self.since.get_or_insert_with(Instant::now);
        let delay = policy.delay(self.attempts);
        self.attempts += 1;
        self.last_error = error;
        let elapsed = since.elapsed();
        if !policy.keeps_trying(elapsed) {
            return Err(WorkerError::GaveUp {
                endpoint: endpoint.to_owned(),
                attempts: self.attempts,
                elapsed,
                limit: policy.give_up_after.unwrap_or(Duration::MAX),
                last_error: std::mem::take(&mut self.last_error),
            });
        }
        Ok(delay)
    }

    fn reset(&mut self) {
        *self = Failures::default();
    }
}

/// How one session (a join and at most one `Work` stream) ended, if not with an error.
#[derive(Debug)]
enum SessionEnd {
    /// The run is over.
    Finished,
    /// Join again after the backoff delay, first dropping the run's caches if asked to.
    Retry { reason: String, drop_caches: bool },
}

impl SessionEnd {
    fn retry(reason: impl Into<String>) -> SessionEnd {
        SessionEnd::Retry {
            reason: reason.into(),
            drop_caches: false,
        }
    }
}

/// A refusal, in a `JoinReply`, a `Shutdown` or a status: `RUN_MISMATCH` means "join
/// afresh"; any other reason is final.
fn refused(reason: RefusalReason, message: String) -> Result<SessionEnd, WorkerError> {
    match reason {
        RefusalReason::RunMismatch => {
            info!(reason = %message, "coordinator asks to join afresh");
            Ok(SessionEnd::Retry {
                reason: format!("coordinator asks to join afresh: {message}"),
                drop_caches: true,
            })
        }
        // The .proto: a peer that receives UNSPECIFIED treats it as BAD_REQUEST.
        RefusalReason::Unspecified => Err(WorkerError::Refused {
            reason: RefusalReason::BadRequest,
            message,
        }),
        reason => Err(WorkerError::Refused { reason, message }),
    }
}

fn refusal(r: pb::Refusal) -> Result<SessionEnd, WorkerError> {
    refused(r.reason(), r.message)
}

/// A failed call: a refusal sent as a status (`"REFUSAL_REASON_…: message"`, see
/// `From<pb::Refusal> for tonic::Status`) is handled as a refusal; statuses that retrying
/// cannot fix are final; anything else is a transport failure to retry.
fn failed_call(call: &'static str, status: tonic::Status) -> Result<SessionEnd, WorkerError> {
    use tonic::Code;
    if let Some((name, message)) = status.message().split_once(": ")
        && let Some(reason) = RefusalReason::from_str_name(name)
    {
        return refused(reason, message.to_owned());
    }
    match status.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::Unimplemented
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::ResourceExhausted => Err(WorkerError::Rejected { call, status }),
        _ => Ok(SessionEnd::retry(format!(
            "{call} call failed with status {:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

/// The caches of the run the worker serves: all rebuildable from the `RunSpec`.
#[derive(Debug)]
struct RunCache {
    run_id: String,
    spec: RunSpec,
    context: Arc<RunContext>,
    compute: Backend,
    /// The last θ received, by digest.
    theta: Option<(Digest, Arc<Vec<f32>>)>,
}

struct Worker {
    options: WorkerOptions,
    data: Arc<Mnist>,
    client: Client,
    /// The token as metadata, for fetches from other workers' relays.
    token: Option<AsciiMetadataValue>,
    /// The relay this worker serves, if any.
    relay: Option<Relaying>,
    cache: Option<RunCache>,
    /// Sent with every Join (`JoinRequest.join_key`): a Join retried after a lost reply or a
    /// stream that never opened replaces the earlier one instead of holding a second place.
    join_key: u64,
    /// The next generation ticket (see `compute`); unique over the worker's life.
    next_ticket: u64,
    failures: Failures,
    /// Pairs evaluated and sent over the worker's life (for its logs).
    pairs_sent: u64,
}

impl Worker {
    /// One join and, if accepted, one `Work` stream until it ends.
    async fn session(&mut self) -> Result<SessionEnd, WorkerError> {
        let threads = self.options.threads.max(1);
        let run_id = self
            .cache
            .as_ref()
            .map(|c| c.run_id.clone())
            .unwrap_or_default();
        let mut request = tonic::Request::new(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            run_id,
            data_digest: self.data.digest.to_vec(),
            threads: u32::try_from(threads).unwrap_or(u32::MAX),
            name: self.options.name.clone(),
            kernel: self.options.kernel.name().to_owned(),
            sums_noise: true,
            relay_port: self.relay.as_ref().map_or(0, |r| u32::from(r.port)),
            relay_host: self
                .options
                .relay
                .as_ref()
                .and_then(|r| r.host.clone())
                .unwrap_or_default(),
            carried_credits: true,
            hub: self.options.delegate.is_some(),
            join_key: self.join_key,
        });
        request.set_timeout(JOIN_TIMEOUT);
        // The deadline is also enforced here: over a network that swallows packets the
        // coordinator never sees the request, let alone its timeout.
        let reply = match tokio::time::timeout(JOIN_TIMEOUT, self.client.join(request)).await {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) => return failed_call("join", status),
            Err(_) => return Ok(SessionEnd::retry("join timed out")),
        };
        let accepted = match reply.outcome {
            Some(pb::join_reply::Outcome::Accepted(accepted)) => accepted,
            Some(pb::join_reply::Outcome::Refused(r)) => return refusal(r),
            None => {
                return Err(WorkerError::Protocol(
                    "join reply holds neither accepted nor refused: expected one of them".into(),
                ));
            }
        };
        if accepted.protocol_version != PROTOCOL_VERSION {
            return Err(WorkerError::Protocol(format!(
                "join accepted with protocol version {}: expected {PROTOCOL_VERSION}",
                accepted.protocol_version
            )));
        }
        let spec = RunSpec::try_from(accepted.spec.ok_or_else(|| {
            WorkerError::Protocol("join accepted without a spec: expected the run".into())
        })?)
        .map_err(WorkerError::Spec)?;
        let golden = accepted.golden.ok_or_else(|| {
            WorkerError::Protocol("join accepted without a golden task: expected one".into())
        })?;
        info!(
            run_id = %accepted.run_id,
            worker_id = accepted.worker_id,
            run_seed = spec.run_seed,
            params = es_kernel::ParamLayout::new(&spec.net).len(),
            population = spec.es.population,
            noise = ?spec.noise,
            "joined"
        );
        self.prepare_run(&accepted.run_id, spec).await?;
        let cache = self.cache.as_mut().expect("prepared above");
        let permit = match &self.options.proof_permits {
            Some(permits) => Some(permits.acquire().await.map_err(|_| {
                WorkerError::Compute("the golden-proof permits were closed".into())
            })?),
            None => None,
        };
        let proof = cache
            .compute
            .golden(golden.generation, golden.index)
            .await?;
        drop(permit);
        debug!(
            generation = golden.generation,
            index = golden.index,
            "computed the golden proof"
        );

        let (out, outbox) = mpsc::channel(OUTBOX);
        let cached = cache.theta.as_ref().map(|(digest, _)| digest);
        let prove = pb::Prove::new(&accepted.run_id, accepted.worker_id, &proof, cached);
        out.send(prove.into())
            .await
            .expect("the receiver is held below");
        let opened =
            tokio::time::timeout(JOIN_TIMEOUT, self.client.work(ReceiverStream::new(outbox)));
        let inbound = match opened.await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return failed_call("work", status),
            Err(_) => return Ok(SessionEnd::retry("opening the work stream timed out")),
        };
        let heartbeat = (accepted.heartbeat_interval_ms > 0)
            .then(|| Duration::from_millis(accepted.heartbeat_interval_ms.into()));
        let (done, finished) = mpsc::unbounded_channel();
        let (sums_done, sums_finished) = mpsc::unbounded_channel();
        let (fetched_tx, fetched) = mpsc::unbounded_channel();
        let serving = Serving {
            cache,
            token: self.token.clone(),
            board: self.relay.as_ref().map(|r| r.board.clone()),
            fetched_tx,
            sums_done,
            credits: CREDITS_PER_THREAD.saturating_mul(u32::try_from(threads).unwrap_or(u32::MAX)),
            carried_credits: accepted.carried_credits,
            out,
            done,
            current: None,
            next_ticket: &mut self.next_ticket,
            pairs_sent: &mut self.pairs_sent,
            failures: &mut self.failures,
            proven: false,
        };
        let span = info_span!("stream", worker_id = accepted.worker_id);
        serving
            .serve(inbound, finished, sums_finished, fetched, heartbeat)
            .instrument(span)
            .await
    }

    /// Makes `self.cache` hold the context of `spec`, keeping the current one if it is the
    /// same run.
    async fn prepare_run(&mut self, run_id: &str, spec: RunSpec) -> Result<(), WorkerError> {
        if let Some(cache) = &self.cache
            && cache.run_id == run_id
            && cache.spec == spec
        {
            return Ok(());
        }
        // Free the old table and θ before building the new ones.
        self.cache = None;
        let data = Arc::clone(&self.data);
        let cache_dir = self.options.cache_dir.clone();
        let task_spec = spec.clone();
        let started = Instant::now();
        let context =
            tokio::task::spawn_blocking(move || RunContext::new(task_spec, data, &cache_dir))
                .await
                .map_err(|source| WorkerError::Task {
                    what: "noise table",
                    source,
                })??;
        info!(
            millis = started.elapsed().as_millis() as u64,
            "prepared the run"
        );
        let context = Arc::new(context);
        let fitnesses = if self.options.fake_fitness {
            Fitnesses::Fake
        } else {
            Fitnesses::Evaluated
        };
        let compute = match &self.options.delegate {
            Some(delegate) => {
                let current = Arc::new(std::sync::atomic::AtomicU64::new(
                    crate::delegate::NO_TICKET,
                ));
                let run = DelegatedRun {
                    run_id: run_id.to_owned(),
                    spec: spec.clone(),
                    noise: context.noise.clone(),
                    data: Arc::clone(&context.data),
                    kernel: self.options.kernel,
                    current: Arc::clone(&current),
                };
                Backend::Delegated {
                    work: delegate.start(run).await?,
                    current,
                }
            }
            None => Backend::Local(ComputeThread::spawn(
                Arc::clone(&context),
                self.options.kernel,
                self.options.threads,
                fitnesses,
            )?),
        };
        self.cache = Some(RunCache {
            run_id: run_id.to_owned(),
            spec,
            context,
            compute,
            theta: None,
        });
        Ok(())
    }
}

/// The generation the worker is working on.
#[derive(Debug)]
struct Current {
    generation: u32,
    ticket: u64,
    digest: Digest,
    theta: Option<Arc<Vec<f32>>>,
    batch: Arc<es_kernel::Batch>,
    perturbation: Arc<Perturbation>,
    /// Assigned chunks waiting for θ (after a `ThetaRequest`).
    waiting: Vec<Range<u32>>,
    /// θ is being fetched from another worker's relay.
    fetching: bool,
    /// Credits the coordinator holds for this generation on the worker's behalf: its own
    /// grant (`Generation.credits`) and, once θ is here, the Ready that tops it up to the
    /// worker's capacity.
    granted: u32,
}

/// The end of a fetch of θ from another worker's relay.
struct Fetched {
    generation: u32,
    digest: Digest,
    outcome: Result<(bytes::Bytes, Vec<f32>), String>,
}

/// One `Work` stream being served.
struct Serving<'a> {
    cache: &'a mut RunCache,
    /// The token as metadata, for fetches from other workers' relays.
    token: Option<AsciiMetadataValue>,
    /// Where the θ this worker holds is published for its relay, if it relays.
    board: Option<Board>,
    /// Fetches from other workers' relays report here.
    fetched_tx: mpsc::UnboundedSender<Fetched>,
    /// The worker's full capacity in indices, granted for each generation.
    credits: u32,
    /// The coordinator agreed to carried credits: it grants them in `Generation` and takes
    /// them back with `Results` (no Ready after each chunk).
    carried_credits: bool,
    out: mpsc::Sender<pb::WorkerMessage>,
    done: mpsc::UnboundedSender<ChunkDone>,
    sums_done: mpsc::UnboundedSender<SumsDone>,
    current: Option<Current>,
    next_ticket: &'a mut u64,
    failures: &'a mut Failures,
    pairs_sent: &'a mut u64,
    proven: bool,
}

/// What handling one message leads to: go on (`None`), end the session, or fail.
type Step = Result<Option<SessionEnd>, WorkerError>;

impl Serving<'_> {
    async fn serve(
        mut self,
        mut inbound: tonic::Streaming<pb::CoordinatorMessage>,
        mut finished: mpsc::UnboundedReceiver<ChunkDone>,
        mut sums_finished: mpsc::UnboundedReceiver<SumsDone>,
        mut fetched: mpsc::UnboundedReceiver<Fetched>,
        heartbeat: Option<Duration>,
    ) -> Result<SessionEnd, WorkerError> {
        // However the stream ends, its queued chunks are skipped.
        let _guard = self.cache.compute.ticket_guard();
        let mut heartbeat = heartbeat.map(|period| {
            let mut interval =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        loop {
            let step = tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(message)) => self.on_message(message).await,
                    Some(Err(status)) => failed_call("work", status).map(Some),
                    None => Ok(Some(SessionEnd::retry("coordinator closed the work stream"))),
                },
                Some(done) = finished.recv() => self.on_done(done).await,
                Some(done) = sums_finished.recv() => self.on_sums_done(done).await,
                Some(fetched) = fetched.recv() => self.on_fetched(fetched).await,
                _ = async {
                    match &mut heartbeat {
                        Some(interval) => interval.tick().await,
                        None => std::future::pending().await,
                    }
                } => self.send(pb::Heartbeat {}).await,
            };
            if let Some(end) = step? {
                return Ok(end);
            }
        }
    }

    async fn on_message(&mut self, message: pb::CoordinatorMessage) -> Step {
        use pb::coordinator_message::Kind;
        match message.kind {
            Some(Kind::ProofAccepted(_)) => self.on_proof_accepted().await,
            Some(Kind::Generation(generation)) => self.on_generation(generation).await,
            Some(Kind::Assign(assign)) => self.on_assign(assign).await,
            Some(Kind::SumNoise(sum)) => self.on_sum_noise(sum),
            Some(Kind::Shutdown(shutdown)) => on_shutdown(shutdown).map(Some),
            None => {
                // A kind added after this worker was built: nothing it could act on.
                warn!("ignoring a coordinator message of an unknown kind");
                Ok(None)
            }
        }
    }

    async fn on_proof_accepted(&mut self) -> Step {
        if self.proven {
            warn!("ignoring a repeated proof acceptance");
            return Ok(None);
        }
        self.proven = true;
        self.failures.reset();
        // Credits are per generation: they are granted when a Generation arrives.
        info!("proof accepted");
        Ok(None)
    }

    /// A Generation resets the credits on both sides (the coordinator counts from zero), so
    /// each one that leaves the worker holding θ is answered with a Ready for its full
    /// capacity. A new generation abandons the chunks of older ones; the answer to a
    /// ThetaRequest (the same generation and digest, now with θ) keeps them.
    async fn on_generation(&mut self, message: pb::Generation) -> Step {
        let digest = message
            .checked_theta_digest()
            .map_err(|source| malformed("generation", source))?;
        let theta = message
            .checked_theta(self.cache.context.dim)
            .map_err(|source| malformed("generation", source))?
            .map(Arc::new);
        let t = message.generation;
        let same = self
            .current
            .as_ref()
            .is_some_and(|c| c.generation == t && c.digest == digest);
        if !same {
            let ticket = *self.next_ticket;
            *self.next_ticket += 1;
            // Queued chunks of older generations are skipped from now on.
            self.cache.compute.set_current(ticket);
            let context = &self.cache.context;
            self.current = Some(Current {
                generation: t,
                ticket,
                digest,
                theta: None,
                batch: Arc::new(context.minibatch(t)),
                perturbation: Arc::new(context.perturbation(t)),
                waiting: Vec::new(),
                fetching: false,
                granted: if self.carried_credits {
                    message.credits
                } else {
                    0
                },
            });
        }
        let current = self.current.as_mut().expect("set above");
        if same && !self.carried_credits {
            // Without carried credits, a repeated Generation reset the coordinator's count.
            current.granted = 0;
        }
        if current.theta.is_none() {
            if theta.is_some()
                && let Some(board) = &self.board
            {
                board.publish(&self.cache.run_id, digest, message.theta.clone());
            }
            let theta = theta.or_else(|| match &self.cache.theta {
                Some((cached, theta)) if *cached == digest => Some(Arc::clone(theta)),
                _ => None,
            });
            if let Some(theta) = &theta {
                self.cache.theta = Some((digest, Arc::clone(theta)));
            }
            current.theta = theta;
        }
        debug!(
            generation = t,
            has_theta = current.theta.is_some(),
            repeated = same,
            "generation"
        );
        if current.theta.is_none() {
            if !message.theta_source.is_empty() {
                if !current.fetching {
                    current.fetching = true;
                    self.start_fetch(t, digest, message.theta_source);
                }
                return Ok(None);
            }
            debug!(generation = t, "requesting theta");
            return self.send(pb::ThetaRequest::new(t, &digest)).await;
        }
        self.theta_arrived().await
    }

    /// Fetches θ `digest` of generation `t` from the relay at `source` in the background;
    /// the outcome comes back to [`Self::on_fetched`].
    fn start_fetch(&self, t: u32, digest: Digest, source: String) {
        debug!(generation = t, %source, "fetching theta from a relay");
        let (token, run_id, dim) = (
            self.token.clone(),
            self.cache.run_id.clone(),
            self.cache.context.dim,
        );
        let report = self.fetched_tx.clone();
        tokio::spawn(async move {
            let outcome = relay::fetch(&source, token, &run_id, &digest, dim).await;
            let _ = report.send(Fetched {
                generation: t,
                digest,
                outcome,
            });
        });
    }

    /// A fetch from a relay ended: θ of the current generation is used (and handed on in
    /// turn); after a failure the coordinator is asked for it. Fetches of older generations
    /// are dropped.
    async fn on_fetched(&mut self, fetched: Fetched) -> Step {
        let Fetched {
            generation,
            digest,
            outcome,
        } = fetched;
        let Some(current) = self
            .current
            .as_mut()
            .filter(|c| c.generation == generation && c.digest == digest && c.theta.is_none())
        else {
            return Ok(None);
        };
        current.fetching = false;
        match outcome {
            Ok((bytes, theta)) => {
                let theta = Arc::new(theta);
                if let Some(board) = &self.board {
                    board.publish(&self.cache.run_id, digest, bytes);
                }
                self.cache.theta = Some((digest, Arc::clone(&theta)));
                current.theta = Some(theta);
                debug!(generation, "theta fetched from a relay");
                self.theta_arrived().await
            }
            Err(reason) => {
                warn!(generation, %reason, "fetching theta from a relay failed: asking the coordinator");
                self.send(pb::ThetaRequest::new(generation, &digest)).await
            }
        }
    }

    /// The current generation's θ is here: its waiting chunks start, and the coordinator
    /// gets the rest of this worker's credits for it (all of them unless the Generation
    /// granted some; none when it granted them all).
    async fn theta_arrived(&mut self) -> Step {
        let current = self.current.as_mut().expect("a generation is current");
        let t = current.generation;
        let wanted = self.credits.saturating_sub(current.granted);
        current.granted = current.granted.max(self.credits);
        for indices in std::mem::take(&mut current.waiting) {
            self.submit_chunk(indices)?;
        }
        if wanted == 0 {
            return Ok(None);
        }
        self.send(pb::Ready {
            generation: t,
            credits: wanted,
        })
        .await
    }

    async fn on_assign(&mut self, assign: pb::Assign) -> Step {
        let pb::Assign {
            generation,
            first_index,
            count,
        } = assign;
        let population = self.cache.context.es.population as u64;
        let end = u64::from(first_index) + u64::from(count);
        if count == 0 || end > population {
            return Err(WorkerError::Protocol(format!(
                "assign of {count} indices from {first_index} in generation {generation}: \
                 expected at least 1 index, all below the population {population}"
            )));
        }
        let indices = first_index..first_index + count;
        match &mut self.current {
            Some(current) if current.generation == generation => {
                if current.theta.is_some() {
                    self.submit_chunk(indices)?;
                } else {
                    current.waiting.push(indices);
                }
                Ok(None)
            }
            current => {
                // The .proto: a worker ignores an Assign of another generation (its credits
                // were reset by the Generation that made it stale).
                warn!(
                    generation,
                    current = current.as_ref().map(|c| c.generation),
                    "ignoring an assign of another generation"
                );
                Ok(None)
            }
        }
    }

    /// Queues one job per range; a SumNoise of a generation other than the current one is
    /// ignored (the coordinator sums what nobody answers itself).
    fn on_sum_noise(&mut self, message: pb::SumNoise) -> Step {
        let context = &self.cache.context;
        let weights = message
            .checked_weights(context.es.population)
            .map_err(|source| malformed("sum_noise", source))?;
        let ranges = message
            .checked_ranges(context.dim)
            .map_err(|source| malformed("sum_noise", source))?;
        let generation = message.generation;
        let Some(current) = self.current.as_ref().filter(|c| c.generation == generation) else {
            warn!(
                generation,
                current = self.current.as_ref().map(|c| c.generation),
                "ignoring a sum-noise request of another generation"
            );
            return Ok(None);
        };
        let request = SumsRequest {
            ticket: current.ticket,
            generation,
            weights: Arc::new(weights),
            ranges,
        };
        self.cache.compute.submit_sums(request, &self.sums_done)?;
        Ok(None)
    }

    /// Sums of the current generation go back to the coordinator; older ones are dropped.
    async fn on_sums_done(&mut self, done: SumsDone) -> Step {
        let current = self
            .current
            .as_ref()
            .is_some_and(|c| c.ticket == done.ticket);
        match done.outcome {
            SumsOutcome::Failed(message) => Err(WorkerError::Compute(message)),
            SumsOutcome::Done(sums) if current => {
                debug!(
                    generation = done.generation,
                    range = ?done.range,
                    "noise summed"
                );
                self.send(pb::NoiseSums::new(done.generation, done.range.start, &sums))
                    .await
            }
            SumsOutcome::Done(_) | SumsOutcome::Skipped => {
                debug!(
                    generation = done.generation,
                    range = ?done.range,
                    "noise sums abandoned"
                );
                Ok(None)
            }
        }
    }

    fn submit_chunk(&mut self, indices: Range<u32>) -> Result<(), WorkerError> {
        let current = self
            .current
            .as_ref()
            .expect("chunks belong to a generation");
        let job = ChunkJob {
            ticket: current.ticket,
            generation: current.generation,
            theta: Arc::clone(current.theta.as_ref().expect("θ is present")),
            batch: Arc::clone(&current.batch),
            perturbation: Arc::clone(&current.perturbation),
            indices,
        };
        self.cache.compute.submit(job, &self.done)
    }

    /// A finished chunk of the current generation is sent back with its indices' credits
    /// (carried, or in a Ready after the results); one of an older generation is dropped (the coordinator would drop it too, and the new
    /// Generation reset the credits).
    async fn on_done(&mut self, done: ChunkDone) -> Step {
        let count = done.indices.len() as u32;
        let current = self
            .current
            .as_ref()
            .is_some_and(|c| c.ticket == done.ticket);
        match done.outcome {
            ChunkOutcome::Failed(message) => Err(WorkerError::Compute(message)),
            ChunkOutcome::Done(pairs) if current => {
                debug!(
                    generation = done.generation,
                    first = done.indices.start,
                    count,
                    "chunk evaluated"
                );
                let results = pb::Results::new(done.generation, &pairs);
                if self.carried_credits {
                    let end = self.send(results.returning(count)).await?;
                    if end.is_none() {
                        *self.pairs_sent += pairs.len() as u64;
                    }
                    return Ok(end);
                }
                if let Some(end) = self.send(results).await? {
                    return Ok(Some(end));
                }
                *self.pairs_sent += pairs.len() as u64;
                self.send(pb::Ready {
                    generation: done.generation,
                    credits: count,
                })
                .await
            }
            ChunkOutcome::Done(_) | ChunkOutcome::Skipped => {
                debug!(
                    generation = done.generation,
                    first = done.indices.start,
                    count,
                    "chunk abandoned"
                );
                Ok(None)
            }
        }
    }

    /// Sends `message`; a closed stream ends the session for a retry.
    async fn send(&self, message: impl Into<pb::WorkerMessage>) -> Step {
        match self.out.send(message.into()).await {
            Ok(()) => Ok(None),
            Err(_) => Ok(Some(SessionEnd::retry(
                "the work stream closed while sending",
            ))),
        }
    }
}

fn on_shutdown(shutdown: pb::Shutdown) -> Result<SessionEnd, WorkerError> {
    info!(
        reason = %shutdown.reason,
        finished = shutdown.finished,
        refused = shutdown.refusal.is_some(),
        "coordinator ends the stream"
    );
    if let Some(r) = shutdown.refusal {
        refusal(r)
    } else if shutdown.finished {
        Ok(SessionEnd::Finished)
    } else {
        Ok(SessionEnd::retry(format!(
            "coordinator is stopping: {}",
            shutdown.reason
        )))
    }
}

fn malformed(message: &'static str, source: es_proto::ConversionError) -> WorkerError {
    WorkerError::Malformed { message, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_sent_as_statuses_are_refusals() {
        let status = tonic::Status::from(pb::Refusal::new(
            RefusalReason::GoldenMismatch,
            "center fitness is 1: expected 2",
        ));
        let e = failed_call("work", status).unwrap_err();
        assert!(e.is_refusal(), "{e}");
        assert!(
            e.to_string().contains("center fitness is 1: expected 2"),
            "{e}"
        );

        let status = tonic::Status::from(pb::Refusal::new(RefusalReason::RunMismatch, "new run"));
        assert!(matches!(
            failed_call("join", status),
            Ok(SessionEnd::Retry {
                drop_caches: true,
                ..
            })
        ));
    }

    #[test]
    fn transport_failures_are_retried_and_a_bad_token_is_final() {
        for status in [
            tonic::Status::unavailable("connection refused"),
            tonic::Status::unknown("h2 protocol error"),
            tonic::Status::cancelled("stream reset"),
            tonic::Status::deadline_exceeded("timeout"),
        ] {
            assert!(matches!(
                failed_call("join", status),
                Ok(SessionEnd::Retry {
                    drop_caches: false,
                    ..
                })
            ));
        }
        let e = failed_call("join", tonic::Status::unauthenticated("bad token")).unwrap_err();
        assert!(
            matches!(e, WorkerError::Rejected { call: "join", .. }),
            "{e}"
        );
        assert!(e.to_string().ends_with(": bad token"), "{e}");
    }

    #[test]
    fn an_unspecified_refusal_counts_as_a_bad_request() {
        let e = refused(RefusalReason::Unspecified, "?".into()).unwrap_err();
        assert!(matches!(
            e,
            WorkerError::Refused {
                reason: RefusalReason::BadRequest,
                ..
            }
        ));
    }

    #[test]
    fn failures_back_off_and_give_up_after_the_limit() {
        let policy = crate::Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(25),
            give_up_after: Some(Duration::from_millis(50)),
        };
        let mut failures = Failures::default();
        let delays: Vec<Duration> = (0..3)
            .map(|_| failures.record("e", &policy, "x".into()).unwrap())
            .collect();
        assert_eq!(delays, [10, 20, 25].map(Duration::from_millis).to_vec());
        failures.reset();
        assert_eq!(
            failures.record("e", &policy, "x".into()).unwrap(),
            Duration::from_millis(10)
        );
        std::thread::sleep(Duration::from_millis(60));
        let e = failures
            .record("http://c:1", &policy, "refused".into())
            .unwrap_err();
        assert!(matches!(e, WorkerError::GaveUp { attempts: 2, .. }), "{e}");
    }

    #[test]
    fn a_token_that_is_no_header_value_is_refused_at_start() {
        let data = DataSource::Dir {
            dir: "/nonexistent".into(),
            mirrors: Vec::new(),
        };
        let mut options = WorkerOptions::new("http://127.0.0.1:1", data);
        options.token = Some("line\nbreak".into());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = runtime
            .block_on(run(options, std::future::pending()))
            .unwrap_err();
        assert!(matches!(e, WorkerError::InvalidToken), "{e}");
    }
}
