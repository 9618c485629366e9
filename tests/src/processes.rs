//! Real `coordinator` and `worker` processes on loopback, and the signals the fault tests
//! send them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, mnist_dir};

/// A child process killed when the test ends, whatever happens.
pub struct Process(pub Child);

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT") with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// `kill -9`, and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "process {} did not exit within {limit:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn has_exited(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_some()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly on some systems.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.pid().to_string())
            .stderr(Stdio::null())
            .status();
        self.kill();
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding an ephemeral port")
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// Starts `coordinator` with `args`, its log (stderr) going to `log`. Its HTTP port is off
/// unless `args` asks for one (`--http`): tests do not compete for the default port.
pub fn coordinator(args: &[String], cache: &Path, log: &Path) -> Process {
    let mut command = Command::new(binary("coordinator"));
    command
        .args(args)
        .args(["--mirror", "none", "--threads", "1"])
        .env("UNDERFLOW_HTTP", "off");
    spawn(command, cache, log)
}

/// Starts a one-thread `worker` of the coordinator at `address`, its log going to `log`.
pub fn worker(address: &str, cache: &Path, log: &Path, extra: &[&str]) -> Process {
    let mut command = Command::new(binary("worker"));
    command
        .args(["--connect", address, "--threads", "1"])
        .args(extra);
    spawn(command, cache, log)
}

/// Starts `command` on the test MNIST copy and the noise cache `cache`, logging at info
/// level without colours to `log`.
fn spawn(mut command: Command, cache: &Path, log: &Path) -> Process {
    let file = std::fs::File::create(log)
        .unwrap_or_else(|e| panic!("creating the log {}: {e}", log.display()));
    Process(
        command
            .arg("--data")
            .arg(mnist_dir())
            .env("UNDERFLOW_CACHE", cache)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program())),
    )
}

/// The lines of a run's `metrics.jsonl`.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls `condition` every 20 ms until it holds, at most `limit`; returns how long it took.
pub fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many lines of the log at `path` contain `needle`.
pub fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// The paths of one run's files in a scratch directory.
pub struct RunPaths {
    pub run_dir: PathBuf,
    pub cache: PathBuf,
    pub logs: PathBuf,
}

impl RunPaths {
    pub fn new(root: &Path) -> RunPaths {
        let paths = RunPaths {
            run_dir: root.join("run"),
            cache: root.join("cache"),
            logs: root.join("logs"),
        };
        std::fs::create_dir_all(&paths.logs).expect("creating the log directory");
        paths
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}
