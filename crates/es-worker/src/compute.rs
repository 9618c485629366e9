//! The compute thread: one dedicated OS thread per worker that owns the evaluators and runs
//! every forward pass (golden task and perturbation chunks), so the async executor never does.
//!
//! Jobs arrive over a std channel and are processed in arrival order; replies go back over
//! tokio channels, which a std thread can send on without blocking. Each job carries the
//! *ticket* of the generation announcement it belongs to; the session bumps the current
//! ticket when a new `Generation` arrives or its stream ends, and the thread skips every job
//! whose ticket is no longer current, so abandoned chunks cost nothing.
//!
//! A load-testing worker ([`Fitnesses::Fake`]) still computes the golden proof honestly but
//! answers chunks with [`fake_pair`], a pure function of (generation, index), without
//! evaluating: one process can then drive a coordinator with hundreds of connections. It
//! answers a share of the update ([`SumsJob`]) with [`fake_sums`] the same way.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;

use es_core::train::{EvalPool, PairResult, Perturbation, golden_task, noise_sums};
use es_kernel::{Batch, Evaluation, Kernel};
use es_proto::{GoldenEval, GoldenProof};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::context::RunContext;
use crate::delegate::{DelegatedWork, SumsRequest};
use crate::error::WorkerError;

/// A ticket that no job carries: set when no generation is current.
pub const NO_TICKET: u64 = 0;

/// One chunk of perturbation indices of one generation, with everything needed to evaluate it.
#[derive(Clone, Debug)]
pub struct ChunkJob {
    /// The generation announcement this chunk belongs to (see the module docs).
    pub ticket: u64,
    pub generation: u32,
    pub theta: Arc<Vec<f32>>,
    pub batch: Arc<Batch>,
    pub perturbation: Arc<Perturbation>,
    pub indices: Range<u32>,
}

/// What became of a [`ChunkJob`].
#[derive(Debug)]
pub struct ChunkDone {
    pub ticket: u64,
    pub generation: u32,
    pub indices: Range<u32>,
    pub outcome: ChunkOutcome,
}

/// What became of a job.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Computed: a chunk's pair results in index order, or one sum per parameter of a range.
    Done(T),
    /// Not computed: its generation was no longer current when its turn came.
    Skipped,
    /// The computation failed (or panicked); the thread has stopped.
    Failed(String),
}

pub type ChunkOutcome = Outcome<Vec<PairResult>>;
pub type SumsOutcome = Outcome<Vec<f32>>;

/// One range of a generation's noise sums (`es_core::train::noise_sums`), the worker's share
/// of the update.
#[derive(Clone, Debug)]
pub(crate) struct SumsJob {
    /// The generation announcement the sums belong to (see the module docs).
    pub ticket: u64,
    pub generation: u32,
    pub weights: Arc<Vec<f32>>,
    pub range: Range<usize>,
}

/// What became of a [`SumsJob`].
#[derive(Debug)]
pub struct SumsDone {
    pub ticket: u64,
    pub generation: u32,
    pub range: Range<usize>,
    pub outcome: SumsOutcome,
}

enum Job {
    Sums {
        job: SumsJob,
        reply: tokio_mpsc::UnboundedSender<SumsDone>,
    },
    Golden {
        generation: u32,
        index: u32,
        reply: oneshot::Sender<Result<GoldenProof, WorkerError>>,
    },
    Chunk {
        job: ChunkJob,
        reply: tokio_mpsc::UnboundedSender<ChunkDone>,
    },
}

/// How the thread answers chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fitnesses {
    /// Evaluates every perturbation on the evaluator threads.
    Evaluated,
    /// Load testing: [`fake_pair`] for every index, nothing evaluated (and no evaluators
    /// built, so a connection costs no evaluation buffers).
    Fake,
}

/// The fake result of `index` in `generation` on a minibatch of `samples`: a pure function of
/// its arguments, so a repeated or reassigned index gets the same bits and the coordinator's
/// duplicate cross-check stays quiet. Fitnesses are distinct and finite, in (−3, −2] like a
/// 10-class cross-entropy, so the ranks (and the update's work) are those of a real
/// generation.
pub(crate) fn fake_pair(generation: u32, index: u32, samples: usize) -> PairResult {
    let key = (u64::from(generation) << 32) | u64::from(index);
    let fake = |salt: u64| {
        let h = splitmix64(key ^ salt);
        // 53 random bits → a uniform f64 in [0, 1).
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        Evaluation {
            fitness: -2.0 - u,
            correct: (h % (samples as u64 + 1)) as usize,
            samples,
        }
    };
    PairResult {
        index,
        plus: fake(0x0123_4567_89ab_cdef),
        minus: fake(0xfedc_ba98_7654_3210),
    }
}

/// The fake noise sums of `range` in `generation`: a pure function of its arguments, finite
/// and of the size of real sums, so a load test's update runs on values like a real one.
pub(crate) fn fake_sums(generation: u32, range: Range<usize>) -> Vec<f32> {
    range
        .map(|j| {
            let h = splitmix64((u64::from(generation) << 40) ^ j as u64);
            // 24 random bits → a uniform value in [-1, 1).
            (h >> 40) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// SplitMix64's output function: a cheap, well-mixed hash of one word.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The handle of a compute thread. Dropping it lets the thread finish its current job, skip
/// the queued ones and exit; it does not wait for it (that would block the executor).
#[derive(Debug)]
pub(crate) struct ComputeThread {
    jobs: mpsc::Sender<Job>,
    current: Arc<AtomicU64>,
}

impl ComputeThread {
    /// Builds `threads` evaluators for the context's network (none for fake fitnesses) and
    /// starts the thread.
    pub fn spawn(
        context: Arc<RunContext>,
        kernel: Kernel,
        threads: usize,
        fitnesses: Fitnesses,
    ) -> Result<ComputeThread, WorkerError> {
        let pool = match fitnesses {
            Fitnesses::Evaluated => Some(
                EvalPool::new(&context.net, kernel, threads).map_err(WorkerError::Evaluators)?,
            ),
            Fitnesses::Fake => None,
        };
        let (jobs, receiver) = mpsc::channel();
        let current = Arc::new(AtomicU64::new(NO_TICKET));
        let state = Arc::clone(&current);
        thread::Builder::new()
            .name("es-worker-compute".into())
            .spawn(move || compute_loop(&context, pool, kernel, &receiver, &state))
            .map_err(|e| WorkerError::Compute(format!("cannot start the thread: {e}")))?;
        Ok(ComputeThread { jobs, current })
    }

    /// Makes `ticket` the current one: queued jobs of any other ticket will be skipped.
    pub fn set_current(&self, ticket: u64) {
        self.current.store(ticket, Ordering::SeqCst);
    }

    /// Evaluates the golden task of `generation` and `index` (see `es_proto::GoldenProof`).
    pub async fn golden(&self, generation: u32, index: u32) -> Result<GoldenProof, WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Golden {
            generation,
            index,
            reply,
        })?;
        answer.await.map_err(|_| stopped())?
    }

    /// Queues `job`; its [`ChunkDone`] is sent on `reply`.
    pub fn submit(
        &self,
        job: ChunkJob,
        reply: &tokio_mpsc::UnboundedSender<ChunkDone>,
    ) -> Result<(), WorkerError> {
        self.send(Job::Chunk {
            job,
            reply: reply.clone(),
        })
    }

    /// Queues `job`; its [`SumsDone`] is sent on `reply`.
    pub fn submit_sums(
        &self,
        job: SumsJob,
        reply: &tokio_mpsc::UnboundedSender<SumsDone>,
    ) -> Result<(), WorkerError> {
        self.send(Job::Sums {
            job,
            reply: reply.clone(),
        })
    }

    fn send(&self, job: Job) -> Result<(), WorkerError> {
        self.jobs.send(job).map_err(|_| stopped())
    }
}

/// What computes a worker's jobs: its own compute thread, or work it delegates (a hub's
/// workers, see [`crate::delegate`]).
#[derive(Debug)]
pub(crate) enum Backend {
    Local(ComputeThread),
    Delegated {
        work: Box<dyn DelegatedWork>,
        current: Arc<AtomicU64>,
    },
}

impl Backend {
    fn current(&self) -> &Arc<AtomicU64> {
        match self {
            Backend::Local(thread) => &thread.current,
            Backend::Delegated { current, .. } => current,
        }
    }

    /// Makes `ticket` the current one: queued jobs of any other ticket will be skipped.
    pub fn set_current(&self, ticket: u64) {
        self.current().store(ticket, Ordering::SeqCst);
    }

    /// A handle that resets the current ticket to [`NO_TICKET`] when dropped (at the end of a
    /// stream, however it ends).
    pub fn ticket_guard(&self) -> TicketGuard {
        TicketGuard(Arc::clone(self.current()))
    }

    /// The golden proof of (`generation`, `index`).
    pub async fn golden(&self, generation: u32, index: u32) -> Result<GoldenProof, WorkerError> {
        match self {
            Backend::Local(thread) => thread.golden(generation, index).await,
            Backend::Delegated { work, .. } => work.golden(generation, index).await,
        }
    }

    /// The run is over: delegated work tells whoever it handed work on to.
    pub async fn run_finished(&self) {
        if let Backend::Delegated { work, .. } = self {
            work.run_finished().await;
        }
    }

    /// Queues `job`; its [`ChunkDone`] is sent on `reply`.
    pub fn submit(
        &self,
        job: ChunkJob,
        reply: &tokio_mpsc::UnboundedSender<ChunkDone>,
    ) -> Result<(), WorkerError> {
        match self {
            Backend::Local(thread) => thread.submit(job, reply),
            Backend::Delegated { work, .. } => work.submit(job, reply),
        }
    }

    /// Queues the request's ranges; one [`SumsDone`] per range is sent on `reply`.
    pub fn submit_sums(
        &self,
        request: SumsRequest,
        reply: &tokio_mpsc::UnboundedSender<SumsDone>,
    ) -> Result<(), WorkerError> {
        match self {
            Backend::Local(thread) => {
                for range in request.ranges {
                    let job = SumsJob {
                        ticket: request.ticket,
                        generation: request.generation,
                        weights: Arc::clone(&request.weights),
                        range,
                    };
                    thread.submit_sums(job, reply)?;
                }
                Ok(())
            }
            Backend::Delegated { work, .. } => work.submit_sums(request, reply),
        }
    }
}

impl Drop for ComputeThread {
    fn drop(&mut self) {
        // Queued jobs are skipped; the closed channel then ends the loop.
        self.set_current(NO_TICKET);
    }
}

/// Resets the compute thread's current ticket when dropped.
#[derive(Debug)]
pub(crate) struct TicketGuard(Arc<AtomicU64>);

impl Drop for TicketGuard {
    fn drop(&mut self) {
        self.0.store(NO_TICKET, Ordering::SeqCst);
    }
}

fn stopped() -> WorkerError {
    WorkerError::Compute("the thread stopped (an earlier job failed)".into())
}

/// `pool` is `None` for fake fitnesses.
fn compute_loop(
    context: &RunContext,
    mut pool: Option<EvalPool>,
    kernel: Kernel,
    jobs: &mpsc::Receiver<Job>,
    current: &AtomicU64,
) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Sums { job, reply } => {
                let (outcome, failed) = run_current(current, job.ticket, || match &pool {
                    Some(pool) => sum(context, pool.threads(), &job),
                    None => Outcome::Done(fake_sums(job.generation, job.range.clone())),
                });
                // The session may be gone; then nobody wants the sums.
                let _ = reply.send(SumsDone {
                    ticket: job.ticket,
                    generation: job.generation,
                    range: job.range,
                    outcome,
                });
                if failed {
                    return;
                }
            }
            Job::Golden {
                generation,
                index,
                reply,
            } => {
                let proof = catch_unwind(AssertUnwindSafe(|| {
                    golden(context, kernel, generation, index)
                }))
                .unwrap_or_else(|panic| Err(WorkerError::Compute(panic_message(&panic))));
                let failed = proof.is_err();
                let _ = reply.send(proof);
                if failed {
                    return;
                }
            }
            Job::Chunk { job, reply } => {
                let (outcome, failed) = run_current(current, job.ticket, || match &mut pool {
                    Some(pool) => evaluate(context, pool, &job),
                    None => Outcome::Done(
                        job.indices
                            .clone()
                            .map(|i| fake_pair(job.generation, i, job.batch.len()))
                            .collect(),
                    ),
                });
                // The session may be gone; then nobody wants the result.
                let _ = reply.send(ChunkDone {
                    ticket: job.ticket,
                    generation: job.generation,
                    indices: job.indices,
                    outcome,
                });
                if failed {
                    // The pool's state after a panic is unknown: stop rather than go on.
                    return;
                }
            }
        }
    }
}

/// Computes a job of generation announcement `ticket` unless a newer announcement has made
/// it stale (then it is skipped); also says whether it failed, after which the compute
/// thread stops.
fn run_current<T>(
    current: &AtomicU64,
    ticket: u64,
    compute: impl FnOnce() -> Outcome<T>,
) -> (Outcome<T>, bool) {
    let outcome = if current.load(Ordering::SeqCst) != ticket {
        Outcome::Skipped
    } else {
        compute()
    };
    let failed = matches!(outcome, Outcome::Failed(_));
    (outcome, failed)
}

fn golden(
    context: &RunContext,
    kernel: Kernel,
    generation: u32,
    index: u32,
) -> Result<GoldenProof, WorkerError> {
    let [center, plus, minus] = golden_task(
        &context.net,
        &context.es,
        context.run_seed,
        &context.noise,
        context.train(),
        generation,
        index,
        kernel,
    )
    .map_err(WorkerError::Golden)?;
    let proof = |run: &es_core::train::GoldenRun| GoldenEval::new(&run.evaluation, &run.logits);
    Ok(GoldenProof {
        center: proof(&center),
        plus: proof(&plus),
        minus: proof(&minus),
    })
}

fn evaluate(context: &RunContext, pool: &mut EvalPool, job: &ChunkJob) -> ChunkOutcome {
    let what = || {
        format!(
            "evaluating indices {:?} of generation {}",
            job.indices, job.generation
        )
    };
    guarded(what, || {
        pool.evaluate(
            &job.theta,
            &context.noise,
            context.run_seed,
            job.generation,
            &job.perturbation,
            &job.batch,
            job.indices.clone(),
        )
    })
}

fn sum(context: &RunContext, threads: usize, job: &SumsJob) -> SumsOutcome {
    let what = || {
        format!(
            "summing the noise of parameters {:?} of generation {}",
            job.range, job.generation
        )
    };
    guarded(what, || {
        noise_sums(
            &context.net,
            &context.es,
            &context.noise,
            context.run_seed,
            job.generation,
            &job.weights,
            job.range.clone(),
            threads,
        )
    })
}

/// Runs `compute`; an error or a panic becomes a failure that says `what` was computed.
fn guarded<T, E: std::fmt::Display>(
    what: impl Fn() -> String,
    compute: impl FnOnce() -> Result<T, E>,
) -> Outcome<T> {
    match catch_unwind(AssertUnwindSafe(compute)) {
        Ok(Ok(value)) => Outcome::Done(value),
        Ok(Err(e)) => Outcome::Failed(format!("{}: {e}", what())),
        Err(panic) => Outcome::Failed(format!("{} panicked: {}", what(), panic_message(&panic))),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::tests::small_run;
    use es_core::init::init_params;
    use es_proto::NoiseSpec;
    use std::path::Path;

    fn context(noise: NoiseSpec, dir: &Path) -> Arc<RunContext> {
        let (spec, data) = small_run(noise);
        Arc::new(RunContext::new(spec, data, dir).unwrap())
    }

    fn job(context: &RunContext, ticket: u64, generation: u32, indices: Range<u32>) -> ChunkJob {
        let mut theta = init_params(&context.net, context.run_seed);
        theta[3] += 0.25;
        ChunkJob {
            ticket,
            generation,
            theta: Arc::new(theta),
            batch: Arc::new(context.minibatch(generation)),
            perturbation: Arc::new(context.perturbation(generation)),
            indices,
        }
    }

    #[tokio::test]
    async fn a_chunk_equals_the_pool_evaluating_it_directly() {
        let dir = tempfile::tempdir().unwrap();
        for noise in [
            NoiseSpec::Stream,
            NoiseSpec::Table {
                noise_seed: 9,
                len: 4000,
            },
        ] {
            let context = context(noise, dir.path());
            let compute = ComputeThread::spawn(
                Arc::clone(&context),
                Kernel::Portable,
                3,
                Fitnesses::Evaluated,
            )
            .unwrap();
            let (tx, mut rx) = tokio_mpsc::unbounded_channel();
            let job = job(&context, 5, 2, 3..17);
            compute.set_current(5);
            compute.submit(job.clone(), &tx).unwrap();
            let done = rx.recv().await.unwrap();
            assert_eq!((done.ticket, done.generation, done.indices), (5, 2, 3..17));
            let ChunkOutcome::Done(pairs) = done.outcome else {
                panic!("expected results, got {:?}", done.outcome);
            };
            let mut pool = EvalPool::new(&context.net, Kernel::Portable, 1).unwrap();
            let expected = pool
                .evaluate(
                    &job.theta,
                    &context.noise,
                    context.run_seed,
                    2,
                    &job.perturbation,
                    &job.batch,
                    3..17,
                )
                .unwrap();
            assert_eq!(pairs.len(), 14);
            for (got, want) in pairs.iter().zip(&expected) {
                assert_eq!(got.index, want.index);
                assert_eq!(got.plus.fitness.to_bits(), want.plus.fitness.to_bits());
                assert_eq!(got.minus.fitness.to_bits(), want.minus.fitness.to_bits());
                assert_eq!(got.plus.correct, want.plus.correct);
                assert_eq!(got.minus.correct, want.minus.correct);
            }
        }
    }

    #[tokio::test]
    async fn jobs_of_a_stale_ticket_are_skipped_in_arrival_order() {
        let context = context(NoiseSpec::Stream, Path::new("/nonexistent"));
        let compute = ComputeThread::spawn(
            Arc::clone(&context),
            Kernel::Portable,
            2,
            Fitnesses::Evaluated,
        )
        .unwrap();
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        compute.set_current(2);
        compute.submit(job(&context, 1, 0, 0..4), &tx).unwrap();
        compute.submit(job(&context, 2, 1, 4..6), &tx).unwrap();
        compute.submit(job(&context, 1, 0, 6..8), &tx).unwrap();
        let outcomes: Vec<ChunkDone> = [
            rx.recv().await.unwrap(),
            rx.recv().await.unwrap(),
            rx.recv().await.unwrap(),
        ]
        .into();
        assert_eq!(outcomes[0].indices, 0..4);
        assert!(matches!(outcomes[0].outcome, ChunkOutcome::Skipped));
        assert_eq!(outcomes[1].indices, 4..6);
        assert!(matches!(&outcomes[1].outcome, ChunkOutcome::Done(p) if p.len() == 2));
        assert_eq!(outcomes[2].indices, 6..8);
        assert!(matches!(outcomes[2].outcome, ChunkOutcome::Skipped));

        // Once the stream's guard is gone nothing is current.
        let guard = TicketGuard(Arc::clone(&compute.current));
        drop(guard);
        compute.submit(job(&context, 2, 1, 0..1), &tx).unwrap();
        assert!(matches!(
            rx.recv().await.unwrap().outcome,
            ChunkOutcome::Skipped
        ));
    }

    /// The golden proof of (`generation`, `index`) computed directly from the golden task.
    fn expected_proof(context: &RunContext, generation: u32, index: u32) -> GoldenProof {
        let [center, plus, minus] = golden_task(
            &context.net,
            &context.es,
            context.run_seed,
            &context.noise,
            context.train(),
            generation,
            index,
            Kernel::Portable,
        )
        .unwrap()
        .map(|run| GoldenEval::new(&run.evaluation, &run.logits));
        GoldenProof {
            center,
            plus,
            minus,
        }
    }

    #[tokio::test]
    async fn the_golden_proof_matches_the_golden_task() {
        let context = context(NoiseSpec::Stream, Path::new("/nonexistent"));
        let compute = ComputeThread::spawn(
            Arc::clone(&context),
            Kernel::Portable,
            2,
            Fitnesses::Evaluated,
        )
        .unwrap();
        let proof = compute.golden(3, 7).await.unwrap();
        assert_eq!(proof, expected_proof(&context, 3, 7));
        assert_ne!(proof.plus, proof.center);
    }

    #[tokio::test]
    async fn a_failing_job_is_reported_and_stops_the_thread() {
        let context = context(NoiseSpec::Stream, Path::new("/nonexistent"));
        let compute = ComputeThread::spawn(
            Arc::clone(&context),
            Kernel::Portable,
            1,
            Fitnesses::Evaluated,
        )
        .unwrap();
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        let mut bad = job(&context, 1, 0, 0..1);
        bad.theta = Arc::new(vec![0.0; 3]);
        compute.set_current(1);
        compute.submit(bad, &tx).unwrap();
        let done = rx.recv().await.unwrap();
        let ChunkOutcome::Failed(message) = done.outcome else {
            panic!("expected a failure, got {:?}", done.outcome);
        };
        assert!(message.contains("panicked"), "{message}");
        let e = compute.golden(0, 0).await.unwrap_err();
        assert!(e.to_string().contains("the thread stopped"), "{e}");
    }

    #[tokio::test]
    async fn noise_sums_equal_the_core_computing_them_and_stale_ones_are_skipped() {
        let context = context(NoiseSpec::Stream, Path::new("/nonexistent"));
        let compute = ComputeThread::spawn(
            Arc::clone(&context),
            Kernel::Portable,
            2,
            Fitnesses::Evaluated,
        )
        .unwrap();
        let population = context.es.population;
        let weights: Vec<f32> = (0..population)
            .map(|i| (i as f32 - 3.5) / population as f32)
            .collect();
        let range = 10..context.dim - 7;
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        compute.set_current(4);
        let job = |ticket| SumsJob {
            ticket,
            generation: 2,
            weights: Arc::new(weights.clone()),
            range: range.clone(),
        };
        compute.submit_sums(job(4), &tx).unwrap();
        let done = rx.recv().await.unwrap();
        assert_eq!(
            (done.ticket, done.generation, done.range.clone()),
            (4, 2, range.clone())
        );
        let SumsOutcome::Done(sums) = done.outcome else {
            panic!("expected sums, got {:?}", done.outcome);
        };
        let want = noise_sums(
            &context.net,
            &context.es,
            &context.noise,
            context.run_seed,
            2,
            &weights,
            range.clone(),
            1,
        )
        .unwrap();
        assert!(
            sums.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(sums.len(), range.len());
        compute.submit_sums(job(3), &tx).unwrap();
        assert!(matches!(
            rx.recv().await.unwrap().outcome,
            SumsOutcome::Skipped
        ));
        // Weights of the wrong length fail with the core's message, and stop the thread.
        let mut bad = job(4);
        bad.weights = Arc::new(vec![0.5]);
        compute.submit_sums(bad, &tx).unwrap();
        let SumsOutcome::Failed(message) = rx.recv().await.unwrap().outcome else {
            panic!("expected a failure");
        };
        assert!(
            message.contains(&format!("1 fitness pairs for population {population}")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn fake_sums_answer_without_reading_noise_and_repeat_bit_for_bit() {
        let context = context(NoiseSpec::Stream, Path::new("/nonexistent"));
        let compute =
            ComputeThread::spawn(Arc::clone(&context), Kernel::Portable, 1, Fitnesses::Fake)
                .unwrap();
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        compute.set_current(1);
        // Weights of the wrong length: summing for real would fail.
        let job = SumsJob {
            ticket: 1,
            generation: 5,
            weights: Arc::new(vec![]),
            range: 3..40,
        };
        compute.submit_sums(job, &tx).unwrap();
        let SumsOutcome::Done(sums) = rx.recv().await.unwrap().outcome else {
            panic!("expected fake sums");
        };
        assert_eq!(sums, fake_sums(5, 3..40));
        assert!(sums.iter().all(|v| v.is_finite() && v.abs() <= 1.0));
        assert_ne!(sums, fake_sums(6, 3..40), "another generation, other sums");
        assert_eq!(
            &fake_sums(5, 0..40)[3..],
            &sums[..],
            "a value depends on its index only"
        );
    }

    #[tokio::test]
    async fn fake_fitnesses_answer_without_evaluating_and_repeat_bit_for_bit() {
        let context = context(NoiseSpec::Stream, Path::new("/nonexistent"));
        let compute =
            ComputeThread::spawn(Arc::clone(&context), Kernel::Portable, 1, Fitnesses::Fake)
                .unwrap();
        // The golden proof is still the real one.
        assert_eq!(
            compute.golden(0, 0).await.unwrap(),
            expected_proof(&context, 0, 0)
        );
        // A θ no network could use: a chunk that evaluated would fail.
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        let mut fake = job(&context, 1, 6, 2..12);
        fake.theta = Arc::new(vec![0.0; 3]);
        compute.set_current(1);
        compute.submit(fake, &tx).unwrap();
        let done = rx.recv().await.unwrap();
        let ChunkOutcome::Done(pairs) = done.outcome else {
            panic!("expected fake results, got {:?}", done.outcome);
        };
        let samples = context.es.batch_size;
        assert_eq!(pairs.len(), 10);
        let mut fitnesses = Vec::new();
        for (pair, index) in pairs.iter().zip(2..) {
            let again = fake_pair(6, index, samples);
            assert_eq!(pair.index, index);
            assert_eq!(pair.plus.fitness.to_bits(), again.plus.fitness.to_bits());
            assert_eq!(pair.minus.fitness.to_bits(), again.minus.fitness.to_bits());
            assert_eq!(
                (pair.plus.correct, pair.minus.correct),
                (again.plus.correct, again.minus.correct)
            );
            for e in [pair.plus, pair.minus] {
                assert!(e.fitness > -3.0 && e.fitness <= -2.0, "{}", e.fitness);
                assert!(e.correct <= samples && e.samples == samples);
                fitnesses.push(e.fitness.to_bits());
            }
        }
        // Distinct within and across generations: ranks never tie.
        fitnesses.push(fake_pair(7, 2, samples).plus.fitness.to_bits());
        let count = fitnesses.len();
        fitnesses.sort_unstable();
        fitnesses.dedup();
        assert_eq!(fitnesses.len(), count);
    }
}
