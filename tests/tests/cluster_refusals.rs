//! A coordinator refuses workers that cannot take part, with a message that says why, and
//! keeps serving the others. Driven with a raw gRPC client, so each refusal is tested alone.

use std::time::Duration;

use es_coordinator::cluster::{self, ClusterOptions};
use es_coordinator::config::RunConfig;
use es_proto::pb::coordinator_client::CoordinatorClient;
use es_proto::pb::{self, RefusalReason, join_reply::Outcome};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use underflow_tests::{Scratch, environment, small_run};

/// Starts a coordinator waiting for 5 workers (so it never starts training) on a free port.
async fn coordinator(
    scratch: &Scratch,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    coordinator_with(scratch, ClusterOptions::default()).await
}

/// As [`coordinator`], with `options` but for the 5 workers it waits for.
async fn coordinator_with(
    scratch: &Scratch,
    options: ClusterOptions,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let env = environment(scratch, "run", 1);
    let options = ClusterOptions {
        workers: 5,
        ..options
    };
    let config = RunConfig { ..small_run(1) };
    let handle = tokio::spawn(async move {
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        cluster::run(config, env, options, listener, shutdown)
            .await
            .unwrap();
    });
    (addr, stop, handle)
}

async fn client(addr: &str) -> CoordinatorClient<Channel> {
    for _ in 0..200 {
        if let Ok(c) = CoordinatorClient::connect(addr.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator at {addr} did not come up");
}

fn mnist_digest() -> Vec<u8> {
    es_data::mnist::load(&underflow_tests::mnist_dir())
        .unwrap()
        .digest
        .to_vec()
}

fn request(digest: Vec<u8>) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: String::new(),
        data_digest: digest,
        threads: 1,
        name: "test".into(),
        kernel: "portable".into(),
        sums_noise: false,
        relay_port: 0,
        relay_host: String::new(),
        carried_credits: false,
        hub: false,
        join_key: 0,
    }
}

async fn join(client: &mut CoordinatorClient<Channel>, req: pb::JoinRequest) -> Outcome {
    // The coordinator answers joins once its data and golden proof are ready.
    for _ in 0..400 {
        match client.join(req.clone()).await {
            Ok(reply) => return reply.into_inner().outcome.expect("an outcome"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("join never answered");
}

fn refusal(outcome: Outcome) -> pb::Refusal {
    match outcome {
        Outcome::Refused(r) => r,
        Outcome::Accepted(a) => panic!("accepted as worker {}", a.worker_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_with_other_data_versions_or_runs_are_refused_with_reasons() {
    let scratch = Scratch::new("refusals");
    let (addr, stop, handle) = coordinator(&scratch).await;
    let mut client = client(&addr).await;
    let digest = mnist_digest();

    let mut other = digest.clone();
    other[0] ^= 1;
    let r = refusal(join(&mut client, request(other)).await);
    assert_eq!(r.reason(), RefusalReason::DataMismatch);
    assert!(r.message.contains("other MNIST files"), "{}", r.message);

    let old = pb::JoinRequest {
        protocol_version: 0,
        ..request(digest.clone())
    };
    let r = refusal(join(&mut client, old).await);
    assert_eq!(r.reason(), RefusalReason::VersionMismatch);
    assert!(
        r.message.contains("protocol version 0") && r.message.contains("same release"),
        "{}",
        r.message
    );

    let stale = pb::JoinRequest {
        run_id: "an-old-run".into(),
        ..request(digest.clone())
    };
    let r = refusal(join(&mut client, stale).await);
    assert_eq!(r.reason(), RefusalReason::RunMismatch);

    // A relay the coordinator could not hand to other workers: a port beyond TCP's, a host
    // that is not one.
    let bad_port = pb::JoinRequest {
        relay_port: 70_000,
        ..request(digest.clone())
    };
    let r = refusal(join(&mut client, bad_port).await);
    assert_eq!(r.reason(), RefusalReason::BadRequest);
    assert!(r.message.contains("relay_port 70000"), "{}", r.message);
    let bad_host = pb::JoinRequest {
        relay_port: 50_052,
        relay_host: "evil.example/path".into(),
        ..request(digest.clone())
    };
    let r = refusal(join(&mut client, bad_host).await);
    assert_eq!(r.reason(), RefusalReason::BadRequest);
    assert!(r.message.contains("relay_host"), "{}", r.message);

    // A worker with the right data is accepted and must then prove its arithmetic: a wrong
    // golden proof is refused on the stream with the first difference named.
    let Outcome::Accepted(accepted) = join(&mut client, request(digest)).await else {
        panic!("a good worker is refused");
    };
    let task = accepted.golden.unwrap();
    assert_eq!((task.generation, task.index), (0, 0));
    let r = refused_proof(&mut client, &accepted, 1.0).await;
    assert_eq!(r.reason(), RefusalReason::GoldenMismatch);
    assert!(r.message.contains("center fitness"), "{}", r.message);

    let _ = stop.send(());
    handle.await.unwrap();
}

/// Opens the work stream of `joined` with a golden proof of `fitness` everywhere (not the
/// coordinator's) and returns the refusal the coordinator answers with.
async fn refused_proof(
    client: &mut CoordinatorClient<Channel>,
    joined: &pb::JoinAccepted,
    fitness: f64,
) -> pb::Refusal {
    let eval = es_proto::GoldenEval {
        fitness_bits: fitness.to_bits(),
        correct: 0,
        logits_digest: [0; 32],
    };
    let proof = es_proto::GoldenProof {
        center: eval,
        plus: eval,
        minus: eval,
    };
    let prove = pb::Prove::new(&joined.run_id, joined.worker_id, &proof, None);
    // The sender stays alive so that the request stream is open while the coordinator answers.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(pb::WorkerMessage::from(prove)).unwrap();
    let mut inbound = client
        .work(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = inbound.message().await.unwrap().expect("a shutdown");
    let Some(pb::coordinator_message::Kind::Shutdown(shutdown)) = first.kind else {
        panic!("expected a refusal, got {first:?}");
    };
    drop(tx);
    shutdown.refusal.expect("a refusal")
}

fn accepted(outcome: Outcome) -> pb::JoinAccepted {
    match outcome {
        Outcome::Accepted(a) => a,
        Outcome::Refused(r) => panic!("refused: {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_retried_with_the_same_key_takes_the_place_of_the_first() {
    let scratch = Scratch::new("join-key");
    let options = ClusterOptions {
        max_workers: 2,
        ..ClusterOptions::default()
    };
    let (addr, stop, handle) = coordinator_with(&scratch, options).await;
    let mut client = client(&addr).await;
    let digest = mnist_digest();
    let keyed = |join_key: u64| pb::JoinRequest {
        join_key,
        ..request(digest.clone())
    };

    // Worker 7 joins, and joins again as after a lost reply: one place, not two, so that
    // worker 8 still finds one.
    let first = accepted(join(&mut client, keyed(7)).await);
    let retried = accepted(join(&mut client, keyed(7)).await);
    assert_ne!(first.worker_id, retried.worker_id);
    accepted(join(&mut client, keyed(8)).await);

    // Both places are taken now: a third worker is refused, with or without a key.
    for key in [9, 0] {
        let r = refusal(join(&mut client, keyed(key)).await);
        assert_eq!(r.reason(), RefusalReason::Full, "key {key}");
        assert!(
            r.message.contains("2 workers joined") && r.message.contains("--max-workers"),
            "{}",
            r.message
        );
    }

    // The join that was given up is gone: a stream that proves with its id is told to join
    // again.
    let r = refused_proof(&mut client, &first, 0.0).await;
    assert_eq!(r.reason(), RefusalReason::RunMismatch);
    assert!(
        r.message
            .contains(&format!("worker id {} is unknown", first.worker_id)),
        "{}",
        r.message
    );

    let _ = stop.send(());
    handle.await.unwrap();
}
