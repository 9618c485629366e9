//! The embedded single-machine trainer end to end, on real MNIST.

use std::sync::atomic::AtomicBool;

use es_coordinator::checkpoint;
use es_coordinator::config::{NoiseKind, RunConfig};
use es_coordinator::embedded;
use es_coordinator::run_dir::read_theta;
use es_kernel::ParamLayout;
use underflow_tests::{Scratch, environment, small_run};

fn theta_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("theta.f32")).expect("theta.f32 written")
}

#[test]
fn a_run_writes_a_complete_run_directory_and_learns() {
    let scratch = Scratch::new("embedded");
    // A 784-32-10 network learns within seconds; the full one needs minutes.
    let config = RunConfig {
        mode: "seed".into(),
        hidden: vec![32],
        scale_exponents: vec![125],
        init_multipliers: vec![1.0, 1.0],
        // This narrow network's logits are small: at the default temperature (2^7, set for
        // the wide alive init) it learns too slowly for 80 generations.
        output_exponent: 4,
        population: 32,
        lr: 0.01,
        ..small_run(80)
    };
    let env = environment(&scratch, "run", 2);
    let summary = embedded::run(&config, &env, &AtomicBool::new(false)).unwrap();
    assert_eq!(summary.generations, 80);
    assert!(!summary.interrupted);

    let dir = &env.run_dir;
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 80);
    for (g, line) in lines.iter().enumerate() {
        assert_eq!(line["generation"], g as u64);
        assert!(line["evals_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(line["workers"], 2);
        let has_test = line.get("test_accuracy").is_some();
        assert_eq!(
            has_test,
            (g + 1) % 5 == 0,
            "test accuracy every 5 generations"
        );
    }
    let back = RunConfig::from_file(&dir.join("config.toml")).unwrap();
    assert_eq!(back, config);
    let dim = ParamLayout::new(&config.net().unwrap()).len();
    assert_eq!(read_theta(&dir.join("theta.f32"), dim).unwrap().len(), dim);
    let summary_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary_json["generations"], 80);

    // Learning: 80 small generations take test accuracy well above chance (10%) and above
    // where it stood after 5.
    let first = lines[4]["test_accuracy"].as_f64().unwrap();
    let last = summary.test_accuracy;
    assert!(
        last > 0.3 && last > first + 0.1,
        "test accuracy {first} at 5 → {last} at 80"
    );
}

#[test]
fn theta_is_bit_identical_for_any_thread_count_and_each_noise_source() {
    let scratch = Scratch::new("threads");
    for noise in [NoiseKind::Table, NoiseKind::Stream] {
        let config = RunConfig {
            noise,
            eval_every: 0,
            ..small_run(4)
        };
        let mut thetas = Vec::new();
        for threads in [1, 2, 3] {
            let env = environment(&scratch, &format!("{noise:?}-{threads}"), threads);
            embedded::run(&config, &env, &AtomicBool::new(false)).unwrap();
            thetas.push(theta_bytes(&env.run_dir));
        }
        assert!(
            thetas.windows(2).all(|w| w[0] == w[1]),
            "{noise:?}: θ differs across thread counts"
        );
    }
}

#[test]
fn a_stop_request_ends_the_run_between_generations_and_keeps_its_results() {
    let scratch = Scratch::new("stop");
    let env = environment(&scratch, "run", 2);
    let summary = embedded::run(&small_run(50), &env, &AtomicBool::new(true)).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.generations, 0);
    assert!(env.run_dir.join("theta.f32").exists());
    assert!(env.run_dir.join("summary.json").exists());
}

#[test]
fn a_run_stopped_by_its_time_limit_leaves_a_checkpoint_where_it_stopped() {
    let scratch = Scratch::new("time-limit");
    let env = environment(&scratch, "run", 1);
    let config = RunConfig {
        time_limit_secs: 1e-9,
        checkpoint_every: 50,
        ..small_run(5)
    };
    let summary = embedded::run(&config, &env, &AtomicBool::new(false)).unwrap();
    assert_eq!(summary.generations, 0);
    // Its periodic checkpoints (every 50) would leave none: the stop itself wrote this one.
    let (_, checkpoint) = checkpoint::load_for_resume(&env.run_dir).unwrap();
    assert_eq!(checkpoint.state.generation, 0);
    assert_eq!(checkpoint.config, config);
}

#[test]
fn missing_data_is_reported_with_how_to_get_it() {
    let scratch = Scratch::new("nodata");
    let mut env = environment(&scratch, "run", 1);
    env.data_dir = scratch.path().join("empty");
    let err = embedded::run(&small_run(1), &env, &AtomicBool::new(false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");
    assert!(err.contains("UNDERFLOW_DATA"), "{err}");
}

#[test]
fn a_run_resumed_from_its_checkpoint_ends_bit_identical_and_a_corrupt_one_is_refused() {
    let scratch = Scratch::new("embedded-resume");
    // With a running average, which the checkpoint must carry for theta.f32 (the average)
    // to come out the same; the fault tests resume runs without one.
    let config = RunConfig {
        eval_every: 0,
        checkpoint_every: 3,
        average_decay: 0.5,
        ..small_run(7)
    };
    let env = environment(&scratch, "whole", 2);
    embedded::run(&config, &env, &AtomicBool::new(false)).unwrap();
    let whole = theta_bytes(&env.run_dir);

    // Resume a copy of the run directory from generation 3's checkpoint.
    let (_, checkpoint) =
        checkpoint::load_for_resume(&env.run_dir.join(checkpoint::DIR).join("g00000003.ckpt"))
            .unwrap();
    assert_eq!(checkpoint.state.generation, 3);
    assert_eq!(checkpoint.config, config);
    let resumed_env = environment(&scratch, "resumed", 1);
    std::fs::create_dir_all(&resumed_env.run_dir).unwrap();
    std::fs::copy(
        env.run_dir.join("metrics.jsonl"),
        resumed_env.run_dir.join("metrics.jsonl"),
    )
    .unwrap();
    let summary = embedded::run_from(
        &config,
        &resumed_env,
        Some(checkpoint.clone()),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(summary.generations, 7);
    assert!(
        theta_bytes(&resumed_env.run_dir) == whole,
        "the resumed run's θ differs from the uninterrupted one"
    );
    let metrics = std::fs::read_to_string(resumed_env.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        7,
        "generations 3.. written once each"
    );

    // Another run's settings do not resume this checkpoint.
    let other = RunConfig {
        lr: config.lr * 2.0,
        ..config.clone()
    };
    let e = embedded::run_from(
        &other,
        &resumed_env,
        Some(checkpoint),
        &AtomicBool::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("other settings than its checkpoint"), "{e}");

    // A damaged newest checkpoint is refused, naming the good one before it.
    let newest = env.run_dir.join(checkpoint::DIR).join("g00000006.ckpt");
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&newest, bytes).unwrap();
    let e = checkpoint::load_for_resume(&env.run_dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("g00000006.ckpt is unusable") && e.contains("g00000003.ckpt"),
        "{e}"
    );
}
