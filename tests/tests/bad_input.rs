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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_refused_and_theta_is_unaffected() {
    // The coordinator's log, shown when the test fails.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let scratch = Scratch::new("bad-input");
    let reference = {
        let env = environment(&scratch, "reference", 2);
        let dir = env.run_dir.clone();
        tokio::task::spawn_blocking(move || {
            embedded::run(&config(), &env, &AtomicBool::new(false)).unwrap()
        })
        .await
        .unwrap();
        std::fs::read(dir.join("theta.f32")).unwrap()
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let env = environment(&scratch, "cluster", 1);
    let run_dir = env.run_dir.clone();
    // Two workers: the first generation waits for the rogue.
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

    // The rogue joins and proves like an honest worker.
    let mut rogue = client(&addr).await;
    let join = pb::JoinRequest {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: String::new(),
        data_digest: mnist.digest.to_vec(),
        threads: 1,
        name: "rogue".into(),
        kernel: "avx512".into(),
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
    let mut inbound = rogue
        .work(ReceiverStream::new(outbox))
        .await
        .unwrap()
        .into_inner();
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

    let summary = tokio::time::timeout(Duration::from_secs(120), coordinator)
        .await
        .expect("the run finishes")
        .unwrap()
        .unwrap();
    assert_eq!(summary.generations, 4);
    let exit = tokio::time::timeout(Duration::from_secs(30), honest)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit, WorkerExit::Finished);
    let theta = std::fs::read(run_dir.join("theta.f32")).unwrap();
    assert!(theta == reference, "the rogue changed θ");
    let metrics = underflow_tests::processes::metrics(&run_dir);
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
