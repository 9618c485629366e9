//! The cluster coordinator: a gRPC server that waits for N workers, proves each one's
//! arithmetic, broadcasts θ each generation, hands out perturbation indices in chunks as
//! workers grant credits, collects the fitnesses and applies the update.
//!
//! The network code is thin: every decision about indices lives in the synchronous
//! [`GenerationWork`] behind one mutex, and the numeric work (update, test evaluation, the
//! golden proof) runs on blocking threads, never on the async executor.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_core::noise::NoiseSource;
use es_core::train::{
    Dataset, EsState, EvalPool, GenerationReport, PairResult, UpdateStats, apply_update,
    golden_task,
};
use es_data::mnist::Mnist;
use es_kernel::{Evaluation, NetConfig};
use es_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use es_proto::pb::{self, RefusalReason};
use es_proto::{Digest, EncodedTheta, GoldenEval, GoldenProof, PROTOCOL_VERSION};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::RunError;
use crate::config::RunConfig;
use crate::embedded::{self, Environment, RunSummary};
use crate::run_dir::RunDir;
use crate::scheduler::{GenerationWork, Submitted, WorkerId};

/// How the cluster waits for and watches its workers.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Workers to wait for before the first generation; later ones join the run as they come.
    pub workers: usize,
    /// A chunk not finished this long after it was handed out goes to another worker.
    pub lease: Duration,
    /// How often workers send a heartbeat; a stream silent for three intervals is dropped.
    pub heartbeat: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: 1,
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(2),
        }
    }
}

/// The golden task every worker of a run must reproduce: generation 0's minibatch and σ,
/// perturbation 0.
const GOLDEN_GENERATION: u32 = 0;
const GOLDEN_INDEX: u32 = 0;

/// What the coordinator knows about a proven worker with an open stream.
struct WorkerSlot {
    name: String,
    threads: u32,
    /// Indices the worker has room for (granted minus assigned).
    credits: u32,
    /// The largest single grant of this generation: the worker's capacity.
    capacity: u32,
    tx: mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>,
    /// The θ the worker holds, as far as the coordinator knows.
    theta_digest: Option<Digest>,
}

#[derive(Default)]
struct State {
    next_worker_id: WorkerId,
    /// Joined but not yet proven, with their thread counts and names.
    joined: HashMap<WorkerId, (u32, String)>,
    workers: HashMap<WorkerId, WorkerSlot>,
    work: Option<GenerationWork>,
    /// The current generation and its θ.
    current: Option<(u32, Arc<EncodedTheta>)>,
    chunk_size: u32,
    faulty: HashSet<WorkerId>,
    rejected_messages: u64,
    /// Set when training ends: `Some(true)` when the run completed, `Some(false)` when the
    /// coordinator stopped early (a worker that joins now should come back later).
    finished: Option<bool>,
    /// Protobuf payload bytes sent and received on work streams, since the last generation.
    bytes_sent: u64,
    bytes_received: u64,
}

/// Sends `message` to a worker, counting its payload bytes. A closed channel means the stream
/// is ending; its handler releases the worker's leases.
fn send(
    bytes_sent: &mut u64,
    tx: &mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>,
    message: pb::CoordinatorMessage,
) {
    *bytes_sent += prost::Message::encoded_len(&message) as u64;
    let _ = tx.send(Ok(message));
}

/// Everything the gRPC handlers share.
struct Shared {
    run_id: String,
    spec: pb::RunSpec,
    golden: GoldenProof,
    data_digest: Digest,
    batch_size: usize,
    options: ClusterOptions,
    state: Mutex<State>,
    /// Signalled when a worker is proven or lost and when a generation completes.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("no handler panics while holding the state")
    }
}

/// Hands `worker` chunks of the current generation while it has credits.
fn assign_to(state: &mut State, worker: WorkerId, lease: Duration) {
    let chunk_size = state.chunk_size.max(1);
    let State {
        work,
        workers,
        bytes_sent,
        ..
    } = state;
    let (Some(work), Some(slot)) = (work.as_mut(), workers.get_mut(&worker)) else {
        return;
    };
    let now = Instant::now();
    while slot.credits > 0 {
        // At most half the worker's capacity per chunk, so that it holds a second chunk while
        // it evaluates the first and never waits a round trip for work. (Half of the *current*
        // credits would shrink chunks to single indices, which a multi-threaded worker cannot
        // spread over its threads.)
        let count = chunk_size.min((slot.capacity / 2).max(1)).min(slot.credits);
        let Some(chunk) = work.assign(worker, count, now, lease) else {
            break;
        };
        slot.credits -= chunk.count;
        let assign = pb::Assign {
            generation: work.generation(),
            first_index: chunk.first,
            count: chunk.count,
        };
        send(bytes_sent, &slot.tx, assign.into());
    }
}

fn assign_all(state: &mut State, lease: Duration) {
    let ids: Vec<WorkerId> = state.workers.keys().copied().collect();
    for id in ids {
        assign_to(state, id, lease);
    }
}

/// Sends the current generation to `worker`: θ's bytes, or its digest alone if the worker
/// holds it.
fn announce(state: &mut State, worker: WorkerId) {
    let Some((generation, theta)) = state.current.clone() else {
        return;
    };
    let State {
        workers,
        bytes_sent,
        ..
    } = state;
    let Some(slot) = workers.get_mut(&worker) else {
        return;
    };
    let message = if slot.theta_digest == Some(*theta.digest()) {
        pb::Generation::digest_only(generation, theta.digest())
    } else {
        pb::Generation::with_theta(generation, &theta)
    };
    slot.theta_digest = Some(*theta.digest());
    // A Generation resets the worker's credits: it answers with a Ready for this generation.
    slot.credits = 0;
    slot.capacity = 0;
    send(bytes_sent, &slot.tx, message.into());
}

struct Service(Arc<Shared>);

fn refuse(reason: RefusalReason, message: String) -> pb::JoinReply {
    tracing::warn!(reason = reason.as_str_name(), %message, "refused a worker");
    pb::Refusal::new(reason, message).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let peer = request.remote_addr();
        let join = request.into_inner();
        let shared = &self.0;
        if join.protocol_version != PROTOCOL_VERSION {
            return Ok(Response::new(refuse(
                RefusalReason::VersionMismatch,
                format!(
                    "worker speaks protocol version {}: this coordinator speaks version {PROTOCOL_VERSION}; run workers built from the same release",
                    join.protocol_version
                ),
            )));
        }
        if !join.run_id.is_empty() && join.run_id != shared.run_id {
            return Ok(Response::new(refuse(
                RefusalReason::RunMismatch,
                format!(
                    "run {} is over: this coordinator serves run {}; join afresh",
                    join.run_id, shared.run_id
                ),
            )));
        }
        if join.data_digest != shared.data_digest {
            return Ok(Response::new(refuse(
                RefusalReason::DataMismatch,
                format!(
                    "data digest {} differs from the coordinator's {}: the worker has other MNIST files",
                    hex(&join.data_digest),
                    hex(&shared.data_digest)
                ),
            )));
        }
        if join.threads == 0 {
            return Ok(Response::new(refuse(
                RefusalReason::BadRequest,
                "threads is 0: expected at least 1".into(),
            )));
        }
        let worker_id = {
            let mut state = shared.lock();
            state.next_worker_id += 1;
            let id = state.next_worker_id;
            state.joined.insert(id, (join.threads, join.name.clone()));
            id
        };
        tracing::info!(worker_id, name = %join.name, threads = join.threads, kernel = %join.kernel, ?peer, "worker joined");
        let accepted = pb::JoinAccepted {
            protocol_version: PROTOCOL_VERSION,
            run_id: shared.run_id.clone(),
            worker_id,
            spec: Some(shared.spec.clone()),
            golden: Some(pb::GoldenTask {
                generation: GOLDEN_GENERATION,
                index: GOLDEN_INDEX,
            }),
            heartbeat_interval_ms: shared.options.heartbeat.as_millis().min(u32::MAX as u128)
                as u32,
        };
        Ok(Response::new(accepted.into()))
    }

    type WorkStream = UnboundedReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn work(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve_worker(Arc::clone(&self.0), inbound, tx));
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

fn shutdown_message(
    refusal: Option<pb::Refusal>,
    reason: &str,
    finished: bool,
) -> pb::CoordinatorMessage {
    pb::Shutdown {
        reason: reason.to_string(),
        refusal,
        finished,
    }
    .into()
}

/// Checks the first message of a stream: it must prove a joined worker of this run.
fn check_proof(
    shared: &Shared,
    first: Option<pb::WorkerMessage>,
) -> Result<(WorkerId, Option<Digest>), pb::Refusal> {
    let bad = |m: String| pb::Refusal::new(RefusalReason::BadRequest, m);
    let Some(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Prove(prove)),
    }) = first
    else {
        return Err(bad(
            "the first message of a work stream must be prove".into()
        ));
    };
    if prove.protocol_version != PROTOCOL_VERSION {
        return Err(pb::Refusal::new(
            RefusalReason::VersionMismatch,
            format!(
                "prove speaks protocol version {}: expected {PROTOCOL_VERSION}",
                prove.protocol_version
            ),
        ));
    }
    if prove.run_id != shared.run_id {
        return Err(pb::Refusal::new(
            RefusalReason::RunMismatch,
            format!(
                "prove names run {:?}: this coordinator serves run {}",
                prove.run_id, shared.run_id
            ),
        ));
    }
    let golden = prove
        .golden
        .as_ref()
        .ok_or_else(|| bad("prove has no golden proof".into()))
        .and_then(|g| GoldenProof::try_from(g).map_err(|e| bad(e.to_string())))?;
    let cached = prove
        .checked_cached_theta_digest()
        .map_err(|e| bad(e.to_string()))?;
    if !shared.lock().joined.contains_key(&prove.worker_id) {
        return Err(pb::Refusal::new(
            RefusalReason::RunMismatch,
            format!(
                "worker id {} is unknown to this run (or already streaming): join again",
                prove.worker_id
            ),
        ));
    }
    if let Some(difference) = golden.difference(&shared.golden) {
        shared.lock().joined.remove(&prove.worker_id);
        return Err(pb::Refusal::new(
            RefusalReason::GoldenMismatch,
            format!("golden evaluation differs from the coordinator's: {difference}"),
        ));
    }
    Ok((prove.worker_id, cached))
}

/// One worker's stream, from its proof to its end.
async fn serve_worker(
    shared: Arc<Shared>,
    mut inbound: Streaming<pb::WorkerMessage>,
    tx: mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>,
) {
    let silence = shared.options.heartbeat * 3;
    let first =
        match tokio::time::timeout(silence.max(Duration::from_secs(10)), inbound.message()).await {
            Ok(Ok(first)) => first,
            _ => return,
        };
    let (worker, cached) = match check_proof(&shared, first) {
        Ok(ok) => ok,
        Err(refusal) => {
            tracing::warn!(reason = refusal.reason().as_str_name(), message = %refusal.message, "refused a worker's stream");
            let text = refusal.message.clone();
            let _ = tx.send(Ok(shutdown_message(Some(refusal), &text, false)));
            return;
        }
    };
    {
        let mut state = shared.lock();
        let (threads, name) = state.joined.remove(&worker).unwrap_or((1, String::new()));
        if let Some(completed) = state.finished {
            let reason = if completed {
                "the run is over"
            } else {
                "the coordinator is stopping"
            };
            let _ = tx.send(Ok(shutdown_message(None, reason, completed)));
            return;
        }
        let _ = tx.send(Ok(pb::ProofAccepted {}.into()));
        state.workers.insert(
            worker,
            WorkerSlot {
                name: name.clone(),
                threads,
                credits: 0,
                capacity: 0,
                tx: tx.clone(),
                theta_digest: cached,
            },
        );
        announce(&mut state, worker);
        tracing::info!(worker_id = worker, %name, threads, workers = state.workers.len(), "worker proven");
    }
    shared.changed.notify_waiters();

    let end = loop {
        let message = match tokio::time::timeout(silence, inbound.message()).await {
            Err(_) => break "silent for three heartbeat intervals".to_string(),
            Ok(Err(status)) => break format!("stream failed: {}", status.message()),
            Ok(Ok(None)) => break "stream closed".to_string(),
            Ok(Ok(Some(m))) => m,
        };
        if let Err(e) = handle_message(&shared, worker, message) {
            tracing::warn!(worker_id = worker, error = %e, "dropping a bad message");
            shared.lock().rejected_messages += 1;
        }
    };
    {
        let mut state = shared.lock();
        let name = state
            .workers
            .remove(&worker)
            .map(|s| s.name)
            .unwrap_or_default();
        let released = state.work.as_mut().map_or(0, |w| w.release_worker(worker));
        assign_all(&mut state, shared.options.lease);
        tracing::info!(worker_id = worker, %name, reason = %end, released, workers = state.workers.len(), "worker left");
    }
    shared.changed.notify_waiters();
}

/// Applies one message of a proven worker; an error names what was wrong with it.
fn handle_message(
    shared: &Shared,
    worker: WorkerId,
    message: pb::WorkerMessage,
) -> Result<(), String> {
    use pb::worker_message::Kind;
    let lease = shared.options.lease;
    shared.lock().bytes_received += prost::Message::encoded_len(&message) as u64;
    match message.kind {
        Some(Kind::Ready(ready)) => {
            let mut state = shared.lock();
            // Grants still in flight for an older generation are ignored.
            if state.current.as_ref().map(|(t, _)| *t) != Some(ready.generation) {
                return Ok(());
            }
            if let Some(slot) = state.workers.get_mut(&worker) {
                slot.credits = slot.credits.saturating_add(ready.credits).min(1 << 20);
                slot.capacity = slot.capacity.max(ready.credits.min(1 << 20));
            }
            assign_to(&mut state, worker, lease);
            Ok(())
        }
        Some(Kind::Results(results)) => {
            let mut complete = false;
            let mut state = shared.lock();
            for pair in &results.pairs {
                let result = pair.to_core(shared.batch_size).map_err(|e| e.to_string())?;
                let Some(work) = state.work.as_mut() else {
                    return Err(format!(
                        "results for generation {} arrived between generations",
                        results.generation
                    ));
                };
                match work.submit(worker, results.generation, result) {
                    Submitted::Accepted { complete: c } => complete |= c,
                    Submitted::Duplicate => {}
                    Submitted::WrongGeneration { current } => {
                        // Late results of a finished generation are normal after a reassignment.
                        tracing::debug!(
                            worker_id = worker,
                            generation = results.generation,
                            current,
                            "dropping stale results"
                        );
                        return Ok(());
                    }
                    Submitted::Conflict { first } => {
                        let other = work.delivered_by(result.index);
                        state.faulty.insert(worker);
                        return Err(format!(
                            "fitness of index {} differs from the one worker {other:?} delivered ({:?} vs {:?}): marked faulty",
                            result.index, result.plus.fitness, first.plus.fitness
                        ));
                    }
                    other => {
                        return Err(format!(
                            "result for index {} rejected: {other:?}",
                            result.index
                        ));
                    }
                }
            }
            drop(state);
            if complete {
                shared.changed.notify_waiters();
            }
            Ok(())
        }
        Some(Kind::ThetaRequest(request)) => {
            let mut state = shared.lock();
            if let Some(slot) = state.workers.get_mut(&worker) {
                slot.theta_digest = None;
            }
            tracing::debug!(
                worker_id = worker,
                generation = request.generation,
                "worker asked for theta"
            );
            announce(&mut state, worker);
            Ok(())
        }
        Some(Kind::Heartbeat(_)) => Ok(()),
        Some(Kind::Prove(_)) => Err("prove after the stream was proven".into()),
        None => Err("message with no kind".into()),
    }
}

/// A running coordinator server's handle for tests and the binary.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Trains with remote workers until the config's generations or time limit, or `shutdown`.
///
/// Serves the `Coordinator` gRPC service and `grpc.health.v1` on `listener`.
pub async fn run(
    config: RunConfig,
    env: Environment,
    options: ClusterOptions,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> Result<RunSummary, RunError> {
    let net = config.net()?;
    let es = config.es()?;
    let data = {
        let env = env.clone();
        tokio::task::spawn_blocking(move || embedded::load_data(&env))
            .await
            .expect("data loading does not panic")?
    };
    let data = Arc::new(data);
    let noise = {
        let (config, env) = (config.clone(), env.clone());
        tokio::task::spawn_blocking(move || embedded::open_noise(&config, &env))
            .await
            .expect("noise set-up does not panic")?
    };
    let spec = es_proto::RunSpec {
        run_seed: config.seed,
        net: net.clone(),
        es: es.clone(),
        noise: es_proto::NoiseSpec::from(&noise),
    };
    let golden = {
        let (net, es, noise, data, kernel) = (
            net.clone(),
            es.clone(),
            noise.clone(),
            Arc::clone(&data),
            env.kernel,
        );
        let seed = config.seed;
        tokio::task::spawn_blocking(move || {
            let train = Dataset {
                images: &data.train.images,
                labels: &data.train.labels,
            };
            golden_task(
                &net,
                &es,
                seed,
                &noise,
                train,
                GOLDEN_GENERATION,
                GOLDEN_INDEX,
                kernel,
            )
        })
        .await
        .expect("the golden task does not panic")?
    };
    let [center, plus, minus] = golden.map(|g| GoldenEval::new(&g.evaluation, &g.logits));
    let run_id = format!(
        "{}-{:x}",
        config.seed,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let shared = Arc::new(Shared {
        run_id: run_id.clone(),
        spec: (&spec).into(),
        golden: GoldenProof {
            center,
            plus,
            minus,
        },
        data_digest: data.digest,
        batch_size: es.batch_size,
        options: options.clone(),
        state: Mutex::new(State::default()),
        changed: Notify::new(),
    });

    let addr = listener.local_addr().map_err(|source| RunError::Io {
        path: "listener".into(),
        source,
    })?;
    let (health_reporter, health_service) = es_proto::tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<Service>>()
        .await;
    let service = CoordinatorServer::new(Service(Arc::clone(&shared)))
        .max_decoding_message_size(es_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(es_proto::MAX_MESSAGE_BYTES);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            // θ (2.7 MB) goes to every worker each generation: windows large enough that it
            // does not wait on HTTP/2 flow control (the default is 64 KiB).
            .initial_stream_window_size(Some(es_proto::MAX_MESSAGE_BYTES as u32))
            .initial_connection_window_size(Some(es_proto::MAX_MESSAGE_BYTES as u32))
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = server_stopped.await;
            }),
    );
    tracing::info!(%addr, run_id, workers = options.workers, "coordinator listening");

    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
        tokio::spawn(async move {
            shutdown.await;
            stop.store(true, Ordering::SeqCst);
            shared.changed.notify_waiters();
        });
    }
    let result = train(
        &config, &env, &options, &shared, &net, es, noise, &data, &stop,
    )
    .await;

    {
        let mut state = shared.lock();
        let finished = result.as_ref().is_ok_and(|s| !s.interrupted);
        state.finished = Some(finished);
        if !state.faulty.is_empty() || state.rejected_messages > 0 {
            let mut faulty: Vec<WorkerId> = state.faulty.iter().copied().collect();
            faulty.sort_unstable();
            tracing::warn!(
                ?faulty,
                rejected_messages = state.rejected_messages,
                "workers sent results that were refused"
            );
        }
        let reason = if finished {
            "the run is over"
        } else {
            "the coordinator is stopping"
        };
        for slot in state.workers.values() {
            let _ = slot.tx.send(Ok(shutdown_message(None, reason, finished)));
        }
        state.workers.clear();
    }
    // Give the shutdown messages a moment to leave before the server closes the streams.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_server.send(());
    let _ = server.await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn train(
    config: &RunConfig,
    env: &Environment,
    options: &ClusterOptions,
    shared: &Arc<Shared>,
    net: &NetConfig,
    es: es_core::train::EsConfig,
    noise: NoiseSource,
    data: &Arc<Mnist>,
    stop: &AtomicBool,
) -> Result<RunSummary, RunError> {
    let mut run_dir = RunDir::create(&env.run_dir)?;
    run_dir.write_file("config.toml", config.to_toml().as_bytes())?;
    let mut es_state = EsState::new(net, &es, config.seed);
    let population = es.population as u32;
    let es = Arc::new(es);
    let noise = Arc::new(noise);

    // Wait for the workers.
    let mut last_log = Instant::now();
    loop {
        let notified = shared.changed.notified();
        let workers = shared.lock().workers.len();
        if workers >= options.workers {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            return finish(env, net, &mut run_dir, es_state, data, Instant::now(), true).await;
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            tracing::info!(workers, wanted = options.workers, "waiting for workers");
            last_log = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
    }

    let started = Instant::now();
    let mut interrupted = false;
    let mut test_pool: Option<EvalPool> = None;
    let mut last_test: Option<Evaluation> = None;
    let mut last_log = Instant::now();
    while es_state.generation < config.generations {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        if config.time_limit_secs > 0.0 && started.elapsed().as_secs_f64() >= config.time_limit_secs
        {
            tracing::info!(generation = es_state.generation, "time limit reached");
            break;
        }
        let t = es_state.generation;
        let gen_started = Instant::now();
        let theta = Arc::new(EncodedTheta::new(&es_state.theta));
        {
            let mut state = shared.lock();
            let threads: u32 = state
                .workers
                .values()
                .map(|w| w.threads)
                .sum::<u32>()
                .max(1);
            // About four chunks per worker thread: small enough that fast and slow workers
            // finish together, large enough that messages stay few.
            state.chunk_size = (population / (4 * threads)).max(1);
            state.work = Some(GenerationWork::new(t, population, state.chunk_size));
            state.current = Some((t, theta));
            let ids: Vec<WorkerId> = state.workers.keys().copied().collect();
            for id in ids {
                announce(&mut state, id);
                assign_to(&mut state, id, options.lease);
            }
        }
        // Wait for every index, re-leasing expired chunks as we go.
        let (results, reassigned, workers, wire) = loop {
            let notified = shared.changed.notified();
            {
                let mut state = shared.lock();
                let work = state.work.as_mut().expect("a generation is running");
                if work.is_complete() {
                    let work = state.work.take().expect("checked above");
                    let reassigned = work.reassigned();
                    let workers = state.workers.len();
                    let wire = (
                        std::mem::take(&mut state.bytes_sent),
                        std::mem::take(&mut state.bytes_received),
                    );
                    break (
                        work.into_results().expect("complete"),
                        reassigned,
                        workers,
                        wire,
                    );
                }
                let (expired, returned) = work.expire(Instant::now());
                if returned > 0 {
                    tracing::warn!(
                        ?expired,
                        returned,
                        "leases expired: handing their indices to others"
                    );
                    assign_all(&mut state, options.lease);
                }
            }
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break (Vec::new(), 0, 0, (0, 0));
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
        };
        if interrupted {
            break;
        }
        let eval_secs = gen_started.elapsed().as_secs_f64();
        let (state_back, update) = {
            let (es, noise) = (Arc::clone(&es), Arc::clone(&noise));
            let net = net.clone();
            let seed = config.seed;
            let threads = env.threads;
            let pairs: Vec<_> = results.iter().map(PairResult::fitness).collect();
            tokio::task::spawn_blocking(move || {
                let update = apply_update(&mut es_state, &net, &es, &noise, seed, &pairs, threads);
                (es_state, update)
            })
            .await
            .expect("the update does not panic")
        };
        es_state = state_back;
        let update: UpdateStats = update?;
        let report = generation_report(t, &results, update);
        let done = es_state.generation;
        let evaluate = config.eval_every > 0 && done.is_multiple_of(config.eval_every);
        let test_eval = if evaluate {
            let (e, pool) =
                evaluate_test(net, env, test_pool.take(), &es_state.theta, data).await?;
            test_pool = Some(pool);
            last_test = Some(e);
            Some(e)
        } else {
            None
        };
        let gen_secs = gen_started.elapsed().as_secs_f64();
        let mut line = embedded::metrics_line(&report, started, gen_secs, workers, test_eval);
        line.evals_per_sec = report.evaluations as f64 / eval_secs.max(1e-9);
        line.wire_bytes_sent = Some(wire.0);
        line.wire_bytes_received = Some(wire.1);
        run_dir.append_metrics(&line)?;
        if reassigned > 0 {
            tracing::info!(
                generation = t,
                reassigned,
                "indices evaluated again after a lost or late worker"
            );
        }
        if evaluate || last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(
                generation = done,
                workers,
                fitness_mean = format!("{:.4}", line.fitness_mean),
                evals_per_sec = format!("{:.0}", line.evals_per_sec),
                test_accuracy = last_test.map(|e| format!("{:.4}", e.accuracy())),
                "generation"
            );
        }
    }
    finish(env, net, &mut run_dir, es_state, data, started, interrupted).await
}

fn generation_report(t: u32, results: &[PairResult], update: UpdateStats) -> GenerationReport {
    let all: Vec<Evaluation> = results.iter().flat_map(|r| [r.plus, r.minus]).collect();
    let n = all.len().max(1) as f64;
    GenerationReport {
        generation: t,
        fitness_mean: all.iter().map(|e| e.fitness).sum::<f64>() / n,
        fitness_max: all
            .iter()
            .map(|e| e.fitness)
            .fold(f64::NEG_INFINITY, f64::max),
        batch_accuracy: all.iter().map(|e| e.accuracy()).sum::<f64>() / n,
        evaluations: all.len(),
        update,
    }
}

async fn evaluate_test(
    net: &NetConfig,
    env: &Environment,
    pool: Option<EvalPool>,
    theta: &[f32],
    data: &Arc<Mnist>,
) -> Result<(Evaluation, EvalPool), RunError> {
    let mut pool = match pool {
        Some(pool) => pool,
        None => EvalPool::new(net, env.kernel, env.threads)?,
    };
    let theta = theta.to_vec();
    let data = Arc::clone(data);
    Ok(tokio::task::spawn_blocking(move || {
        let test = Dataset {
            images: &data.test.images,
            labels: &data.test.labels,
        };
        let e = pool.evaluate_dataset(&theta, test);
        (e, pool)
    })
    .await
    .expect("test evaluation does not panic"))
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    env: &Environment,
    net: &NetConfig,
    run_dir: &mut RunDir,
    es_state: EsState,
    data: &Arc<Mnist>,
    started: Instant,
    interrupted: bool,
) -> Result<RunSummary, RunError> {
    run_dir.write_theta("theta.f32", &es_state.theta)?;
    let (net, env, data) = (net.clone(), env.clone(), Arc::clone(data));
    let generations = es_state.generation;
    let mode = net.arithmetic.name().to_string();
    let (flushed, unflushed) = tokio::task::spawn_blocking(move || {
        let test = Dataset {
            images: &data.test.images,
            labels: &data.test.labels,
        };
        let flushed = embedded::evaluate_with(&net, net.arithmetic, &env, &es_state.theta, test)?;
        let unflushed = embedded::evaluate_with(
            &net,
            es_kernel::Arithmetic::Ieee,
            &env,
            &es_state.theta,
            test,
        )?;
        Ok::<_, RunError>((flushed, unflushed))
    })
    .await
    .expect("final evaluation does not panic")?;
    let summary = RunSummary {
        generations,
        wall_secs: started.elapsed().as_secs_f64(),
        test_accuracy: flushed.accuracy(),
        test_loss: -flushed.fitness,
        test_accuracy_unflushed: unflushed.accuracy(),
        mode,
        interrupted,
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
    run_dir.write_file("summary.json", json.as_bytes())?;
    tracing::info!(generations, test_accuracy = summary.test_accuracy, run_dir = %run_dir.path().display(), interrupted, "run finished");
    Ok(summary)
}
