//! The worker's view of a run: the `RunSpec` the coordinator sent, turned into the core's
//! types with the noise source built (the table mapped from the host's cache file), and what
//! each generation derives from it (minibatch, perturbation).

use std::path::Path;
use std::sync::Arc;

use es_core::minibatch::MinibatchBuilder;
use es_core::noise::NoiseSource;
use es_core::train::{Dataset, EsConfig, Perturbation};
use es_data::mnist::Mnist;
use es_kernel::{Batch, NetConfig, ParamLayout};
use es_proto::{NoiseSpec, RunSpec};

use crate::error::WorkerError;

/// A run as the worker evaluates it: everything but θ. Rebuildable at any time from the
/// `RunSpec`, the data and the cache directory.
#[derive(Debug)]
pub(crate) struct RunContext {
    pub run_seed: u64,
    pub net: NetConfig,
    pub es: EsConfig,
    pub noise: NoiseSource,
    pub data: Arc<Mnist>,
    /// The parameter dimension D.
    pub dim: usize,
}

impl RunContext {
    /// The context of `spec` on `data`. Checks that the training split fits the network and
    /// opens the noise table from `cache_dir`, generating its file if missing: this may take
    /// seconds to minutes and does blocking I/O, so call it off the async executor.
    pub fn new(spec: RunSpec, data: Arc<Mnist>, cache_dir: &Path) -> Result<Self, WorkerError> {
        let RunSpec {
            run_seed,
            net,
            es,
            noise,
        } = spec;
        train_split(&data)
            .validate(&net)
            .map_err(WorkerError::Dataset)?;
        let noise = match noise {
            NoiseSpec::Stream => NoiseSource::Stream,
            NoiseSpec::Table { noise_seed, len } => {
                let table = es_data::noise_file::open_or_create(cache_dir, noise_seed, len)
                    .map_err(|source| WorkerError::NoiseFile {
                        dir: cache_dir.to_path_buf(),
                        source,
                    })?;
                NoiseSource::Table(table)
            }
        };
        let dim = ParamLayout::new(&net).len();
        Ok(RunContext {
            run_seed,
            net,
            es,
            noise,
            data,
            dim,
        })
    }

    /// The training split as the core sees it.
    pub fn train(&self) -> Dataset<'_> {
        train_split(&self.data)
    }

    /// The minibatch of generation `t`.
    pub fn minibatch(&self, t: u32) -> Batch {
        let mut batch = Batch::new(self.net.inputs);
        MinibatchBuilder::new().fill(&self.es, self.run_seed, self.train(), t, &mut batch);
        batch
    }

    /// The per-layer σ of generation `t`.
    pub fn perturbation(&self, t: u32) -> Perturbation {
        self.es.perturbation(&self.net, t)
    }
}

fn train_split(data: &Mnist) -> Dataset<'_> {
    Dataset {
        images: &data.train.images,
        labels: &data.train.labels,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use es_core::minibatch::minibatch_indices;
    use es_core::seeds::{Purpose, rng, uniform_below};
    use es_data::mnist::Split;
    use es_proto::pb;

    /// A small network (16 inputs, 2 classes) and a synthetic data set for it whose class
    /// decides which half of the image is bright.
    pub(crate) fn small_run(noise: NoiseSpec) -> (RunSpec, Arc<Mnist>) {
        let net = NetConfig {
            inputs: 16,
            hidden: vec![24, 24],
            outputs: 2,
            ..NetConfig::default()
        };
        let es = EsConfig {
            population: 24,
            batch_size: 32,
            sigma: 0.05,
            ..EsConfig::default()
        };
        let split = |n: usize, seed: u64| {
            let mut r = rng(seed, Purpose::Test, 0, 0);
            let mut images = Vec::new();
            let mut labels = Vec::new();
            for i in 0..n {
                let label = (i % 2) as u8;
                for k in 0..16 {
                    let bright = (k < 8) == (label == 0);
                    let base = if bright { 160 } else { 0 };
                    images.push(base + uniform_below(&mut r, 90) as u8);
                }
                labels.push(label);
            }
            Split { images, labels }
        };
        let data = Mnist {
            train: split(256, 5),
            test: split(64, 6),
            digest: [7; 32],
        };
        let spec = RunSpec {
            run_seed: 42,
            net,
            es,
            noise,
        };
        (spec, Arc::new(data))
    }

    /// The spec as the worker receives it: through the wire types.
    pub(crate) fn over_the_wire(spec: &RunSpec) -> RunSpec {
        RunSpec::try_from(pb::RunSpec::from(spec)).unwrap()
    }

    #[test]
    fn a_table_spec_maps_the_cached_table_and_derives_each_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, data) = small_run(NoiseSpec::Table {
            noise_seed: 3,
            len: 5000,
        });
        let context = RunContext::new(over_the_wire(&spec), data, dir.path()).unwrap();
        assert_eq!(context.run_seed, 42);
        assert_eq!(context.net, spec.net);
        assert_eq!(context.es.population, 24);
        assert_eq!(context.dim, ParamLayout::new(&spec.net).len());
        match &context.noise {
            NoiseSource::Table(table) => {
                assert_eq!((table.noise_seed(), table.len()), (3, 5000));
            }
            NoiseSource::Stream => panic!("expected a table"),
        }
        assert!(
            dir.path()
                .join(es_data::noise_file::file_name(3, 5000))
                .exists()
        );
        let batch = context.minibatch(4);
        assert_eq!(batch.len(), 32);
        let mut indices = Vec::new();
        minibatch_indices(42, 4, 32, 256, &mut indices);
        let mut expected = Batch::new(16);
        expected.fill(
            &context.data.train.images,
            &context.data.train.labels,
            &indices,
        );
        assert_eq!(batch.pixels(), expected.pixels());
        assert_eq!(batch.labels(), expected.labels());
        assert_eq!(context.perturbation(4), spec.es.perturbation(&spec.net, 4));
    }

    #[test]
    fn a_stream_spec_needs_no_cache_directory() {
        let (spec, data) = small_run(NoiseSpec::Stream);
        let context =
            RunContext::new(spec, data, Path::new("/nonexistent/underflow-cache")).unwrap();
        assert!(matches!(context.noise, NoiseSource::Stream));
    }

    #[test]
    fn data_of_another_shape_is_refused_with_the_shapes() {
        let (mut spec, data) = small_run(NoiseSpec::Stream);
        spec.net.inputs = 784;
        let e = RunContext::new(spec, data, Path::new("/nonexistent")).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, WorkerError::Dataset(_)), "{text}");
        assert!(text.contains("4096 pixels for 256 labels"), "{text}");
        assert!(text.contains("784 pixels per label"), "{text}");
    }

    #[test]
    fn an_unwritable_cache_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let (spec, data) = small_run(NoiseSpec::Table {
            noise_seed: 3,
            len: 5000,
        });
        let e = RunContext::new(spec, data, &file).unwrap_err();
        assert!(matches!(e, WorkerError::NoiseFile { .. }), "{e}");
        assert!(e.to_string().contains("not-a-dir"), "{e}");
    }
}
