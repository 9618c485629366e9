//! Fuzzing the checkpoint reader, as property tests with a bounded number of cases (they run
//! in every `cargo test`). The digest seals a file against damage, not against someone who
//! writes one: so besides arbitrary bytes, the inputs here are valid checkpoints mutated and
//! *resealed*, and checkpoints built from arbitrary headers and payloads. `decode` must return
//! an error or a checkpoint, never panic; what it returns must survive `encode` and `decode`
//! again, bit for bit.

use std::path::Path;

use es_coordinator::checkpoint::{Checkpoint, Header, decode, encode};
use es_coordinator::config::RunConfig;
use es_core::optimizer::Adam;
use es_core::train::{EsConfig, EsState};
use proptest::prelude::*;
use sha2::{Digest as _, Sha256};

const MAGIC: &[u8; 8] = b"UFCKPT01";

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn valid(dim: usize) -> Vec<u8> {
    let es = EsConfig::default();
    let mut adam = Adam::new(es.adam, dim);
    adam.m
        .iter_mut()
        .enumerate()
        .for_each(|(i, m)| *m = i as f32);
    adam.t = 3;
    let state = EsState {
        generation: 3,
        theta: (0..dim).map(|i| -(i as f32)).collect(),
        adam,
        average: Vec::new(),
    };
    encode("run-7", &RunConfig::default(), &[9; 32], &state)
}

fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let digest = Sha256::digest(&body);
    body.extend_from_slice(&digest);
    body
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Decodes `bytes`; a checkpoint that decodes must encode and decode to itself.
fn check(bytes: &[u8]) -> Option<Checkpoint> {
    let decoded = decode(Path::new("fuzz.ckpt"), bytes).ok()?;
    let again = encode(
        &decoded.run_id,
        &decoded.config,
        &decoded.data_digest,
        &decoded.state,
    );
    let back = decode(Path::new("again.ckpt"), &again).expect("a re-encoded checkpoint decodes");
    assert_eq!(back.run_id, decoded.run_id);
    assert_eq!(back.config, decoded.config);
    assert_eq!(back.data_digest, decoded.data_digest);
    assert_eq!(back.state.generation, decoded.state.generation);
    assert_eq!(back.state.adam.t, decoded.state.adam.t);
    assert_eq!(bits(&back.state.theta), bits(&decoded.state.theta));
    assert_eq!(bits(&back.state.adam.m), bits(&decoded.state.adam.m));
    assert_eq!(bits(&back.state.adam.v), bits(&decoded.state.adam.v));
    Some(decoded)
}

/// A checkpoint file around `header` (any JSON) and `payload`, correctly sealed.
fn file(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = MAGIC.to_vec();
    body.extend_from_slice(&(header.len() as u32).to_le_bytes());
    body.extend_from_slice(header);
    body.extend_from_slice(payload);
    seal(body)
}

proptest! {
    #![proptest_config(config(30_000))]

    #[test]
    fn arbitrary_bytes_are_refused_without_panicking(
        mut bytes in prop::collection::vec(any::<u8>(), 0..256),
        magic in any::<bool>(),
        sealed in any::<bool>(),
    ) {
        if magic && bytes.len() >= 12 {
            bytes[..8].copy_from_slice(MAGIC);
        }
        let bytes = if sealed { seal(bytes) } else { bytes };
        let _ = check(&bytes);
    }

    #[test]
    fn mutated_and_resealed_checkpoints_never_panic(
        dim in 0usize..8,
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let bytes = valid(dim);
        let mut body = bytes[..bytes.len() - 32].to_vec();
        for (at, byte, kind) in edits {
            let n = body.len();
            match kind {
                0 => body[at % n] = byte,
                1 => body.truncate(at % (n + 1)),
                _ => body.insert(at % (n + 1), byte),
            }
            if body.is_empty() {
                break;
            }
        }
        let _ = check(&seal(body));
    }

    #[test]
    fn arbitrary_headers_and_payloads_never_panic(
        run_id in ".{0,12}",
        generation in any::<u32>(),
        adam_steps in any::<u64>(),
        dim in prop_oneof![0usize..6, Just(usize::MAX / 12), Just(usize::MAX / 4), any::<usize>()],
        data_digest in prop_oneof![Just("09".repeat(32)), "[0-9a-fA-F]{62,66}", ".{0,70}"],
        config_edit in prop::option::of((any::<usize>(), ".{0,8}")),
        payload in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let mut config = RunConfig::default().to_toml();
        if let Some((at, text)) = config_edit {
            let mut at = at % (config.len() + 1);
            while !config.is_char_boundary(at) {
                at -= 1;
            }
            config.insert_str(at, &text);
        }
        let header = Header { run_id, generation, adam_steps, dim, data_digest, config };
        let json = serde_json::to_vec(&header).unwrap();
        if let Some(c) = check(&file(&json, &payload)) {
            prop_assert_eq!(c.state.theta.len(), dim);
            prop_assert_eq!(payload.len(), 12 * dim);
        }
    }
}

#[test]
fn a_valid_checkpoint_passes_the_same_checks() {
    for dim in [0, 1, 5] {
        let c = check(&valid(dim)).expect("a valid checkpoint decodes");
        assert_eq!(c.state.theta.len(), dim);
    }
}
