//! The run as it travels in `JoinAccepted.spec`: the network, the ES hyperparameters that
//! evaluations depend on, the noise source and `run_seed`, converted to and from the core's
//! types. Conversions from the wire validate everything, so a worker never builds a network or
//! a noise source from a spec the core would reject; error fields are paths within `RunSpec`.

use es_core::noise::{MAX_TABLE_LEN, NoiseSource};
use es_core::optimizer::Schedule;
use es_core::train::EsConfig;
use es_kernel::{Arithmetic, NetConfig};

use crate::MAX_THETA_DIM;
use crate::error::{ConversionError, to_usize};
use crate::pb;

/// Everything that, with θ and the data, determines every evaluation of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// The seed every random choice of the run derives from.
    pub run_seed: u64,
    pub net: NetConfig,
    /// The ES hyperparameters. Only those evaluations depend on travel (population, batch
    /// size, σ, its schedule and per-layer multipliers); a spec decoded from the wire has the
    /// update's (learning rate and its schedule, l2, Adam, lr multipliers) at their defaults:
    /// the update is the coordinator's alone.
    pub es: EsConfig,
    pub noise: NoiseSpec,
}

/// Where perturbations come from: the description of a [`NoiseSource`], which a worker
/// builds (generating or mapping the table) from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoiseSpec {
    /// A shared table of `len` standard normals generated from `noise_seed`.
    Table { noise_seed: u64, len: usize },
    /// Each perturbation regenerated from its own ChaCha stream.
    Stream,
}

impl From<&NoiseSource> for NoiseSpec {
    fn from(source: &NoiseSource) -> Self {
        match source {
            NoiseSource::Table(table) => NoiseSpec::Table {
                noise_seed: table.noise_seed(),
                len: table.len(),
            },
            NoiseSource::Stream => NoiseSpec::Stream,
        }
    }
}

impl From<&RunSpec> for pb::RunSpec {
    fn from(spec: &RunSpec) -> Self {
        pb::RunSpec {
            run_seed: spec.run_seed,
            net: Some((&spec.net).into()),
            es: Some((&spec.es).into()),
            noise: Some(spec.noise.into()),
        }
    }
}

/// Checks each part, then that they fit together: the σ multipliers match the layers, the
/// noise table holds at least one perturbation of D values.
impl TryFrom<pb::RunSpec> for RunSpec {
    type Error = ConversionError;

    fn try_from(m: pb::RunSpec) -> Result<Self, Self::Error> {
        let net: NetConfig = m
            .net
            .ok_or(ConversionError::Missing {
                field: "net",
                expected: "the network",
            })?
            .try_into()?;
        let es: EsConfig =
            m.es.ok_or(ConversionError::Missing {
                field: "es",
                expected: "the ES hyperparameters",
            })?
            .try_into()?;
        let noise: NoiseSpec = m
            .noise
            .ok_or(ConversionError::Missing {
                field: "noise",
                expected: "the noise source",
            })?
            .try_into()?;
        es.validate_for(&net)
            .map_err(|source| ConversionError::Es {
                field: "es",
                source,
            })?;
        if let NoiseSpec::Table { len, .. } = noise {
            // The network's dimension is checked by the conversion above, so it is computable.
            let dim = checked_dim(&net).unwrap_or(usize::MAX);
            if len < dim {
                return Err(ConversionError::value(
                    "noise.table.len",
                    len,
                    format!("at least the parameter dimension {dim}"),
                ));
            }
        }
        Ok(RunSpec {
            run_seed: m.run_seed,
            net,
            es,
            noise,
        })
    }
}

impl From<&NetConfig> for pb::NetSpec {
    fn from(net: &NetConfig) -> Self {
        pb::NetSpec {
            inputs: net.inputs as u64,
            hidden: net.hidden.iter().map(|&w| w as u64).collect(),
            outputs: net.outputs as u64,
            scale_exponents: net.scale_exponents.clone(),
            init_multipliers: net.init_multipliers.clone(),
            arithmetic: net.arithmetic.name().to_string(),
            output_exponent: net.output_exponent,
        }
    }
}

/// Validates the network as `NetConfig::validate` does, and refuses one with more than
/// [`MAX_THETA_DIM`] parameters (θ must fit one message).
impl TryFrom<pb::NetSpec> for NetConfig {
    type Error = ConversionError;

    fn try_from(m: pb::NetSpec) -> Result<Self, Self::Error> {
        let arithmetic: Arithmetic =
            m.arithmetic
                .parse()
                .map_err(|source| ConversionError::Net {
                    field: "net.arithmetic",
                    source,
                })?;
        let net = NetConfig {
            inputs: to_usize("net.inputs", m.inputs)?,
            hidden: m
                .hidden
                .iter()
                .map(|&w| to_usize("net.hidden", w))
                .collect::<Result<_, _>>()?,
            outputs: to_usize("net.outputs", m.outputs)?,
            scale_exponents: m.scale_exponents,
            init_multipliers: m.init_multipliers,
            output_exponent: m.output_exponent,
            arithmetic,
        };
        net.validate().map_err(|source| ConversionError::Net {
            field: "net",
            source,
        })?;
        match checked_dim(&net) {
            Some(dim) if dim <= MAX_THETA_DIM => Ok(net),
            dim => Err(ConversionError::value(
                "net",
                match dim {
                    Some(dim) => format!("a network of {dim} parameters"),
                    None => "a network of more parameters than this host can count".to_string(),
                },
                format!("at most {MAX_THETA_DIM} parameters, so that θ fits one message"),
            )),
        }
    }
}

/// D of a valid network, or `None` if it overflows `usize` (a spec from the wire could ask
/// for that; `ParamLayout::new` would then overflow).
fn checked_dim(net: &NetConfig) -> Option<usize> {
    net.widths().windows(2).try_fold(0usize, |d, w| {
        d.checked_add(w[0].checked_mul(w[1])?.checked_add(w[1])?)
    })
}

impl From<&EsConfig> for pb::EsSpec {
    fn from(es: &EsConfig) -> Self {
        pb::EsSpec {
            population: es.population as u64,
            batch_size: es.batch_size as u64,
            sigma: Some(es.sigma),
            sigma_schedule: Some(es.sigma_schedule.into()),
            sigma_multipliers: es.sigma_multipliers.clone(),
            layer_populations: es.layer_populations.iter().map(|&p| p as u64).collect(),
            neuron_groups: es.neuron_groups.iter().map(|&g| g as u64).collect(),
            // A constant batch is sent as no schedule, as peers before the field read it.
            batch_schedule: (es.batch_schedule != Schedule::Constant)
                .then(|| es.batch_schedule.into()),
            image_shift: es.image_shift as u64,
        }
    }
}

/// The evaluation half of an [`EsConfig`], validated by `EsConfig::validate`; the update's
/// fields take their defaults. The σ multipliers are checked against the network by
/// [`RunSpec`]'s conversion, which knows the layers.
impl TryFrom<pb::EsSpec> for EsConfig {
    type Error = ConversionError;

    fn try_from(m: pb::EsSpec) -> Result<Self, Self::Error> {
        let es = EsConfig {
            population: to_usize("es.population", m.population)?,
            batch_size: to_usize("es.batch_size", m.batch_size)?,
            sigma: m.sigma.ok_or(ConversionError::Missing {
                field: "es.sigma",
                expected: "a number",
            })?,
            sigma_schedule: schedule_from(
                &SIGMA_SCHEDULE,
                m.sigma_schedule.ok_or(ConversionError::Missing {
                    field: SIGMA_SCHEDULE.field,
                    expected: "a schedule",
                })?,
            )?,
            batch_schedule: match m.batch_schedule {
                None => Schedule::Constant,
                Some(schedule) => schedule_from(&BATCH_SCHEDULE, schedule)?,
            },
            sigma_multipliers: m.sigma_multipliers,
            layer_populations: m
                .layer_populations
                .into_iter()
                .map(|p| to_usize("es.layer_populations", p))
                .collect::<Result<_, _>>()?,
            neuron_groups: m
                .neuron_groups
                .into_iter()
                .map(|g| to_usize("es.neuron_groups", g))
                .collect::<Result<_, _>>()?,
            image_shift: to_usize("es.image_shift", m.image_shift)?,
            ..EsConfig::default()
        };
        es.validate().map_err(|source| ConversionError::Es {
            field: "es",
            source,
        })?;
        Ok(es)
    }
}

impl From<Schedule> for pb::Schedule {
    fn from(schedule: Schedule) -> Self {
        use pb::schedule::{Constant, Cosine, Kind, Linear, Step};
        let kind = match schedule {
            Schedule::Constant => Kind::Constant(Constant {}),
            Schedule::Linear {
                final_fraction,
                over,
            } => Kind::Linear(Linear {
                final_fraction: Some(final_fraction),
                over,
            }),
            Schedule::Cosine {
                final_fraction,
                over,
            } => Kind::Cosine(Cosine {
                final_fraction: Some(final_fraction),
                over,
            }),
            Schedule::Step { factor, every } => Kind::Step(Step {
                factor: Some(factor),
                every,
            }),
        };
        pb::Schedule { kind: Some(kind) }
    }
}

/// The wire names of one schedule field's parts, for errors.
struct ScheduleFields {
    field: &'static str,
    kind: &'static str,
    linear: &'static str,
    cosine: &'static str,
    step: &'static str,
}

const SIGMA_SCHEDULE: ScheduleFields = ScheduleFields {
    field: "es.sigma_schedule",
    kind: "es.sigma_schedule.kind",
    linear: "es.sigma_schedule.linear.final_fraction",
    cosine: "es.sigma_schedule.cosine.final_fraction",
    step: "es.sigma_schedule.step.factor",
};

const BATCH_SCHEDULE: ScheduleFields = ScheduleFields {
    field: "es.batch_schedule",
    kind: "es.batch_schedule.kind",
    linear: "es.batch_schedule.linear.final_fraction",
    cosine: "es.batch_schedule.cosine.final_fraction",
    step: "es.batch_schedule.step.factor",
};

/// A schedule of a kind this code knows, with finite parameters. A missing kind (e.g. one a
/// newer peer added) is an error, never a silent `Constant`.
fn schedule_from(names: &ScheduleFields, m: pb::Schedule) -> Result<Schedule, ConversionError> {
    use pb::schedule::Kind;
    Ok(match m.kind {
        None => {
            return Err(ConversionError::Missing {
                field: names.kind,
                expected: "constant, linear, cosine or step",
            });
        }
        Some(Kind::Constant(_)) => Schedule::Constant,
        Some(Kind::Linear(l)) => Schedule::Linear {
            final_fraction: finite(names.linear, l.final_fraction)?,
            over: l.over,
        },
        Some(Kind::Cosine(c)) => Schedule::Cosine {
            final_fraction: finite(names.cosine, c.final_fraction)?,
            over: c.over,
        },
        Some(Kind::Step(s)) => Schedule::Step {
            factor: finite(names.step, s.factor)?,
            every: s.every,
        },
    })
}

fn finite(field: &'static str, value: Option<f64>) -> Result<f64, ConversionError> {
    match value {
        None => Err(ConversionError::Missing {
            field,
            expected: "a finite number",
        }),
        Some(v) if v.is_finite() => Ok(v),
        Some(v) => Err(ConversionError::value(field, v, "a finite number")),
    }
}

impl From<NoiseSpec> for pb::NoiseSpec {
    fn from(noise: NoiseSpec) -> Self {
        use pb::noise_spec::{Source, Stream, Table};
        let source = match noise {
            NoiseSpec::Table { noise_seed, len } => Source::Table(Table {
                noise_seed,
                len: len as u64,
            }),
            NoiseSpec::Stream => Source::Stream(Stream {}),
        };
        pb::NoiseSpec {
            source: Some(source),
        }
    }
}

/// A table length in `1..=MAX_TABLE_LEN` (what `NoiseTable` can index), or a stream.
impl TryFrom<pb::NoiseSpec> for NoiseSpec {
    type Error = ConversionError;

    fn try_from(m: pb::NoiseSpec) -> Result<Self, Self::Error> {
        use pb::noise_spec::Source;
        match m.source {
            None => Err(ConversionError::Missing {
                field: "noise.source",
                expected: "a table or a stream",
            }),
            Some(Source::Stream(_)) => Ok(NoiseSpec::Stream),
            Some(Source::Table(t)) => {
                let len = to_usize("noise.table.len", t.len)?;
                if len == 0 || len > MAX_TABLE_LEN {
                    return Err(ConversionError::value(
                        "noise.table.len",
                        len,
                        format!("1..={MAX_TABLE_LEN}"),
                    ));
                }
                Ok(NoiseSpec::Table {
                    noise_seed: t.noise_seed,
                    len,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use es_core::noise::NoiseTable;
    use es_kernel::ParamLayout;
    use prost::Message;

    use super::*;

    /// Breaks one field of a message that was valid.
    type Breaker<M> = fn(&mut M);

    fn spec() -> RunSpec {
        RunSpec {
            run_seed: 0xDEAD_BEEF_0123_4567,
            net: NetConfig::default(),
            es: EsConfig {
                population: 300,
                batch_size: 64,
                sigma: 0.03,
                sigma_schedule: Schedule::Cosine {
                    final_fraction: 0.25,
                    over: 5000,
                },
                sigma_multipliers: vec![1.0, 0.5, 2.0],
                layer_populations: vec![100, 150, 50],
                neuron_groups: vec![4, 15, 2],
                ..EsConfig::default()
            },
            noise: NoiseSpec::Table {
                noise_seed: 123,
                len: 1 << 26,
            },
        }
    }

    /// Through the wire bytes and back, as a worker receives it.
    fn round_trip(spec: &RunSpec) -> Result<RunSpec, ConversionError> {
        let bytes = pb::RunSpec::from(spec).encode_to_vec();
        pb::RunSpec::decode(&bytes[..]).unwrap().try_into()
    }

    fn wire() -> pb::RunSpec {
        pb::RunSpec::from(&spec())
    }

    #[test]
    fn run_spec_round_trips() {
        let spec = spec();
        assert_eq!(round_trip(&spec).unwrap(), spec);
        let small = NetConfig {
            hidden: vec![7],
            scale_exponents: vec![100],
            init_multipliers: vec![1.5, 3.0],
            arithmetic: Arithmetic::Ieee,
            ..NetConfig::default()
        };
        for net in [NetConfig::seed(), small] {
            let es = EsConfig {
                sigma_multipliers: Vec::new(),
                layer_populations: Vec::new(),
                neuron_groups: Vec::new(),
                ..spec.es.clone()
            };
            let s = RunSpec {
                net,
                es,
                noise: NoiseSpec::Stream,
                ..spec.clone()
            };
            assert_eq!(round_trip(&s).unwrap(), s);
        }
    }

    #[test]
    fn floats_keep_their_bits() {
        let mut s = spec();
        s.es.sigma = f32::from_bits(0x3C23_D70B);
        s.net.init_multipliers = vec![f32::from_bits(0x3F80_0001), 8.0, f32::MIN_POSITIVE];
        s.es.sigma_schedule = Schedule::Linear {
            final_fraction: f64::from_bits(0x3FB9_9999_9999_999A),
            over: u64::MAX,
        };
        let back = round_trip(&s).unwrap();
        assert_eq!(back.es.sigma.to_bits(), 0x3C23_D70B);
        assert_eq!(back.net.init_multipliers[0].to_bits(), 0x3F80_0001);
        assert_eq!(back, s);
        // Schedules compare floats with `==`; their bits must survive too, −0.0 included
        // (proto3 would drop a zero without the fields' explicit presence).
        let fraction = |s: Schedule| match s {
            Schedule::Linear { final_fraction, .. } | Schedule::Cosine { final_fraction, .. } => {
                final_fraction
            }
            Schedule::Step { factor, .. } => factor,
            Schedule::Constant => unreachable!(),
        };
        for value in [-0.0, 0.0, f64::from_bits(1), -1e300] {
            for schedule in [
                Schedule::Linear {
                    final_fraction: value,
                    over: 9,
                },
                Schedule::Cosine {
                    final_fraction: value,
                    over: 9,
                },
                Schedule::Step {
                    factor: value,
                    every: 9,
                },
            ] {
                s.es.sigma_schedule = schedule;
                let back = round_trip(&s).unwrap().es.sigma_schedule;
                assert_eq!(fraction(back).to_bits(), value.to_bits(), "{schedule:?}");
            }
        }
    }

    #[test]
    fn update_fields_stay_home() {
        let mut s = spec();
        s.es.lr = 0.5;
        s.es.l2 = 0.25;
        s.es.lr_multipliers = vec![1.0, 2.0, 3.0];
        s.es.lr_schedule = Schedule::Step {
            factor: 0.5,
            every: 10,
        };
        let back = round_trip(&s).unwrap();
        let defaults = EsConfig::default();
        assert_eq!(back.es.lr, defaults.lr);
        assert_eq!(back.es.l2, defaults.l2);
        assert_eq!(back.es.lr_multipliers, defaults.lr_multipliers);
        assert_eq!(back.es.lr_schedule, defaults.lr_schedule);
        // What evaluations depend on arrives intact.
        for t in [0, 1, 2500, 10_000] {
            assert_eq!(
                back.es.layer_sigmas(&back.net, t),
                s.es.layer_sigmas(&s.net, t)
            );
        }
    }

    #[test]
    fn every_schedule_round_trips() {
        for schedule in [
            Schedule::Constant,
            Schedule::Linear {
                final_fraction: 0.1,
                over: 100,
            },
            Schedule::Cosine {
                final_fraction: -0.0,
                over: 0,
            },
            Schedule::Step {
                factor: 0.5,
                every: 7,
            },
        ] {
            for names in [&SIGMA_SCHEDULE, &BATCH_SCHEDULE] {
                let back = schedule_from(names, pb::Schedule::from(schedule)).unwrap();
                assert_eq!(back, schedule);
            }
        }
    }

    #[test]
    fn bad_schedules_are_refused_naming_their_field() {
        for (names, field) in [
            (&SIGMA_SCHEDULE, "es.sigma_schedule"),
            (&BATCH_SCHEDULE, "es.batch_schedule"),
        ] {
            let e = schedule_from(names, pb::Schedule { kind: None }).unwrap_err();
            assert_eq!(e.field(), format!("{field}.kind"));
            let e = schedule_from(
                names,
                pb::Schedule {
                    kind: Some(pb::schedule::Kind::Cosine(pb::schedule::Cosine {
                        final_fraction: None,
                        over: 3,
                    })),
                },
            )
            .unwrap_err();
            assert!(matches!(e, ConversionError::Missing { .. }), "{e}");
            assert_eq!(e.field(), format!("{field}.cosine.final_fraction"));
            let step = Schedule::Step {
                factor: f64::NAN,
                every: 1,
            };
            let e = schedule_from(names, pb::Schedule::from(step)).unwrap_err();
            assert_eq!(e.field(), format!("{field}.step.factor"));
            assert!(e.to_string().contains("expected a finite number"), "{e}");
            let linear = Schedule::Linear {
                final_fraction: f64::INFINITY,
                over: 1,
            };
            let e = schedule_from(names, pb::Schedule::from(linear)).unwrap_err();
            assert_eq!(e.field(), format!("{field}.linear.final_fraction"));
        }
    }

    #[test]
    fn a_batch_schedule_round_trips_and_a_constant_one_is_left_out() {
        let mut s = spec();
        assert_eq!(pb::EsSpec::from(&s.es).batch_schedule, None);
        s.es.batch_schedule = Schedule::Cosine {
            final_fraction: 4.0,
            over: 900,
        };
        assert!(pb::EsSpec::from(&s.es).batch_schedule.is_some());
        let back = round_trip(&s).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.es.batch_at(900), 4 * s.es.batch_size);
        // A schedule the batch cannot follow is refused on arrival.
        let mut m = pb::RunSpec::from(&s);
        m.es.as_mut().unwrap().batch_schedule = Some(
            Schedule::Step {
                factor: 2.0,
                every: 10,
            }
            .into(),
        );
        let e = RunSpec::try_from(m).unwrap_err();
        assert!(e.to_string().contains("batch schedule"), "{e}");
    }

    #[test]
    fn an_image_shift_round_trips_and_one_the_images_cannot_take_is_refused() {
        let mut s = spec();
        assert_eq!(pb::EsSpec::from(&s.es).image_shift, 0);
        s.es.image_shift = 2;
        let back = round_trip(&s).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.es.image_shift, 2);
        // A shift as wide as the 28-pixel images is refused on arrival.
        let mut m = pb::RunSpec::from(&s);
        m.es.as_mut().unwrap().image_shift = 28;
        let e = RunSpec::try_from(m).unwrap_err();
        assert!(e.to_string().contains("image shift 28"), "{e}");
    }

    #[test]
    fn noise_specs_round_trip() {
        for noise in [
            NoiseSpec::Stream,
            NoiseSpec::Table {
                noise_seed: u64::MAX,
                len: 1,
            },
            NoiseSpec::Table {
                noise_seed: 0,
                len: MAX_TABLE_LEN,
            },
        ] {
            assert_eq!(
                NoiseSpec::try_from(pb::NoiseSpec::from(noise)).unwrap(),
                noise
            );
        }
        let table = NoiseTable::from_storage(77, Box::new(vec![0.0f32; 4096]));
        assert_eq!(
            NoiseSpec::from(&NoiseSource::Table(Arc::new(table))),
            NoiseSpec::Table {
                noise_seed: 77,
                len: 4096
            }
        );
        assert_eq!(NoiseSpec::from(&NoiseSource::Stream), NoiseSpec::Stream);
    }

    #[test]
    fn bad_noise_specs_are_refused() {
        let e = NoiseSpec::try_from(pb::NoiseSpec { source: None }).unwrap_err();
        assert!(
            matches!(
                e,
                ConversionError::Missing {
                    field: "noise.source",
                    ..
                }
            ),
            "{e}"
        );
        for len in [0, MAX_TABLE_LEN + 1] {
            let e =
                NoiseSpec::try_from(pb::NoiseSpec::from(NoiseSpec::Table { noise_seed: 1, len }))
                    .unwrap_err();
            assert_eq!(e.field(), "noise.table.len", "{e}");
        }
        // A table too short for one perturbation of the network.
        let mut s = spec();
        let dim = ParamLayout::new(&s.net).len();
        s.noise = NoiseSpec::Table {
            noise_seed: 1,
            len: dim - 1,
        };
        let e = round_trip(&s).unwrap_err();
        assert_eq!(e.field(), "noise.table.len");
        assert_eq!(
            e.to_string(),
            format!(
                "noise.table.len is {}: expected at least the parameter dimension {dim}",
                dim - 1
            )
        );
        s.noise = NoiseSpec::Table {
            noise_seed: 1,
            len: dim,
        };
        round_trip(&s).unwrap();
    }

    #[test]
    fn missing_parts_are_named() {
        let cases: [(Breaker<pb::RunSpec>, &str); 5] = [
            (|m| m.net = None, "net"),
            (|m| m.es = None, "es"),
            (|m| m.noise = None, "noise"),
            (
                |m| m.es.as_mut().unwrap().sigma_schedule = None,
                "es.sigma_schedule",
            ),
            (|m| m.es.as_mut().unwrap().sigma = None, "es.sigma"),
        ];
        for (break_it, field) in cases {
            let mut m = wire();
            break_it(&mut m);
            let e = RunSpec::try_from(m).unwrap_err();
            assert!(matches!(e, ConversionError::Missing { .. }), "{e}");
            assert_eq!(e.field(), field);
        }
    }

    #[test]
    fn bad_networks_are_refused() {
        let cases: [(Breaker<pb::NetSpec>, &str); 6] = [
            (|n| n.arithmetic = "fma".into(), "net.arithmetic"),
            (|n| n.arithmetic.clear(), "net.arithmetic"),
            (|n| n.hidden[1] = 0, "net"),
            (
                |n| {
                    n.scale_exponents.pop();
                },
                "net",
            ),
            (|n| n.init_multipliers[2] = f32::NAN, "net"),
            // D would overflow: refused before anything allocates.
            (|n| n.hidden = vec![u64::MAX / 2; 2], "net"),
        ];
        for (break_it, field) in cases {
            let mut m = wire();
            break_it(m.net.as_mut().unwrap());
            let e = RunSpec::try_from(m).unwrap_err();
            assert_eq!(e.field(), field, "{e}");
        }
        let e = NetConfig::try_from(pb::NetSpec {
            arithmetic: "fma".into(),
            ..pb::NetSpec::from(&NetConfig::default())
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "net.arithmetic does not describe a network: unknown arithmetic mode \"fma\": \
             expected \"ftz\", \"seed\" or \"ieee\""
        );
    }

    #[test]
    fn networks_whose_theta_does_not_fit_a_message_are_refused() {
        let mut net = pb::NetSpec::from(&NetConfig::default());
        net.hidden = vec![2048, 2048];
        let e = NetConfig::try_from(net.clone()).unwrap_err();
        assert_eq!(e.field(), "net");
        assert!(e.to_string().contains("so that θ fits one message"), "{e}");
        net.hidden = vec![1024, 1024];
        NetConfig::try_from(net).unwrap();
    }

    #[test]
    fn bad_hyperparameters_are_refused() {
        let cases: [Breaker<pb::EsSpec>; 13] = [
            |es| es.population = 0,
            |es| es.population = 1 << 24 | 1,
            |es| es.batch_size = 0,
            |es| es.sigma = Some(0.0),
            |es| es.sigma = Some(f32::NAN),
            |es| es.sigma_multipliers = vec![1.0, 1.0],
            // Layer populations: one per layer, summing to the population.
            |es| es.layer_populations = vec![100, 200],
            |es| es.layer_populations = vec![100, 100, 99],
            |es| es.layer_populations = vec![u64::MAX, 2, 1],
            // Neuron groups: one per layer, each dividing its layer's pairs, at most its
            // neurons, and only with layer populations.
            |es| es.neuron_groups = vec![4, 15],
            |es| es.neuron_groups = vec![4, 7, 2],
            |es| es.neuron_groups = vec![4, 15, 25],
            |es| {
                es.layer_populations = Vec::new();
                es.neuron_groups = vec![1, 1, 1];
            },
        ];
        for break_it in cases {
            let mut m = wire();
            break_it(m.es.as_mut().unwrap());
            let e = RunSpec::try_from(m).unwrap_err();
            assert!(matches!(e, ConversionError::Es { field: "es", .. }), "{e}");
        }
        let mut m = wire();
        m.es.as_mut().unwrap().sigma_multipliers = vec![1.0, -1.0, 1.0];
        let e = RunSpec::try_from(m).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("es is not a valid ES configuration: "),
            "{e}"
        );
    }
}
