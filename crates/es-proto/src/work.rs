//! The messages of the `Work` stream: pair results to and from the core's types, the golden
//! proof, `Generation` with θ, refusals, and each message wrapped into the stream's envelope
//! (`WorkerMessage`, `CoordinatorMessage`) by `From`.

use std::ops::Range;

use bytes::Bytes;
use es_core::strategy::PairFitness;
use es_core::train::PairResult;
use es_kernel::Evaluation;
use sha2::{Digest as _, Sha256};

use crate::error::{ConversionError, to_usize};
use crate::pb;
use crate::theta::{Digest, EncodedTheta, digest_from_bytes, f32s_from_bytes, hex, logits_digest};

impl From<&PairResult> for pb::PairResult {
    fn from(r: &PairResult) -> Self {
        pb::PairResult {
            index: r.index,
            fitness_plus: Some(r.plus.fitness),
            fitness_minus: Some(r.minus.fitness),
            correct_plus: r.plus.correct as u64,
            correct_minus: r.minus.correct as u64,
        }
    }
}

impl From<PairResult> for pb::PairResult {
    fn from(r: PairResult) -> Self {
        (&r).into()
    }
}

/// The two fitnesses, bit for bit; missing ones, NaN and +inf are refused (a correct worker
/// reports a diverged network as −inf, never NaN, and ranks cannot order NaN).
impl TryFrom<&pb::PairResult> for PairFitness {
    type Error = ConversionError;

    fn try_from(m: &pb::PairResult) -> Result<Self, Self::Error> {
        Ok(PairFitness {
            plus: fitness("results.pairs.fitness_plus", m.fitness_plus)?,
            minus: fitness("results.pairs.fitness_minus", m.fitness_minus)?,
        })
    }
}

fn fitness(field: &'static str, value: Option<f64>) -> Result<f64, ConversionError> {
    match value {
        None => Err(ConversionError::Missing {
            field,
            expected: "a fitness",
        }),
        Some(v) if v.is_nan() || v == f64::INFINITY => {
            Err(ConversionError::value(field, v, "a finite number or -inf"))
        }
        Some(v) => Ok(v),
    }
}

impl pb::PairResult {
    /// The core's result for a minibatch of `samples` images (the wire does not repeat the
    /// batch size): fitnesses checked as for [`PairFitness`], correct counts at most `samples`.
    pub fn to_core(&self, samples: usize) -> Result<PairResult, ConversionError> {
        let f = PairFitness::try_from(self)?;
        let correct = |field, value| {
            let c = to_usize(field, value)?;
            if c > samples {
                Err(ConversionError::value(
                    field,
                    c,
                    format!("at most the batch size {samples}"),
                ))
            } else {
                Ok(c)
            }
        };
        Ok(PairResult {
            index: self.index,
            plus: Evaluation {
                fitness: f.plus,
                correct: correct("results.pairs.correct_plus", self.correct_plus)?,
                samples,
            },
            minus: Evaluation {
                fitness: f.minus,
                correct: correct("results.pairs.correct_minus", self.correct_minus)?,
                samples,
            },
        })
    }
}

impl pb::Results {
    /// The results of `pairs`, all of `generation`.
    pub fn new(generation: u32, pairs: &[PairResult]) -> Self {
        pb::Results {
            generation,
            pairs: pairs.iter().map(pb::PairResult::from).collect(),
            credits: 0,
        }
    }

    /// The same results returning `credits` to the coordinator (carried credits: see the
    /// .proto).
    pub fn returning(self, credits: u32) -> Self {
        pb::Results { credits, ..self }
    }
}

/// One evaluation of the golden task as bits: what a worker proves and the coordinator
/// compares with `==` (bit equality of the fitness, not float equality).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GoldenEval {
    /// `f64::to_bits` of the fitness.
    pub fitness_bits: u64,
    /// Samples classified correctly.
    pub correct: usize,
    /// [`logits_digest`] of the batch's logits.
    pub logits_digest: Digest,
}

impl GoldenEval {
    /// The proof of an evaluation and the logits it was computed from.
    pub fn new(evaluation: &Evaluation, logits: &[f32]) -> Self {
        GoldenEval {
            fitness_bits: evaluation.fitness.to_bits(),
            correct: evaluation.correct,
            logits_digest: logits_digest(logits),
        }
    }

    /// The fitness as a number.
    pub fn fitness(&self) -> f64 {
        f64::from_bits(self.fitness_bits)
    }

    fn from_wire(
        m: &pb::GoldenEval,
        digest_field: &'static str,
    ) -> Result<GoldenEval, ConversionError> {
        Ok(GoldenEval {
            fitness_bits: m.fitness_bits,
            correct: to_usize("golden.correct", m.correct)?,
            logits_digest: digest_from_bytes(digest_field, &m.logits_digest)?,
        })
    }
}

/// A worker's answer to a `GoldenTask`: θ₀, θ₀ + σε and θ₀ − σε evaluated on the golden
/// minibatch (see the `.proto` for the task's definition).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GoldenProof {
    pub center: GoldenEval,
    pub plus: GoldenEval,
    pub minus: GoldenEval,
}

impl GoldenProof {
    /// The first way `self` (a worker's proof) differs from `expected` (the coordinator's), in
    /// words for a `GOLDEN_MISMATCH` refusal; `None` if they are equal. A difference in the
    /// center points at the data, the init or the arithmetic; one only in plus or minus at the
    /// noise or σ.
    pub fn difference(&self, expected: &GoldenProof) -> Option<String> {
        let sides = [
            ("center", &self.center, &expected.center),
            ("plus", &self.plus, &expected.plus),
            ("minus", &self.minus, &expected.minus),
        ];
        sides.into_iter().find_map(|(side, got, want)| {
            if got.fitness_bits != want.fitness_bits {
                Some(format!(
                    "{side} fitness is {:?} (bits {:#018x}): expected {:?} (bits {:#018x})",
                    got.fitness(),
                    got.fitness_bits,
                    want.fitness(),
                    want.fitness_bits
                ))
            } else if got.correct != want.correct {
                Some(format!(
                    "{side} correct count is {}: expected {}",
                    got.correct, want.correct
                ))
            } else if got.logits_digest != want.logits_digest {
                Some(format!(
                    "{side} logits digest is {}: expected {}",
                    hex(&got.logits_digest),
                    hex(&want.logits_digest)
                ))
            } else {
                None
            }
        })
    }
}

impl From<&GoldenEval> for pb::GoldenEval {
    fn from(g: &GoldenEval) -> Self {
        pb::GoldenEval {
            fitness_bits: g.fitness_bits,
            correct: g.correct as u64,
            logits_digest: g.logits_digest.to_vec(),
        }
    }
}

/// Checks the digest's length (32 bytes).
impl TryFrom<&pb::GoldenEval> for GoldenEval {
    type Error = ConversionError;

    fn try_from(m: &pb::GoldenEval) -> Result<Self, Self::Error> {
        GoldenEval::from_wire(m, "golden.logits_digest")
    }
}

impl From<&GoldenProof> for pb::GoldenProof {
    fn from(g: &GoldenProof) -> Self {
        pb::GoldenProof {
            center: Some((&g.center).into()),
            plus: Some((&g.plus).into()),
            minus: Some((&g.minus).into()),
        }
    }
}

/// Checks that all three evaluations are present with 32-byte digests.
impl TryFrom<&pb::GoldenProof> for GoldenProof {
    type Error = ConversionError;

    fn try_from(m: &pb::GoldenProof) -> Result<Self, Self::Error> {
        let side = |eval: &Option<pb::GoldenEval>, field, digest_field| {
            let eval = eval.as_ref().ok_or(ConversionError::Missing {
                field,
                expected: "an evaluation",
            })?;
            GoldenEval::from_wire(eval, digest_field)
        };
        Ok(GoldenProof {
            center: side(&m.center, "golden.center", "golden.center.logits_digest")?,
            plus: side(&m.plus, "golden.plus", "golden.plus.logits_digest")?,
            minus: side(&m.minus, "golden.minus", "golden.minus.logits_digest")?,
        })
    }
}

impl pb::Prove {
    /// The first message of a Work stream: this code's protocol version, the run and worker
    /// ids from `JoinAccepted`, the golden `proof`, and the digest of the θ the worker holds
    /// from an earlier stream of the run, if any.
    pub fn new(
        run_id: &str,
        worker_id: u64,
        proof: &GoldenProof,
        cached_theta_digest: Option<&Digest>,
    ) -> Self {
        pb::Prove {
            protocol_version: crate::PROTOCOL_VERSION,
            run_id: run_id.to_owned(),
            worker_id,
            golden: Some(proof.into()),
            cached_theta_digest: cached_theta_digest.map_or_else(Vec::new, |d| d.to_vec()),
        }
    }

    /// The digest of the θ the worker holds, if any: empty or exactly 32 bytes.
    pub fn checked_cached_theta_digest(&self) -> Result<Option<Digest>, ConversionError> {
        if self.cached_theta_digest.is_empty() {
            Ok(None)
        } else {
            digest_from_bytes("prove.cached_theta_digest", &self.cached_theta_digest).map(Some)
        }
    }
}

impl pb::Generation {
    /// Announces `generation` with θ's bytes (shared with `theta`, not copied).
    pub fn with_theta(generation: u32, theta: &EncodedTheta) -> Self {
        pb::Generation {
            generation,
            theta_digest: theta.digest().to_vec(),
            theta: theta.bytes().clone(),
            theta_source: String::new(),
            credits: 0,
        }
    }

    /// Announces `generation` by θ's digest alone, for a worker known to hold that θ.
    pub fn digest_only(generation: u32, theta_digest: &Digest) -> Self {
        Self::relayed(generation, theta_digest, String::new())
    }

    /// Announces `generation` by θ's digest and the "host:port" of a worker that relays it
    /// (empty: none, the worker holds θ).
    pub fn relayed(generation: u32, theta_digest: &Digest, source: String) -> Self {
        pb::Generation {
            generation,
            theta_digest: theta_digest.to_vec(),
            theta: Bytes::new(),
            theta_source: source,
            credits: 0,
        }
    }

    /// The same announcement with `credits` granted on the worker's behalf (carried
    /// credits: see the .proto).
    pub fn granting(self, credits: u32) -> Self {
        pb::Generation { credits, ..self }
    }

    /// The announced digest, checked for length.
    pub fn checked_theta_digest(&self) -> Result<Digest, ConversionError> {
        digest_from_bytes("generation.theta_digest", &self.theta_digest)
    }

    /// θ if the message carries it (`None` if it came by digest alone): exactly `dim`
    /// little-endian f32 values whose SHA-256 is the announced digest.
    pub fn checked_theta(&self, dim: usize) -> Result<Option<Vec<f32>>, ConversionError> {
        let announced = self.checked_theta_digest()?;
        if self.theta.is_empty() {
            return Ok(None);
        }
        theta_with_digest("generation.theta", &self.theta, dim, &announced).map(Some)
    }
}

impl pb::FetchThetaRequest {
    /// Asks for the θ of run `run_id` with digest `theta_digest`.
    pub fn new(run_id: &str, theta_digest: &Digest) -> Self {
        pb::FetchThetaRequest {
            run_id: run_id.to_owned(),
            theta_digest: theta_digest.to_vec(),
        }
    }

    /// The digest asked for, checked for length.
    pub fn checked_theta_digest(&self) -> Result<Digest, ConversionError> {
        digest_from_bytes("fetch_theta.theta_digest", &self.theta_digest)
    }
}

impl pb::FetchThetaReply {
    /// θ as relayed: exactly `dim` little-endian f32 values whose SHA-256 is `expected`, the
    /// digest the coordinator announced (a relay cannot pass off another θ).
    pub fn checked_theta(
        &self,
        dim: usize,
        expected: &Digest,
    ) -> Result<Vec<f32>, ConversionError> {
        theta_with_digest("fetch_theta_reply.theta", &self.theta, dim, expected)
    }
}

/// `bytes` decoded as exactly `dim` little-endian f32 values, provided their SHA-256 is
/// `announced`.
fn theta_with_digest(
    field: &'static str,
    bytes: &[u8],
    dim: usize,
    announced: &Digest,
) -> Result<Vec<f32>, ConversionError> {
    let theta = f32s_from_bytes(field, bytes, dim)?;
    let computed: Digest = Sha256::digest(bytes).into();
    if computed != *announced {
        return Err(ConversionError::DigestMismatch {
            field,
            announced: hex(announced),
            computed: hex(&computed),
        });
    }
    Ok(theta)
}

// θ is megabytes: show its length and digest, not its bytes.
impl std::fmt::Debug for pb::Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("generation", &self.generation)
            .field("theta_digest", &hex(&self.theta_digest))
            .field("theta_bytes", &self.theta.len())
            .field("theta_source", &self.theta_source)
            .field("credits", &self.credits)
            .finish()
    }
}

impl std::fmt::Debug for pb::FetchThetaReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchThetaReply")
            .field("theta_bytes", &self.theta.len())
            .finish()
    }
}

/// Values as the wire's little-endian f32 bytes.
pub fn f32s_to_bytes(values: &[f32]) -> Bytes {
    crate::theta::f32s_to_le_bytes(values)
}

/// `values` decoded from `bytes` as exactly `len` little-endian f32 values, each finite.
fn finite_f32s(field: &'static str, bytes: &[u8], len: usize) -> Result<Vec<f32>, ConversionError> {
    let values = f32s_from_bytes(field, bytes, len)?;
    // A pass without early exits, which the compiler vectorizes, finds whether any is not
    // finite (megabytes of noise sums arrive per generation); only then is it looked for.
    let all_finite = values
        .chunks(1024)
        .all(|chunk| chunk.iter().fold(true, |ok, v| ok & v.is_finite()));
    if all_finite {
        return Ok(values);
    }
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(ConversionError::value(
            field,
            format!("{v} at {i}"),
            "finite values",
        ));
    }
    Ok(values)
}

impl pb::SumNoise {
    /// Asks for the noise sums of `ranges` of `generation` under `weights` (the wire bytes of
    /// [`f32s_to_bytes`], shared, not copied, by every worker's message).
    pub fn new(generation: u32, weights: Bytes, ranges: &[Range<usize>]) -> Self {
        pb::SumNoise {
            generation,
            weights,
            ranges: ranges
                .iter()
                .map(|r| pb::ParamRange {
                    start: r.start as u64,
                    len: r.len() as u64,
                })
                .collect(),
        }
    }

    /// The weights: one finite value per perturbation of `population`.
    pub fn checked_weights(&self, population: usize) -> Result<Vec<f32>, ConversionError> {
        finite_f32s("sum_noise.weights", &self.weights, population)
    }

    /// The ranges: at least one, each non-empty and inside θ's `dim` parameters, none
    /// overlapping another.
    pub fn checked_ranges(&self, dim: usize) -> Result<Vec<Range<usize>>, ConversionError> {
        if self.ranges.is_empty() {
            return Err(ConversionError::Missing {
                field: "sum_noise.ranges",
                expected: "at least one range of θ",
            });
        }
        let mut ranges = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            let start = to_usize("sum_noise.ranges.start", r.start)?;
            let len = to_usize("sum_noise.ranges.len", r.len)?;
            if len == 0 || start >= dim || len > dim - start {
                return Err(ConversionError::value(
                    "sum_noise.ranges",
                    format!("{start}..{}", start.saturating_add(len)),
                    format!("a non-empty range inside θ's 0..{dim}"),
                ));
            }
            ranges.push(start..start + len);
        }
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.start);
        if let Some(w) = sorted.windows(2).find(|w| w[0].end > w[1].start) {
            return Err(ConversionError::value(
                "sum_noise.ranges",
                format!("{:?} and {:?}", w[0], w[1]),
                "ranges that do not overlap",
            ));
        }
        Ok(ranges)
    }
}

impl pb::NoiseSums {
    /// The sums of the range starting at `start` of `generation`.
    pub fn new(generation: u32, start: usize, sums: &[f32]) -> Self {
        pb::NoiseSums {
            generation,
            start: start as u64,
            sums: f32s_to_bytes(sums).to_vec(),
        }
    }

    /// The sums: exactly `len` finite values (the weights are finite and at most 1 in size,
    /// the noise finite, so a correct sum is too).
    pub fn checked_sums(&self, len: usize) -> Result<Vec<f32>, ConversionError> {
        finite_f32s("noise_sums.sums", &self.sums, len)
    }
}

impl pb::ThetaRequest {
    /// Asks for the θ named `theta_digest` of `generation`.
    pub fn new(generation: u32, theta_digest: &Digest) -> Self {
        pb::ThetaRequest {
            generation,
            theta_digest: theta_digest.to_vec(),
        }
    }
}

impl pb::Refusal {
    /// A refusal for `reason`, explained by `message`.
    pub fn new(reason: pb::RefusalReason, message: impl Into<String>) -> Self {
        pb::Refusal {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// For a handler that ends a call with an error rather than answering with a `Refusal`: a
/// mismatch is a failed precondition (the worker must change before it can join), a full
/// coordinator is out of resources, anything else a bad argument.
impl From<pb::Refusal> for tonic::Status {
    fn from(refusal: pb::Refusal) -> Self {
        use pb::RefusalReason as R;
        use tonic::Code;
        let reason = refusal.reason();
        let code = match reason {
            R::DataMismatch | R::VersionMismatch | R::GoldenMismatch | R::RunMismatch => {
                Code::FailedPrecondition
            }
            R::Full => Code::ResourceExhausted,
            R::BadRequest | R::Unspecified => Code::InvalidArgument,
        };
        tonic::Status::new(
            code,
            format!("{}: {}", reason.as_str_name(), refusal.message),
        )
    }
}

impl From<pb::JoinAccepted> for pb::JoinReply {
    fn from(accepted: pb::JoinAccepted) -> Self {
        pb::JoinReply {
            outcome: Some(pb::join_reply::Outcome::Accepted(accepted)),
        }
    }
}

impl From<pb::Refusal> for pb::JoinReply {
    fn from(refusal: pb::Refusal) -> Self {
        pb::JoinReply {
            outcome: Some(pb::join_reply::Outcome::Refused(refusal)),
        }
    }
}

/// `From<pb::Message>` for the stream envelope `$envelope`, one impl per `oneof kind` variant.
macro_rules! envelope {
    ($envelope:ident, $kind:ident: $($variant:ident),+ $(,)?) => {
        $(
            impl From<pb::$variant> for pb::$envelope {
                fn from(m: pb::$variant) -> Self {
                    pb::$envelope {
                        kind: Some(pb::$kind::Kind::$variant(m)),
                    }
                }
            }
        )+
    };
}

envelope!(
    WorkerMessage,
    worker_message: Prove,
    Ready,
    Results,
    ThetaRequest,
    Heartbeat,
    NoiseSums,
);
envelope!(
    CoordinatorMessage,
    coordinator_message: ProofAccepted,
    Generation,
    Assign,
    Shutdown,
    SumNoise,
);

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::theta::theta_digest;

    /// Through the wire bytes and back.
    fn wire<M: Message + Default>(m: &M) -> M {
        M::decode(&m.encode_to_vec()[..]).unwrap()
    }

    fn eval(fitness: f64, correct: usize) -> Evaluation {
        Evaluation {
            fitness,
            correct,
            samples: 100,
        }
    }

    #[test]
    fn pair_results_round_trip_bit_for_bit() {
        let fitnesses = [
            -std::f64::consts::LN_10, // ten classes, uniform logits
            -0.0,
            0.0,
            f64::NEG_INFINITY,
            -f64::MIN_POSITIVE / 4.0, // denormal
            f64::MIN,
        ];
        for (i, &plus) in fitnesses.iter().enumerate() {
            let minus = fitnesses[fitnesses.len() - 1 - i];
            let r = PairResult {
                index: (1 << 24) - 1 - i as u32,
                plus: eval(plus, 100),
                minus: eval(minus, i),
            };
            let m = wire(&pb::PairResult::from(r));
            let back = m.to_core(100).unwrap();
            assert_eq!(back.index, r.index);
            assert_eq!(back.plus.fitness.to_bits(), plus.to_bits());
            assert_eq!(back.minus.fitness.to_bits(), minus.to_bits());
            assert_eq!((back.plus.correct, back.minus.correct), (100, i));
            assert_eq!((back.plus.samples, back.minus.samples), (100, 100));
            let f = PairFitness::try_from(&m).unwrap();
            assert_eq!(f.plus.to_bits(), r.fitness().plus.to_bits());
            assert_eq!(f.minus.to_bits(), r.fitness().minus.to_bits());
        }
    }

    /// Breaks one field of a valid pair result.
    type Breaker = fn(&mut pb::PairResult);

    #[test]
    fn bad_pair_results_are_refused() {
        let good = pb::PairResult::from(PairResult {
            index: 3,
            plus: eval(-1.0, 10),
            minus: eval(-2.0, 20),
        });
        let cases: [(Breaker, &str); 7] = [
            (|m| m.fitness_plus = None, "results.pairs.fitness_plus"),
            (|m| m.fitness_minus = None, "results.pairs.fitness_minus"),
            (
                |m| m.fitness_plus = Some(f64::NAN),
                "results.pairs.fitness_plus",
            ),
            (
                |m| m.fitness_minus = Some(f64::from_bits(0xFFF8_0000_0000_0001)),
                "results.pairs.fitness_minus",
            ),
            (
                |m| m.fitness_plus = Some(f64::INFINITY),
                "results.pairs.fitness_plus",
            ),
            (|m| m.correct_plus = 101, "results.pairs.correct_plus"),
            (
                |m| m.correct_minus = u64::MAX,
                "results.pairs.correct_minus",
            ),
        ];
        for (break_it, field) in cases {
            let mut m = good;
            break_it(&mut m);
            let e = m.to_core(100).unwrap_err();
            assert_eq!(e.field(), field, "{e}");
        }
        let mut m = good;
        m.correct_plus = 101;
        assert_eq!(
            m.to_core(100).unwrap_err().to_string(),
            "results.pairs.correct_plus is 101: expected at most the batch size 100"
        );
        m.fitness_plus = Some(f64::NAN);
        assert!(PairFitness::try_from(&m).is_err());
        // Exactly the batch size is fine.
        m = good;
        m.correct_plus = 100;
        m.to_core(100).unwrap();
    }

    #[test]
    fn results_keep_order_and_generation() {
        let pairs: Vec<PairResult> = (0..5)
            .map(|i| PairResult {
                index: 10 + i,
                plus: eval(-(i as f64), i as usize),
                minus: eval(-0.5, 0),
            })
            .collect();
        let m = wire(&pb::Results::new(42, &pairs));
        assert_eq!(m.generation, 42);
        let back: Vec<PairResult> = m.pairs.iter().map(|p| p.to_core(100).unwrap()).collect();
        assert_eq!(back, pairs);
    }

    fn golden() -> GoldenProof {
        let logits: Vec<f32> = (0..30).map(|i| i as f32 * 0.25 - 3.0).collect();
        GoldenProof {
            center: GoldenEval::new(&eval(-2.25, 3), &logits),
            plus: GoldenEval::new(&eval(-0.0, 0), &logits[..10]),
            minus: GoldenEval::new(&eval(f64::NEG_INFINITY, 100), &[]),
        }
    }

    #[test]
    fn golden_proofs_round_trip() {
        let g = golden();
        let back = GoldenProof::try_from(&wire(&pb::GoldenProof::from(&g))).unwrap();
        assert_eq!(back, g);
        assert_eq!(back.plus.fitness().to_bits(), (-0.0f64).to_bits());
        assert_eq!(back.difference(&g), None);
        let e = GoldenEval::try_from(&pb::GoldenEval::from(&g.center)).unwrap();
        assert_eq!(e, g.center);
    }

    #[test]
    fn golden_equality_is_bit_equality() {
        let g = golden();
        let mut other = g;
        other.plus.fitness_bits = 0.0f64.to_bits(); // +0 where the proof has -0
        assert_ne!(other, g);
        let why = other.difference(&g).unwrap();
        assert!(
            why.starts_with("plus fitness is 0.0 (bits 0x0000000000000000)"),
            "{why}"
        );
        let mut other = g;
        other.minus.correct = 99;
        assert_eq!(
            other.difference(&g).unwrap(),
            "minus correct count is 99: expected 100"
        );
        let mut other = g;
        other.center.logits_digest[31] ^= 1;
        other.minus.correct = 99;
        let why = other.difference(&g).unwrap();
        assert!(why.starts_with("center logits digest is "), "{why}");
    }

    #[test]
    fn bad_golden_proofs_are_refused() {
        let good = pb::GoldenProof::from(&golden());
        let mut m = good.clone();
        m.plus = None;
        let e = GoldenProof::try_from(&m).unwrap_err();
        assert!(
            matches!(
                e,
                ConversionError::Missing {
                    field: "golden.plus",
                    ..
                }
            ),
            "{e}"
        );
        let mut m = good.clone();
        m.minus.as_mut().unwrap().logits_digest.pop();
        let e = GoldenProof::try_from(&m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "golden.minus.logits_digest has 31 bytes: expected 32"
        );
    }

    #[test]
    fn generation_carries_theta_bit_for_bit() {
        let theta = vec![
            -0.0,
            f32::from_bits(0x7FA0_0001),
            f32::from_bits(3),
            1.0,
            -f32::MAX,
        ];
        let encoded = EncodedTheta::new(&theta);
        let m = wire(&pb::Generation::with_theta(9, &encoded));
        assert_eq!(m.generation, 9);
        assert_eq!(m.checked_theta_digest().unwrap(), theta_digest(&theta));
        let back = m.checked_theta(theta.len()).unwrap().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&theta));
        // The message shares θ's bytes rather than copying them.
        let m = pb::Generation::with_theta(9, &encoded);
        assert_eq!(m.theta.as_ptr(), encoded.bytes().as_ptr());

        let m = wire(&pb::Generation::digest_only(10, encoded.digest()));
        assert!(m.theta.is_empty());
        assert_eq!(m.checked_theta_digest().unwrap(), *encoded.digest());
        assert_eq!(m.checked_theta(theta.len()).unwrap(), None);
    }

    #[test]
    fn generation_debug_shows_the_digest_not_the_bytes() {
        let encoded = EncodedTheta::new(&[0.5; 1000]);
        let m = pb::CoordinatorMessage::from(pb::Generation::with_theta(4, &encoded));
        let text = format!("{m:?}");
        assert!(text.contains("generation: 4"), "{text}");
        assert!(text.contains(&hex(encoded.digest())), "{text}");
        assert!(text.contains("theta_bytes: 4000"), "{text}");
        assert!(text.len() < 250, "{text}");
    }

    #[test]
    fn bad_generations_are_refused() {
        let encoded = EncodedTheta::new(&[1.0, 2.0, 3.0]);
        let good = pb::Generation::with_theta(1, &encoded);

        let e = good.checked_theta(4).unwrap_err();
        assert!(
            matches!(
                e,
                ConversionError::Length {
                    field: "generation.theta",
                    got: 12,
                    expected: 16
                }
            ),
            "{e}"
        );
        let mut m = good.clone();
        m.theta = m.theta.slice(..10);
        assert!(matches!(
            m.checked_theta(3).unwrap_err(),
            ConversionError::NotF32s { got: 10, .. }
        ));
        let mut m = good.clone();
        m.theta_digest.truncate(16);
        assert_eq!(
            m.checked_theta(3).unwrap_err().to_string(),
            "generation.theta_digest has 16 bytes: expected 32"
        );
        let mut m = good.clone();
        m.theta = EncodedTheta::new(&[1.0, 2.0, -3.0]).bytes().clone();
        let e = m.checked_theta(3).unwrap_err();
        assert!(matches!(e, ConversionError::DigestMismatch { .. }), "{e}");
        assert!(
            e.to_string().starts_with("generation.theta has digest "),
            "{e}"
        );
        let mut m = good.clone();
        m.theta_digest.clear();
        assert!(m.checked_theta(3).is_err());
    }

    #[test]
    fn noise_sum_messages_round_trip_bit_for_bit() {
        let weights = [0.5, -0.25, -0.0, 1.0];
        let m = wire(&pb::SumNoise::new(
            7,
            f32s_to_bytes(&weights),
            &[8..20, 0..3],
        ));
        assert_eq!(m.generation, 7);
        let back = m.checked_weights(4).unwrap();
        assert!(
            back.iter()
                .zip(&weights)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(m.checked_ranges(20).unwrap(), vec![8..20, 0..3]);
        let sums = [f32::MIN_POSITIVE, -3.5, 0.0];
        let m = wire(&pb::NoiseSums::new(7, 8, &sums));
        assert_eq!((m.generation, m.start), (7, 8));
        let back = m.checked_sums(3).unwrap();
        assert!(
            back.iter()
                .zip(&sums)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    #[test]
    fn bad_noise_sum_messages_are_refused() {
        let good = pb::SumNoise::new(7, f32s_to_bytes(&[0.5, -0.5]), &[0..4, 4..10]);
        assert_eq!(
            good.checked_weights(3).unwrap_err().to_string(),
            "sum_noise.weights has 8 bytes: expected 12"
        );
        let nan = pb::SumNoise::new(7, f32s_to_bytes(&[0.5, f32::NAN]), &[0..4, 5..6]);
        assert_eq!(
            nan.checked_weights(2).unwrap_err().to_string(),
            "sum_noise.weights is NaN at 1: expected finite values"
        );
        assert_eq!(
            good.checked_ranges(9).unwrap_err().to_string(),
            "sum_noise.ranges is 4..10: expected a non-empty range inside θ's 0..9"
        );
        let overlapping = pb::SumNoise::new(7, Bytes::new(), &[3..8, 0..4]);
        assert_eq!(
            overlapping.checked_ranges(10).unwrap_err().to_string(),
            "sum_noise.ranges is 0..4 and 3..8: expected ranges that do not overlap"
        );
        let empty = pb::SumNoise::new(7, Bytes::new(), &[0..1, 2..2]);
        assert!(empty.checked_ranges(10).is_err());
        let none = pb::SumNoise::new(7, Bytes::new(), &[]);
        assert_eq!(
            none.checked_ranges(10).unwrap_err().to_string(),
            "sum_noise.ranges is missing: expected at least one range of θ"
        );
        let mut huge = good.clone();
        huge.ranges[0].len = u64::MAX;
        assert!(huge.checked_ranges(10).is_err());
        let sums = pb::NoiseSums::new(7, 0, &[1.0, f32::INFINITY]);
        assert_eq!(
            sums.checked_sums(2).unwrap_err().to_string(),
            "noise_sums.sums is inf at 1: expected finite values"
        );
        assert!(matches!(
            sums.checked_sums(3).unwrap_err(),
            ConversionError::Length {
                got: 8,
                expected: 12,
                ..
            }
        ));
    }

    #[test]
    fn cached_theta_digest_is_empty_or_32_bytes() {
        let mut m = pb::Prove::default();
        assert_eq!(m.checked_cached_theta_digest().unwrap(), None);
        let d = theta_digest(&[1.0]);
        m.cached_theta_digest = d.to_vec();
        assert_eq!(m.checked_cached_theta_digest().unwrap(), Some(d));
        m.cached_theta_digest.push(0);
        assert_eq!(
            m.checked_cached_theta_digest().unwrap_err().field(),
            "prove.cached_theta_digest"
        );
    }

    #[test]
    fn theta_request_carries_the_digest() {
        let d = theta_digest(&[1.0, 2.0]);
        let m = wire(&pb::ThetaRequest::new(5, &d));
        assert_eq!((m.generation, &m.theta_digest[..]), (5, &d[..]));
    }

    #[test]
    fn refusals_map_to_status_codes() {
        use pb::RefusalReason as R;
        use tonic::Code;
        let table = [
            (R::Unspecified, Code::InvalidArgument),
            (R::DataMismatch, Code::FailedPrecondition),
            (R::VersionMismatch, Code::FailedPrecondition),
            (R::GoldenMismatch, Code::FailedPrecondition),
            (R::RunMismatch, Code::FailedPrecondition),
            (R::Full, Code::ResourceExhausted),
            (R::BadRequest, Code::InvalidArgument),
        ];
        for (reason, code) in table {
            let refusal = wire(&pb::Refusal::new(reason, "because"));
            assert_eq!(refusal.reason(), reason);
            let status = tonic::Status::from(refusal);
            assert_eq!(status.code(), code, "{reason:?}");
        }
        let status = tonic::Status::from(pb::Refusal::new(
            R::DataMismatch,
            "data digest 00 differs from the coordinator's 11",
        ));
        assert_eq!(
            status.message(),
            "REFUSAL_REASON_DATA_MISMATCH: data digest 00 differs from the coordinator's 11"
        );
        // A reason this code does not know reads as unspecified.
        let unknown = pb::Refusal {
            reason: 99,
            message: String::new(),
        };
        assert_eq!(unknown.reason(), R::Unspecified);
    }

    #[test]
    fn envelopes_wrap_every_message() {
        use pb::coordinator_message::Kind as C;
        use pb::worker_message::Kind as W;
        let w = |m: pb::WorkerMessage| wire(&m).kind.unwrap();
        assert!(matches!(w(pb::Prove::default().into()), W::Prove(_)));
        let ready = pb::Ready {
            generation: 2,
            credits: 8,
        };
        assert!(matches!(w(ready.into()), W::Ready(r) if r == ready));
        assert!(matches!(w(pb::Results::new(1, &[]).into()), W::Results(_)));
        assert!(matches!(
            w(pb::ThetaRequest::default().into()),
            W::ThetaRequest(_)
        ));
        assert!(matches!(w(pb::Heartbeat {}.into()), W::Heartbeat(_)));

        let c = |m: pb::CoordinatorMessage| wire(&m).kind.unwrap();
        assert!(matches!(
            c(pb::ProofAccepted {}.into()),
            C::ProofAccepted(_)
        ));
        assert!(matches!(
            c(pb::Generation::default().into()),
            C::Generation(_)
        ));
        let assign = pb::Assign {
            generation: 3,
            first_index: 64,
            count: 16,
        };
        assert!(matches!(c(assign.into()), C::Assign(a) if a == assign));
        let shutdown = pb::Shutdown {
            reason: "golden mismatch".into(),
            refusal: Some(pb::Refusal::new(pb::RefusalReason::GoldenMismatch, "x")),
            finished: false,
        };
        assert!(matches!(c(shutdown.clone().into()), C::Shutdown(s) if s == shutdown));

        let reply = wire(&pb::JoinReply::from(pb::Refusal::new(
            pb::RefusalReason::Full,
            "8 of 8 workers",
        )));
        assert!(matches!(
            reply.outcome,
            Some(pb::join_reply::Outcome::Refused(_))
        ));
        let reply = wire(&pb::JoinReply::from(pb::JoinAccepted {
            worker_id: 7,
            ..Default::default()
        }));
        assert!(matches!(
            reply.outcome,
            Some(pb::join_reply::Outcome::Accepted(pb::JoinAccepted {
                worker_id: 7,
                ..
            }))
        ));
    }
}
