//! Fuzzing, as property tests with a bounded number of cases (they run in every `cargo test`):
//! every message a peer can receive is decoded from arbitrary bytes and from mutations of
//! valid messages, then put through every conversion the receiver applies. Nothing may panic;
//! what converts must convert back to what arrived.
//!
//! Inbound to the coordinator: `JoinRequest`, `WorkerMessage` (`Prove`'s golden proof and
//! cached digest, `Results`' pairs). Inbound to a worker: `JoinReply` (the `RunSpec`),
//! `CoordinatorMessage` (`Generation`'s digest and θ).

use es_core::train::{EsConfig, PairResult};
use es_kernel::{Evaluation, NetConfig, ParamLayout};
use es_proto::pb::{self, RefusalReason};
use es_proto::{EncodedTheta, GoldenEval, GoldenProof, NoiseSpec, RunSpec};
use proptest::prelude::*;
use prost::Message;

/// The batch size the coordinator checks `correct` counts against.
const BATCH: usize = 100;
/// θ's dimension a worker checks `Generation` against (small, so that valid θ occur).
const DIM: usize = 3;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// What the coordinator does with a `WorkerMessage` before it touches its state.
fn coordinator_receives(message: &pb::WorkerMessage) {
    use pb::worker_message::Kind;
    match &message.kind {
        Some(Kind::Prove(prove)) => {
            if let Some(golden) = &prove.golden
                && let Ok(proof) = GoldenProof::try_from(golden)
            {
                let back = pb::GoldenProof::from(&proof);
                assert_eq!(GoldenProof::try_from(&back).unwrap(), proof);
                let _ = proof.difference(&proof);
            }
            let _ = prove.checked_cached_theta_digest();
        }
        Some(Kind::Results(results)) => {
            for pair in &results.pairs {
                if let Ok(result) = pair.to_core(BATCH) {
                    assert_eq!(&pb::PairResult::from(&result), pair);
                    assert!(result.plus.correct <= BATCH && result.minus.correct <= BATCH);
                }
            }
        }
        Some(Kind::NoiseSums(sums)) => {
            if let Ok(values) = sums.checked_sums(DIM) {
                assert!(values.iter().all(|v| v.is_finite()));
            }
        }
        Some(Kind::Ready(_) | Kind::ThetaRequest(_) | Kind::Heartbeat(_)) | None => {}
    }
}

/// What a worker does with a `CoordinatorMessage`.
fn worker_receives(message: &pb::CoordinatorMessage) {
    use pb::coordinator_message::Kind;
    match &message.kind {
        Some(Kind::Generation(generation)) => {
            let digest = generation.checked_theta_digest();
            if let Ok(Some(theta)) = generation.checked_theta(DIM) {
                assert_eq!(theta.len(), DIM);
                assert_eq!(EncodedTheta::new(&theta).digest(), &digest.unwrap());
            }
            let _ = format!("{generation:?}");
        }
        Some(Kind::Shutdown(shutdown)) => {
            if let Some(refusal) = &shutdown.refusal {
                let _ = refusal.reason();
                let _ = tonic::Status::from(refusal.clone());
            }
        }
        Some(Kind::SumNoise(sum)) => {
            if let Ok(weights) = sum.checked_weights(BATCH) {
                assert!(weights.iter().all(|v| v.is_finite()));
            }
            if let Ok(ranges) = sum.checked_ranges(DIM) {
                assert!(ranges.iter().all(|r| !r.is_empty() && r.end <= DIM));
            }
        }
        Some(Kind::ProofAccepted(_) | Kind::Assign(_)) | None => {}
    }
}

/// What a worker does with a `JoinReply`: the spec must convert to something the core can
/// build, and back.
fn worker_joins(reply: &pb::JoinReply) {
    use pb::join_reply::Outcome;
    match &reply.outcome {
        Some(Outcome::Accepted(accepted)) => {
            if let Some(spec) = &accepted.spec
                && let Ok(spec) = RunSpec::try_from(spec.clone())
            {
                let dim = ParamLayout::new(&spec.net).len();
                assert!(dim <= es_proto::MAX_THETA_DIM);
                let back = RunSpec::try_from(pb::RunSpec::from(&spec)).unwrap();
                assert_eq!(back, spec);
            }
        }
        Some(Outcome::Refused(refusal)) => {
            let _ = refusal.reason();
        }
        None => {}
    }
}

/// Decodes `bytes` as every inbound message and converts what decodes.
fn receive_all(bytes: &[u8]) {
    if let Ok(m) = pb::WorkerMessage::decode(bytes) {
        coordinator_receives(&m);
        // A decoded message encodes to canonical bytes, which decode and encode to
        // themselves (bytes, not `==`: a fitness may be NaN).
        let once = m.encode_to_vec();
        let twice = pb::WorkerMessage::decode(&*once).unwrap().encode_to_vec();
        assert_eq!(once, twice);
    }
    if let Ok(m) = pb::JoinRequest::decode(bytes) {
        assert_eq!(pb::JoinRequest::decode(&*m.encode_to_vec()).unwrap(), m);
    }
    if let Ok(m) = pb::CoordinatorMessage::decode(bytes) {
        worker_receives(&m);
    }
    if let Ok(m) = pb::JoinReply::decode(bytes) {
        worker_joins(&m);
    }
}

fn pair(index: u32, fitness: f64, correct: usize) -> PairResult {
    let e = |fitness| Evaluation {
        fitness,
        correct,
        samples: BATCH,
    };
    PairResult {
        index,
        plus: e(fitness),
        minus: e(-fitness),
    }
}

/// Valid messages of every inbound kind: the seeds that mutations start from.
fn seeds() -> Vec<Vec<u8>> {
    let eval = GoldenEval {
        fitness_bits: (-2.25f64).to_bits(),
        correct: 17,
        logits_digest: [7; 32],
    };
    let proof = GoldenProof {
        center: eval,
        plus: eval,
        minus: eval,
    };
    let theta = EncodedTheta::new(&[1.0, -0.0, 3.5]);
    let spec = RunSpec {
        run_seed: 42,
        net: NetConfig::default(),
        es: EsConfig::default(),
        noise: NoiseSpec::Table {
            noise_seed: 123,
            len: 1 << 22,
        },
    };
    let worker: Vec<pb::WorkerMessage> = vec![
        pb::Prove {
            protocol_version: es_proto::PROTOCOL_VERSION,
            run_id: "run-1".into(),
            worker_id: 3,
            golden: Some((&proof).into()),
            cached_theta_digest: theta.digest().to_vec(),
        }
        .into(),
        pb::Results::new(
            4,
            &[
                pair(0, -2.0, 10),
                pair(7, f64::NEG_INFINITY, 0),
                pair(9, -0.0, 100),
            ],
        )
        .into(),
        pb::Ready {
            generation: 4,
            credits: 16,
        }
        .into(),
        pb::ThetaRequest::new(4, theta.digest()).into(),
        pb::Heartbeat {}.into(),
        pb::NoiseSums::new(4, 1, &[0.5, -1.0]).into(),
    ];
    let coordinator: Vec<pb::CoordinatorMessage> = vec![
        pb::Generation::with_theta(5, &theta).into(),
        pb::Generation::digest_only(5, theta.digest()).into(),
        pb::Assign {
            generation: 5,
            first_index: 2,
            count: 8,
        }
        .into(),
        pb::ProofAccepted {}.into(),
        pb::SumNoise::new(
            5,
            es_proto::work::f32s_to_bytes(&[0.5, -0.5, 0.0]),
            &[0..1, 2..3],
        )
        .into(),
        pb::Shutdown {
            reason: "over".into(),
            refusal: Some(pb::Refusal::new(RefusalReason::Full, "full")),
            finished: false,
        }
        .into(),
    ];
    let join = pb::JoinRequest {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: String::new(),
        data_digest: vec![1; 32],
        threads: 2,
        name: "node/1".into(),
        kernel: "avx2".into(),
        sums_noise: true,
        relay_port: 0,
        relay_host: String::new(),
        carried_credits: true,
        hub: false,
        join_key: 0x0123_4567_89AB_CDEF,
    };
    let accepted = pb::JoinReply::from(pb::JoinAccepted {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: "run-1".into(),
        worker_id: 3,
        spec: Some((&spec).into()),
        golden: Some(pb::GoldenTask {
            generation: 0,
            index: 0,
        }),
        heartbeat_interval_ms: 2000,
        carried_credits: true,
    });
    let mut all: Vec<Vec<u8>> = worker.iter().map(Message::encode_to_vec).collect();
    all.extend(coordinator.iter().map(Message::encode_to_vec));
    all.push(join.encode_to_vec());
    all.push(accepted.encode_to_vec());
    all
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match m {
        Mutation::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
        Mutation::Set { at, byte } if n > 0 => bytes[at % n] = *byte,
        Mutation::Truncate { at } => bytes.truncate(at % (n + 1)),
        Mutation::Insert { at, bytes: new } => {
            let at = at % (n + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Remove { at, len } if n > 0 => {
            let at = at % n;
            bytes.drain(at..(at + len).min(n));
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(config(100_000))]

    #[test]
    fn arbitrary_bytes_never_panic_a_receiver(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        receive_all(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic_a_receiver(
        seed in 0usize..16,
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let mut bytes = seeds[seed % seeds.len()].clone();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        receive_all(&bytes);
    }

    #[test]
    fn arbitrary_results_are_checked_pair_by_pair(
        index in any::<u32>(),
        plus in prop::option::of(any::<f64>()),
        minus in prop::option::of(any::<f64>()),
        correct_plus in any::<u64>(),
        correct_minus in any::<u64>(),
    ) {
        let pair = pb::PairResult { index, fitness_plus: plus, fitness_minus: minus, correct_plus, correct_minus };
        let valid = |f: Option<f64>| f.is_some_and(|f| !f.is_nan() && f != f64::INFINITY);
        let ok = valid(plus) && valid(minus)
            && correct_plus <= BATCH as u64 && correct_minus <= BATCH as u64;
        prop_assert_eq!(pair.to_core(BATCH).is_ok(), ok);
        coordinator_receives(&pb::Results { generation: 1, pairs: vec![pair], credits: 1 }.into());
    }
}

#[test]
fn the_seeds_are_valid_messages() {
    // Every seed converts without error where a receiver would accept it, so mutations
    // start from the accepted path, not from an early rejection.
    for bytes in seeds() {
        receive_all(&bytes);
    }
    let g = seeds()
        .iter()
        .find_map(
            |bytes| match pb::CoordinatorMessage::decode(&**bytes).ok()?.kind {
                Some(pb::coordinator_message::Kind::Generation(g)) if !g.theta.is_empty() => {
                    Some(g)
                }
                _ => None,
            },
        )
        .expect("a seed is a generation with θ");
    assert_eq!(g.checked_theta(DIM).unwrap().unwrap(), vec![1.0, -0.0, 3.5]);
}
