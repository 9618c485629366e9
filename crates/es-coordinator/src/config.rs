//! A run's configuration: defaults, an optional TOML file, then command-line flags (the CLI
//! wins), resolved into the core's typed configs.

use std::path::PathBuf;
use std::str::FromStr;

use es_core::optimizer::Schedule;
use es_core::train::EsConfig;
use es_kernel::{Arithmetic, NetConfig};
use serde::{Deserialize, Serialize};

/// Where perturbations come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NoiseKind {
    /// A shared table of standard normals cached as a file (the OpenAI ES scheme).
    #[default]
    Table,
    /// Each perturbation regenerated from its own ChaCha stream; no table.
    Stream,
}

/// Everything that defines a run. Serialised into the run directory as `config.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Generations to run (the run also stops at `time_limit_secs`).
    pub generations: u32,
    /// Wall-clock budget in seconds; 0 means none.
    pub time_limit_secs: f64,
    pub population: usize,
    /// Training images per generation (at generation 0, with a batch schedule).
    pub batch: usize,
    /// "constant", "linear:FRACTION" or "cosine:FRACTION": the batch goes from `batch` to
    /// `batch · FRACTION` over the run's generations (e.g. "linear:4": from 100 to 400).
    pub batch_schedule: String,
    pub sigma: f32,
    /// "constant", "linear:FRACTION", "cosine:FRACTION" (over the run's generations) or
    /// "step:FACTOR:EVERY".
    pub sigma_schedule: String,
    pub lr: f32,
    pub lr_schedule: String,
    pub l2: f32,
    /// Per-layer multipliers of σ (empty: all 1).
    pub sigma_multipliers: Vec<f32>,
    /// Per-layer multipliers of Adam's step (empty: all 1).
    pub lr_multipliers: Vec<f32>,
    /// Mirrored pairs per layer, summing to `population` (empty: every pair perturbs every
    /// layer; see `EsConfig::layer_populations`).
    pub layer_populations: Vec<usize>,
    /// Per layer, the groups its neurons are split into (empty: all 1; needs layer
    /// populations; see `EsConfig::neuron_groups`).
    pub neuron_groups: Vec<usize>,
    /// The largest shift, in pixels, of a training image in a minibatch (0: none; see
    /// `EsConfig::image_shift`).
    pub image_shift: usize,
    /// Decay of the running average of θ the run reports, evaluates and exports (0: none;
    /// see `EsConfig::average_decay`).
    pub average_decay: f32,
    pub mode: String,
    pub hidden: Vec<usize>,
    pub scale_exponents: Vec<i32>,
    /// Scale exponent of the logits: a positive value is a softmax temperature of 2^e.
    pub output_exponent: i32,
    pub init_multipliers: Vec<f32>,
    pub noise: NoiseKind,
    pub noise_seed: u64,
    pub noise_table_len: usize,
    /// Evaluate test accuracy on the full test set every K generations (and at the end);
    /// 0 only at the end.
    pub eval_every: u32,
    /// Write a checkpoint every K generations (and when stopped by a signal); 0 never.
    /// Operational only: it does not change θ, so a resumed run may set it anew.
    pub checkpoint_every: u32,
}

/// The base every config file is read onto, and what library callers and tests build on: the
/// first release's settings (P 256 full-length perturbations, B 100, no augmentation, no
/// averaging). A config file keeps the meaning it had when it was written, so a key it leaves
/// out must mean what it meant then; the coordinator's fresh runs start from
/// [`RunConfig::recommended`] instead.
impl Default for RunConfig {
    fn default() -> Self {
        let net = NetConfig::default();
        let es = EsConfig::default();
        RunConfig {
            seed: 1,
            generations: 1400,
            time_limit_secs: 0.0,
            population: es.population,
            batch: es.batch_size,
            batch_schedule: "constant".into(),
            sigma: es.sigma,
            sigma_schedule: "constant".into(),
            lr: es.lr,
            lr_schedule: "cosine:0.05".into(),
            l2: es.l2,
            sigma_multipliers: es.sigma_multipliers,
            lr_multipliers: es.lr_multipliers,
            layer_populations: es.layer_populations,
            neuron_groups: es.neuron_groups,
            image_shift: es.image_shift,
            average_decay: es.average_decay,
            mode: net.arithmetic.name().into(),
            hidden: net.hidden,
            scale_exponents: net.scale_exponents,
            output_exponent: net.output_exponent,
            init_multipliers: net.init_multipliers,
            noise: NoiseKind::Table,
            noise_seed: 123,
            noise_table_len: es_core::noise::DEFAULT_TABLE_LEN,
            eval_every: 100,
            // 8 MB per checkpoint (θ and Adam's moments): every ~30 s of the default run.
            checkpoint_every: 50,
        }
    }
}

/// A configuration value that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error(
        "schedule {0:?} is not valid: expected constant, linear:FRACTION, cosine:FRACTION or step:FACTOR:EVERY"
    )]
    Schedule(String),
    #[error(transparent)]
    Net(#[from] es_kernel::ConfigError),
    #[error(transparent)]
    Es(#[from] es_core::train::TrainError),
}

impl RunConfig {
    /// What `coordinator` trains when no `--config` is given: the best recipe measured so far,
    /// sized for about 20 minutes on a 2-core machine (docs/RESULTS.md,
    /// `docs/results/z-p2048-2500/`). Most pairs perturb one group of a layer's neurons, which
    /// makes a pair cheap; layer 1 takes small steps; the batch grows as the learning rate
    /// decays; training images shift by up to a pixel; and the model is θ's running average.
    pub fn recommended() -> RunConfig {
        RunConfig {
            generations: 2500,
            population: 2048,
            layer_populations: vec![128, 1280, 640],
            neuron_groups: vec![16, 64, 10],
            batch: 150,
            batch_schedule: "linear:3".into(),
            lr_multipliers: vec![0.2, 1.0, 1.0],
            image_shift: 1,
            average_decay: 0.995,
            // Hidden activations scaled by 2^-126 rather than the seed's 2^-125, as in every
            // run the recipe grew from (ftz-e126-* onward in docs/RESULTS.md).
            scale_exponents: vec![126, 126],
            eval_every: 250,
            // 8 MB per checkpoint (θ and Adam's moments): about every 20 s.
            checkpoint_every: 50,
            ..RunConfig::default()
        }
    }

    pub fn from_file(path: &std::path::Path) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Whether `other` is the same run: equal in everything but the operational settings a
    /// resumed run may change (time limit, test and checkpoint intervals), which never
    /// change θ.
    pub fn same_run_as(&self, other: &RunConfig) -> bool {
        let operational = |c: &RunConfig| RunConfig {
            time_limit_secs: 0.0,
            eval_every: 0,
            checkpoint_every: 0,
            ..c.clone()
        };
        operational(self) == operational(other)
    }

    /// Parses a config from TOML text (e.g. the one a checkpoint carries).
    pub fn from_toml(text: &str) -> Result<RunConfig, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a run config always serialises")
    }

    pub fn net(&self) -> Result<NetConfig, ConfigError> {
        let net = NetConfig {
            hidden: self.hidden.clone(),
            scale_exponents: self.scale_exponents.clone(),
            output_exponent: self.output_exponent,
            init_multipliers: self.init_multipliers.clone(),
            arithmetic: Arithmetic::from_str(&self.mode)?,
            ..NetConfig::default()
        };
        net.validate()?;
        Ok(net)
    }

    pub fn es(&self) -> Result<EsConfig, ConfigError> {
        let es = EsConfig {
            population: self.population,
            batch_size: self.batch,
            batch_schedule: parse_schedule(&self.batch_schedule, self.generations)?,
            sigma: self.sigma,
            sigma_schedule: parse_schedule(&self.sigma_schedule, self.generations)?,
            lr: self.lr,
            lr_schedule: parse_schedule(&self.lr_schedule, self.generations)?,
            l2: self.l2,
            sigma_multipliers: self.sigma_multipliers.clone(),
            lr_multipliers: self.lr_multipliers.clone(),
            layer_populations: self.layer_populations.clone(),
            neuron_groups: self.neuron_groups.clone(),
            image_shift: self.image_shift,
            average_decay: self.average_decay,
            ..EsConfig::default()
        };
        es.validate_for(&self.net()?)?;
        Ok(es)
    }
}

fn parse_schedule(text: &str, generations: u32) -> Result<Schedule, ConfigError> {
    let bad = || ConfigError::Schedule(text.to_string());
    let parts: Vec<&str> = text.split(':').collect();
    let num = |s: &str| {
        s.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(bad)
    };
    let over = generations as u64;
    Ok(match parts.as_slice() {
        ["constant"] => Schedule::Constant,
        ["linear", f] => Schedule::Linear {
            final_fraction: num(f)?,
            over,
        },
        ["cosine", f] => Schedule::Cosine {
            final_fraction: num(f)?,
            over,
        },
        ["step", factor, every] => Schedule::Step {
            factor: num(factor)?,
            every: every.parse().map_err(|_| bad())?,
        },
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_and_round_trip_through_toml() {
        let config = RunConfig::default();
        assert_eq!(config.net().unwrap(), NetConfig::default());
        let back: RunConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn the_recommended_recipe_resolves_and_its_saved_config_reads_back_whole() {
        let recipe = RunConfig::recommended();
        let es = recipe.es().unwrap();
        assert_eq!(es.layer_populations.iter().sum::<usize>(), es.population);
        assert_eq!(
            recipe.net().unwrap(),
            NetConfig {
                scale_exponents: vec![126, 126],
                ..NetConfig::default()
            }
        );
        // A run's config.toml names every key, so it reads back as the recipe even though
        // keys a file leaves out mean the first release's values.
        let back = RunConfig::from_toml(&recipe.to_toml()).unwrap();
        assert_eq!(back, recipe);
        assert_ne!(recipe, RunConfig::default());
    }

    #[test]
    fn keys_a_file_leaves_out_keep_the_first_releases_meaning() {
        let partial = RunConfig::from_toml("generations = 10").unwrap();
        assert_eq!(
            partial,
            RunConfig {
                generations: 10,
                ..RunConfig::default()
            }
        );
        let es = partial.es().unwrap();
        assert_eq!((es.population, es.batch_size), (256, 100));
        assert!(es.layer_populations.is_empty() && es.neuron_groups.is_empty());
        assert_eq!((es.image_shift, es.average_decay), (0, 0.0));
        assert_eq!(es.batch_schedule, Schedule::Constant);
    }

    #[test]
    fn schedules_parse_and_bad_ones_are_named() {
        assert_eq!(parse_schedule("constant", 10).unwrap(), Schedule::Constant);
        assert_eq!(
            parse_schedule("cosine:0.1", 10).unwrap(),
            Schedule::Cosine {
                final_fraction: 0.1,
                over: 10
            }
        );
        assert_eq!(
            parse_schedule("step:0.5:100", 10).unwrap(),
            Schedule::Step {
                factor: 0.5,
                every: 100
            }
        );
        let err = parse_schedule("cosine", 10).unwrap_err().to_string();
        assert!(err.contains("\"cosine\" is not valid"), "{err}");
    }

    #[test]
    fn a_batch_schedule_spans_the_run_and_old_configs_keep_a_constant_batch() {
        let config: RunConfig =
            toml::from_str("generations = 400\nbatch = 50\nbatch_schedule = \"linear:4\"").unwrap();
        let es = config.es().unwrap();
        assert_eq!(
            (es.batch_at(0), es.batch_at(200), es.batch_at(400)),
            (50, 125, 200)
        );
        // A config.toml written before the field (a checkpoint's) reads as a constant batch.
        let old: RunConfig = toml::from_str("batch = 50").unwrap();
        assert_eq!(old.es().unwrap().batch_schedule, Schedule::Constant);
        let stepped = RunConfig {
            batch_schedule: "step:2:10".into(),
            ..RunConfig::default()
        };
        let err = stepped.es().unwrap_err().to_string();
        assert!(err.contains("expected constant, linear or cosine"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(toml::from_str::<RunConfig>("populaton = 3").is_err());
        let config = RunConfig {
            mode: "fast".into(),
            ..RunConfig::default()
        };
        assert!(
            config
                .net()
                .unwrap_err()
                .to_string()
                .contains("unknown arithmetic mode")
        );
        let config = RunConfig {
            sigma: -1.0,
            ..RunConfig::default()
        };
        assert!(config.es().unwrap_err().to_string().contains("sigma is -1"));
    }
}
