//! The `coordinator` binary's command line: help, and the errors people hit first. (Also makes
//! `cargo test` build the binary, which the cluster tests in `tests/` start as a process.)

use std::process::Command;

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
}

/// The output of a command that must succeed; its stderr is the failure message.
fn succeeded(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn help_lists_the_main_flags() {
    let out = coordinator().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--workers",
        "--listen",
        "--generations",
        "--population",
        "--mode",
        "--run-dir",
        "--data",
        "--http",
        "--log-format",
        "--relay-fanout",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
    // Grouped: every flag sits under one of these headings.
    for heading in [
        "Cluster:",
        "Security:",
        "Checkpoints and resuming:",
        "Run settings:",
        "Data and machine:",
        "Monitoring:",
    ] {
        assert!(
            text.contains(heading),
            "{heading} missing from --help:\n{text}"
        );
    }
    let monitoring = text.split("Monitoring:").nth(1).unwrap();
    assert!(
        monitoring.contains("--http") && monitoring.contains("--log-format"),
        "{text}"
    );
}

/// The settings `coordinator ARGS --print-config` resolves to.
fn resolved(args: &[&str]) -> es_coordinator::config::RunConfig {
    let out = succeeded(
        coordinator()
            .args(args)
            .arg("--print-config")
            .output()
            .unwrap(),
    );
    es_coordinator::config::RunConfig::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

#[test]
fn with_no_config_a_run_starts_from_the_recipe_and_a_population_alone_drops_its_split() {
    use es_coordinator::config::RunConfig;
    assert_eq!(resolved(&[]), RunConfig::recommended());
    let alone = resolved(&["--population", "8"]);
    assert_eq!(
        alone,
        RunConfig {
            population: 8,
            layer_populations: vec![],
            neuron_groups: vec![],
            ..RunConfig::recommended()
        }
    );
    // With a split beside it, or a file under it, the population is taken as given.
    let split = resolved(&["--population", "164", "--layer-populations", "16,128,20"]);
    assert_eq!(split.layer_populations, [16, 128, 20]);
    assert_eq!(split.neuron_groups, RunConfig::recommended().neuron_groups);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(&file, "population = 64\nlayer_populations = [32, 16, 16]\n").unwrap();
    let out = coordinator()
        .arg("--config")
        .arg(&file)
        .args(["--population", "8", "--print-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sum to 64: expected the population, 8"),
        "{err}"
    );
}

#[test]
fn a_busy_http_port_is_reported_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = coordinator()
        .args(["--http", &addr, "--generations", "1", "--mirror", "none"])
        .args(["--data", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot serve: HTTP on {addr}"))
            && err.contains("in use")
            && err.contains("--http off"),
        "{err}"
    );
}

#[test]
fn bad_values_are_named_before_any_work() {
    let out = coordinator().args(["--mode", "fast"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown arithmetic mode \"fast\""), "{err}");

    let out = coordinator()
        .args(["--lr-schedule", "cosine"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("schedule \"cosine\" is not valid"),
        "{err}"
    );
}

#[test]
fn missing_data_without_mirrors_says_how_to_get_it() {
    let dir = std::env::temp_dir().join(format!("underflow-cli-nodata-{}", std::process::id()));
    let out = coordinator()
        .args(["--mirror", "none", "--generations", "1", "--run-dir"])
        .arg(dir.join("run"))
        .arg("--data")
        .arg(dir.join("empty"))
        .env_remove("UNDERFLOW_DATA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("UNDERFLOW_DATA"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_busy_port_is_reported_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/mnist");
    let out = coordinator()
        .args([
            "--workers",
            "1",
            "--listen",
            &addr,
            "--mirror",
            "none",
            "--data",
            data,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("--listen"),
        "{err}"
    );
}

#[test]
fn resume_refuses_a_missing_checkpoint_and_conflicting_settings() {
    let dir = std::env::temp_dir().join(format!("underflow-cli-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = coordinator().arg("--resume").arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no checkpoint in") && err.contains("checkpoint_every"),
        "{err}"
    );
    let out = coordinator()
        .arg("--resume")
        .arg(&dir)
        .args(["--lr", "0.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lr") && err.contains("--resume"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn auto_resume_starts_afresh_then_continues_from_the_newest_checkpoint() {
    let dir = std::env::temp_dir().join(format!("underflow-cli-auto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/mnist");
    let run = |generations: &str| {
        coordinator()
            .args(["--auto-resume", "--generations", generations])
            .args(["--population", "8", "--batch", "16", "--eval-every", "0"])
            .args(["--noise-table-len", "1048576", "--checkpoint-every", "2"])
            .args(["--mirror", "none", "--threads", "1", "--data", data])
            .arg("--run-dir")
            .arg(dir.join("run"))
            .env("UNDERFLOW_CACHE", dir.join("cache"))
            .output()
            .unwrap()
    };
    let first = run("4");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!String::from_utf8_lossy(&first.stderr).contains("--auto-resume: resuming"));
    assert!(dir.join("run/checkpoints/g00000004.ckpt").exists());
    // Restarted with the same flags: it resumes at generation 4 and has nothing left to do.
    let again = run("4");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(
        err.contains("--auto-resume: resuming") && err.contains("generation 4"),
        "{err}"
    );
    // Restarted with other settings: refused, the checkpoint kept.
    let other = run("6");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(err.contains("other settings than its checkpoint"), "{err}");
    assert!(dir.join("run/checkpoints/g00000004.ckpt").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn probe_reports_a_coordinator_that_does_not_answer() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    // Environment settings (as in the container images) do not get in the probe's way.
    let out = coordinator()
        .args(["--probe", &addr])
        .env("UNDERFLOW_DATA", "/nonexistent")
        .env("UNDERFLOW_MIRRORS", "none")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("no coordinator answers at http://{addr}")),
        "{err}"
    );
}

#[test]
fn underflow_evaluates_and_exports_a_run() {
    let dir = std::env::temp_dir().join(format!("underflow-cli-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/mnist");
    let run = dir.join("run");
    let trained = coordinator()
        .args(["--log-format", "json"])
        .args(["--generations", "3", "--population", "8", "--batch", "32"])
        .args(["--eval-every", "0", "--noise-table-len", "1048576"])
        .args(["--mirror", "none", "--threads", "1", "--data", data])
        .arg("--run-dir")
        .arg(&run)
        .env("UNDERFLOW_CACHE", dir.join("cache"))
        .output()
        .unwrap();
    let trained = succeeded(trained);
    // --log-format json: every log line is a JSON object with a message.
    let log = String::from_utf8_lossy(&trained.stderr);
    assert!(log.lines().count() >= 2, "{log}");
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    // The end of the run drew its curves.
    for name in ["curves.svg", "curves.png"] {
        let len = std::fs::metadata(run.join(name)).map_or(0, |m| m.len());
        assert!(len > 1000, "{name}: {len} bytes");
    }
    let underflow = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_underflow"));
        c.env("UNDERFLOW_DATA", data);
        c
    };
    // The run's own arithmetic, then the unflushed control: the summary's two accuracies.
    for (mode, key) in [
        (None, "test_accuracy"),
        (Some("ieee"), "test_accuracy_unflushed"),
    ] {
        let mut c = underflow();
        c.arg("evaluate").arg(&run).arg("--json");
        if let Some(mode) = mode {
            c.args(["--mode", mode]);
        }
        c.arg("--logits").arg(dir.join("logits.npy"));
        let out = succeeded(c.output().unwrap());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["accuracy"], summary[key], "{mode:?}");
        assert_eq!(report["samples"], 10_000);
        let confusion = report["confusion"].as_array().unwrap();
        let total: u64 = confusion
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(total, 10_000);
        let npy = std::fs::metadata(dir.join("logits.npy")).unwrap().len();
        assert!((400_000..400_256).contains(&npy), "{npy} bytes of logits");
    }
    // The training split: all 60,000 images, an accuracy that agrees with its confusion matrix.
    let out = underflow()
        .arg("evaluate")
        .arg(&run)
        .args(["--split", "train", "--json"])
        .output()
        .unwrap();
    let out = succeeded(out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["split"], "train");
    assert_eq!(report["samples"], 60_000);
    let confusion = report["confusion"].as_array().unwrap();
    let rows: Vec<Vec<u64>> = confusion
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_u64().unwrap())
                .collect()
        })
        .collect();
    let total: u64 = rows.iter().flatten().sum();
    let correct: u64 = (0..10).map(|k| rows[k][k]).sum();
    assert_eq!(total, 60_000);
    assert_eq!(
        report["accuracy"].as_f64().unwrap(),
        correct as f64 / 60_000.0
    );
    // Export, and read the tensors back: θ's bits in the documented names and shapes.
    let out = underflow()
        .arg("export")
        .arg(&run)
        .arg("--out")
        .arg(dir.join("model.safetensors"))
        .output()
        .unwrap();
    succeeded(out);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let net = es_kernel::NetConfig::default();
    let back = es_coordinator::export::from_safetensors(&net, &bytes).unwrap();
    let theta = es_coordinator::run_dir::read_theta(&run.join("theta.f32"), back.len()).unwrap();
    assert!(
        back.iter()
            .map(|x| x.to_bits())
            .eq(theta.iter().map(|x| x.to_bits())),
        "the export holds θ bit for bit"
    );
    // `underflow plot` draws them again on demand.
    std::fs::remove_file(run.join("curves.png")).unwrap();
    let out = underflow().arg("plot").arg(&run).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("curves.png"),
        "{out:?}"
    );
    let png = std::fs::read(run.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let missing = underflow()
        .args(["evaluate", "/nonexistent/run"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/run"));
    let _ = std::fs::remove_dir_all(dir);
}
