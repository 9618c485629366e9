//! The worker against a scripted coordinator: a test gRPC server whose handlers hand every call
//! to the test body, which plays the coordinator's side message by message. This checks the
//! worker's half of the protocol (joins, proofs, credits, θ by digest, stale work, rejoins and
//! refusals) without the real coordinator.

use std::sync::Arc;
use std::time::Duration;

use es_core::init::init_params;
use es_core::noise::{NoiseSource, NoiseTable};
use es_core::train::{EvalPool, golden_task, minibatch_indices};
use es_data::mnist::Mnist;
use es_kernel::{Batch, Kernel};
use es_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use es_proto::pb::{self, RefusalReason, worker_message::Kind};
use es_proto::{EncodedTheta, GoldenEval, GoldenProof, NoiseSpec, RunSpec};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::context::tests::small_run;
use crate::{Backoff, DataSource, WorkerError, WorkerExit, WorkerOptions};

type Outbound = mpsc::UnboundedSender<Result<pb::CoordinatorMessage, Status>>;

/// The credits the test worker (2 threads, [`Coord::options`]) grants per generation.
const CAPACITY: u32 = 2 * crate::session::CREDITS_PER_THREAD;

/// The server: forwards each call to the test body.
struct Script {
    joins: mpsc::UnboundedSender<(pb::JoinRequest, oneshot::Sender<pb::JoinReply>)>,
    streams: mpsc::UnboundedSender<(Streaming<pb::WorkerMessage>, Outbound)>,
}

#[tonic::async_trait]
impl Coordinator for Script {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let (reply, answer) = oneshot::channel();
        self.joins
            .send((request.into_inner(), reply))
            .map_err(|_| Status::unavailable("the test is over"))?;
        let reply = answer
            .await
            .map_err(|_| Status::unavailable("the test dropped the join"))?;
        Ok(Response::new(reply))
    }

    type WorkStream = UnboundedReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn work(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.streams
            .send((request.into_inner(), tx))
            .map_err(|_| Status::unavailable("the test is over"))?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// The test body's side of the scripted coordinator.
struct Coord {
    endpoint: String,
    joins: mpsc::UnboundedReceiver<(pb::JoinRequest, oneshot::Sender<pb::JoinReply>)>,
    streams: mpsc::UnboundedReceiver<(Streaming<pb::WorkerMessage>, Outbound)>,
    spec: RunSpec,
    data: Arc<Mnist>,
}

impl Coord {
    async fn start(noise: NoiseSpec) -> Coord {
        let (spec, data) = small_run(noise);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (joins, join_rx) = mpsc::unbounded_channel();
        let (streams, stream_rx) = mpsc::unbounded_channel();
        let service = CoordinatorServer::new(Script { joins, streams })
            .max_decoding_message_size(es_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(es_proto::MAX_MESSAGE_BYTES);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Coord {
            endpoint,
            joins: join_rx,
            streams: stream_rx,
            spec,
            data,
        }
    }

    fn options(&self, cache_dir: &std::path::Path) -> WorkerOptions {
        let mut options =
            WorkerOptions::new(&self.endpoint, DataSource::Loaded(Arc::clone(&self.data)));
        options.threads = 2;
        options.kernel = Kernel::Portable;
        options.cache_dir = cache_dir.to_path_buf();
        options.name = "scripted".into();
        options.reconnect = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            give_up_after: Some(WAIT),
        };
        options
    }

    async fn join(&mut self) -> (pb::JoinRequest, oneshot::Sender<pb::JoinReply>) {
        tokio::time::timeout(WAIT, self.joins.recv())
            .await
            .expect("the worker joins")
            .unwrap()
    }

    fn accepted(&self, run_id: &str, worker_id: u64, heartbeat_ms: u32) -> pb::JoinReply {
        pb::JoinAccepted {
            protocol_version: es_proto::PROTOCOL_VERSION,
            run_id: run_id.into(),
            worker_id,
            spec: Some((&self.spec).into()),
            golden: Some(pb::GoldenTask {
                generation: 1,
                index: 3,
            }),
            heartbeat_interval_ms: heartbeat_ms,
            carried_credits: false,
        }
        .into()
    }

    /// Like [`Coord::accepted`], agreeing to the carried credits the worker asks for.
    fn accepted_carrying(&self, run_id: &str, worker_id: u64) -> pb::JoinReply {
        let mut reply = self.accepted(run_id, worker_id, 0);
        if let Some(pb::join_reply::Outcome::Accepted(accepted)) = &mut reply.outcome {
            accepted.carried_credits = true;
        }
        reply
    }

    async fn stream(&mut self) -> Conversation {
        let (inbound, out) = tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("the worker opens its stream")
            .unwrap();
        Conversation {
            inbound,
            out,
            heartbeats: 0,
        }
    }

    /// The run's noise source, generated in memory.
    fn noise(&self) -> NoiseSource {
        match self.spec.noise {
            NoiseSpec::Stream => NoiseSource::Stream,
            NoiseSpec::Table { noise_seed, len } => {
                NoiseSource::Table(Arc::new(NoiseTable::generate(noise_seed, len)))
            }
        }
    }

    /// The proof a correct worker sends for the golden task named in [`Coord::accepted`].
    fn expected_proof(&self) -> GoldenProof {
        let noise = self.noise();
        let train = es_core::train::Dataset {
            images: &self.data.train.images,
            labels: &self.data.train.labels,
        };
        let [c, p, m] = golden_task(
            &self.spec.net,
            &self.spec.es,
            self.spec.run_seed,
            &noise,
            train,
            1,
            3,
            Kernel::Portable,
        )
        .unwrap();
        GoldenProof {
            center: GoldenEval::new(&c.evaluation, &c.logits),
            plus: GoldenEval::new(&p.evaluation, &p.logits),
            minus: GoldenEval::new(&m.evaluation, &m.logits),
        }
    }

    fn theta(&self, bump: f32) -> Vec<f32> {
        let mut theta = init_params(&self.spec.net, self.spec.run_seed);
        theta[0] += bump;
        theta
    }
}

/// One Work stream, seen from the coordinator.
struct Conversation {
    inbound: Streaming<pb::WorkerMessage>,
    out: Outbound,
    heartbeats: usize,
}

impl Conversation {
    fn send(&self, message: impl Into<pb::CoordinatorMessage>) {
        self.out.send(Ok(message.into())).unwrap();
    }

    /// Assigns indices `first_index .. first_index + count` of `generation`.
    fn assign(&self, generation: u32, first_index: u32, count: u32) {
        self.send(pb::Assign {
            generation,
            first_index,
            count,
        });
    }

    /// The next message other than a heartbeat (heartbeats are counted).
    async fn next(&mut self) -> Kind {
        loop {
            let message = tokio::time::timeout(WAIT, self.inbound.next())
                .await
                .expect("the worker sends a message")
                .expect("the stream is open")
                .expect("the stream is healthy");
            match message.kind.expect("a message has a kind") {
                Kind::Heartbeat(_) => self.heartbeats += 1,
                kind => return kind,
            }
        }
    }

    async fn prove(&mut self) -> pb::Prove {
        match self.next().await {
            Kind::Prove(prove) => prove,
            other => panic!("expected prove, got {other:?}"),
        }
    }

    async fn ready(&mut self) -> pb::Ready {
        match self.next().await {
            Kind::Ready(ready) => ready,
            other => panic!("expected ready, got {other:?}"),
        }
    }

    async fn results(&mut self) -> pb::Results {
        match self.next().await {
            Kind::Results(results) => results,
            other => panic!("expected results, got {other:?}"),
        }
    }
}

fn shutdown(finished: bool, refusal: Option<pb::Refusal>) -> pb::Shutdown {
    pb::Shutdown {
        reason: "scripted".into(),
        refusal,
        finished,
    }
}

/// The pairs of `indices` evaluated directly, as they travel.
fn expected_pairs(
    coord: &Coord,
    theta: &[f32],
    t: u32,
    indices: std::ops::Range<u32>,
) -> Vec<pb::PairResult> {
    let (net, es) = (&coord.spec.net, &coord.spec.es);
    let train = &coord.data.train;
    let mut minibatch = Vec::new();
    minibatch_indices(
        coord.spec.run_seed,
        t,
        es.batch_size,
        train.len(),
        &mut minibatch,
    );
    let mut batch = Batch::new(net.inputs);
    batch.fill(&train.images, &train.labels, &minibatch);
    let mut pool = EvalPool::new(net, Kernel::Portable, 1).unwrap();
    pool.evaluate(
        theta,
        &coord.noise(),
        coord.spec.run_seed,
        t,
        &es.perturbation(net, t),
        &batch,
        indices,
    )
    .unwrap()
    .iter()
    .map(pb::PairResult::from)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_proves_evaluates_its_chunks_and_finishes() {
    let cache = tempfile::tempdir().unwrap();
    let mut coord = Coord::start(NoiseSpec::Table {
        noise_seed: 5,
        len: 3000,
    })
    .await;
    let worker = tokio::spawn(crate::run(
        coord.options(cache.path()),
        std::future::pending(),
    ));

    let (join, reply) = coord.join().await;
    assert_eq!(join.protocol_version, es_proto::PROTOCOL_VERSION);
    assert_eq!(join.run_id, "");
    assert_eq!(join.data_digest, coord.data.digest.to_vec());
    assert_eq!(
        (join.threads, join.name.as_str(), join.kernel.as_str()),
        (2, "scripted", "portable")
    );
    reply.send(coord.accepted("run-1", 7, 20)).unwrap();

    let mut stream = coord.stream().await;
    let prove = stream.prove().await;
    assert_eq!((prove.run_id.as_str(), prove.worker_id), ("run-1", 7));
    assert!(prove.cached_theta_digest.is_empty());
    let proof = GoldenProof::try_from(prove.golden.as_ref().unwrap()).unwrap();
    assert_eq!(proof, coord.expected_proof());

    stream.send(pb::ProofAccepted {});
    let theta = coord.theta(0.0);
    stream.send(pb::Generation::with_theta(0, &EncodedTheta::new(&theta)));
    let ready = stream.ready().await;
    assert_eq!(
        (ready.generation, ready.credits),
        (0, CAPACITY),
        "CREDITS_PER_THREAD per thread"
    );

    stream.assign(0, 0, 5);
    stream.assign(0, 5, 3);
    for (first, count) in [(0, 5), (5, 3)] {
        let results = stream.results().await;
        assert_eq!(results.generation, 0);
        assert_eq!(
            results.pairs,
            expected_pairs(&coord, &theta, 0, first..first + count)
        );
        let ready = stream.ready().await;
        assert_eq!((ready.generation, ready.credits), (0, count));
    }

    // Heartbeats every 20 ms while nothing else happens.
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream.send(shutdown(true, None));
    let exit = tokio::time::timeout(WAIT, worker).await.unwrap().unwrap();
    assert_eq!(exit.unwrap(), WorkerExit::Finished);
    while let Some(Ok(message)) = stream.inbound.next().await {
        assert!(
            matches!(message.kind, Some(Kind::Heartbeat(_))),
            "{message:?}"
        );
        stream.heartbeats += 1;
    }
    assert!(stream.heartbeats >= 2, "{} heartbeats", stream.heartbeats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carried_credits_come_in_generations_and_go_back_with_results() {
    let cache = tempfile::tempdir().unwrap();
    let mut coord = Coord::start(NoiseSpec::Stream).await;
    let worker = tokio::spawn(crate::run(
        coord.options(cache.path()),
        std::future::pending(),
    ));
    let (join, reply) = coord.join().await;
    assert!(join.carried_credits, "the worker asks for carried credits");
    reply.send(coord.accepted_carrying("run-1", 1)).unwrap();
    let mut stream = coord.stream().await;
    stream.prove().await;
    stream.send(pb::ProofAccepted {});

    // A generation that grants nothing is answered with a Ready for the full capacity.
    let theta = coord.theta(0.0);
    let encoded = EncodedTheta::new(&theta);
    stream.send(pb::Generation::with_theta(0, &encoded));
    let ready = stream.ready().await;
    assert_eq!((ready.generation, ready.credits), (0, CAPACITY));
    // Results return their indices' credits themselves: no Ready follows them.
    stream.assign(0, 0, 3);
    let results = stream.results().await;
    assert_eq!((results.generation, results.credits), (0, 3));
    assert_eq!(results.pairs, expected_pairs(&coord, &theta, 0, 0..3));

    // A generation that grants the whole capacity is answered with results alone.
    stream.send(pb::Generation::digest_only(1, encoded.digest()).granting(CAPACITY));
    stream.assign(1, 4, 2);
    let results = stream.results().await;
    assert_eq!((results.generation, results.credits), (1, 2));
    assert_eq!(results.pairs, expected_pairs(&coord, &theta, 1, 4..6));

    // A partial grant is topped up by a Ready for the rest.
    stream.send(pb::Generation::digest_only(2, encoded.digest()).granting(20));
    let ready = stream.ready().await;
    assert_eq!((ready.generation, ready.credits), (2, CAPACITY - 20));

    // θ asked for by digest: the repeated Generation that brings it grants nothing more and
    // asks for no Ready; the chunk assigned meanwhile starts with it.
    let theta3 = coord.theta(0.5);
    let encoded3 = EncodedTheta::new(&theta3);
    stream.send(pb::Generation::digest_only(3, encoded3.digest()).granting(CAPACITY));
    match stream.next().await {
        Kind::ThetaRequest(request) => assert_eq!(request.generation, 3),
        other => panic!("expected a theta request, got {other:?}"),
    }
    stream.assign(3, 7, 1);
    stream.send(pb::Generation::with_theta(3, &encoded3));
    let results = stream.results().await;
    assert_eq!((results.generation, results.credits), (3, 1));
    assert_eq!(results.pairs, expected_pairs(&coord, &theta3, 3, 7..8));

    stream.send(shutdown(true, None));
    let exit = tokio::time::timeout(WAIT, worker).await.unwrap().unwrap();
    assert_eq!(exit.unwrap(), WorkerExit::Finished);
    // Nothing but heartbeats after the last results: in particular no Ready.
    while let Some(Ok(message)) = stream.inbound.next().await {
        assert!(
            matches!(message.kind, Some(Kind::Heartbeat(_))),
            "{message:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn theta_by_digest_stale_work_rejoins_and_a_final_refusal() {
    let cache = tempfile::tempdir().unwrap();
    let mut coord = Coord::start(NoiseSpec::Stream).await;
    let worker = tokio::spawn(crate::run(
        coord.options(cache.path()),
        std::future::pending(),
    ));
    let (first_join, reply) = coord.join().await;
    // The worker's key, by which a retried Join replaces its earlier one, is never "none".
    assert_ne!(first_join.join_key, 0);
    reply.send(coord.accepted("run-1", 1, 0)).unwrap();
    let mut stream = coord.stream().await;
    stream.prove().await;
    stream.send(pb::ProofAccepted {});

    // θ announced by digest alone: the worker asks for it, and holds assigned chunks until
    // it arrives.
    let theta = coord.theta(0.5);
    let encoded = EncodedTheta::new(&theta);
    stream.send(pb::Generation::digest_only(0, encoded.digest()));
    match stream.next().await {
        Kind::ThetaRequest(request) => {
            assert_eq!(request.generation, 0);
            assert_eq!(request.theta_digest, encoded.digest().to_vec());
        }
        other => panic!("expected a theta request, got {other:?}"),
    }
    stream.assign(0, 10, 2);
    stream.send(pb::Generation::with_theta(0, &encoded));
    let ready = stream.ready().await;
    assert_eq!((ready.generation, ready.credits), (0, CAPACITY));
    let results = stream.results().await;
    assert_eq!(results.pairs, expected_pairs(&coord, &theta, 0, 10..12));
    assert_eq!(stream.ready().await.credits, 2);

    // An Assign of another generation is ignored; the next generation reuses the cached θ.
    stream.assign(9, 0, 4);
    stream.send(pb::Generation::digest_only(1, encoded.digest()));
    let ready = stream.ready().await;
    assert_eq!((ready.generation, ready.credits), (1, CAPACITY));

    // A new generation abandons queued work of the old one: only generation 3's results come.
    let theta3 = coord.theta(-0.5);
    stream.send(pb::Generation::with_theta(
        2,
        &EncodedTheta::new(&coord.theta(0.25)),
    ));
    assert_eq!(stream.ready().await.generation, 2);
    for first in (0..24).step_by(3) {
        stream.assign(2, first, 3);
    }
    stream.send(pb::Generation::with_theta(3, &EncodedTheta::new(&theta3)));
    stream.assign(3, 4, 1);
    loop {
        match stream.next().await {
            Kind::Ready(ready) if ready.generation == 2 => {}
            Kind::Results(results) if results.generation == 2 => {}
            Kind::Ready(ready) => {
                assert_eq!((ready.generation, ready.credits), (3, CAPACITY));
                break;
            }
            other => panic!("expected generation 2's stragglers or a ready, got {other:?}"),
        }
    }
    let results = stream.results().await;
    assert_eq!(results.generation, 3);
    assert_eq!(results.pairs, expected_pairs(&coord, &theta3, 3, 4..5));
    assert_eq!(stream.ready().await.credits, 1);

    // The coordinator stops: the worker joins the same run again, offering its θ.
    stream.send(shutdown(false, None));
    let (join, reply) = coord.join().await;
    assert_eq!(join.run_id, "run-1");
    assert_eq!(
        join.join_key, first_join.join_key,
        "the same worker, the same key"
    );
    reply.send(coord.accepted("run-1", 2, 0)).unwrap();
    let mut stream = coord.stream().await;
    let prove = stream.prove().await;
    assert_eq!(prove.worker_id, 2);
    assert_eq!(
        prove.cached_theta_digest,
        EncodedTheta::new(&theta3).digest().to_vec()
    );

    // The stream dies: the worker joins again.
    drop(stream);
    let (join, reply) = coord.join().await;
    assert_eq!(join.run_id, "run-1");
    reply.send(coord.accepted("run-1", 3, 0)).unwrap();
    let mut stream = coord.stream().await;
    stream.prove().await;

    // RUN_MISMATCH: the worker drops its caches and joins afresh.
    stream.send(shutdown(
        false,
        Some(pb::Refusal::new(
            RefusalReason::RunMismatch,
            "unknown worker id",
        )),
    ));
    let (join, reply) = coord.join().await;
    assert_eq!(join.run_id, "");
    assert_eq!(join.join_key, first_join.join_key);
    reply.send(coord.accepted("run-2", 1, 0)).unwrap();
    let mut stream = coord.stream().await;
    let prove = stream.prove().await;
    assert!(prove.cached_theta_digest.is_empty());

    // Any other refusal is final.
    stream.send(shutdown(
        false,
        Some(pb::Refusal::new(
            RefusalReason::GoldenMismatch,
            "center fitness is 1: expected 2",
        )),
    ));
    let e = tokio::time::timeout(WAIT, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(e.is_refusal(), "{e}");
    assert_eq!(
        e.to_string(),
        "coordinator refused this worker (REFUSAL_REASON_GOLDEN_MISMATCH): center fitness is 1: expected 2"
    );
}

#[tokio::test]
async fn a_refused_join_is_final() {
    let cache = tempfile::tempdir().unwrap();
    let mut coord = Coord::start(NoiseSpec::Stream).await;
    let worker = tokio::spawn(crate::run(
        coord.options(cache.path()),
        std::future::pending(),
    ));
    let (_, reply) = coord.join().await;
    reply
        .send(
            pb::Refusal::new(
                RefusalReason::DataMismatch,
                "data digest 0707 differs from the coordinator's 9bc0",
            )
            .into(),
        )
        .unwrap();
    let e = tokio::time::timeout(WAIT, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            e,
            WorkerError::Refused {
                reason: RefusalReason::DataMismatch,
                ..
            }
        ),
        "{e}"
    );
}

/// An endpoint on which nothing listens.
async fn dead_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn an_unreachable_coordinator_is_retried_until_the_limit() {
    let (_, data) = small_run(NoiseSpec::Stream);
    let mut options = WorkerOptions::new(dead_endpoint().await, DataSource::Loaded(data));
    options.reconnect = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(40),
        give_up_after: Some(Duration::from_millis(300)),
    };
    let e = tokio::time::timeout(WAIT, crate::run(options, std::future::pending()))
        .await
        .unwrap()
        .unwrap_err();
    let WorkerError::GaveUp { attempts, .. } = &e else {
        panic!("expected giving up, got {e}");
    };
    assert!(*attempts >= 3, "{e}");
}

#[tokio::test]
async fn shutdown_stops_a_reconnecting_worker() {
    let (_, data) = small_run(NoiseSpec::Stream);
    let options = WorkerOptions::new(dead_endpoint().await, DataSource::Loaded(data));
    let exit = tokio::time::timeout(
        WAIT,
        crate::run(options, tokio::time::sleep(Duration::from_millis(200))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(exit, WorkerExit::Shutdown);
}
