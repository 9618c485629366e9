//! The stateless Underflow worker: joins a coordinator, proves that its data and arithmetic
//! match (the golden task), then evaluates the perturbation indices it is assigned and sends
//! back their fitnesses, for as long as the run lasts.
//!
//! Everything a worker computes follows from what the coordinator sends (the `RunSpec`, θ of
//! each generation) and its MNIST files; it never sends or receives a noise vector, and its
//! caches (the noise table mapped from the host's cache file, the run's context, the last θ)
//! can be dropped and rebuilt at any time. See `proto/es/v1/es.proto` for the protocol.
//!
//! - [`run`]: the worker's life, until the run is over, `shutdown` resolves or a final error.
//! - [`WorkerOptions`], [`DataSource`], [`Backoff`], [`ClientTls`]: what a worker is told at
//!   start.
//! - [`WorkerExit`], [`WorkerError`]: how it ended.
//! - `session` (private): join, prove, serve the `Work` stream, reconnect.
//! - `compute` (private): the dedicated compute thread that runs every forward pass, so the
//!   async executor never does.
//! - `context` (private): a `RunSpec` turned into the core's types, with the noise source.
//! - [`delegate`]: the seam a hub plugs into, computing nothing itself but handing each
//!   chunk and sums request on to workers of its own.
//! - `relay` (private): with [`RelayOptions`], the `ThetaRelay` service that hands the θ this
//!   worker received on to others of the run, and the fetch from another worker's, so that
//!   the coordinator sends θ's bytes to a few workers per generation instead of to all.
//!
//! The `worker` binary is a thin CLI over [`run`].
//!
//! ```no_run
//! # async fn example(mnist: std::sync::Arc<es_data::mnist::Mnist>) -> Result<(), es_worker::WorkerError> {
//! use es_worker::{DataSource, WorkerExit, WorkerOptions};
//! let mut options = WorkerOptions::new("http://127.0.0.1:50051", DataSource::Loaded(mnist));
//! options.threads = 2;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! let exit = es_worker::run(options, shutdown).await?;
//! assert!(matches!(exit, WorkerExit::Finished | WorkerExit::Shutdown));
//! # Ok(()) }
//! ```

mod compute;
mod context;
pub mod delegate;
mod error;
mod options;
mod relay;
#[cfg(test)]
mod scripted_tests;
mod session;

pub use error::WorkerError;
pub use options::{AUTHORIZATION_KEY, Backoff, ClientTls, DataSource, WorkerOptions, default_name};
pub use relay::{RELAY_WAIT, RelayOptions};
pub use session::{WorkerExit, run};
