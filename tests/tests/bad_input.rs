//! A proven client that misbehaves in every way a message can: results for a future
//! generation, out-of-range and unassigned indices, non-finite and malformed fitnesses,
//! messages with no kind, a second proof — and then plain lies about its assigned indices.
//! Each is refused or caught; the run finishes with θ bit-identical to an undisturbed one.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use es_coordinator::cluster::{self, ClusterOptions};
use es_coordinator::config::RunConfig;
use es_coordinator::embedded;
use es_core::noise::NoiseSource;
use es_core::train::{Dataset, golden_task};
use es_data::noise_file::{Check, NoiseFile};
use es_proto::pb::coordinator_client::CoordinatorClient;
use es_proto::pb::{self, coordinator_message, join_reply::Outcome};
use es_proto::{GoldenEval, GoldenProof, NoiseSpec, RunSpec};
use es_worker::{DataSource, WorkerExit, WorkerOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use underflow_tests::{Scratch, environment, mnist_dir, small_run};

fn config() -> RunConfig {
    RunConfig {
        eval_every: 0,
        population: 24,
        ..small_run(4)
    }
}

async fn client(addr: &str) -> CoordinatorClient<Channel> {
    for _ in 0..400 {
        if let Ok(c) = CoordinatorClient::connect(addr.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator at {addr} did not come up");
}

/// The golden proof an honest worker of `accepted`'s run would send.
fn honest_proof(accepted: &pb::JoinAccepted, cache: &std::path::Path) -> GoldenProof {
    let spec = RunSpec::try_from(accepted.spec.clone().unwrap()).unwrap();
    let noise = match spec.noise {
        NoiseSpec::Table { noise_seed, len } => NoiseSource::Table(
            NoiseFile::open_or_create(cache, noise_seed, len, Check::Quick)
                .unwrap()
                .into_table(),
        ),
        NoiseSpec::Stream => NoiseSource::Stream,
    };
    let data = es_data::mnist::load(&mnist_dir()).unwrap();
    let train = Dataset {
        images: &data.train.images,
        labels: &data.train.labels,
    };
    let task = accepted.golden.unwrap();
    let [center, plus, minus] = golden_task(
        &spec.net,
        &spec.es,
        spec.run_seed,
        &noise,
        train,
        task.generation,
        task.index,
        es_kernel::Kernel::detect().unwrap(),
    )
    .unwrap()
    .map(|g| GoldenEval::new(&g.evaluation, &g.logits));
    GoldenProof {
        center,
        plus,
        minus,
    }
}

fn pair(index: u32, plus: f64, minus: f64, correct: u64) -> pb::PairResult {
    pb::PairResult {
        index,
        fitness_plus: Some(plus),
        fitness_minus: Some(minus),
        correct_plus: correct,
        correct_minus: correct,
    }
}

fn results(generation: u32, pairs: Vec<pb::PairResult>) -> pb::WorkerMessage {
    pb::Results { generation, pairs }.into()
}

/// The embedded run of `config()`: θ's bytes, which no rogue may change.
async fn reference_theta(scratch: &Scratch) -> Vec<u8> {
    let env = environment(scratch, "reference", 2);
    let dir = env.run_dir.clone();
    tokio::task::spawn_blocking(move || {
        embedded::run(&config(), &env, &AtomicBool::new(false)).unwrap()
    })
    .await
    .unwrap();
    std::fs::read(dir.join("theta.f32")).unwrap()
}

/// A coordinator of `config()` waiting for two workers (the first generation waits for the
/// rogue), and one honest in-process worker of one thread.
struct Cluster {
    addr: String,
    run_dir: std::path::PathBuf,
    mnist: Arc<es_data::mnist::Mnist>,
    coordinator: JoinHandle<Result<embedded::RunSummary, es_coordinator::RunError>>,
    honest: JoinHandle<Result<WorkerExit, es_worker::WorkerError>>,
}

async fn start_cluster(scratch: &Scratch) -> Cluster {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let env = environment(scratch, "cluster", 1);
    let run_dir = env.run_dir.clone();
    let options = ClusterOptions {
        workers: 2,
        ..ClusterOptions::default()
    };
    let coordinator = tokio::spawn(cluster::run(
        config(),
        env,
        options,
        listener,
        Box::pin(std::future::pending()),
    ));
    let mnist = Arc::new(es_data::mnist::load(&mnist_dir()).unwrap());
    let mut honest_options = WorkerOptions::new(addr.clone(), DataSource::Loaded(mnist.clone()));
    honest_options.threads = 1;
    honest_options.cache_dir = scratch.path().join("cache");
    honest_options.name = "honest".into();
    let honest = tokio::spawn(es_worker::run(honest_options, std::future::pending::<()>()));
    Cluster {
        addr,
        run_dir,
        mnist,
        coordinator,
        honest,
    }
}

/// A client that joins (offering to sum noise or not) and proves itself honestly; then it
/// may do as it likes on its open Work stream.
struct Rogue {
    out: mpsc::Sender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    prove: pb::Prove,
}

async fn join_rogue(cluster: &Cluster, scratch: &Scratch, sums_noise: bool) -> Rogue {
    let mut rogue = client(&cluster.addr).await;
    let join = pb::JoinRequest {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: String::new(),
        data_digest: cluster.mnist.digest.to_vec(),
        threads: 1,
        name: "rogue".into(),
        kernel: "avx512".into(),
        sums_noise,
        relay_port: 0,
        relay_host: String::new(),
    };
    let accepted = loop {
        match rogue.join(join.clone()).await {
            Ok(reply) => match reply.into_inner().outcome.unwrap() {
                Outcome::Accepted(a) => break a,
                Outcome::Refused(r) => panic!("rogue refused at join: {}", r.message),
            },
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let proof = {
        let (accepted, cache) = (accepted.clone(), scratch.path().join("cache"));
        tokio::task::spawn_blocking(move || honest_proof(&accepted, &cache))
            .await
            .unwrap()
    };
    let (out, outbox) = mpsc::channel::<pb::WorkerMessage>(64);
    let prove = pb::Prove {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: accepted.run_id.clone(),
        worker_id: accepted.worker_id,
        golden: Some((&proof).into()),
        cached_theta_digest: Vec::new(),
    };
    out.send(prove.clone().into()).await.unwrap();
    let inbound = rogue
        .work(ReceiverStream::new(outbox))
        .await
        .unwrap()
        .into_inner();
    Rogue {
        out,
        inbound,
        prove,
    }
}

/// Waits for the run to finish and the honest worker with it; checks that θ is
/// `reference`'s and returns the run's metrics.
async fn finish(cluster: Cluster, reference: &[u8]) -> Vec<serde_json::Value> {
    let summary = tokio::time::timeout(Duration::from_secs(120), cluster.coordinator)
        .await
        .expect("the run finishes")
        .unwrap()
        .unwrap();
    assert_eq!(summary.generations, 4);
    let exit = tokio::time::timeout(Duration::from_secs(30), cluster.honest)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit, WorkerExit::Finished);
    let theta = std::fs::read(cluster.run_dir.join("theta.f32")).unwrap();
    assert!(theta == reference, "the rogue changed θ");
    underflow_tests::processes::metrics(&cluster.run_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_refused_and_theta_is_unaffected() {
    // The coordinator's log, shown when the test fails.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let scratch = Scratch::new("bad-input");
    let reference = reference_theta(&scratch).await;
    let cluster = start_cluster(&scratch).await;
    // Not asked for noise sums: this rogue's bad messages are its results.
    let Rogue {
        out,
        mut inbound,
        prove,
    } = join_rogue(&cluster, &scratch, false).await;
    let mut next = async |limit: Duration| -> Option<coordinator_message::Kind> {
        match tokio::time::timeout(limit, inbound.next()).await {
            Err(_) => None,
            Ok(message) => Some(
                message
                    .expect("the stream is open")
                    .expect("no stream error")
                    .kind
                    .expect("a kind"),
            ),
        }
    };
    const WAIT: Duration = Duration::from_secs(60);
    assert!(matches!(
        next(WAIT).await.expect("the coordinator answers"),
        coordinator_message::Kind::ProofAccepted(_)
    ));
    let coordinator_message::Kind::Generation(generation) =
        next(WAIT).await.expect("the coordinator answers")
    else {
        panic!("expected the first generation");
    };
    let t = generation.generation;
    out.send(
        pb::Ready {
            generation: t,
            credits: 4,
        }
        .into(),
    )
    .await
    .unwrap();
    let coordinator_message::Kind::Assign(assign) =
        next(WAIT).await.expect("the coordinator answers")
    else {
        panic!("expected an assignment");
    };
    // The credits may come back as several chunks: collect every assignment that follows.
    let mut mine: Vec<u32> = (assign.first_index..assign.first_index + assign.count).collect();
    while let Some(message) = next(Duration::from_millis(500)).await {
        if let coordinator_message::Kind::Assign(more) = message {
            mine.extend(more.first_index..more.first_index + more.count);
        }
    }
    let not_mine = (0..24).find(|i| !mine.contains(i)).unwrap();

    // Every kind of bad message; each is refused and logged, none ends the run.
    let batch = config().batch as u64;
    for bad in [
        results(t + 5, vec![pair(mine[0], -1.0, -1.0, 1)]),
        results(t, vec![pair(9999, -1.0, -1.0, 1)]),
        results(t, vec![pair(not_mine, -1.0, -1.0, 1)]),
        results(t, vec![pair(mine[0], f64::NAN, -1.0, 1)]),
        results(t, vec![pair(mine[0], f64::INFINITY, -1.0, 1)]),
        results(t, vec![pair(mine[0], -1.0, -1.0, batch + 1)]),
        results(
            t,
            vec![pb::PairResult {
                fitness_plus: None,
                ..pair(mine[0], -1.0, -1.0, 1)
            }],
        ),
        pb::WorkerMessage { kind: None },
        prove.into(),
    ] {
        out.send(bad).await.unwrap();
    }
    // Then lies about its own indices: the coordinator audits one and quarantines it.
    let lies = mine.iter().map(|&i| pair(i, -0.5, -0.25, 3)).collect();
    out.send(results(t, lies)).await.unwrap();
    let shutdown = loop {
        match next(WAIT).await.expect("the coordinator answers") {
            coordinator_message::Kind::Shutdown(s) => break s,
            _ => continue,
        }
    };
    let refusal = shutdown.refusal.expect("a quarantine says why");
    assert_eq!(refusal.reason(), pb::RefusalReason::GoldenMismatch);
    assert!(
        refusal.message.contains("arithmetic differs"),
        "{}",
        refusal.message
    );
    drop(out);
    let metrics = finish(cluster, &reference).await;
    let total = |field: &str| -> u64 { metrics.iter().filter_map(|l| l[field].as_u64()).sum() };
    assert_eq!(
        total("rejected_messages"),
        9,
        "each bad message refused once"
    );
    assert_eq!(total("quarantined"), 1, "the liar quarantined");
    assert!(
        total("reassigned") >= u64::from(assign.count),
        "its indices evaluated again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_false_noise_sums_are_refused_or_caught_and_theta_is_unaffected() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let scratch = Scratch::new("bad-sums");
    let reference = reference_theta(&scratch).await;
    let cluster = start_cluster(&scratch).await;
    // The rogue takes no indices (it never grants credits), but offers to sum noise.
    let Rogue {
        out, mut inbound, ..
    } = join_rogue(&cluster, &scratch, true).await;
    // The first SumNoise (the honest worker evaluates the whole generation meanwhile).
    let sum_noise = loop {
        let message = tokio::time::timeout(Duration::from_secs(60), inbound.next())
            .await
            .expect("the coordinator asks for sums")
            .expect("the stream is open")
            .expect("no stream error");
        if let Some(coordinator_message::Kind::SumNoise(m)) = message.kind {
            break m;
        }
    };
    let t = sum_noise.generation;
    let ranges = sum_noise.checked_ranges(usize::MAX).unwrap();
    assert_eq!(
        sum_noise
            .checked_weights(config().population)
            .unwrap()
            .len(),
        24
    );
    let first = ranges[0].clone();
    let sums = |generation: u32, start: usize, values: Vec<f32>| -> pb::WorkerMessage {
        pb::NoiseSums::new(generation, start, &values).into()
    };
    // Each refused: a future generation, a range not asked for, the wrong length, NaN.
    for bad in [
        sums(t + 3, first.start, vec![0.0; first.len()]),
        sums(t, first.start + 1, vec![0.0; first.len()]),
        sums(t, first.start, vec![0.0; first.len() - 1]),
        sums(t, first.start, {
            let mut v = vec![0.0; first.len()];
            v[5] = f32::NAN;
            v
        }),
    ] {
        out.send(bad).await.unwrap();
    }
    // Then well-formed lies for all its ranges: the audit catches them.
    for range in &ranges {
        out.send(sums(t, range.start, vec![0.25; range.len()]))
            .await
            .unwrap();
    }
    let shutdown = loop {
        let message = tokio::time::timeout(Duration::from_secs(60), inbound.next())
            .await
            .expect("the coordinator answers")
            .expect("the stream is open")
            .expect("no stream error");
        if let Some(coordinator_message::Kind::Shutdown(s)) = message.kind {
            break s;
        }
    };
    let refusal = shutdown.refusal.expect("a quarantine says why");
    assert_eq!(refusal.reason(), pb::RefusalReason::GoldenMismatch);
    assert!(
        refusal.message.contains("noise sum of parameter")
            && refusal.message.contains("where the coordinator's is"),
        "{}",
        refusal.message
    );
    drop(out);
    let metrics = finish(cluster, &reference).await;
    let total = |field: &str| -> u64 { metrics.iter().filter_map(|l| l[field].as_u64()).sum() };
    assert_eq!(
        total("rejected_messages"),
        4,
        "each bad message refused once"
    );
    assert_eq!(total("quarantined"), 1, "the liar quarantined");
    let line = &metrics[t as usize];
    assert_eq!(
        line["sums_local"].as_u64(),
        Some(ranges.len() as u64),
        "the coordinator summed the liar's ranges itself"
    );
    assert!(
        line["sums_delivered"].as_u64().unwrap() > 0,
        "the honest worker's"
    );
    // Later generations: the honest worker sums everything.
    for line in &metrics[t as usize + 1..] {
        assert_eq!(line["sums_local"].as_u64(), Some(0), "{line}");
    }
}
