//! `es-bench`: measures the forward pass, the noise and the update of Underflow on this machine
//! and prints them as one table (optionally also as JSON).
//!
//! Every number in the table is measured in this run; where an input is missing (no trained
//! parameters given) the table says so instead of showing a number.

mod ab;
mod forward;
mod noise;
mod report;
mod timing;
mod update;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use es_core::init::init_params;
use es_core::noise::{DEFAULT_TABLE_LEN, NoiseSource};
use es_kernel::{Arithmetic, Batch, Forward, Kernel, NetConfig, ParamLayout};

use crate::report::{Header, Row, human, sig3};
use crate::timing::{Budget, secs};

#[derive(Parser, Debug)]
#[command(
    name = "es-bench",
    about = "Benchmarks the Underflow forward pass, noise and update; prints one table"
)]
struct Cli {
    /// MNIST directory (the four IDX files, raw or gzipped); default: $UNDERFLOW_DATA, else
    /// ../shared/data/mnist relative to the workspace root.
    #[arg(long, env = "UNDERFLOW_DATA")]
    data: Option<PathBuf>,
    /// Trained parameters: 669,706 little-endian f32, as the coordinator writes to
    /// RUN_DIR/theta.f32.
    #[arg(long)]
    trained: Option<PathBuf>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A ~20 s smoke run for CI: shorter rows, fewer rounds, a 2^24-value noise table.
    #[arg(long)]
    quick: bool,
    /// Batch sizes of the forward rows (the other kernels run at the first).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    batches: Vec<usize>,
    /// Only the side-by-side rows (earlier path against its replacement, alternated in one
    /// run), not the rest of the table.
    #[arg(long)]
    ab_only: bool,
}

/// Run lengths of the full and the quick run.
struct Plan {
    forward: Budget,
    /// Budget of the rows whose calls take 100+ ms (update, read bandwidth).
    slow: Budget,
    table_len: usize,
    table_rounds: usize,
    read_bytes: usize,
    /// Budget of a side-by-side row (both paths together).
    ab: Budget,
    /// Budget of a side-by-side row of the loss's exp or log (microseconds per call).
    math: Budget,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                forward: Budget {
                    per_row: secs(0.25),
                    rounds: 3,
                },
                slow: Budget {
                    per_row: secs(0.3),
                    rounds: 3,
                },
                table_len: 1 << 24,
                table_rounds: 1,
                read_bytes: 1 << 30,
                ab: Budget {
                    per_row: secs(0.5),
                    rounds: 4,
                },
                math: Budget {
                    per_row: secs(0.3),
                    rounds: 4,
                },
            }
        } else {
            Plan {
                // Seven rounds: the median then ignores up to three rounds disturbed by
                // other work on the machine.
                forward: Budget {
                    per_row: secs(1.4),
                    rounds: 7,
                },
                slow: Budget {
                    per_row: secs(2.0),
                    rounds: 5,
                },
                table_len: DEFAULT_TABLE_LEN,
                table_rounds: 3,
                read_bytes: 1 << 30,
                // Many short alternating rounds: the median ratio ignores the rounds another
                // process disturbed.
                ab: Budget {
                    per_row: secs(6.0),
                    rounds: 15,
                },
                math: Budget {
                    per_row: secs(1.5),
                    rounds: 15,
                },
            }
        }
    }
}

/// The populations of the update rows.
const POPULATIONS: [usize; 2] = [256, 1000];
/// OpenAI's noise seed, also the project's default.
const NOISE_SEED: u64 = 123;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        !cli.batches.is_empty() && !cli.batches.contains(&0),
        "--batches {:?}: expected batch sizes of at least 1",
        cli.batches
    );
    let plan = Plan::new(cli.quick);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = Kernel::detect().context("choosing the forward kernel (UNDERFLOW_KERNEL)")?;
    let data_dir = cli.data.clone().unwrap_or_else(default_data_dir);
    let dim = ParamLayout::new(&NetConfig::default()).len();
    let trained = cli
        .trained
        .as_deref()
        .map(|p| read_params(p, dim))
        .transpose()?;

    let header = header(&cli, &plan, kernel, threads, &data_dir);
    print!("{}", header.render());
    println!();

    progress("loading MNIST");
    let mnist = es_data::mnist::load(&data_dir).with_context(|| {
        format!(
            "loading MNIST from {} (set --data or UNDERFLOW_DATA)",
            data_dir.display()
        )
    })?;
    let train = &mnist.train;

    let mut rows = Vec::new();
    if !cli.ab_only {
        let forward_rows = forward_section(&plan, &cli.batches, kernel, trained.as_deref(), train)?;
        let pair_forward = (forward_rows.pair_secs, forward_rows.pair_batch);
        rows.extend(forward_rows.rows);
        rows.extend(noise_section(&plan, threads, pair_forward, dim)?);
    }
    rows.extend(ab_section(&plan, kernel, trained.as_deref(), train)?);

    let table = report::render_table(&rows);
    println!("{table}");
    println!(
        "value: median of the timed rounds. spread: (slowest − fastest round) / median. \
         GB = 1e9 bytes. Forward and GEMM rows run on one thread."
    );
    if let Some(path) = &cli.json {
        report::write_json(path, &header, &rows)?;
        println!("rows written to {}", path.display());
    }
    Ok(())
}

/// The side-by-side rows at B = 100 (the default minibatch): the detected kernel and the
/// portable one, init parameters and trained ones when given.
fn ab_section(
    plan: &Plan,
    kernel: Kernel,
    trained: Option<&[f32]>,
    train: &es_data::mnist::Split,
) -> anyhow::Result<Vec<Row>> {
    let net = NetConfig::default();
    let b = 100.min(train.len());
    let batch = forward::first_images(&train.images, &train.labels, net.inputs, b);
    let init = init_params(&net, 1);
    let mut params: Vec<(&str, &[f32])> = vec![("init", &init)];
    if let Some(t) = trained {
        params.push(("trained", t));
    }
    let mut kernels = vec![kernel];
    if kernel != Kernel::Portable {
        kernels.push(Kernel::Portable);
    }
    let mut rows = ab::forward_change_rows(plan.ab, &kernels, &params, &batch)?;
    // The loss's exp and log, on the logits of the last parameter set (trained if given).
    let theta = params.last().expect("init is always there").1;
    let mut forward = Forward::new(net.clone(), kernel).context("building the forward pass")?;
    let logits = forward.logits(theta, &batch).to_vec();
    rows.extend(ab::math_rows(plan.math, &logits, net.outputs)?);
    rows.extend(ab::loss_rows(
        plan.math,
        &logits,
        batch.labels(),
        net.outputs,
    )?);
    Ok(rows)
}

/// Progress on stderr, so stdout holds only the header and the table.
fn progress(what: &str) {
    eprintln!("es-bench: {what}");
}

/// `../shared/data/mnist` next to the workspace this binary was built from.
fn default_data_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
    // Canonical when it exists, for a readable header; as is otherwise, for the error.
    dir.canonicalize().unwrap_or(dir)
}

/// Reads `dim` little-endian f32 written by the coordinator (`RUN_DIR/theta.f32`).
fn read_params(path: &Path, dim: usize) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading trained parameters {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() == dim * 4,
        "trained parameters {}: {} bytes, expected {} ({dim} little-endian f32)",
        path.display(),
        bytes.len(),
        dim * 4
    );
    let params: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "trained parameters {}: value {i} is {}, expected a finite number",
            path.display(),
            params[i]
        );
    }
    Ok(params)
}

fn header(cli: &Cli, plan: &Plan, kernel: Kernel, threads: usize, data: &Path) -> Header {
    let supported: Vec<&str> = Kernel::supported().iter().map(|k| k.name()).collect();
    let build = if cfg!(debug_assertions) {
        "DEBUG build: numbers are meaningless, build with --release"
    } else {
        "release"
    };
    // The portable kernel is only as wide as the compile target allows.
    let target = if cfg!(target_feature = "avx2") {
        "avx2 enabled at compile time"
    } else {
        "baseline target features (portable kernel compiled without avx2)"
    };
    let mode = if cli.quick {
        "--quick (smoke run: short rows, small noise table)"
    } else {
        "full"
    };
    Header {
        lines: vec![
            ("cpu", cpu_model()),
            (
                "kernel",
                format!("{kernel} (detected; supported: {})", supported.join(", ")),
            ),
            (
                "threads",
                format!(
                    "{threads} (all cores; rayon pool {})",
                    rayon::current_num_threads()
                ),
            ),
            ("load at start", load_average()),
            ("build", format!("{build}, {target}")),
            (
                "run",
                format!(
                    "{mode}; forward rows {:.2} s in {} rounds",
                    plan.forward.per_row.as_secs_f64(),
                    plan.forward.rounds
                ),
            ),
            ("data", data.display().to_string()),
            (
                "trained",
                cli.trained.as_ref().map_or_else(
                    || "not given".to_string(),
                    // Speed is what is measured, so one file serves both modes.
                    |p| {
                        format!(
                            "{} (run in both modes, whatever it was trained in)",
                            p.display()
                        )
                    },
                ),
            ),
        ],
    }
}

/// The CPU's model name from /proc/cpuinfo, where there is one.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| format!("unknown ({})", std::env::consts::ARCH))
}

/// The 1-minute load average: other work on the machine makes every row slower.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .map_or_else(
            || "unknown".to_string(),
            |l| format!("{l} (1-min load average; other processes share the cores)"),
        )
}

struct ForwardRows {
    rows: Vec<Row>,
    /// Seconds of the two `ftz` forward passes of one mirrored pair at the reference batch
    /// (B = 100 when measured; detected kernel, init parameters), to put the perturbation
    /// cost in proportion.
    pair_secs: f64,
    /// The reference batch size of `pair_secs`.
    pair_batch: usize,
}

/// Our forward pass in every mode, batch size and parameter set, the other kernels, and the
/// GEMM reference.
fn forward_section(
    plan: &Plan,
    batch_sizes: &[usize],
    kernel: Kernel,
    trained: Option<&[f32]>,
    train: &es_data::mnist::Split,
) -> anyhow::Result<ForwardRows> {
    let ftz = NetConfig::default();
    let seed = NetConfig::seed();
    let modes = [(Arithmetic::Ftz, &ftz), (Arithmetic::Seed, &seed)];
    let init_ftz = init_params(&ftz, 1);
    let init_seed = init_params(&seed, 1);
    let init_for = |mode| {
        if mode == Arithmetic::Ftz {
            &init_ftz
        } else {
            &init_seed
        }
    };
    let batches: Vec<(usize, Batch)> = batch_sizes
        .iter()
        .map(|&b| {
            anyhow::ensure!(
                train.len() >= b,
                "MNIST training split has {} images, fewer than the batch size {b}",
                train.len()
            );
            Ok((
                b,
                forward::first_images(&train.images, &train.labels, ftz.inputs, b),
            ))
        })
        .collect::<anyhow::Result<_>>()?;

    // The reference first, so every row of ours can be given as a ratio of it.
    let mut gemm_rows = Vec::new();
    let mut gemm_rate = Vec::new();
    for (b, batch) in &batches {
        progress(&format!("sgemm B={b}"));
        let g = forward::bench_gemm(&ftz, &init_ftz, batch, plan.forward)?;
        gemm_rate.push(g.samples_per_sec);
        gemm_rows.push(
            Row::new(
                "gemm",
                format!("matrixmultiply::sgemm B={b}"),
                g.samples_per_sec,
                "samples/s/core",
            )
            .timed(&g.stats)
            .note(format!(
                "{} GFLOP/s dense (B×784·784×512, ·512×512, ·512×10 + bias)",
                sig3(g.gflops)
            ))
            .metric("gflops", g.gflops),
        );
    }

    let mut params: Vec<(&str, Option<&[f32]>)> = vec![("init", None)];
    if let Some(t) = trained {
        params.push(("trained", Some(t)));
    }
    let mut rows = Vec::new();
    // The batch the other kernels and the perturbation row are compared at: B = 100 (the
    // default minibatch) when it was asked for, else the first.
    let reference = batches.iter().position(|(b, _)| *b == 100).unwrap_or(0);
    let mut pair_secs = f64::NAN;
    let mut best_reference = Vec::new();
    for &(mode, config) in &modes {
        for (bi, (b, batch)) in batches.iter().enumerate() {
            for &(name, given) in &params {
                let theta = given.unwrap_or(init_for(mode));
                let case = format!("{kernel} {mode} B={b} {name}");
                progress(&format!("forward {case}"));
                let ours = forward::bench_ours(kernel, config, theta, batch, plan.forward)?;
                if mode == Arithmetic::Ftz && bi == reference {
                    best_reference.push((name, ours.samples_per_sec));
                    if name == "init" {
                        pair_secs = 2.0 * *b as f64 / ours.samples_per_sec;
                    }
                }
                rows.push(forward_row(case, &ours, gemm_rate[bi]));
            }
        }
    }
    if trained.is_none() {
        rows.push(Row::absent(
            "forward",
            "trained params",
            "trained: not given (pass --trained RUN_DIR/theta.f32)",
        ));
    }

    // The other kernels at the reference batch in ftz mode: the SIMD speed-up.
    let (b, batch) = &batches[reference];
    for other in Kernel::supported().into_iter().filter(|&k| k != kernel) {
        for &(name, given) in &params {
            let theta = given.unwrap_or(&init_ftz);
            let case = format!("{other} ftz B={b} {name}");
            progress(&format!("forward {case}"));
            let ours = forward::bench_ours(other, &ftz, theta, batch, plan.forward)?;
            let best = best_reference
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, r)| *r)
                .expect(
                    "the detected kernel ran every parameter set at the reference batch in ftz",
                );
            rows.push(
                forward_row(case, &ours, gemm_rate[reference])
                    .note(format!(
                        "{kernel} is {}× faster",
                        sig3(best / ours.samples_per_sec)
                    ))
                    .metric("detected_kernel_speedup", best / ours.samples_per_sec),
            );
        }
    }
    rows.extend(gemm_rows);
    Ok(ForwardRows {
        rows,
        pair_secs,
        pair_batch: *b,
    })
}

fn forward_row(case: String, ours: &forward::Ours, gemm_rate: f64) -> Row {
    let mut row = Row::new("forward", case, ours.samples_per_sec, "samples/s/core")
        .timed(&ours.stats)
        .versus(ours.samples_per_sec / gemm_rate, "sgemm", false)
        .note(forward::density_text(&ours.density))
        .note(format!(
            "{} GFLOP/s useful (nonzero terms)",
            sig3(ours.useful_gflops)
        ))
        .note(format!("batch acc {:.1}%", ours.accuracy * 100.0))
        .metric("useful_gflops", ours.useful_gflops)
        .metric("batch_accuracy", ours.accuracy);
    for (name, d) in ["density_l1", "density_l2", "density_l3"]
        .into_iter()
        .zip(&ours.density)
    {
        row = row.metric(name, *d);
    }
    row
}

/// Noise table, stream noise, perturbation, read bandwidth and the update.
fn noise_section(
    plan: &Plan,
    threads: usize,
    (pair_forward_secs, pair_batch): (f64, usize),
    dim: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let net = NetConfig::default();

    let len_text = format!("2^{}", plan.table_len.trailing_zeros());
    progress(&format!("noise table {len_text}"));
    let (stats, table) = noise::bench_table(NOISE_SEED, plan.table_len, plan.table_rounds);
    let rayon_threads = rayon::current_num_threads();
    rows.push(
        Row::new(
            "noise",
            format!("NoiseTable::generate({NOISE_SEED}, {len_text})"),
            stats.median,
            "s",
        )
        .timed(&stats)
        .note(format!(
            "all cores ({rayon_threads} rayon threads); {} ns per normal per thread; {} MiB",
            sig3(stats.median * rayon_threads as f64 / plan.table_len as f64 * 1e9),
            (plan.table_len * 4) >> 20
        ))
        .metric("values", plan.table_len as f64)
        .metric("threads", rayon_threads as f64),
    );

    progress("stream perturbation");
    let stats = noise::bench_stream(dim, plan.forward)?;
    rows.push(
        Row::new(
            "noise",
            format!("stream perturbation D={}", human(dim as f64)),
            stats.median * 1e3,
            "ms/vector",
        )
        .timed(&stats)
        .note(format!(
            "{} ns per normal; 1 thread (ChaCha12 + polar method)",
            sig3(stats.median / dim as f64 * 1e9)
        ))
        .metric("ns_per_normal", stats.median / dim as f64 * 1e9),
    );

    progress("perturbation θ±σε");
    let theta = init_params(&net, 1);
    let stats = noise::bench_perturb(&net, &theta, &table, plan.forward)?;
    let ms_pair = stats.median * 1e3;
    rows.push(
        Row::new(
            "perturb",
            format!("θ+σε and θ−σε, D={}", human(dim as f64)),
            stats.median / dim as f64 * 1e9,
            "ns/param",
        )
        .timed(&stats)
        .note(format!(
            "{} ms per pair; 1 thread, table noise; {:.1}% of the pair's two ftz forwards at B={}",
            sig3(ms_pair),
            stats.median / pair_forward_secs * 100.0,
            pair_batch
        ))
        .metric("ms_per_pair", ms_pair),
    );

    let gib = plan.read_bytes as f64 / f64::from(1u32 << 30);
    progress(&format!("read bandwidth over {gib} GiB"));
    let stats = update::bench_read(plan.read_bytes, threads, plan.slow);
    let read_gbps = plan.read_bytes as f64 / stats.median / 1e9;
    rows.push(
        Row::new(
            "memory",
            format!("read-sum {gib} GiB f32, {threads} threads"),
            read_gbps,
            "GB/s",
        )
        .timed(&stats)
        .note("8 independent accumulators per thread: bandwidth-bound"),
    );

    let source = NoiseSource::Table(std::sync::Arc::new(table));
    for p in POPULATIONS {
        progress(&format!("update P={p}"));
        let stats = update::bench_update(&net, p, &source, threads, plan.slow)?;
        let gbps = (p * dim * 4) as f64 / stats.median / 1e9;
        let mut row = Row::new(
            "update",
            format!("apply_update P={p}, table noise, {threads} threads"),
            stats.median * 1e3,
            "ms/update",
        )
        .timed(&stats)
        .versus(gbps / read_gbps, "read bw", true)
        .note(format!("effective {} GB/s (P×D×4 B read)", sig3(gbps)))
        .metric("effective_gbps", gbps);
        if plan.table_len < DEFAULT_TABLE_LEN {
            row = row.note(format!(
                "{len_text} table: windows overlap, partly cache-resident"
            ));
        }
        rows.push(row);
    }
    Ok(rows)
}
