//! The cluster coordinator: a gRPC server that waits for N workers, proves each one's
//! arithmetic, broadcasts θ each generation, hands out perturbation indices in chunks as
//! workers grant credits, collects the fitnesses and applies the update.
//!
//! The network code is thin: every decision about indices lives in the synchronous
//! [`GenerationWork`] behind one mutex, and the numeric work (update, test evaluation, the
//! golden proof) runs on blocking threads, never on the async executor.
//!
//! [`hub`] serves the same workers as a node between them and a coordinator upstream.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_core::noise::NoiseSource;
use es_core::strategy::PairFitness;
use es_core::train::{
    Dataset, EsConfig, EsState, EvalPool, Evaluator, GenerationReport, PairResult, TrainError,
    UpdateStats, apply_update, evaluate_index, finish_update, golden_task, noise_sums,
    update_weights,
};
use es_data::mnist::Mnist;
use es_kernel::{Evaluation, NetConfig, ParamLayout};
use es_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use es_proto::pb::{self, RefusalReason};
use es_proto::{Digest, EncodedTheta, GoldenEval, GoldenProof, PROTOCOL_VERSION};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::RunError;
use crate::auth::{RequireToken, ServerTls, Token, check_exposure};
use crate::checkpoint::{Checkpoint, Checkpointer};
use crate::config::RunConfig;
use crate::embedded::{self, Environment, RunSummary};
use crate::limits::{Incoming, TokenBucket, inbound_message_limit};
use crate::monitor::{Monitor, Phase};
use crate::relays;
use crate::run_dir::RunDir;
use crate::scheduler::{GenerationWork, Submitted, WorkerId, same_result};
use crate::sums::{SumWork, SumsSubmitted};

mod hub;
pub use hub::{Hub, HubOptions};

/// How the cluster waits for and watches its workers, who may take part, and what each may
/// cost (see `auth` and `limits`).
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Workers to wait for before the first generation; later ones join the run as they come.
    pub workers: usize,
    /// Slack over a chunk's expected evaluation time (measured on the previous generation)
    /// before the chunk goes to another worker.
    pub lease: Duration,
    /// The lease of chunks handed out before any generation has been timed.
    pub first_lease: Duration,
    /// How often workers send a heartbeat; a stream silent for three intervals is dropped.
    pub heartbeat: Duration,
    /// Rejected messages after which a worker is disconnected.
    pub max_rejected: u32,
    /// Every this many generations, the coordinator evaluates one result of each worker
    /// itself (its first of the generation) before the update; 0 turns audits off.
    pub audit_every: u32,
    /// The cluster's shared token, required on every call of the `Coordinator` service.
    pub token: Option<Token>,
    /// TLS (and, with a client CA, mutual TLS); `None` serves plain HTTP/2.
    pub tls: Option<ServerTls>,
    /// Serve unauthenticated on an address other than loopback (see
    /// [`crate::auth::check_exposure`]).
    pub insecure: bool,
    /// Workers joined or streaming at once; a Join beyond is refused with `FULL`.
    pub max_workers: usize,
    /// Open connections at once; more are closed as they arrive.
    pub max_connections: usize,
    /// `Results` and `ThetaRequest` messages per second one stream may send (a token bucket
    /// holding one second's worth); each one beyond is rejected unread, and counts towards
    /// [`ClusterOptions::max_rejected`].
    pub results_per_sec: f64,
    /// Spread the update's noise sums over the workers that can compute them (a noise table
    /// only: with a stream every worker would regenerate all the noise); the coordinator
    /// checks samples of them and steps Adam. Off: it computes the whole update itself.
    pub spread_update: bool,
    /// θ's bytes go from the coordinator to at most this many workers per generation; the
    /// others fetch θ from workers that relay it (`worker --relay-listen`), each relay serving
    /// at most this many ([`crate::relays`]). 0: the coordinator sends θ to every worker.
    pub relay_fanout: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: 1,
            lease: Duration::from_secs(5),
            first_lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(2),
            max_rejected: 64,
            audit_every: 1,
            token: None,
            tls: None,
            insecure: false,
            max_workers: 64,
            max_connections: 128,
            results_per_sec: 1000.0,
            spread_update: true,
            relay_fanout: 8,
        }
    }
}

/// How long a joined worker may take to open its stream (it may first build its noise
/// table) before its place is given to others.
const JOIN_TTL: Duration = Duration::from_secs(600);
/// The longest worker name and kernel name kept from a `JoinRequest` (they are for logs).
const MAX_NAME_CHARS: usize = 64;
/// Full copies of θ one worker may ask for in one generation (a worker that lost its copy
/// asks once); more are rejected, since each costs the coordinator θ's bytes on the wire.
const MAX_THETA_REQUESTS: u32 = 4;
/// Rejected parts of one message that are logged one by one; the rest are counted.
const LOGGED_ERRORS: usize = 3;
/// The HTTP/2 flow-control window of each stream a client opens (the connection's is twice
/// this): how much a client can make the coordinator buffer before it reads.
const STREAM_WINDOW: u32 = 1 << 20;
/// Streams one connection may hold open at once (a worker needs two: Join and Work).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// The largest header block a client may send (the token is one short header).
const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;
/// The deadline of a unary call, reading its request included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping coordinator waits for clients to close their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The golden task every worker of a run must reproduce: perturbation 0 of
/// [`EsConfig::golden_generation`] (generation 0 unless the batch grows), with that
/// generation's minibatch and σ.
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
    /// Messages (or parts of them) refused so far.
    rejected: u32,
    /// Results accepted from this stream (for the logs: who contributed).
    accepted: u64,
    /// The generation of the last `ThetaRequest` and how many came for it.
    theta_requests: (u32, u32),
    /// It answers `SumNoise` (its `JoinRequest` said so).
    sums_noise: bool,
    /// Where it serves `ThetaRelay` ("host:port"), if it relays θ to other workers.
    relay: Option<String>,
    /// It takes credits granted in `Generation` and returns them in `Results` (its
    /// `JoinRequest` asked for carried credits).
    carried_credits: bool,
    /// It is a hub, handing its chunks on to workers of its own (`JoinRequest.hub`).
    hub: bool,
}

/// The most credits a worker can hold, whatever it grants (a bound on a peer's claim).
const MAX_CREDITS: u32 = 1 << 20;

impl WorkerSlot {
    /// Adds the worker's grant of `credits` (a Ready, or carried back by Results).
    fn grant(&mut self, credits: u32) {
        self.credits = self.credits.saturating_add(credits).min(MAX_CREDITS);
    }
}

/// A worker that joined but has not proven itself yet.
struct Joined {
    threads: u32,
    name: String,
    at: Instant,
    sums_noise: bool,
    relay: Option<String>,
    carried_credits: bool,
    hub: bool,
    /// `JoinRequest.join_key`: the worker's own number (0: none), by which a retried Join
    /// replaces this one.
    join_key: u64,
}

#[derive(Default)]
struct State {
    next_worker_id: WorkerId,
    /// Joined but not yet proven.
    joined: HashMap<WorkerId, Joined>,
    workers: HashMap<WorkerId, WorkerSlot>,
    work: Option<GenerationWork>,
    /// The current generation and its θ, encoded for the wire and as numbers (to settle
    /// disputes).
    current: Option<(u32, Arc<EncodedTheta>)>,
    current_theta: Option<Arc<Vec<f32>>>,
    chunk_size: u32,
    /// The threads of the workers in the run when the generation began (hubs' grants are
    /// their share of it).
    threads: u32,
    /// Seconds one thread takes per pair, measured on the last generation: the expected
    /// time of a chunk, from which its lease follows.
    pair_secs: Option<f64>,
    /// Workers whose results disagreed with the coordinator's own evaluation.
    quarantined: HashSet<WorkerId>,
    /// Workers audited this generation.
    audited: HashSet<WorkerId>,
    /// Checks (disputes and audits) still being evaluated: the generation waits for them.
    checks_pending: u32,
    rejected_messages: u64,
    /// Set when training ends: `Some(true)` when the run completed, `Some(false)` when the
    /// coordinator stopped early (a worker that joins now should come back later).
    finished: Option<bool>,
    /// What the next generation's metrics line reports.
    counters: GenerationCounters,
    /// The update being spread over the workers, between a generation's results and its
    /// update.
    sums: Option<SumWork>,
    /// Seconds the last spread update waited for its workers (their leases follow from it).
    sums_secs: Option<f64>,
    /// A hub's chunks from its own coordinator, waiting for their results; empty on the root.
    upstream: hub::Upstream,
}

/// What the cluster counts between two generations' metrics lines, taken whole when a
/// generation completes.
#[derive(Debug, Default)]
struct GenerationCounters {
    /// Protobuf payload bytes sent and received on work streams.
    bytes_sent: u64,
    bytes_received: u64,
    /// Messages rejected, and workers quarantined.
    rejected: u64,
    quarantined: u64,
    /// Workers told to fetch θ from a relay, and `ThetaRequest`s answered (a relay's children
    /// whose fetch failed among them).
    theta_relayed: u32,
    theta_requested: u32,
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
    /// The run's ES settings (each generation's batch size bounds its results' counts).
    es: EsConfig,
    options: ClusterOptions,
    state: Mutex<State>,
    /// Evaluates indices on the coordinator: disputes and audits.
    referee: Arc<Mutex<Referee>>,
    /// Signalled when a worker is proven or lost and when a generation completes.
    changed: Notify,
    /// What people watching the run see (dashboard, `/metrics`, progress line).
    monitor: Monitor,
    /// Every accepted result wakes the waiters, not only the generation's last one: a hub
    /// answers its coordinator chunk by chunk ([`hub`]).
    wake_on_each_result: bool,
}

impl Shared {
    /// The state of a node (root or hub) serving run `run_id` of `node`, its workers to prove
    /// `golden`; its `Referee` evaluates with the node's kernel.
    fn new(
        node: &NodeRun,
        run_id: String,
        spec: pb::RunSpec,
        golden: GoldenProof,
        options: ClusterOptions,
        monitor: Monitor,
        wake_on_each_result: bool,
    ) -> Result<Shared, es_kernel::ConfigError> {
        let referee = Referee {
            evaluator: Evaluator::new(node.net.clone(), node.kernel)?,
            es: Arc::clone(&node.es),
            run_seed: node.run_seed,
            noise: Arc::clone(&node.noise),
            data: Arc::clone(&node.data),
        };
        Ok(Shared {
            run_id,
            spec,
            golden,
            data_digest: node.data.digest,
            es: EsConfig::clone(&node.es),
            options,
            state: Mutex::new(State::default()),
            referee: Arc::new(Mutex::new(referee)),
            changed: Notify::new(),
            monitor,
            wake_on_each_result,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("no handler panics while holding the state")
    }

    /// Shows the workers now in the run, with what each has contributed.
    fn publish_workers(&self, state: &State) {
        self.monitor.workers(
            state
                .workers
                .iter()
                .map(|(id, w)| (*id, w.name.clone(), w.threads, w.accepted)),
        );
    }
}

/// How long `slot`'s worker may take over a chunk: the time its queue of `capacity` pairs
/// takes at the measured speed, twice over, plus the configured slack.
fn lease_for(options: &ClusterOptions, pair_secs: Option<f64>, slot: &WorkerSlot) -> Duration {
    match pair_secs {
        None => options.first_lease,
        Some(secs) => {
            let queue = f64::from(slot.capacity.max(1)) / f64::from(slot.threads.max(1));
            options.lease + Duration::from_secs_f64((2.0 * secs * queue).min(3600.0))
        }
    }
}

/// The most chunks a generation is cut into, whatever the worker count: every chunk costs
/// the coordinator an `Assign` and a `Results` (and their wake-ups), which at a thousand
/// workers cost more than the work they carry.
const MAX_CHUNKS: u32 = 1024;

/// Pairs per chunk for `population` pairs over `threads` worker threads: about four chunks
/// per thread, small enough that fast and slow workers finish together, but no more than
/// [`MAX_CHUNKS`] chunks in all.
fn chunk_size(population: u32, threads: u32) -> u32 {
    (population / (4 * threads.max(1)))
        .max(population.div_ceil(MAX_CHUNKS))
        .max(1)
}

/// Hands `worker` chunks of the current generation while it has credits.
fn assign_to(state: &mut State, worker: WorkerId, options: &ClusterOptions) {
    let chunk_size = state.chunk_size.max(1);
    let pair_secs = state.pair_secs;
    let all_threads = state.threads;
    let State {
        work,
        workers,
        counters,
        ..
    } = state;
    let (Some(work), Some(slot)) = (work.as_mut(), workers.get_mut(&worker)) else {
        return;
    };
    let lease = lease_for(options, pair_secs, slot);
    let now = Instant::now();
    // No more than two chunks' worth (or two per thread) in flight: the rest stays in the
    // pool for whichever worker finishes first, instead of queueing behind this one (and
    // being lost with it). A hub cuts each chunk again for its own workers, who evaluate
    // them side by side: it gets its threads' share of the generation in about four chunks
    // (messages to the root stay few) and holds three at a time.
    let (chunk, most_in_flight) = if slot.hub {
        let chunk = hub_chunk(work.population(), all_threads, slot.threads).max(chunk_size);
        (chunk, chunk.saturating_mul(3))
    } else {
        (chunk_size, 2 * chunk_size.max(slot.threads))
    };
    while slot.credits > 0 {
        // At most half the worker's capacity per chunk, so that it holds a second chunk while
        // it evaluates the first and never waits a round trip for work. (Half of the *current*
        // credits would shrink chunks to single indices, which a multi-threaded worker cannot
        // spread over its threads.)
        let count = chunk.min((slot.capacity / 2).max(1)).min(slot.credits);
        let in_flight = slot.capacity.saturating_sub(slot.credits);
        if in_flight >= most_in_flight {
            break;
        }
        let assigned = if slot.hub {
            work.assign_run(worker, count, now, lease)
        } else {
            work.assign(worker, count, now, lease)
        };
        let Some(chunk) = assigned else {
            break;
        };
        slot.credits -= chunk.count;
        let assign = pb::Assign {
            generation: work.generation(),
            first_index: chunk.first,
            count: chunk.count,
        };
        send(&mut counters.bytes_sent, &slot.tx, assign.into());
    }
}

/// A hub's chunk: a quarter of its threads' share of the generation's `population` pairs,
/// of `all_threads` in the run.
fn hub_chunk(population: u32, all_threads: u32, hub_threads: u32) -> u32 {
    let share = u64::from(population) * u64::from(hub_threads) / u64::from(all_threads.max(1));
    u32::try_from(share.div_ceil(4)).unwrap_or(u32::MAX).max(1)
}

fn assign_all(state: &mut State, options: &ClusterOptions) {
    let ids: Vec<WorkerId> = state.workers.keys().copied().collect();
    for id in ids {
        assign_to(state, id, options);
    }
}

/// Takes `worker` out of the run for computing other bits than the coordinator: it is told
/// why and disconnected, and everything it delivered this generation is evaluated again.
fn quarantine(state: &mut State, worker: WorkerId, reason: &str, options: &ClusterOptions) {
    if !state.quarantined.insert(worker) {
        return;
    }
    state.counters.quarantined += 1;
    let name = match state.workers.remove(&worker) {
        Some(slot) => {
            let refusal = pb::Refusal::new(RefusalReason::GoldenMismatch, reason.to_string());
            let _ = slot
                .tx
                .send(Ok(shutdown_message(Some(refusal), reason, false)));
            slot.name
        }
        None => String::new(),
    };
    let returned = state
        .work
        .as_mut()
        .map_or(0, |work| work.discard_worker(worker));
    // Noise sums it delivered may be wrong too: the coordinator computes them.
    if let Some(sums) = state.sums.as_mut() {
        sums.release_worker(worker, true);
    }
    tracing::error!(worker_id = worker, %name, reason, returned, "worker quarantined");
    assign_all(state, options);
}

/// Whether an announcement starts the generation for the worker or repeats it (the answer to
/// a `ThetaRequest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Announcement {
    /// The worker's credits start afresh: from the capacity it last declared (carried
    /// credits, granted in the message) or from zero (it answers with a Ready).
    Start,
    /// A worker with carried credits keeps its count and is granted nothing more; one
    /// without starts from zero again, as it answers with a Ready for its full capacity.
    Repeat,
}

/// Sends the current generation to `worker`: θ's bytes, or its digest alone if the worker
/// holds it.
fn announce(state: &mut State, worker: WorkerId, announcement: Announcement) {
    announce_from(state, worker, None, announcement);
}

/// Like [`announce`], but a worker that lacks θ is told to fetch it from the relay at
/// `source` ("host:port"), when given, instead of being sent the bytes.
fn announce_from(
    state: &mut State,
    worker: WorkerId,
    source: Option<String>,
    announcement: Announcement,
) {
    let Some((generation, theta)) = state.current.clone() else {
        return;
    };
    let State {
        workers, counters, ..
    } = state;
    let Some(slot) = workers.get_mut(&worker) else {
        return;
    };
    let message = if slot.theta_digest == Some(*theta.digest()) {
        pb::Generation::digest_only(generation, theta.digest())
    } else if let Some(source) = source {
        counters.theta_relayed += 1;
        pb::Generation::relayed(generation, theta.digest(), source)
    } else {
        pb::Generation::with_theta(generation, &theta)
    };
    slot.theta_digest = Some(*theta.digest());
    let message = match (slot.carried_credits, announcement) {
        // Granting the worker's last declared capacity saves it a Ready and the generation a
        // round trip: its chunks follow this message at once.
        (true, Announcement::Start) => {
            slot.credits = slot.capacity;
            message.granting(slot.capacity)
        }
        (true, Announcement::Repeat) => message,
        // The worker answers with a Ready for this generation.
        (false, _) => {
            slot.credits = 0;
            slot.capacity = 0;
            message
        }
    };
    send(&mut counters.bytes_sent, &slot.tx, message.into());
}

/// For each worker that lacks the current θ and has a relaying worker to fetch it from
/// ([`relays::plan`]): that relay's address.
fn theta_sources(state: &State, fanout: usize) -> HashMap<WorkerId, String> {
    let Some((_, theta)) = &state.current else {
        return HashMap::new();
    };
    let (mut relaying, mut plain) = (Vec::new(), Vec::new());
    for (&id, slot) in &state.workers {
        if slot.theta_digest == Some(*theta.digest()) {
            continue;
        }
        if slot.relay.is_some() {
            relaying.push(id);
        } else {
            plain.push(id);
        }
    }
    if relaying.is_empty() {
        return HashMap::new();
    }
    relays::plan(&relaying, &plain, fanout)
        .into_iter()
        .filter_map(|(id, parent)| {
            let address = state.workers.get(&parent?)?.relay.clone()?;
            Some((id, address))
        })
        .collect()
}

/// Where a joining worker serves `ThetaRelay` ("host:port"), if it does: its `relay_host`,
/// or else the address its connection comes from (`peer`), with its `relay_port`.
fn relay_address(
    join: &pb::JoinRequest,
    peer: Option<SocketAddr>,
) -> Result<Option<String>, String> {
    if join.relay_port == 0 {
        return Ok(None);
    }
    let port = u16::try_from(join.relay_port).map_err(|_| {
        format!(
            "relay_port {}: expected a TCP port, 1 to 65535",
            join.relay_port
        )
    })?;
    let host = &join.relay_host;
    if !es_proto::plausible_host(host) {
        return Err(format!(
            "relay_host {:?}: expected a host name or an IP address of at most {} characters",
            host.chars().take(64).collect::<String>(),
            es_proto::MAX_HOST_CHARS
        ));
    }
    if !host.is_empty() {
        return Ok(Some(format!("{host}:{port}")));
    }
    // An IPv6 address prints in brackets as a socket address.
    Ok(peer.map(|peer| SocketAddr::new(peer.ip(), port).to_string()))
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
        let relay = match relay_address(&join, peer) {
            Ok(relay) => relay,
            Err(message) => {
                return Ok(Response::new(refuse(RefusalReason::BadRequest, message)));
            }
        };
        let name: String = join.name.chars().take(MAX_NAME_CHARS).collect();
        let kernel: String = join.kernel.chars().take(MAX_NAME_CHARS).collect();
        let (worker_id, replaced) = {
            let mut state = shared.lock();
            let now = Instant::now();
            // Expired joins give their places back, and so does an earlier join of this same
            // worker: it joins again only once it has given that one up (its reply was lost,
            // or its stream never opened).
            let key = join.join_key;
            let mut replaced = 0;
            state.joined.retain(|_, joined| {
                if now.duration_since(joined.at) >= JOIN_TTL {
                    false
                } else if key != 0 && joined.join_key == key {
                    replaced += 1;
                    false
                } else {
                    true
                }
            });
            let taken = state.joined.len() + state.workers.len();
            if taken >= shared.options.max_workers {
                drop(state);
                return Ok(Response::new(refuse(
                    RefusalReason::Full,
                    format!(
                        "the coordinator already has {taken} workers joined or working: at most {} (--max-workers)",
                        shared.options.max_workers
                    ),
                )));
            }
            state.next_worker_id += 1;
            let id = state.next_worker_id;
            state.joined.insert(
                id,
                Joined {
                    threads: join.threads,
                    name: name.clone(),
                    at: now,
                    sums_noise: join.sums_noise,
                    relay: relay.clone(),
                    carried_credits: join.carried_credits,
                    hub: join.hub,
                    join_key: key,
                },
            );
            (id, replaced)
        };
        if replaced > 0 {
            tracing::info!(
                %name,
                ?peer,
                "worker joined again before opening its stream: its earlier join is dropped"
            );
        }
        tracing::info!(worker_id, %name, threads = join.threads, %kernel, ?peer, ?relay, hub = join.hub, "worker joined");
        let accepted = pb::JoinAccepted {
            protocol_version: PROTOCOL_VERSION,
            run_id: shared.run_id.clone(),
            worker_id,
            spec: Some(shared.spec.clone()),
            golden: Some(pb::GoldenTask {
                generation: shared.es.golden_generation(),
                index: GOLDEN_INDEX,
            }),
            heartbeat_interval_ms: shared.options.heartbeat.as_millis().min(u32::MAX as u128)
                as u32,
            carried_credits: join.carried_credits,
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
    let deadline = silence.max(Duration::from_secs(10));
    // A stream that fails (e.g. an oversized message) or stays silent is told why.
    let first = match tokio::time::timeout(deadline, inbound.message()).await {
        Ok(Ok(first)) => first,
        Ok(Err(status)) => {
            let _ = tx.send(Err(status));
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(Status::deadline_exceeded(format!(
                "no prove within {deadline:?} of opening the work stream"
            ))));
            return;
        }
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
        let Joined {
            threads,
            name,
            sums_noise,
            relay,
            carried_credits,
            hub,
            ..
        } = state.joined.remove(&worker).unwrap_or(Joined {
            threads: 1,
            name: String::new(),
            at: Instant::now(),
            sums_noise: false,
            relay: None,
            carried_credits: false,
            hub: false,
            join_key: 0,
        });
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
                rejected: 0,
                accepted: 0,
                theta_requests: (0, 0),
                sums_noise,
                relay,
                carried_credits,
                hub,
            },
        );
        announce(&mut state, worker, Announcement::Start);
        tracing::info!(worker_id = worker, %name, threads, workers = state.workers.len(), "worker proven");
        shared.monitor.worker_joined();
        shared.publish_workers(&state);
    }
    shared.changed.notify_waiters();

    let rate = shared.options.results_per_sec;
    let mut bucket = TokenBucket::new(rate, rate.min(f64::from(u32::MAX)) as u32, Instant::now());
    let end = loop {
        let message = match tokio::time::timeout(silence, inbound.message()).await {
            Err(_) => break "silent for three heartbeat intervals".to_string(),
            Ok(Err(status)) => {
                let end = format!("stream failed: {}", status.message());
                let _ = tx.send(Err(status));
                break end;
            }
            Ok(Ok(None)) => break "stream closed".to_string(),
            Ok(Ok(Some(m))) => m,
        };
        use pb::worker_message::Kind;
        let costly = matches!(
            message.kind,
            Some(Kind::Results(_) | Kind::ThetaRequest(_) | Kind::NoiseSums(_))
        );
        let handled = if costly && !bucket.take(Instant::now()) {
            Handled::error(format!(
                "more than {rate} results or theta requests per second: message dropped"
            ))
        } else {
            handle_message(&shared, worker, message)
        };
        if !handled.errors.is_empty() {
            let mut state = shared.lock();
            state.rejected_messages += handled.errors.len() as u64;
            state.counters.rejected += handled.errors.len() as u64;
            let rejected = state.workers.get_mut(&worker).map_or(0, |slot| {
                slot.rejected = slot.rejected.saturating_add(handled.errors.len() as u32);
                slot.rejected
            });
            drop(state);
            for error in handled.errors.iter().take(LOGGED_ERRORS) {
                tracing::warn!(worker_id = worker, %error, "rejected a worker's message");
            }
            if handled.errors.len() > LOGGED_ERRORS {
                tracing::warn!(
                    worker_id = worker,
                    more = handled.errors.len() - LOGGED_ERRORS,
                    "rejected more parts of the same message"
                );
            }
            if rejected > shared.options.max_rejected {
                let reason = format!(
                    "sent {rejected} rejected messages: more than the {} allowed",
                    shared.options.max_rejected
                );
                let refusal = pb::Refusal::new(RefusalReason::BadRequest, reason.clone());
                let _ = tx.send(Ok(shutdown_message(Some(refusal), &reason, false)));
                break reason;
            }
        }
        for c in handled.checks {
            check(&shared, c).await;
        }
        if shared.lock().quarantined.contains(&worker) {
            break "quarantined".to_string();
        }
    };
    {
        let mut state = shared.lock();
        let removed = state.workers.remove(&worker);
        // A worker still listed when its stream ends is lost to a running generation loop;
        // the end of the run, and quarantine, take workers off the list themselves.
        if removed.is_some() && state.finished.is_none() {
            shared.monitor.worker_lost();
        }
        shared.publish_workers(&state);
        let released = state.work.as_mut().map_or(0, |w| w.release_worker(worker))
            + state
                .sums
                .as_mut()
                .map_or(0, |s| s.release_worker(worker, false) as u32);
        assign_all(&mut state, &shared.options);
        match removed {
            Some(slot) => {
                tracing::info!(worker_id = worker, name = %slot.name, reason = %end, released, pairs_accepted = slot.accepted, workers = state.workers.len(), "worker left");
            }
            // Already logged when it was taken off the list (the end of the run, quarantine).
            None => {
                tracing::debug!(worker_id = worker, reason = %end, released, "stream of a worker off the list ended");
            }
        }
    }
    shared.changed.notify_waiters();
}

/// Results of one index to check against the coordinator's own evaluation: two that
/// disagree (a dispute), or one picked for an audit.
#[derive(Clone, Debug)]
struct Check {
    generation: u32,
    index: u32,
    /// Who claimed what (`None`: a worker no longer known).
    claims: Vec<(Option<WorkerId>, PairResult)>,
}

/// What one message led to: the parts that were refused (each naming what was wrong) and
/// the checks to run.
#[derive(Debug, Default)]
struct Handled {
    errors: Vec<String>,
    checks: Vec<Check>,
}

impl Handled {
    fn error(message: String) -> Handled {
        Handled {
            errors: vec![message],
            checks: Vec::new(),
        }
    }
}

/// Applies one message of a proven worker. Each result of a `Results` message is judged on
/// its own: a bad one is refused without losing the good ones beside it. Checks returned are
/// already counted in `checks_pending`.
fn handle_message(shared: &Shared, worker: WorkerId, message: pb::WorkerMessage) -> Handled {
    use pb::worker_message::Kind;
    let mut state = shared.lock();
    state.counters.bytes_received += prost::Message::encoded_len(&message) as u64;
    if !state.workers.contains_key(&worker) {
        return Handled::error(format!(
            "worker {worker} is not in the run (quarantined or disconnected)"
        ));
    }
    match message.kind {
        Some(Kind::Ready(ready)) => {
            // Grants still in flight for an older generation are ignored.
            if state.current.as_ref().map(|(t, _)| *t) != Some(ready.generation) {
                return Handled::default();
            }
            if let Some(slot) = state.workers.get_mut(&worker) {
                slot.grant(ready.credits);
                slot.capacity = slot.capacity.max(ready.credits.min(MAX_CREDITS));
            }
            assign_to(&mut state, worker, &shared.options);
            Handled::default()
        }
        Some(Kind::Results(results)) => {
            let mut handled = Handled::default();
            let mut complete = false;
            // A worker's first accepted result of an audited generation is checked.
            let audit = shared.options.audit_every > 0
                && results
                    .generation
                    .is_multiple_of(shared.options.audit_every)
                && !state.audited.contains(&worker);
            let State {
                work,
                workers,
                audited,
                checks_pending,
                ..
            } = &mut *state;
            let Some(work) = work.as_mut() else {
                // Between generations: late results of the finished one.
                return handled;
            };
            if results.generation != work.generation() {
                // Late results of a finished generation are normal after a reassignment;
                // a future generation is not.
                if results.generation > work.generation() {
                    handled.errors.push(format!(
                        "results for generation {}: the current generation is {}",
                        results.generation,
                        work.generation()
                    ));
                } else {
                    tracing::debug!(
                        worker_id = worker,
                        generation = results.generation,
                        current = work.generation(),
                        "dropping stale results"
                    );
                }
                return handled;
            }
            if results.pairs.len() > work.population() as usize {
                handled.errors.push(format!(
                    "results message with {} pairs: a generation has {}",
                    results.pairs.len(),
                    work.population()
                ));
                return handled;
            }
            let batch = shared.es.batch_at(results.generation);
            for pair in &results.pairs {
                let result = match pair.to_core(batch) {
                    Ok(result) => result,
                    Err(e) => {
                        handled.errors.push(format!("malformed result: {e}"));
                        continue;
                    }
                };
                match work.submit(worker, results.generation, result) {
                    Submitted::Accepted { complete: c } => {
                        complete |= c;
                        if let Some(slot) = workers.get_mut(&worker) {
                            slot.accepted += 1;
                        }
                        if audit && handled.checks.is_empty() {
                            handled.checks.push(Check {
                                generation: results.generation,
                                index: result.index,
                                claims: vec![(Some(worker), result)],
                            });
                        }
                    }
                    Submitted::Duplicate => {}
                    Submitted::Conflict { first } => handled.checks.push(Check {
                        generation: results.generation,
                        index: result.index,
                        claims: vec![
                            (work.delivered_by(result.index), first),
                            (Some(worker), result),
                        ],
                    }),
                    Submitted::WrongGeneration { current } => {
                        handled.errors.push(format!(
                            "result for generation {}: the current generation is {current}",
                            results.generation
                        ));
                    }
                    Submitted::OutOfRange { population } => handled.errors.push(format!(
                        "result for index {}: expected an index below the population {population}",
                        result.index
                    )),
                    Submitted::Late => tracing::debug!(
                        worker_id = worker,
                        index = result.index,
                        "dropping a late result"
                    ),
                    Submitted::NotAssigned => handled.errors.push(format!(
                        "result for index {}, which was not assigned to worker {worker}",
                        result.index
                    )),
                    Submitted::NotFinite => handled.errors.push(format!(
                        "result for index {} has fitness {} / {}: expected finite numbers or -inf",
                        result.index, result.plus.fitness, result.minus.fitness
                    )),
                }
            }
            if audit && !handled.checks.is_empty() {
                audited.insert(worker);
            }
            *checks_pending += handled.checks.len() as u32;
            // Carried credits: the results count as a Ready for their generation (the current
            // one: older results returned above).
            if results.credits > 0
                && let Some(slot) = workers.get_mut(&worker)
                && slot.carried_credits
            {
                slot.grant(results.credits);
                assign_to(&mut state, worker, &shared.options);
            }
            drop(state);
            if complete || shared.wake_on_each_result {
                shared.changed.notify_waiters();
            }
            handled
        }
        Some(Kind::ThetaRequest(request)) => {
            let current = state.current.as_ref().map(|(t, _)| *t);
            if let Some(slot) = state.workers.get_mut(&worker) {
                let (t, count) = slot.theta_requests;
                let count = if current == Some(t) { count + 1 } else { 1 };
                slot.theta_requests = (current.unwrap_or(0), count);
                if count > MAX_THETA_REQUESTS {
                    return Handled::error(format!(
                        "theta request number {count} in generation {}: at most {MAX_THETA_REQUESTS} are answered",
                        request.generation
                    ));
                }
                slot.theta_digest = None;
            }
            state.counters.theta_requested += 1;
            tracing::debug!(
                worker_id = worker,
                generation = request.generation,
                "worker asked for theta"
            );
            announce(&mut state, worker, Announcement::Repeat);
            Handled::default()
        }
        Some(Kind::NoiseSums(answer)) => {
            let Some(sums) = state.sums.as_mut() else {
                // Between spread updates: a late answer (its range was summed meanwhile).
                return Handled::default();
            };
            if answer.generation != sums.generation() {
                return if answer.generation > sums.generation() {
                    Handled::error(format!(
                        "noise sums for generation {}: the update being spread is generation {}'s",
                        answer.generation,
                        sums.generation()
                    ))
                } else {
                    Handled::default()
                };
            }
            let start = usize::try_from(answer.start).unwrap_or(usize::MAX);
            let Some(len) = sums.expected_len(worker, start) else {
                return Handled::error(format!(
                    "noise sums from parameter {start} of generation {}, which were not asked of worker {worker} (or arrived already)",
                    answer.generation
                ));
            };
            let values = match answer.checked_sums(len) {
                Ok(values) => values,
                Err(e) => return Handled::error(format!("malformed noise sums: {e}")),
            };
            let complete = matches!(
                sums.submit(worker, answer.generation, start, values),
                SumsSubmitted::Accepted { complete: true }
            );
            drop(state);
            if complete {
                shared.changed.notify_waiters();
            }
            Handled::default()
        }
        Some(Kind::Heartbeat(_)) => Handled::default(),
        Some(Kind::Prove(_)) => Handled::error("prove after the stream was proven".into()),
        None => Handled::error("message with no kind".into()),
    }
}

/// The run as one node (the root or a hub) computes on it itself.
struct NodeRun {
    net: NetConfig,
    es: Arc<EsConfig>,
    noise: Arc<NoiseSource>,
    data: Arc<Mnist>,
    kernel: es_kernel::Kernel,
    run_seed: u64,
}

impl NodeRun {
    /// The golden proof of (`generation`, `index`), computed on a blocking thread.
    async fn golden(
        self: &Arc<Self>,
        generation: u32,
        index: u32,
    ) -> Result<GoldenProof, TrainError> {
        let run = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let train = Dataset {
                images: &run.data.train.images,
                labels: &run.data.train.labels,
            };
            let runs = golden_task(
                &run.net,
                &run.es,
                run.run_seed,
                &run.noise,
                train,
                generation,
                index,
                run.kernel,
            )?;
            let [center, plus, minus] = runs.map(|g| GoldenEval::new(&g.evaluation, &g.logits));
            Ok(GoldenProof {
                center,
                plus,
                minus,
            })
        })
        .await
        .expect("the golden task does not panic")
    }
}

/// The coordinator's own evaluator, which checks workers' results.
struct Referee {
    evaluator: Evaluator,
    es: Arc<EsConfig>,
    run_seed: u64,
    noise: Arc<NoiseSource>,
    data: Arc<Mnist>,
}

impl Referee {
    fn evaluate(
        &mut self,
        theta: &[f32],
        generation: u32,
        index: u32,
    ) -> Result<PairResult, es_core::train::TrainError> {
        let train = Dataset {
            images: &self.data.train.images,
            labels: &self.data.train.labels,
        };
        evaluate_index(
            &mut self.evaluator,
            &self.es,
            self.run_seed,
            &self.noise,
            train,
            theta,
            generation,
            index,
        )
    }
}

/// Runs a check: evaluates the index on the coordinator, stores that result, and quarantines
/// every worker that claimed something else. The generation cannot complete before its
/// checks have run, so no unchecked claim reaches the update.
async fn check(shared: &Arc<Shared>, check: Check) {
    let truth = evaluate_check(shared, &check).await;
    let mut state = shared.lock();
    state.checks_pending -= 1;
    let current = state.work.as_ref().map(|w| w.generation()) == Some(check.generation);
    if let (Some(truth), true) = (truth, current) {
        let wrong: Vec<(Option<WorkerId>, PairResult)> = check
            .claims
            .iter()
            .filter(|(_, claim)| !same_result(claim, &truth))
            .copied()
            .collect();
        if check.claims.len() > 1 || !wrong.is_empty() {
            tracing::warn!(
                generation = check.generation,
                index = check.index,
                claims = ?check.claims.iter().map(|(w, c)| (*w, c.plus.fitness, c.minus.fitness)).collect::<Vec<_>>(),
                coordinator = ?(truth.plus.fitness, truth.minus.fitness),
                "results checked against the coordinator's own evaluation"
            );
        }
        if !wrong.is_empty() {
            state.work.as_mut().expect("checked above").settle(truth);
        }
        for (worker, claim) in wrong {
            let Some(worker) = worker else { continue };
            let reason = format!(
                "worker {worker}'s fitness of index {} in generation {} is {:?}/{:?}: the coordinator computes {:?}/{:?}; its arithmetic differs",
                check.index,
                check.generation,
                claim.plus.fitness,
                claim.minus.fitness,
                truth.plus.fitness,
                truth.minus.fitness
            );
            quarantine(&mut state, worker, &reason, &shared.options);
        }
    }
    drop(state);
    shared.changed.notify_waiters();
}

/// The coordinator's own result of a check's index, if its generation is still running.
async fn evaluate_check(shared: &Arc<Shared>, check: &Check) -> Option<PairResult> {
    let theta = {
        let state = shared.lock();
        match (&state.current, &state.current_theta) {
            (Some((t, _)), Some(theta)) if *t == check.generation => Arc::clone(theta),
            _ => return None, // The generation ended meanwhile.
        }
    };
    let referee = Arc::clone(&shared.referee);
    let (generation, index) = (check.generation, check.index);
    // A check that cannot run must still end: the generation waits for every pending one.
    let truth = tokio::task::spawn_blocking(move || {
        let mut referee = referee
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        referee.evaluate(&theta, generation, index)
    })
    .await;
    match truth {
        Ok(Ok(truth)) => Some(truth),
        Ok(Err(e)) => {
            tracing::error!(generation, index, error = %e, "could not run a check");
            None
        }
        Err(e) => {
            tracing::error!(generation, index, error = %e, "a check panicked");
            None
        }
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
    run_from(config, env, options, listener, shutdown, None).await
}

/// Like [`run`], continuing from `resume` when given (under the checkpoint's run id, so its
/// workers rejoin). `config` must be the checkpoint's, operational settings aside. Writes a
/// checkpoint every `config.checkpoint_every` generations and when `shutdown` ends the run.
pub async fn run_from(
    config: RunConfig,
    env: Environment,
    options: ClusterOptions,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
    resume: Option<Checkpoint>,
) -> Result<RunSummary, RunError> {
    let local = listener.local_addr().map_err(|source| RunError::Io {
        path: "listener".into(),
        source,
    })?;
    check_exposure(
        local,
        options.token.is_some(),
        options.tls.as_ref().is_some_and(ServerTls::mutual),
        options.insecure,
    )
    .map_err(RunError::Exposed)?;
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
    let begun = embedded::begin("cluster", &config, &env, &net, &es, &data, resume)?;
    let spec = es_proto::RunSpec {
        run_seed: config.seed,
        net: net.clone(),
        es: es.clone(),
        noise: es_proto::NoiseSpec::from(&noise),
    };
    let run_id = begun.run_id.clone();
    let noise = Arc::new(noise);
    let es = Arc::new(es);
    let node = Arc::new(NodeRun {
        net: net.clone(),
        es: Arc::clone(&es),
        noise: Arc::clone(&noise),
        data: Arc::clone(&data),
        kernel: env.kernel,
        run_seed: config.seed,
    });
    let golden = node.golden(es.golden_generation(), GOLDEN_INDEX).await?;
    let shared = Arc::new(Shared::new(
        &node,
        run_id.clone(),
        (&spec).into(),
        golden,
        options.clone(),
        env.monitor.clone(),
        false,
    )?);

    let server = Server::start(&shared, listener).await?;
    tracing::info!(
        addr = %server.addr,
        run_id,
        workers = options.workers,
        "coordinator listening"
    );

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
        &config, &env, &options, &shared, &net, es, noise, &data, &stop, begun,
    )
    .await;

    let finished = result.as_ref().is_ok_and(|s| !s.interrupted);
    end_streams(&shared, finished);
    server.stop().await;
    result
}

/// The gRPC server of the `Coordinator` service (and gRPC health), serving `Shared`.
struct Server {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    /// Serves the workers' calls on `listener`, with the security and limits of
    /// `shared.options`.
    async fn start(
        shared: &Arc<Shared>,
        listener: tokio::net::TcpListener,
    ) -> Result<Server, RunError> {
        let options = &shared.options;
        let addr = listener.local_addr().map_err(|source| RunError::Io {
            path: "listener".into(),
            source,
        })?;
        let (health_reporter, health_service) = es_proto::tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<CoordinatorServer<Service>>()
            .await;
        // Every call of the Coordinator service needs the token; the interceptor runs before
        // a request's body is read. A worker sends small messages: the decoding limit is what
        // a generation of results needs, not θ's size.
        let service = InterceptedService::new(
            CoordinatorServer::new(Service(Arc::clone(shared)))
                .max_decoding_message_size(inbound_message_limit(shared.es.population))
                .max_encoding_message_size(es_proto::MAX_MESSAGE_BYTES),
            RequireToken::new(options.token.as_ref()),
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &options.tls {
            builder = builder
                .tls_config(tls.config())
                .map_err(|e| RunError::Serve(format!("the TLS configuration is unusable: {e}")))?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            builder
                // Flow-control windows bound what a client can make the coordinator buffer:
                // workers send small messages (θ travels the other way, under the worker's
                // own windows), so 1 MiB per stream and 2 MiB per connection slow nothing.
                .initial_stream_window_size(Some(STREAM_WINDOW))
                .initial_connection_window_size(Some(2 * STREAM_WINDOW))
                .max_frame_size(Some(es_proto::HTTP2_MAX_FRAME_BYTES))
                .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
                .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
                // Unary calls (Join) must finish within this; work streams have their own
                // deadlines (first message, heartbeats) in `serve_worker`.
                .timeout(CALL_TIMEOUT)
                // A peer that stops answering pings (vanished, cut off) loses its connection.
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(health_service)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    Incoming::new(listener, options.max_connections),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        tracing::info!(
            tls = options.tls.is_some(),
            mutual_tls = options.tls.as_ref().is_some_and(ServerTls::mutual),
            token = options.token.is_some(),
            "coordinator security"
        );
        Ok(Server { addr, stop, task })
    }

    /// Stops serving after the last messages have had a moment to leave. A graceful stop
    /// waits for clients to close their connections; one that never does (a stuck or
    /// hostile client) must not keep the coordinator from exiting.
    async fn stop(self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "clients kept connections open after the run: closing them"
            );
            task.abort();
        }
    }
}

/// Tells every worker that the run is over (`finished`) or that the coordinator is stopping,
/// and forgets them; logs who was refused.
fn end_streams(shared: &Shared, finished: bool) {
    let mut state = shared.lock();
    state.finished = Some(finished);
    if !state.quarantined.is_empty() || state.rejected_messages > 0 {
        let mut quarantined: Vec<WorkerId> = state.quarantined.iter().copied().collect();
        quarantined.sort_unstable();
        tracing::warn!(
            ?quarantined,
            rejected_messages = state.rejected_messages,
            "workers sent results that were refused"
        );
    }
    let reason = if finished {
        "the run is over"
    } else {
        "the coordinator is stopping"
    };
    for (id, slot) in &state.workers {
        tracing::info!(worker_id = id, name = %slot.name, pairs_accepted = slot.accepted, "worker at the end of the run");
        let _ = slot.tx.send(Ok(shutdown_message(None, reason, finished)));
    }
    state.workers.clear();
}

#[allow(clippy::too_many_arguments)]
async fn train(
    config: &RunConfig,
    env: &Environment,
    options: &ClusterOptions,
    shared: &Arc<Shared>,
    net: &NetConfig,
    es: Arc<EsConfig>,
    noise: Arc<NoiseSource>,
    data: &Arc<Mnist>,
    stop: &AtomicBool,
    begun: embedded::Begun,
) -> Result<RunSummary, RunError> {
    let embedded::Begun {
        state: mut es_state,
        mut run_dir,
        checkpointer,
        ..
    } = begun;
    let population = es.population as u32;
    let checkpointer = Arc::new(checkpointer);

    shared.monitor.set_phase(Phase::WaitingForWorkers);
    if !wait_for_workers(shared, stop).await {
        return finish(
            env,
            net,
            &mut run_dir,
            es_state,
            data,
            Instant::now(),
            true,
            &checkpointer,
        )
        .await;
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
        let cpu_started = process_cpu_secs();
        // θ's digest and copy are made outside the lock: the handlers keep running meanwhile.
        // One copy serves both as the wire's bytes and as the values disputes are settled on.
        let theta_values = Arc::new(es_state.theta.clone());
        let theta = Arc::new(EncodedTheta::shared(Arc::clone(&theta_values)));
        begin_generation(
            &mut shared.lock(),
            options,
            Wanted::All,
            t,
            population,
            theta,
            theta_values,
        );
        let Some(Collected {
            results,
            reassigned,
            workers,
            counters,
        }) = collect_results(shared, options, stop, gen_started).await
        else {
            interrupted = true;
            break;
        };
        let eval_secs = gen_started.elapsed().as_secs_f64();
        let update_started = Instant::now();
        let pairs: Vec<_> = results.iter().map(PairResult::fitness).collect();
        let (sums, spread_counts) =
            if options.spread_update && matches!(*noise, NoiseSource::Table(_)) {
                let update = SpreadUpdate {
                    net,
                    es: &es,
                    noise: &noise,
                    run_seed: config.seed,
                    threads: env.threads,
                };
                let (g, counts) = update.noise_sums(shared, options, t, &pairs).await?;
                (Some(g), Some(counts))
            } else {
                (None, None)
            };
        let (state_back, update) = {
            let (es, noise) = (Arc::clone(&es), Arc::clone(&noise));
            let net = net.clone();
            let seed = config.seed;
            let threads = env.threads;
            let checkpointer = Arc::clone(&checkpointer);
            tokio::task::spawn_blocking(move || {
                let update = match sums {
                    Some(g) => finish_update(&mut es_state, &net, &es, g, threads),
                    None => apply_update(&mut es_state, &net, &es, &noise, seed, &pairs, threads),
                };
                let update = update.map_err(RunError::from).and_then(|update| {
                    if checkpointer.due(es_state.generation) {
                        checkpointer.save(&es_state)?;
                    }
                    Ok(update)
                });
                (es_state, update)
            })
            .await
            .expect("the update does not panic")
        };
        es_state = state_back;
        let update: UpdateStats = update?;
        let mut report = generation_report(t, &results, update);
        report.update_secs = update_started.elapsed().as_secs_f64();
        let done = es_state.generation;
        let evaluate = config.eval_every > 0 && done.is_multiple_of(config.eval_every);
        let test_eval = if evaluate {
            let (e, pool) =
                evaluate_test(net, env, test_pool.take(), es_state.model(), data).await?;
            test_pool = Some(pool);
            last_test = Some(e);
            Some(e)
        } else {
            None
        };
        let gen_secs = gen_started.elapsed().as_secs_f64();
        let mut line = embedded::metrics_line(&report, started, gen_secs, workers, test_eval);
        line.evals_per_sec = report.evaluations as f64 / eval_secs.max(1e-9);
        line.wire_bytes_sent = Some(counters.bytes_sent);
        line.wire_bytes_received = Some(counters.bytes_received);
        line.reassigned = Some(reassigned);
        line.rejected_messages = Some(counters.rejected);
        line.quarantined = Some(counters.quarantined);
        line.theta_relayed = Some(counters.theta_relayed);
        line.theta_requested = Some(counters.theta_requested);
        line.collect_secs = Some(eval_secs);
        line.cpu_secs = cpu_started
            .zip(process_cpu_secs())
            .map(|(start, end)| end - start);
        line.sums_delivered = spread_counts.map(|(delivered, _)| delivered);
        line.sums_local = spread_counts.map(|(_, local)| local);
        run_dir.append_metrics(&line)?;
        shared.monitor.generation(&line, report.evaluations as u64);
        shared.publish_workers(&shared.lock());
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
    finish(
        env,
        net,
        &mut run_dir,
        es_state,
        data,
        started,
        interrupted,
        &checkpointer,
    )
    .await
}

/// Waits until `shared` has its `options.workers` proven workers (a root before its first
/// generation, a hub before it proves upstream), saying every 5 s how many it has; `false`
/// if `stop` is set first.
async fn wait_for_workers(shared: &Shared, stop: &AtomicBool) -> bool {
    let wanted = shared.options.workers;
    let mut last_log = Instant::now();
    loop {
        let notified = shared.changed.notified();
        let workers = shared.lock().workers.len();
        if workers >= wanted {
            return true;
        }
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            tracing::info!(workers, wanted, "waiting for workers");
            last_log = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
    }
}

/// Which indices of a generation are wanted when it begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    /// The whole population (the root).
    All,
    /// None yet: they are granted as a hub's coordinator hands them out.
    Granted,
}

/// Starts generation `t` of `population` indices with θ (`theta` as it travels,
/// `theta_values` to settle disputes): cuts it into chunks for the workers' threads, tells
/// every proven worker (θ's bytes, or which relay to fetch them from) and hands each what its
/// credits allow.
#[allow(clippy::too_many_arguments)]
fn begin_generation(
    state: &mut State,
    options: &ClusterOptions,
    wanted: Wanted,
    t: u32,
    population: u32,
    theta: Arc<EncodedTheta>,
    theta_values: Arc<Vec<f32>>,
) {
    let threads: u32 = state
        .workers
        .values()
        .map(|w| w.threads)
        .fold(0u32, u32::saturating_add)
        .max(1);
    state.chunk_size = chunk_size(population, threads);
    state.threads = threads;
    state.work = Some(match wanted {
        Wanted::All => GenerationWork::new(t, population, state.chunk_size),
        Wanted::Granted => GenerationWork::open(t, population, state.chunk_size),
    });
    state.current = Some((t, theta));
    state.current_theta = Some(theta_values);
    state.audited.clear();
    let mut sources = theta_sources(state, options.relay_fanout);
    let ids: Vec<WorkerId> = state.workers.keys().copied().collect();
    for id in ids {
        announce_from(state, id, sources.remove(&id), Announcement::Start);
        assign_to(state, id, options);
    }
}

/// A generation's results, in index order, and what it took to collect them.
struct Collected {
    results: Vec<PairResult>,
    /// Indices evaluated again after a lost or late worker.
    reassigned: u32,
    /// Workers in the run when the last result came.
    workers: usize,
    counters: GenerationCounters,
}

/// Waits until the current generation has every result and no check is pending, handing
/// expired leases' indices to other workers meanwhile; `None` when `stop` is set first.
/// Its pace sets the next generation's leases.
async fn collect_results(
    shared: &Shared,
    options: &ClusterOptions,
    stop: &AtomicBool,
    gen_started: Instant,
) -> Option<Collected> {
    loop {
        let notified = shared.changed.notified();
        {
            let mut state = shared.lock();
            let checks_pending = state.checks_pending;
            let work = state.work.as_mut().expect("a generation is running");
            if work.is_complete() && checks_pending == 0 {
                let work = state.work.take().expect("checked above");
                let population = work.population();
                let reassigned = work.reassigned();
                let workers = state.workers.len();
                let threads: u32 = state.workers.values().map(|w| w.threads).sum();
                let pair_secs = gen_started.elapsed().as_secs_f64() * f64::from(threads.max(1))
                    / f64::from(population.max(1));
                state.pair_secs = Some(match state.pair_secs {
                    Some(previous) => 0.5 * (previous + pair_secs),
                    None => pair_secs,
                });
                return Some(Collected {
                    results: work.into_results().expect("complete"),
                    reassigned,
                    workers,
                    counters: std::mem::take(&mut state.counters),
                });
            }
            hand_out_expired(&mut state, options);
        }
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
    }
}

/// Returns the indices of the current generation's expired leases to the pool and hands
/// them to workers with credits.
fn hand_out_expired(state: &mut State, options: &ClusterOptions) {
    let Some(work) = state.work.as_mut() else {
        return;
    };
    let (expired, returned) = work.expire(Instant::now());
    if returned > 0 {
        tracing::warn!(
            ?expired,
            returned,
            "leases expired: handing their indices to others"
        );
        assign_all(state, options);
    }
}

/// What the coordinator needs to spread a generation's update and check the answers.
struct SpreadUpdate<'a> {
    net: &'a NetConfig,
    es: &'a Arc<EsConfig>,
    noise: &'a Arc<NoiseSource>,
    run_seed: u64,
    threads: usize,
}

/// Parameters of each delivered range that an audit sums again on the coordinator.
const AUDIT_SUMS: usize = 64;

impl SpreadUpdate<'_> {
    /// Generation `t`'s noise sums over all of θ, spread over the workers that can compute
    /// them: each gets the weights and its share of θ's ranges. The coordinator waits until
    /// every range is answered or its worker gone, or the lease (the last spread's time, four
    /// times over, plus the configured slack) runs out; in audited generations it sums
    /// [`AUDIT_SUMS`] parameters at a random place of every delivered range itself and
    /// quarantines a worker that differs; then it sums every range still missing itself.
    async fn noise_sums(
        &self,
        shared: &Arc<Shared>,
        options: &ClusterOptions,
        t: u32,
        pairs: &[PairFitness],
    ) -> Result<(Vec<f32>, (u32, u32)), RunError> {
        let weights = Arc::new(update_weights(self.es, pairs)?);
        let dim = ParamLayout::new(self.net).len();
        let (work, counts) = self
            .spread(shared, options, t, weights, std::slice::from_ref(&(0..dim)))
            .await?;
        Ok((work.assemble().expect("every range was filled"), counts))
    }

    /// Generation `t`'s noise sums with `weights` over the parameters of `within`, spread
    /// over the workers as [`Self::noise_sums`] describes; every range is filled. Also returns
    /// how many ranges workers delivered and how many this node summed itself.
    async fn spread(
        &self,
        shared: &Arc<Shared>,
        options: &ClusterOptions,
        t: u32,
        weights: Arc<Vec<f32>>,
        within: &[Range<usize>],
    ) -> Result<(SumWork, (u32, u32)), TrainError> {
        let started = Instant::now();
        let lease = {
            let mut state = shared.lock();
            let mut ids: Vec<WorkerId> = state
                .workers
                .iter()
                .filter(|(_, w)| w.sums_noise)
                .map(|(id, _)| *id)
                .collect();
            ids.sort_unstable();
            let (work, assigned) = SumWork::plan_within(t, within, &ids);
            let encoded = es_proto::work::f32s_to_bytes(&weights);
            let State {
                workers, counters, ..
            } = &mut *state;
            for (id, ranges) in &assigned {
                if let Some(slot) = workers.get(id) {
                    let message = pb::SumNoise::new(t, encoded.clone(), ranges);
                    send(&mut counters.bytes_sent, &slot.tx, message.into());
                }
            }
            state.sums = Some(work);
            match state.sums_secs {
                Some(secs) => options.lease + Duration::from_secs_f64((4.0 * secs).min(3600.0)),
                None => options.first_lease,
            }
        };
        loop {
            let notified = shared.changed.notified();
            let settled = shared.lock().sums.as_ref().is_none_or(SumWork::is_settled);
            if settled || started.elapsed() >= lease {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
        }
        let work = {
            let mut state = shared.lock();
            state.sums_secs = Some(started.elapsed().as_secs_f64());
            state.sums.take().expect("set above and taken only here")
        };
        let audit = options.audit_every > 0 && t.is_multiple_of(options.audit_every);
        let (net, es, noise) = (
            self.net.clone(),
            Arc::clone(self.es),
            Arc::clone(self.noise),
        );
        let (run_seed, threads) = (self.run_seed, self.threads);
        let (work, wrong, counts) = tokio::task::spawn_blocking(move || {
            let sum = |range: Range<usize>, threads: usize| {
                noise_sums(&net, &es, &noise, run_seed, t, &weights, range, threads)
            };
            let mut work = work;
            // Each audit's place is unpredictable to the workers: a per-process random hash.
            let places = std::hash::RandomState::new();
            let mut wrong: Vec<(WorkerId, String)> = Vec::new();
            if audit {
                // Judged in place; the wrong workers' ranges are released after the loop.
                for (worker, range, sums) in work.delivered() {
                    if wrong.iter().any(|(w, _)| *w == worker) {
                        continue;
                    }
                    let len = AUDIT_SUMS.min(range.len());
                    let at = (std::hash::BuildHasher::hash_one(&places, (t, worker, range.start))
                        as usize)
                        % (range.len() - len + 1);
                    let mine = sum(range.start + at..range.start + at + len, 1)?;
                    let theirs = &sums[at..at + len];
                    if let Some(k) = (0..len).find(|&k| mine[k].to_bits() != theirs[k].to_bits())
                    {
                        let j = range.start + at + k;
                        wrong.push((
                            worker,
                            format!(
                                "its noise sum of parameter {j} in generation {t} is {} where the coordinator's is {}",
                                theirs[k], mine[k]
                            ),
                        ));
                    }
                }
                for (worker, _) in &wrong {
                    work.release_worker(*worker, true);
                }
            }
            let missing = work.missing();
            let delivered = work.delivered().count() as u32;
            if !missing.is_empty() {
                tracing::debug!(generation = t, ranges = missing.len(), "summing noise ranges no worker delivered");
            }
            let missing_count = missing.len() as u32;
            for range in missing {
                let start = range.start;
                work.fill(start, sum(range, threads)?);
            }
            Ok::<_, TrainError>((work, wrong, (delivered, missing_count)))
        })
        .await
        .expect("summing noise does not panic")?;
        if !wrong.is_empty() {
            let mut state = shared.lock();
            for (worker, reason) in &wrong {
                quarantine(&mut state, *worker, reason, options);
            }
        }
        Ok((work, counts))
    }
}

/// CPU seconds (user and system, all threads) this process has used so far, where the OS
/// tells (`getrusage`); `None` elsewhere.
#[cfg(unix)]
fn process_cpu_secs() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: `usage` is valid for writes of one `rusage`, which getrusage fills completely
    // when it returns 0; it is read only then.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

#[cfg(not(unix))]
fn process_cpu_secs() -> Option<f64> {
    None
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
        update_secs: 0.0,
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
    checkpointer: &Checkpointer,
) -> Result<RunSummary, RunError> {
    env.monitor.set_phase(Phase::Finished);
    if checkpointer.due_at_stop(es_state.generation) {
        let (checkpointer, state) = (checkpointer.clone(), es_state.clone());
        tokio::task::spawn_blocking(move || checkpointer.save(&state))
            .await
            .expect("saving a checkpoint does not panic")?;
    }
    // The run's result: θ, or its running average when the run keeps one.
    run_dir.write_theta("theta.f32", es_state.model())?;
    let (net, env, data) = (net.clone(), env.clone(), Arc::clone(data));
    let generations = es_state.generation;
    let mode = net.arithmetic.name().to_string();
    let (flushed, unflushed) = tokio::task::spawn_blocking(move || {
        let test = Dataset {
            images: &data.test.images,
            labels: &data.test.labels,
        };
        let flushed = embedded::evaluate_with(&net, net.arithmetic, &env, es_state.model(), test)?;
        let unflushed = embedded::evaluate_with(
            &net,
            es_kernel::Arithmetic::Ieee,
            &env,
            es_state.model(),
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
    embedded::write_plots(run_dir.path());
    tracing::info!(generations, test_accuracy = summary.test_accuracy, run_dir = %run_dir.path().display(), interrupted, "run finished");
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_gets_a_quarter_of_its_threads_share_per_chunk() {
        // 8 hubs of 250 threads at P 10,000: 312.5 pairs each quarter, so four messages per
        // hub and generation instead of one per worker chunk.
        assert_eq!(hub_chunk(10_000, 2_000, 250), 313);
        assert_eq!(hub_chunk(16, 3, 3), 4);
        assert_eq!(hub_chunk(1, 1_000, 1), 1, "never empty");
    }

    /// What `assign_to` hands one worker of `threads` threads and `credits` credits in a run
    /// of `all_threads` threads at population `population`: the counts of its Assigns.
    fn assigned_counts(hub: bool, threads: u32, credits: u32, all_threads: u32) -> Vec<u32> {
        let population = 10_000;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut state = State {
            threads: all_threads,
            chunk_size: chunk_size(population, all_threads),
            ..State::default()
        };
        state.work = Some(GenerationWork::new(0, population, state.chunk_size));
        state.workers.insert(
            1,
            WorkerSlot {
                name: "w".into(),
                threads,
                credits,
                capacity: credits,
                tx,
                theta_digest: None,
                rejected: 0,
                accepted: 0,
                theta_requests: (0, 0),
                sums_noise: true,
                relay: None,
                carried_credits: true,
                hub,
            },
        );
        assign_to(&mut state, 1, &ClusterOptions::default());
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m.expect("no error").kind {
                Some(pb::coordinator_message::Kind::Assign(a)) => a.count,
                other => panic!("expected an Assign, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_hub_is_leased_a_quarter_of_its_share_per_assign_however_small_the_chunks() {
        // One of 8 hubs of 250 threads at P 10,000: the generation is cut into chunks of 10
        // (the 1,024-chunk cap), but the hub gets runs of 313 pairs, three in flight: a few
        // messages per hub and generation at the root, not one per 10 pairs.
        assert_eq!(chunk_size(10_000, 2_000), 10);
        assert_eq!(assigned_counts(true, 250, 16_000, 2_000), [313, 313, 313]);
        // A worker that is not a hub gets the chunk size, two chunks' worth in flight.
        assert_eq!(assigned_counts(false, 2, 128, 2_000), [10, 10]);
    }

    #[test]
    fn chunks_are_four_per_thread_but_never_more_than_max_chunks() {
        // 32 two-thread workers: four chunks per thread.
        assert_eq!(chunk_size(10_000, 64), 39);
        // 1,000 two-thread workers: the cap, not single pairs.
        assert_eq!(chunk_size(10_000, 2_000), 10);
        // Small runs keep their spread over the workers.
        assert_eq!(chunk_size(8, 2), 1);
        assert_eq!(chunk_size(256, 2), 32);
        assert_eq!(chunk_size(0, 3), 1);
        for population in [1, 7, 1_000, 1_024, 1_025, 10_000, 65_537, 1_000_000] {
            for threads in [1, 2, 63, 1_000, 2_000, 100_000] {
                let size = chunk_size(population, threads);
                assert!(size >= 1, "P={population} threads={threads}");
                assert!(
                    population.div_ceil(size) <= MAX_CHUNKS,
                    "P={population} threads={threads}: {size} per chunk"
                );
            }
        }
    }
}
