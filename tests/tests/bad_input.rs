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
use es_proto::pb::{self, coordinator_message};
use es_worker::{DataSource, WorkerExit, WorkerOptions};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use underflow_tests::raw_worker::{RawWorker, join_request};
use underflow_tests::{Scratch, environment, mnist_dir, small_run};

fn config() -> RunConfig {
    RunConfig {
        eval_every: 0,
        population: 24,
        ..small_run(4)
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
    pb::Results {
        generation,
        pairs,
        credits: 0,
    }
    .into()
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

/// A worker of bare messages that joins (offering to sum noise or not) and proves itself
/// honestly; then it may do as it likes on its open Work stream.
async fn join_rogue(cluster: &Cluster, scratch: &Scratch, sums_noise: bool) -> RawWorker {
    let join = pb::JoinRequest {
        sums_noise,
        ..join_request(&cluster.mnist, "rogue")
    };
    RawWorker::join(
        &cluster.addr,
        join,
        &cluster.mnist,
        &scratch.path().join("cache"),
    )
    .await
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
    let mut rogue = join_rogue(&cluster, &scratch, false).await;
    const WAIT: Duration = Duration::from_secs(60);
    assert!(matches!(
        rogue
            .next_within(WAIT)
            .await
            .expect("the coordinator answers"),
        coordinator_message::Kind::ProofAccepted(_)
    ));
    let coordinator_message::Kind::Generation(generation) = rogue
        .next_within(WAIT)
        .await
        .expect("the coordinator answers")
    else {
        panic!("expected the first generation");
    };
    // It did not ask for carried credits: it is granted none and sends a Ready.
    assert_eq!(generation.credits, 0);
    let t = generation.generation;
    rogue
        .send(pb::Ready {
            generation: t,
            credits: 4,
        })
        .await;
    let coordinator_message::Kind::Assign(assign) = rogue
        .next_within(WAIT)
        .await
        .expect("the coordinator answers")
    else {
        panic!("expected an assignment");
    };
    // The credits may come back as several chunks: collect every assignment that follows.
    let mut mine: Vec<u32> = (assign.first_index..assign.first_index + assign.count).collect();
    while let Some(message) = rogue.next_within(Duration::from_millis(500)).await {
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
        rogue.prove.clone().into(),
    ] {
        rogue.send(bad).await;
    }
    // Then lies about its own indices: the coordinator audits one and quarantines it.
    let lies = mine.iter().map(|&i| pair(i, -0.5, -0.25, 3)).collect();
    rogue.send(results(t, lies)).await;
    let shutdown = loop {
        match rogue
            .next_within(WAIT)
            .await
            .expect("the coordinator answers")
        {
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
    drop(rogue);
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
    let RawWorker {
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
