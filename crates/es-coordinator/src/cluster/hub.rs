//! A hub: a worker to its own coordinator (upstream) and a coordinator to workers of its own,
//! so that the root serves a few hubs' streams instead of thousands of workers'.
//!
//! Upstream, the hub is an ordinary `es_worker` session ([`es_worker::delegate`]): it joins,
//! proves the golden task, receives θ and `Assign`s, and sends `Results` and `NoiseSums` with
//! its credits. Only the computing is handed on: each upstream generation becomes a generation
//! of the hub's own that opens empty ([`Wanted::Granted`]) and is granted each upstream chunk
//! as it comes; its workers get θ, chunks, leases and audits exactly as from the root, and an
//! upstream chunk is answered once every index of it has a result and no check is pending
//! (so in an audited generation nothing unchecked goes up: the root could only quarantine the
//! whole hub). A `SumNoise` is split over the hub's workers the same way the root splits θ
//! ([`SumWork::plan_within`]), audited, and whatever they leave is summed by the hub itself.
//!
//! Bits never change on the way: the hub forwards its workers' results and sums as they are,
//! and a wrong one is caught by the hub's own `Referee` before it is forwarded.

use std::fmt;
use std::sync::atomic::AtomicU64;

use es_worker::WorkerError;
use es_worker::delegate::{
    ChunkDone, ChunkJob, Delegate, DelegatedRun, DelegatedWork, Outcome, SumsDone, SumsRequest,
};
use tokio::sync::mpsc::UnboundedSender;

use super::*;

/// How a hub serves its own workers.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Security, limits, leases, audits and the spread update towards the hub's workers, as
    /// a coordinator's. `workers` is how many of its own workers the hub waits for before it
    /// proves the golden task upstream: the root counts the hub, and starts generations it
    /// waits for, only then (0 or 1: the hub joins at once; its workers join as they come).
    pub cluster: ClusterOptions,
    /// Where the hub's workers connect.
    pub listen: SocketAddr,
    /// Threads the hub sums noise ranges on when its workers leave some unanswered.
    pub threads: usize,
}

/// The [`Delegate`] of a hub: give it to [`es_worker::WorkerOptions::delegate`], and the worker
/// session hands every chunk and sums request on to the workers that connect to
/// [`HubOptions::listen`].
#[derive(Debug)]
pub struct Hub {
    options: HubOptions,
}

impl Hub {
    pub fn new(options: HubOptions) -> Hub {
        Hub { options }
    }
}

/// A chunk the hub's coordinator handed it, waiting for its results.
struct UpstreamChunk {
    ticket: u64,
    generation: u32,
    indices: Range<u32>,
    reply: UnboundedSender<ChunkDone>,
}

/// The chunks of the upstream generation being served, and its announcement's ticket.
#[derive(Default)]
pub(super) struct Upstream {
    ticket: u64,
    chunks: Vec<UpstreamChunk>,
}

/// How long a hub keeps trying to bind its listening address (a previous run's server may
/// still be letting go of it).
const BIND_PATIENCE: Duration = Duration::from_secs(15);

#[tonic::async_trait]
impl Delegate for Hub {
    async fn start(&self, run: DelegatedRun) -> Result<Box<dyn DelegatedWork>, WorkerError> {
        let DelegatedRun {
            run_id,
            spec,
            noise,
            data,
            kernel,
            current,
        } = run;
        let options = &self.options;
        let cluster = &options.cluster;
        check_exposure(
            options.listen,
            cluster.token.is_some(),
            cluster.tls.as_ref().is_some_and(ServerTls::mutual),
            cluster.insecure,
        )
        .map_err(|e| WorkerError::Delegate(e.to_string()))?;
        let es = Arc::new(spec.es.clone());
        let noise = Arc::new(noise);
        let node = Arc::new(NodeRun {
            net: spec.net.clone(),
            es: Arc::clone(&es),
            noise: Arc::clone(&noise),
            data: Arc::clone(&data),
            kernel,
            run_seed: spec.run_seed,
        });
        let golden_at = (es.golden_generation(), GOLDEN_INDEX);
        let golden = node
            .golden(golden_at.0, golden_at.1)
            .await
            .map_err(WorkerError::Golden)?;
        let shared = Arc::new(
            Shared::new(
                &node,
                run_id.clone(),
                (&spec).into(),
                golden,
                cluster.clone(),
                Monitor::default(),
                true,
            )
            .map_err(WorkerError::Evaluators)?,
        );
        let listener = bind(options.listen).await?;
        let server = Server::start(&shared, listener)
            .await
            .map_err(|e| WorkerError::Delegate(format!("cannot serve the hub's workers: {e}")))?;
        tracing::info!(addr = %server.addr, run_id, "hub listening for its workers");
        let pump = tokio::spawn(answer_upstream(Arc::clone(&shared), Arc::clone(&current)));
        Ok(Box::new(HubWork {
            shared,
            server_addr: server.addr,
            server: Mutex::new(Some(server)),
            pump,
            golden: (golden_at, golden),
            current,
            sums_task: Mutex::new(None),
            node,
            sum_threads: options.threads.max(1),
        }))
    }
}

/// Binds `addr`, retrying for [`BIND_PATIENCE`] while it is in use.
async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, WorkerError> {
    let started = Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < BIND_PATIENCE =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(WorkerError::Delegate(format!(
                    "cannot listen for the hub's workers on {addr}: {e}"
                )));
            }
        }
    }
}

/// The hub's side of one run.
struct HubWork {
    shared: Arc<Shared>,
    server_addr: SocketAddr,
    server: Mutex<Option<Server>>,
    /// Answers upstream chunks as their results come in ([`answer_upstream`]).
    pump: tokio::task::JoinHandle<()>,
    /// The golden proof the hub computed for its workers, and of which task.
    golden: ((u32, u32), GoldenProof),
    /// The upstream announcement now current (set by the worker session).
    current: Arc<AtomicU64>,
    /// The spread of the last `SumNoise`, aborted when the next one comes.
    sums_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    node: Arc<NodeRun>,
    /// Threads to sum noise on.
    sum_threads: usize,
}

impl fmt::Debug for HubWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No lock taken: a Debug print must never wait for (or deadlock on) the state.
        f.debug_struct("HubWork")
            .field("run_id", &self.shared.run_id)
            .field("listen", &self.server_addr)
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl DelegatedWork for HubWork {
    async fn golden(&self, generation: u32, index: u32) -> Result<GoldenProof, WorkerError> {
        let (at, proof) = self.golden;
        if at == (generation, index) {
            // The upstream proof waits for the hub's own workers (`--workers`). A hub has no
            // stop flag: its session ends the wait by dropping this future.
            wait_for_workers(&self.shared, &AtomicBool::new(false)).await;
            return Ok(proof);
        }
        // Another task than the one the hub's workers prove: computed on its own.
        self.node
            .golden(generation, index)
            .await
            .map_err(WorkerError::Golden)
    }

    /// Grants the chunk's indices to the hub's generation, beginning a new one when the
    /// chunk belongs to a new upstream announcement.
    fn submit(&self, job: ChunkJob, reply: &UnboundedSender<ChunkDone>) -> Result<(), WorkerError> {
        let ChunkJob {
            ticket,
            generation,
            theta,
            indices,
            ..
        } = job;
        let shared = &self.shared;
        let fresh = shared.lock().upstream.ticket != ticket;
        // θ's digest and copy are made outside the lock, as on the root.
        let encoded = fresh.then(|| Arc::new(EncodedTheta::shared(Arc::clone(&theta))));
        let mut state = shared.lock();
        if let Some(encoded) = encoded {
            let upstream = std::mem::take(&mut state.upstream.chunks);
            skip(upstream);
            state.upstream.ticket = ticket;
            let same = matches!(&state.current, Some((t, current))
                if *t == generation && current.digest() == encoded.digest());
            // The same generation announced again (a new upstream stream) keeps its work:
            // results already in answer the chunks handed out again.
            if !same || state.work.is_none() {
                begin_generation(
                    &mut state,
                    &shared.options,
                    Wanted::Granted,
                    generation,
                    shared.es.population as u32,
                    encoded,
                    theta,
                );
            }
        }
        let work = state.work.as_mut().expect("begun above");
        // Indices handed out again upstream (a lease there ended) are granted once here.
        for run in work.ungranted(indices.clone()) {
            work.extend(run)
                .map_err(|e| WorkerError::Delegate(e.to_string()))?;
        }
        state.upstream.chunks.push(UpstreamChunk {
            ticket,
            generation,
            indices,
            reply: reply.clone(),
        });
        assign_all(&mut state, &shared.options);
        drop(state);
        shared.changed.notify_waiters();
        Ok(())
    }

    /// Spreads the ranges over the hub's workers in the background; a newer request aborts
    /// an older one that is still waiting.
    fn submit_sums(
        &self,
        request: SumsRequest,
        reply: &UnboundedSender<SumsDone>,
    ) -> Result<(), WorkerError> {
        let (shared, node, current, reply, threads) = (
            Arc::clone(&self.shared),
            Arc::clone(&self.node),
            Arc::clone(&self.current),
            reply.clone(),
            self.sum_threads,
        );
        let task = tokio::spawn(async move {
            let SumsRequest {
                ticket,
                generation,
                weights,
                ranges,
            } = request;
            let update = SpreadUpdate {
                net: &node.net,
                es: &node.es,
                noise: &node.noise,
                run_seed: node.run_seed,
                threads,
            };
            let spread = update
                .spread(&shared, &shared.options, generation, weights, &ranges)
                .await;
            for range in ranges {
                let outcome = if current.load(Ordering::SeqCst) != ticket {
                    Outcome::Skipped
                } else {
                    match &spread {
                        Ok((work, _)) => {
                            Outcome::Done(work.sums_of(range.clone()).expect("every range filled"))
                        }
                        Err(e) => Outcome::Failed(e.to_string()),
                    }
                };
                let _ = reply.send(SumsDone {
                    ticket,
                    generation,
                    range,
                    outcome,
                });
            }
        });
        if let Some(older) = self
            .sums_task
            .lock()
            .expect("no panics holding it")
            .replace(task)
        {
            older.abort();
        }
        Ok(())
    }

    /// Tells the hub's workers the run is over and stops serving them.
    async fn run_finished(&self) {
        end_streams(&self.shared, true);
        let server = self.server.lock().expect("no panics holding it").take();
        if let Some(server) = server {
            server.stop().await;
        }
    }
}

impl Drop for HubWork {
    /// Leaving the run (another run upstream, or the worker stopping): the hub's workers are
    /// told this coordinator is stopping, so they come back for whatever it serves next.
    fn drop(&mut self) {
        self.pump.abort();
        if let Some(task) = self.sums_task.lock().expect("no panics holding it").take() {
            task.abort();
        }
        end_streams(&self.shared, false);
        let server = self.server.lock().expect("no panics holding it").take();
        if let (Some(server), Ok(runtime)) = (server, tokio::runtime::Handle::try_current()) {
            runtime.spawn(server.stop());
        }
    }
}

/// Upstream chunks of an abandoned announcement are answered as skipped.
fn skip(chunks: Vec<UpstreamChunk>) {
    for chunk in chunks {
        let _ = chunk.reply.send(ChunkDone {
            ticket: chunk.ticket,
            generation: chunk.generation,
            indices: chunk.indices,
            outcome: Outcome::Skipped,
        });
    }
}

/// Answers each upstream chunk once its every index has a result and no check is pending,
/// and hands out again the indices of expired leases, until aborted.
async fn answer_upstream(shared: Arc<Shared>, current: Arc<AtomicU64>) {
    loop {
        let notified = shared.changed.notified();
        {
            let mut state = shared.lock();
            let checked = state.checks_pending == 0;
            let State { work, upstream, .. } = &mut *state;
            if checked && let Some(work) = work.as_mut() {
                let live = current.load(Ordering::SeqCst);
                let (answered, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut upstream.chunks)
                    .into_iter()
                    .map(|chunk| {
                        let results = (chunk.ticket == live
                            && chunk.generation == work.generation())
                        .then(|| work.results_of(chunk.indices.clone()))
                        .flatten();
                        (chunk, results)
                    })
                    .partition(|(chunk, results)| results.is_some() || chunk.ticket != live);
                upstream.chunks = waiting.into_iter().map(|(chunk, _)| chunk).collect();
                for (chunk, results) in answered {
                    let _ = chunk.reply.send(ChunkDone {
                        ticket: chunk.ticket,
                        generation: chunk.generation,
                        indices: chunk.indices,
                        outcome: results.map_or(Outcome::Skipped, Outcome::Done),
                    });
                }
            }
            hand_out_expired(&mut state, &shared.options);
        }
        let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
    }
}
