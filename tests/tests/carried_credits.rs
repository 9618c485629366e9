//! The coordinator's half of carried credits (JoinRequest.carried_credits): a worker that
//! asked for them sends one Ready on its stream, for its first generation, and then only
//! results. Each later Generation grants its capacity and work follows at once; each
//! Results hands its indices' credits back. A coordinator that ignored them would leave this
//! worker, the run's only one, waiting for work it never gets.

use std::sync::Arc;
use std::time::Duration;

use es_coordinator::cluster::{self, ClusterOptions};
use es_coordinator::config::RunConfig;
use es_proto::pb::{self, coordinator_message::Kind};
use underflow_tests::raw_worker::{RawWorker, join_request};
use underflow_tests::{Scratch, environment, mnist_dir, small_run};

const WAIT: Duration = Duration::from_secs(60);
const CAPACITY: u32 = 8;

fn results(assign: &pb::Assign) -> pb::Results {
    let pairs = (assign.first_index..assign.first_index + assign.count)
        .map(|index| pb::PairResult {
            index,
            fitness_plus: Some(-1.0),
            fitness_minus: Some(-1.5),
            correct_plus: 1,
            correct_minus: 0,
        })
        .collect();
    pb::Results {
        generation: assign.generation,
        pairs,
        credits: assign.count,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_carried_credits_needs_one_ready_per_stream() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let scratch = Scratch::new("carried-credits");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let config = RunConfig {
        eval_every: 0,
        ..small_run(3)
    };
    // The raw worker's fitnesses are made up: no audits. It sends no heartbeats either, so
    // they are not due while the coordinator finishes the run: its final evaluations
    // (unflushed ones among them) take longer than three default intervals on CPUs where
    // denormal arithmetic is slow, such as Intel's.
    let options = ClusterOptions {
        workers: 1,
        audit_every: 0,
        heartbeat: WAIT,
        ..ClusterOptions::default()
    };
    let coordinator = tokio::spawn(cluster::run(
        config,
        environment(&scratch, "cluster", 1),
        options,
        listener,
        Box::pin(std::future::pending()),
    ));
    let mnist = Arc::new(es_data::mnist::load(&mnist_dir()).unwrap());
    let join = pb::JoinRequest {
        carried_credits: true,
        ..join_request(&mnist, "carrier")
    };
    let mut worker = RawWorker::join(&addr, join, &mnist, &scratch.path().join("cache")).await;
    assert!(
        worker.accepted.carried_credits,
        "the coordinator agrees to carried credits"
    );
    assert!(matches!(
        worker.next_within(WAIT).await,
        Some(Kind::ProofAccepted(_))
    ));

    let mut generations = Vec::new();
    let mut readies = 0;
    let mut evaluated = 0;
    loop {
        match worker
            .next_within(WAIT)
            .await
            .expect("the coordinator answers")
        {
            Kind::Generation(generation) => {
                // A new stream's first generation grants nothing: the worker declares its
                // capacity once. Later ones grant that capacity themselves.
                let expected = if generations.is_empty() { 0 } else { CAPACITY };
                assert_eq!(
                    generation.credits, expected,
                    "credits granted in generation {}",
                    generation.generation
                );
                if generation.credits == 0 {
                    readies += 1;
                    worker
                        .send(pb::Ready {
                            generation: generation.generation,
                            credits: CAPACITY,
                        })
                        .await;
                }
                generations.push(generation.generation);
            }
            Kind::Assign(assign) => {
                assert_eq!(Some(&assign.generation), generations.last());
                evaluated += assign.count;
                worker.send(results(&assign)).await;
            }
            Kind::Shutdown(shutdown) => {
                assert!(shutdown.finished, "{shutdown:?}");
                break;
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    assert_eq!(generations, [0, 1, 2]);
    assert_eq!(readies, 1, "one Ready for the whole stream");
    assert_eq!(
        evaluated,
        3 * 16,
        "every index of three generations of 16 pairs"
    );
    let summary = tokio::time::timeout(WAIT, coordinator)
        .await
        .expect("the run finishes")
        .unwrap()
        .unwrap();
    assert_eq!(summary.generations, 3);
}
