//! The `coordinator` binary's command line: help, and the errors people hit first. (Also makes
//! `cargo test` build the binary, which the cluster tests in `tests/` start as a process.)

use std::process::Command;

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
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
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
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
