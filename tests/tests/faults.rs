//! Faults on real processes over loopback: workers killed, stopped, cut off by the network
//! and restarted, the coordinator killed and resumed from its checkpoint. In every case the
//! final θ is bit-identical to an undisturbed run of the same seed (DESIGN.md §3).
//!
//! Each test prints what it measured (time to detect a lost worker, time lost, evaluations
//! repeated); `cargo test -p underflow-tests --test faults -- --nocapture` shows it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use es_coordinator::config::RunConfig;
use es_coordinator::embedded;
use underflow_tests::processes::{
    Process, RunPaths, coordinator, free_port, log_count, metrics, wait_for, worker,
};
use underflow_tests::proxy::Proxy;
use underflow_tests::{Scratch, environment, small_run};

/// The scenarios run one at a time: each starts four or five processes, and on a 2-core
/// machine two at once would starve the heartbeats that fault detection relies on.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Generations slow enough (tenths of a second on a 2-core debug build) that a fault lands
/// in the middle of one.
fn config(generations: u32) -> RunConfig {
    RunConfig {
        population: 24,
        batch: 500,
        eval_every: 0,
        ..small_run(generations)
    }
}

/// The same run for the `coordinator` binary: its config as a file in `dir`, so that the
/// binary resolves exactly the settings the reference trained (without `--config` it would
/// start from the recommended recipe instead).
fn run_flags(generations: u32, dir: &Path) -> Vec<String> {
    let path = dir.join("run.toml");
    std::fs::write(&path, config(generations).to_toml()).expect("write the run's config");
    vec!["--config".into(), path.display().to_string()]
}

/// θ of the undisturbed run, from the embedded trainer (bit-identical to any cluster run).
fn reference_theta(scratch: &Scratch, generations: u32) -> Vec<u8> {
    let env = environment(scratch, "reference", 2);
    embedded::run(&config(generations), &env, &AtomicBool::new(false)).expect("reference run");
    std::fs::read(env.run_dir.join("theta.f32")).expect("reference θ")
}

/// Coordinator flags for a cluster of `workers` on `port` with quick fault detection.
fn cluster_flags(port: u16, workers: usize, paths: &RunPaths) -> Vec<String> {
    vec![
        "--workers".into(),
        workers.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--heartbeat".into(),
        "0.5".into(),
        "--lease".into(),
        "2".into(),
        "--run-dir".into(),
        paths.run_dir.display().to_string(),
    ]
}

/// One scenario: the undisturbed run's θ, and a coordinator waiting for `workers` workers on
/// a free port with quick fault detection (workers are started by the test).
struct Scenario {
    // Dropped first: the processes end before their scratch directory goes.
    coord: Process,
    reference: Vec<u8>,
    paths: RunPaths,
    port: u16,
    address: String,
    log: PathBuf,
    _scratch: Scratch,
}

impl Scenario {
    fn start(name: &str, generations: u32, workers: usize, extra: &[&str]) -> Scenario {
        let scratch = Scratch::new(name);
        let reference = reference_theta(&scratch, generations);
        let paths = RunPaths::new(scratch.path());
        let port = free_port();
        let log = paths.log("coordinator");
        let mut args = cluster_flags(port, workers, &paths);
        args.extend(run_flags(generations, scratch.path()));
        args.extend(extra.iter().map(|a| a.to_string()));
        let coord = coordinator(&args, &paths.cache, &log);
        Scenario {
            coord,
            reference,
            paths,
            port,
            address: format!("127.0.0.1:{port}"),
            log,
            _scratch: scratch,
        }
    }

    /// A one-thread worker dialing the coordinator directly, logging to `w{i}.log`.
    fn worker(&self, i: usize) -> Process {
        worker(
            &self.address,
            &self.paths.cache,
            &self.paths.log(&format!("w{i}")),
            &[],
        )
    }
}

fn assert_same_theta(run_dir: &Path, reference: &[u8], what: &str) {
    let theta = std::fs::read(run_dir.join("theta.f32")).expect("the run wrote θ");
    assert!(
        theta == reference,
        "{what}: θ differs from the undisturbed run"
    );
}

fn reassigned(run_dir: &Path) -> u64 {
    metrics(run_dir)
        .iter()
        .filter_map(|l| l["reassigned"].as_u64())
        .sum()
}

/// Seconds of the slowest generation and of the median one.
fn generation_times(run_dir: &Path) -> (f64, f64) {
    let walls: Vec<f64> = metrics(run_dir)
        .iter()
        .filter_map(|l| l["wall_secs"].as_f64())
        .collect();
    let mut times: Vec<f64> = walls.windows(2).map(|w| w[1] - w[0]).collect();
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    (times.last().copied().unwrap_or(0.0), median)
}

/// Half the time the last generation took.
fn half_a_generation(run_dir: &Path) -> Duration {
    let walls: Vec<f64> = metrics(run_dir)
        .iter()
        .filter_map(|l| l["wall_secs"].as_f64())
        .collect();
    let last = match walls.as_slice() {
        [.., a, b] => b - a,
        [a] => *a,
        [] => 0.0,
    };
    Duration::from_secs_f64((last / 2.0).clamp(0.0, 5.0))
}

fn finish(coordinator: &mut Process, workers: &mut [Process]) {
    assert!(
        coordinator.wait(Duration::from_secs(240)).success(),
        "coordinator failed"
    );
    for w in workers {
        assert!(
            w.wait(Duration::from_secs(60)).success(),
            "a worker did not finish cleanly"
        );
    }
}

#[test]
fn a_worker_killed_mid_generation_changes_nothing() {
    let _serial = one_at_a_time();
    let generations = 12;
    let mut s = Scenario::start("fault-kill", generations, 3, &[]);
    let mut workers: Vec<Process> = (0..3).map(|i| s.worker(i)).collect();
    wait_for("three generations", Duration::from_secs(120), || {
        metrics(&s.paths.run_dir).len() >= 3
    });
    // Generations end when metrics.jsonl grows: half a generation later is mid-generation.
    std::thread::sleep(half_a_generation(&s.paths.run_dir));
    let left_before = log_count(&s.log, "worker left");
    workers.remove(1).kill();
    let detected = wait_for("the coordinator to notice", Duration::from_secs(30), || {
        log_count(&s.log, "worker left") > left_before
    });
    finish(&mut s.coord, &mut workers);
    assert_same_theta(&s.paths.run_dir, &s.reference, "after kill -9 of a worker");
    let lines = metrics(&s.paths.run_dir);
    assert_eq!(lines.len(), generations as usize);
    assert!(
        lines.iter().any(|l| l["workers"] == 2),
        "the run went on with two workers"
    );
    for line in std::fs::read_to_string(&s.log).unwrap().lines() {
        if line.contains("worker left") || line.contains("expired") {
            eprintln!("coordinator: {line}");
        }
    }
    let (slowest, median) = generation_times(&s.paths.run_dir);
    eprintln!(
        "kill -9: lost worker detected in {:.0} ms; evaluations repeated: {}; slowest generation {slowest:.3} s vs median {median:.3} s",
        detected.as_secs_f64() * 1e3,
        2 * reassigned(&s.paths.run_dir)
    );
}

#[test]
fn a_stopped_worker_is_dropped_and_rejoins_when_continued() {
    let _serial = one_at_a_time();
    let generations = 14;
    let mut s = Scenario::start("fault-stop", generations, 3, &[]);
    let mut workers: Vec<Process> = (0..3).map(|i| s.worker(i)).collect();
    wait_for("two generations", Duration::from_secs(120), || {
        metrics(&s.paths.run_dir).len() >= 2
    });
    std::thread::sleep(half_a_generation(&s.paths.run_dir));
    let left_before = log_count(&s.log, "worker left");
    let proven_before = log_count(&s.log, "worker proven");
    workers[2].signal("STOP");
    // Three heartbeats of silence (1.5 s) drop it; its leases go to the others.
    let detected = wait_for(
        "the stalled worker to be dropped",
        Duration::from_secs(30),
        || log_count(&s.log, "worker left") > left_before,
    );
    let stopped_at = metrics(&s.paths.run_dir).len();
    std::thread::sleep(Duration::from_secs(1));
    workers[2].signal("CONT");
    let rejoined = wait_for(
        "the continued worker to rejoin",
        Duration::from_secs(60),
        || log_count(&s.log, "worker proven") > proven_before || s.coord.has_exited(),
    );
    finish(&mut s.coord, &mut workers);
    assert_same_theta(&s.paths.run_dir, &s.reference, "after SIGSTOP/SIGCONT");
    let lines = metrics(&s.paths.run_dir);
    assert!(
        lines[stopped_at..].iter().any(|l| l["workers"] == 3) || stopped_at + 2 >= lines.len(),
        "the continued worker took part again"
    );
    eprintln!(
        "SIGSTOP: stalled worker dropped after {:.0} ms of silence detection; rejoined {:.0} ms after SIGCONT; evaluations repeated: {}; slowest generation {:.3} s vs median {:.3} s",
        detected.as_secs_f64() * 1e3,
        rejoined.as_secs_f64() * 1e3,
        2 * reassigned(&s.paths.run_dir),
        generation_times(&s.paths.run_dir).0,
        generation_times(&s.paths.run_dir).1
    );
}

#[test]
fn a_killed_coordinator_resumes_from_its_checkpoint_and_the_workers_ride_it_out() {
    let _serial = one_at_a_time();
    let generations = 14;
    let mut s = Scenario::start("fault-resume", generations, 2, &["--checkpoint-every", "4"]);
    let mut workers: Vec<Process> = (0..2).map(|i| s.worker(i)).collect();
    let checkpoint = s.paths.run_dir.join("checkpoints/g00000008.ckpt");
    wait_for(
        "the checkpoint of generation 8",
        Duration::from_secs(120),
        || checkpoint.exists(),
    );
    // Let it run past the checkpoint, so that the resumed run redoes generations.
    wait_for("generation 10", Duration::from_secs(60), || {
        metrics(&s.paths.run_dir).len() >= 10
    });
    s.coord.kill();
    let killed = Instant::now();
    let mut resume = vec![
        "--resume".to_string(),
        s.paths.run_dir.display().to_string(),
    ];
    resume.extend(cluster_flags(s.port, 2, &s.paths));
    let log = s.paths.log("coordinator-2");
    s.coord = coordinator(&resume, &s.paths.cache, &log);
    let back = wait_for("the workers to rejoin", Duration::from_secs(60), || {
        log_count(&log, "worker proven") >= 2 || s.coord.has_exited()
    });
    let downtime = killed.elapsed().min(back + Duration::from_secs(1));
    finish(&mut s.coord, &mut workers);
    assert_same_theta(
        &s.paths.run_dir,
        &s.reference,
        "after the coordinator's restart",
    );
    let generations_logged: Vec<u64> = metrics(&s.paths.run_dir)
        .iter()
        .map(|l| l["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(
        generations_logged,
        (0..u64::from(generations)).collect::<Vec<_>>(),
        "metrics.jsonl holds each generation once"
    );
    eprintln!(
        "coordinator kill -9 at generation ≥ 10, resumed from generation 8: workers back {:.0} ms after the restart ({:.1} s of downtime)",
        back.as_secs_f64() * 1e3,
        downtime.as_secs_f64()
    );
}

/// A small deterministic generator for the chaos schedule.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn chaos_random_kills_and_restarts_of_workers_leave_theta_bit_identical() {
    let _serial = one_at_a_time();
    let generations = 20;
    let mut s = Scenario::start("fault-chaos", generations, 3, &[]);
    let mut started = 0;
    let spawn = |started: &mut usize| {
        *started += 1;
        worker(
            &s.address,
            &s.paths.cache,
            &s.paths.log(&format!("w{started}")),
            &[],
        )
    };
    let mut workers: Vec<Process> = (0..3).map(|_| spawn(&mut started)).collect();
    wait_for("the first generation", Duration::from_secs(120), || {
        !metrics(&s.paths.run_dir).is_empty()
    });
    let mut rng = SplitMix(0x00c0_ffee);
    let mut kills = 0;
    // At most 5 faults, one every 0.2–1.0 s, while the run lasts; one worker always lives.
    while kills < 5 && !s.coord.has_exited() {
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        if s.coord.has_exited() {
            break;
        }
        if workers.len() > 1 && rng.below(3) > 0 {
            let victim = rng.below(workers.len() as u64) as usize;
            workers.remove(victim).kill();
            kills += 1;
        }
        if workers.len() < 3 {
            workers.push(spawn(&mut started));
        }
    }
    assert!(
        s.coord.wait(Duration::from_secs(240)).success(),
        "coordinator failed"
    );
    for w in &mut workers {
        // A worker started near the end may have found the run over: either way it exits.
        w.wait(Duration::from_secs(60));
    }
    assert_same_theta(&s.paths.run_dir, &s.reference, "after chaos");
    assert_eq!(metrics(&s.paths.run_dir).len(), generations as usize);
    eprintln!(
        "chaos: {kills} workers killed, {} started in all; evaluations repeated: {}",
        started,
        2 * reassigned(&s.paths.run_dir)
    );
}

#[test]
fn a_worker_behind_a_blackholed_link_is_dropped_and_rejoins_after_healing() {
    let _serial = one_at_a_time();
    let generations = 16;
    let mut s = Scenario::start("fault-cut", generations, 3, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(Proxy::start(s.address.parse().unwrap()));
    let mut workers: Vec<Process> = (0..2).map(|i| s.worker(i)).collect();
    workers.push(worker(
        &proxy.address().to_string(),
        &s.paths.cache,
        &s.paths.log("w-behind-proxy"),
        &["--keepalive", "0.5"],
    ));
    wait_for("two generations", Duration::from_secs(120), || {
        metrics(&s.paths.run_dir).len() >= 2
    });
    std::thread::sleep(half_a_generation(&s.paths.run_dir));
    let left_before = log_count(&s.log, "worker left");
    let proven_before = log_count(&s.log, "worker proven");
    proxy.cut();
    let detected = wait_for(
        "the cut-off worker to be dropped",
        Duration::from_secs(30),
        || log_count(&s.log, "worker left") > left_before,
    );
    std::thread::sleep(Duration::from_secs(2));
    proxy.heal();
    let rejoined = wait_for(
        "the cut-off worker to rejoin",
        Duration::from_secs(60),
        || log_count(&s.log, "worker proven") > proven_before || s.coord.has_exited(),
    );
    finish(&mut s.coord, &mut workers);
    assert_same_theta(&s.paths.run_dir, &s.reference, "after a network cut");
    assert!(
        proxy.connections() >= 2,
        "the worker reconnected through the proxy"
    );
    eprintln!(
        "network cut: worker dropped {:.0} ms after the cut; rejoined {:.0} ms after healing; evaluations repeated: {}; slowest generation {:.3} s vs median {:.3} s",
        detected.as_secs_f64() * 1e3,
        rejoined.as_secs_f64() * 1e3,
        2 * reassigned(&s.paths.run_dir),
        generation_times(&s.paths.run_dir).0,
        generation_times(&s.paths.run_dir).1
    );
}
