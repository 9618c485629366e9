//! The float-underflow network of Underflow: an MLP with no activation functions whose
//! nonlinearity is the rounding of f32 values near the smallest normal float.
//!
//! - [`config`]: the network's shape, scale exponents and arithmetic mode; the flat parameter
//!   layout (also the checkpoint and export layout).
//! - [`reference`]: the scalar forward pass that *is* the specification.
//! - [`float_env`]: the one audited module that sets flush-to-zero around kernel calls.
//! - [`kernels`]: the sparse accumulate kernel in portable Rust, AVX2 and AVX-512, dispatched
//!   at run time and bit-identical to the reference.
//! - [`forward`]: batches and the fast forward pass built on the kernels.
//! - [`loss`]: fitness (minus softmax cross-entropy) and accuracy.
//!
//! Plain synchronous Rust: no I/O, no threads, no allocation in the hot loop.

pub mod config;
pub mod float_env;
pub mod forward;
pub mod kernels;
pub mod loss;
pub mod reference;
pub mod sparse;

pub use config::{Arithmetic, ConfigError, NetConfig, ParamLayout};
pub use forward::{Batch, Fill, Forward, GroupCopies, NeuronGroup, Prefix, layer_range};
pub use kernels::Kernel;
pub use loss::Evaluation;
