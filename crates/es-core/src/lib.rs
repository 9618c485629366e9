//! The evolution-strategies core of Underflow: plain synchronous Rust, no async, no I/O.
//!
//! - [`seeds`]: every random choice of a run derived from `run_seed` through ChaCha, at
//!   documented stream positions.
//! - [`init`]: the initial parameters θ₀ from `run_seed`.
//! - [`noise`]: the bit-reproducible standard normal sampler, the shared noise table and the
//!   stream noise source.
//! - [`strategy`]: mirrored sampling, centered ranks, the gradient estimate.
//! - [`minibatch`]: a generation's training images, drawn and (optionally) shifted.
//! - [`optimizer`]: Adam with L2 and the schedules.
//! - [`train`]: the single-process training loop on all cores.

pub mod init;
pub mod minibatch;
pub mod noise;
pub mod optimizer;
pub mod seeds;
pub mod strategy;
pub mod train;
