//! Work a worker hands on instead of computing it: the seam a hub plugs into.
//!
//! A hub is a worker to its coordinator and a coordinator to workers of its own, so that the
//! root coordinator serves a few streams instead of thousands. Everything a worker does
//! upstream (join, prove the golden task, fetch θ, turn `Assign`s into chunks and chunks into
//! `Results` with their credits, answer `SumNoise`) stays the same; only the computing is
//! delegated: with [`crate::WorkerOptions::delegate`] set, the session starts a
//! [`DelegatedWork`] for each run instead of its compute thread and gives it the same jobs.
//!
//! The contract is the compute thread's: every submitted chunk and sums request gets exactly
//! one answer on its reply channel ([`Outcome::Skipped`] once its ticket is no longer current,
//! or never if the worker is gone), with the same bits the worker would have computed.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use es_core::noise::NoiseSource;
use es_data::mnist::Mnist;
use es_kernel::Kernel;
use es_proto::{GoldenProof, RunSpec};
use tokio::sync::mpsc::UnboundedSender;

pub use crate::compute::{
    ChunkDone, ChunkJob, ChunkOutcome, NO_TICKET, Outcome, SumsDone, SumsOutcome,
};
use crate::error::WorkerError;

/// A run whose work is delegated: what the upstream coordinator said, and the worker's own
/// view of it.
#[derive(Debug)]
pub struct DelegatedRun {
    /// The upstream coordinator's id of the run.
    pub run_id: String,
    pub spec: RunSpec,
    /// The run's noise source (the table mapped from the host's cache file).
    pub noise: NoiseSource,
    pub data: Arc<Mnist>,
    /// The kernel the worker was told to evaluate with.
    pub kernel: Kernel,
    /// The ticket of the upstream generation announcement now current ([`NO_TICKET`]
    /// between streams): jobs of any other ticket are abandoned.
    pub current: Arc<AtomicU64>,
}

/// One `SumNoise` request of the upstream coordinator: its weights and every range asked,
/// together, so that a hub can plan them over its workers at once.
#[derive(Clone, Debug)]
pub struct SumsRequest {
    pub ticket: u64,
    pub generation: u32,
    pub weights: Arc<Vec<f32>>,
    pub ranges: Vec<Range<usize>>,
}

/// Starts delegated work for each run the worker joins.
#[tonic::async_trait]
pub trait Delegate: Send + Sync + Debug {
    /// Starts serving `run` (e.g. a hub's own coordinator service). Called when the worker
    /// joins a run it holds no caches for; the returned work is dropped when the worker
    /// leaves the run.
    async fn start(&self, run: DelegatedRun) -> Result<Box<dyn DelegatedWork>, WorkerError>;
}

/// The delegated work of one run.
#[tonic::async_trait]
pub trait DelegatedWork: Send + Sync + Debug {
    /// The golden proof of (`generation`, `index`), for the upstream `Prove`.
    async fn golden(&self, generation: u32, index: u32) -> Result<GoldenProof, WorkerError>;
    /// Has `job`'s indices evaluated; their [`ChunkDone`] goes to `reply`.
    fn submit(&self, job: ChunkJob, reply: &UnboundedSender<ChunkDone>) -> Result<(), WorkerError>;
    /// Has the request's ranges summed; one [`SumsDone`] per range goes to `reply`.
    fn submit_sums(
        &self,
        request: SumsRequest,
        reply: &UnboundedSender<SumsDone>,
    ) -> Result<(), WorkerError>;
    /// The upstream coordinator said the run is over (before the worker exits).
    async fn run_finished(&self) {}
}
