//! The I/O edge under the numeric core: the MNIST files (read, verified against their
//! published digests, downloaded when missing) and the shared noise table cached as a file
//! that every process on a host maps read-only.
//!
//! - [`mnist`]: IDX reader for raw or gzipped files, digest verification, mirror download.
//! - [`noise_file`]: create-once, map-many cache of [`es_core::noise::NoiseTable`].

pub mod mnist;
pub mod noise_file;
