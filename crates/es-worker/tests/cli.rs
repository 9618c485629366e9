//! The `worker` binary's command line: its help lists the flags, and missing data is reported
//! before any connection is tried. (Also makes `cargo test` build the binary, which the
//! cross-process tests of the workspace run.)

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[test]
fn help_lists_the_flags() {
    let output = worker().arg("--help").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--connect",
        "--threads",
        "--data",
        "--cache-dir",
        "--name",
        "--kernel",
        "--mirror",
        "--token",
        "--give-up-after",
        "--relay-listen",
        "--relay-host",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn missing_data_is_named_before_connecting() {
    let output = worker()
        .args(["--connect", "127.0.0.1:1", "--data", "/nonexistent"])
        .env_remove("UNDERFLOW_DATA")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("cannot load mnist from /nonexistent"),
        "{stderr}"
    );
    assert!(stderr.contains("not found in /nonexistent"), "{stderr}");
}

#[test]
fn a_missing_connect_flag_is_a_usage_error() {
    let output = worker().output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--connect"), "{stderr}");
}

#[test]
fn an_unreachable_coordinator_is_named_with_what_to_check() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/mnist");
    let output = worker()
        .args(["--connect", &addr, "--give-up-after", "1", "--data", data])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!("gave up reconnecting to http://{addr}"))
            && stderr.contains("Is the coordinator running")
            && stderr.contains("--connect"),
        "{stderr}"
    );
}

#[test]
fn relay_settings_that_cannot_work_are_named_before_connecting() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/mnist");
    let run = |extra: &[&str]| {
        let output = worker()
            .args([
                "--connect",
                "127.0.0.1:1",
                "--data",
                data,
                "--give-up-after",
                "1",
            ])
            .args(extra)
            .env_remove("UNDERFLOW_TOKEN")
            .env_remove("UNDERFLOW_TOKEN_FILE")
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        String::from_utf8(output.stderr).unwrap()
    };
    // Reachable from other machines and open to anyone: refused.
    let stderr = run(&["--relay-listen", "0.0.0.0:0"]);
    assert!(
        stderr.contains("relay listener 0.0.0.0:0") && stderr.contains("without a token"),
        "{stderr}"
    );
    // Many connections of one process cannot share one port.
    let stderr = run(&[
        "--fake-fitness",
        "--connections",
        "2",
        "--relay-listen",
        "127.0.0.1:7000",
    ]);
    assert!(stderr.contains("give port 0"), "{stderr}");
    let stderr = run(&["--relay-listen", "127.0.0.1:0", "--relay-host", "a b"]);
    assert!(
        stderr.contains("--relay-host") && stderr.contains("relay host \"a b\""),
        "{stderr}"
    );
}
