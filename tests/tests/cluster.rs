//! The gRPC cluster end to end: a coordinator and stateless workers on loopback give θ
//! bit-identical to the embedded trainer, whatever the number of workers and their threads;
//! real `coordinator` and `worker` processes train and exit cleanly.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use es_coordinator::cluster::{self, ClusterOptions};
use es_coordinator::config::RunConfig;
use es_coordinator::embedded;
use es_worker::{DataSource, RelayOptions, WorkerExit, WorkerOptions};
use underflow_tests::{Scratch, binary, environment, mnist_dir, small_run};

fn config() -> RunConfig {
    RunConfig {
        eval_every: 0,
        ..small_run(5)
    }
}

/// One in-process worker of a test cluster: its evaluation threads, whether it answers
/// with fake fitnesses (the load-test mode) instead of evaluating, and whether it relays θ.
#[derive(Clone, Copy, Debug)]
struct TestWorker {
    threads: usize,
    fake: bool,
    relay: Relay,
}

/// Whether a test worker relays θ to others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relay {
    Off,
    /// Listens on loopback and lets the coordinator tell others where.
    On,
    /// Listens, but announces an address where nothing listens: every fetch from it fails.
    Unreachable,
}

impl TestWorker {
    fn real(threads: usize) -> TestWorker {
        TestWorker {
            threads,
            fake: false,
            relay: Relay::Off,
        }
    }
}

/// A worker's in-process run, as spawned by [`spawn_workers`].
type WorkerTask = tokio::task::JoinHandle<Result<WorkerExit, es_worker::WorkerError>>;

/// The relay options a test worker (or hub) with `relay` runs with.
fn relay_options(relay: Relay) -> Option<RelayOptions> {
    match relay {
        Relay::Off => None,
        Relay::On => Some(RelayOptions::new("127.0.0.1:0".parse().unwrap(), None).unwrap()),
        // Loopback answers on every 127.x address, but only the bound one has a listener.
        Relay::Unreachable => Some(
            RelayOptions::new("127.0.0.2:0".parse().unwrap(), Some("127.0.0.3".into())).unwrap(),
        ),
    }
}

/// Starts an in-process coordinator of `config` with `options` on a free loopback port: its
/// endpoint, its run directory and its task.
async fn start_coordinator(
    config: &RunConfig,
    scratch: &Scratch,
    name: &str,
    options: ClusterOptions,
) -> (
    String,
    std::path::PathBuf,
    tokio::task::JoinHandle<Result<embedded::RunSummary, es_coordinator::RunError>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let env = environment(scratch, name, 1);
    let run_dir = env.run_dir.clone();
    let coordinator = tokio::spawn(cluster::run(
        config.clone(),
        env,
        options,
        listener,
        Box::pin(std::future::pending()),
    ));
    (endpoint, run_dir, coordinator)
}

/// How each of `tasks` ended, each given 30 s after the run to see that it is over.
async fn exits_of(tasks: Vec<WorkerTask>) -> Vec<Result<WorkerExit, es_worker::WorkerError>> {
    let mut exits = Vec::new();
    for task in tasks {
        let exit = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the worker (or hub) exits after the run")
            .unwrap();
        exits.push(exit);
    }
    exits
}

/// Starts one in-process worker of `endpoint` per entry of `workers`, named `{name}-{i}`.
fn spawn_workers(
    endpoint: &str,
    workers: &[TestWorker],
    name: &str,
    scratch: &Scratch,
    mnist: &Arc<es_data::mnist::Mnist>,
) -> Vec<WorkerTask> {
    workers
        .iter()
        .enumerate()
        .map(|(i, worker)| {
            let mut options = WorkerOptions::new(endpoint, DataSource::Loaded(Arc::clone(mnist)));
            options.threads = worker.threads;
            options.fake_fitness = worker.fake;
            options.cache_dir = scratch.path().join("cache");
            options.name = format!("{name}-{i}");
            options.relay = relay_options(worker.relay);
            tokio::spawn(es_worker::run(options, std::future::pending::<()>()))
        })
        .collect()
}

/// Runs `config` on a coordinator (auditing every `audit_every` generations, spreading the
/// update over the workers unless `local_update`) with one in-process worker per entry of
/// `workers`; returns the final θ's bytes and how each worker ended. A spread update must
/// have come from the workers alone.
async fn cluster_run(
    config: &RunConfig,
    scratch: &Scratch,
    name: &str,
    workers: &[TestWorker],
    audit_every: u32,
    local_update: bool,
) -> (Vec<u8>, Vec<Result<WorkerExit, es_worker::WorkerError>>) {
    let options = ClusterOptions {
        audit_every,
        spread_update: !local_update,
        ..ClusterOptions::default()
    };
    cluster_run_with(config, scratch, name, workers, options).await
}

/// [`cluster_run`] with the coordinator's `options` (their worker count set from `workers`).
async fn cluster_run_with(
    config: &RunConfig,
    scratch: &Scratch,
    name: &str,
    workers: &[TestWorker],
    options: ClusterOptions,
) -> (Vec<u8>, Vec<Result<WorkerExit, es_worker::WorkerError>>) {
    let local_update = !options.spread_update;
    let options = ClusterOptions {
        workers: workers.len(),
        ..options
    };
    let (endpoint, run_dir, coordinator) = start_coordinator(config, scratch, name, options).await;
    let mnist = Arc::new(es_data::mnist::load(&mnist_dir()).unwrap());
    let tasks = spawn_workers(&endpoint, workers, name, scratch, &mnist);
    let summary = coordinator.await.unwrap().unwrap();
    assert_eq!(summary.generations, 5);
    let exits = exits_of(tasks).await;
    let metrics = underflow_tests::processes::metrics(&run_dir);
    for line in &metrics {
        let (delivered, local) = (&line["sums_delivered"], &line["sums_local"]);
        if local_update {
            assert!(delivered.is_null() && local.is_null(), "{line}");
        } else if exits.iter().all(Result::is_ok) {
            // Every worker stayed: none of the update was left to the coordinator.
            assert!(delivered.as_u64().unwrap() > 0, "{line}");
            assert_eq!(local.as_u64(), Some(0), "{line}");
        }
    }
    (std::fs::read(run_dir.join("theta.f32")).unwrap(), exits)
}

/// Every worker of a test cluster saw the run finish.
fn assert_all_finished(exits: Vec<Result<WorkerExit, es_worker::WorkerError>>) {
    for exit in exits {
        assert_eq!(exit.unwrap(), WorkerExit::Finished);
    }
}

/// [`cluster_run`] with real workers of `worker_threads` threads each, audits on; every
/// worker must see the run finish.
async fn cluster_theta(
    config: &RunConfig,
    scratch: &Scratch,
    name: &str,
    worker_threads: &[usize],
) -> Vec<u8> {
    let workers: Vec<TestWorker> = worker_threads
        .iter()
        .map(|&threads| TestWorker::real(threads))
        .collect();
    let (theta, exits) = cluster_run(config, scratch, name, &workers, 1, false).await;
    assert_all_finished(exits);
    theta
}

/// The embedded run of `config` in the background: θ's bytes.
async fn embedded_theta(config: &RunConfig, scratch: &Arc<Scratch>) -> Vec<u8> {
    let (config, scratch) = (config.clone(), Arc::clone(scratch));
    tokio::task::spawn_blocking(move || {
        let env = environment(&scratch, "embedded", 2);
        let embedded_dir = env.run_dir.clone();
        embedded::run(&config, &env, &AtomicBool::new(false)).unwrap();
        std::fs::read(embedded_dir.join("theta.f32")).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn theta_is_bit_identical_embedded_with_one_worker_and_with_three() {
    let scratch = Arc::new(Scratch::new("cluster-determinism"));
    let config = config();
    let embedded = embedded_theta(&config, &scratch).await;
    let one = cluster_theta(&config, &scratch, "one", &[2]).await;
    assert!(
        one == embedded,
        "θ with 1 worker differs from the embedded run"
    );
    let three = cluster_theta(&config, &scratch, "three", &[1, 2, 1]).await;
    assert!(
        three == embedded,
        "θ with 3 workers differs from the embedded run"
    );
    // The coordinator computing the whole update itself (--local-update): the same bits.
    let real = TestWorker::real(1);
    let (local, exits) = cluster_run(&config, &scratch, "local", &[real, real], 1, true).await;
    assert_all_finished(exits);
    assert!(
        local == embedded,
        "θ with the update on the coordinator differs from the embedded run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_layer_populations_and_neuron_groups_theta_is_bit_identical_with_two_workers() {
    let scratch = Arc::new(Scratch::new("cluster-layer-populations"));
    // Chunks mix pairs of neuron groups of layers 1 and 2 (run from θ's prefix) and of the
    // whole layer 3.
    let config = RunConfig {
        layer_populations: vec![8, 6, 2],
        neuron_groups: vec![4, 3, 1],
        ..config()
    };
    let embedded = embedded_theta(&config, &scratch).await;
    let plain_scratch = Arc::new(Scratch::new("cluster-lp-plain"));
    let plain = embedded_theta(&self::config(), &plain_scratch).await;
    assert!(embedded != plain, "layer populations changed nothing");
    let two = cluster_theta(&config, &scratch, "two", &[1, 2]).await;
    assert!(
        two == embedded,
        "θ with layer populations and 2 workers differs from the embedded run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_growing_batch_theta_is_bit_identical_with_two_workers() {
    let scratch = Arc::new(Scratch::new("cluster-batch-schedule"));
    // The batch grows from the test run's size to three times it over the run: workers draw
    // each generation's batch from the spec, and prove the golden task where it ends.
    let config = RunConfig {
        batch_schedule: "linear:3".into(),
        ..config()
    };
    let embedded = embedded_theta(&config, &scratch).await;
    let plain_scratch = Arc::new(Scratch::new("cluster-bs-plain"));
    let plain = embedded_theta(&self::config(), &plain_scratch).await;
    assert!(embedded != plain, "the batch schedule changed nothing");
    let two = cluster_theta(&config, &scratch, "two", &[1, 2]).await;
    assert!(
        two == embedded,
        "θ with a batch schedule and 2 workers differs from the embedded run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shifted_images_theta_is_bit_identical_with_two_workers() {
    let scratch = Arc::new(Scratch::new("cluster-image-shift"));
    // Every training image moves by up to 2 pixels: workers shift each generation's images
    // from the spec exactly as the embedded trainer does.
    let config = RunConfig {
        image_shift: 2,
        ..config()
    };
    let embedded = embedded_theta(&config, &scratch).await;
    let plain_scratch = Arc::new(Scratch::new("cluster-shift-plain"));
    let plain = embedded_theta(&self::config(), &plain_scratch).await;
    assert!(embedded != plain, "the image shift changed nothing");
    let two = cluster_theta(&config, &scratch, "two", &[1, 2]).await;
    assert!(
        two == embedded,
        "θ with shifted images and 2 workers differs from the embedded run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_running_average_the_cluster_writes_the_embedded_average() {
    let scratch = Arc::new(Scratch::new("cluster-average"));
    // The run's result is θ̄: the coordinator keeps it beside θ while workers get θ.
    let config = RunConfig {
        average_decay: 0.9,
        ..config()
    };
    let embedded = embedded_theta(&config, &scratch).await;
    let plain_scratch = Arc::new(Scratch::new("cluster-average-plain"));
    let plain = embedded_theta(&self::config(), &plain_scratch).await;
    assert!(embedded != plain, "the average is θ itself");
    let two = cluster_theta(&config, &scratch, "two", &[1, 2]).await;
    assert!(
        two == embedded,
        "θ̄ with 2 workers differs from the embedded run's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_workers_drive_a_run_only_with_audits_off() {
    let scratch = Arc::new(Scratch::new("cluster-fake"));
    let config = config();
    let embedded = embedded_theta(&config, &scratch).await;
    let fake = TestWorker {
        fake: true,
        ..TestWorker::real(1)
    };
    // Audits off (the load test): fake workers prove the golden task, join and finish the
    // run; θ follows their fake fitnesses, so it is not the embedded run's.
    let (theta, exits) = cluster_run(
        &config,
        &scratch,
        "fake-only",
        &[fake, fake, fake],
        0,
        false,
    )
    .await;
    assert_all_finished(exits);
    assert_eq!(theta.len(), embedded.len());
    assert!(theta != embedded, "fake fitnesses moved θ like real ones");

    // Audits on (the default): the fake worker is quarantined at its first result, the real
    // one redoes its indices, and θ is the embedded run's bit for bit.
    let real = TestWorker::real(1);
    let (theta, exits) =
        cluster_run(&config, &scratch, "fake-audited", &[fake, real], 1, false).await;
    let mut exits = exits.into_iter();
    let e = exits.next().unwrap().unwrap_err();
    assert!(e.is_refusal(), "{e}");
    assert!(e.to_string().contains("GOLDEN_MISMATCH"), "{e}");
    assert_eq!(exits.next().unwrap().unwrap(), WorkerExit::Finished);
    assert!(
        theta == embedded,
        "θ with a quarantined fake worker differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_theta_relayed_between_workers_the_coordinator_sends_it_once_and_theta_is_identical() {
    let scratch = Arc::new(Scratch::new("cluster-relay"));
    // Neuron groups make the update spread over the workers small next to θ, so the bytes the
    // coordinator sends show whether θ went out once or to everyone.
    let config = RunConfig {
        layer_populations: vec![8, 6, 2],
        neuron_groups: vec![4, 3, 1],
        ..config()
    };
    let embedded = embedded_theta(&config, &scratch).await;
    let theta_bytes = embedded.len() as u64;
    let options = ClusterOptions {
        relay_fanout: 1,
        ..ClusterOptions::default()
    };
    let relaying = TestWorker {
        relay: Relay::On,
        ..TestWorker::real(1)
    };
    // Fanout 1: the coordinator feeds one worker, which feeds the second, which feeds the
    // third.
    let (theta, exits) = cluster_run_with(
        &config,
        &scratch,
        "relay",
        &[relaying, relaying, relaying],
        options.clone(),
    )
    .await;
    assert_all_finished(exits);
    assert!(theta == embedded, "θ relayed between workers differs");
    let metrics = underflow_tests::processes::metrics(&scratch.path().join("relay"));
    assert_eq!(metrics.len(), 5);
    for line in &metrics {
        assert_eq!(line["theta_relayed"].as_u64(), Some(2), "{line}");
        assert_eq!(line["theta_requested"].as_u64(), Some(0), "{line}");
        let sent = line["wire_bytes_sent"].as_u64().unwrap();
        assert!(
            sent < 2 * theta_bytes,
            "{sent} bytes sent for a θ of {theta_bytes}: θ went to more than one worker"
        );
    }

    // Relays nobody can reach: every fetch fails, the workers ask the coordinator, and the
    // run goes on with the same bits.
    let unreachable = TestWorker {
        relay: Relay::Unreachable,
        ..TestWorker::real(1)
    };
    let (theta, exits) = cluster_run_with(
        &config,
        &scratch,
        "relay-unreachable",
        &[unreachable, unreachable, relaying],
        options,
    )
    .await;
    assert_all_finished(exits);
    assert!(theta == embedded, "θ after failed relays differs");
    // Whatever the join order, the first worker fed by a relay or the second one is fed by
    // an unreachable relay: one or two fallbacks per generation.
    let metrics = underflow_tests::processes::metrics(&scratch.path().join("relay-unreachable"));
    assert_eq!(metrics.len(), 5);
    for line in &metrics {
        assert_eq!(line["theta_relayed"].as_u64(), Some(2), "{line}");
        let requested = line["theta_requested"].as_u64().unwrap();
        assert!((1..=2).contains(&requested), "{line}");
    }
}

/// A child process killed when the test ends, whatever happens.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait(child: &mut Process, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn coordinator_and_two_worker_processes_train_and_exit_cleanly() {
    let scratch = Scratch::new("processes");
    let port = free_port();
    let run_dir = scratch.path().join("run");
    let cache = scratch.path().join("cache");
    let mut coordinator = Process(
        Command::new(binary("coordinator"))
            .args([
                "--workers",
                "2",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--generations",
                "3",
            ])
            .args([
                "--population",
                "16",
                "--batch",
                "32",
                "--noise-table-len",
                "4194304",
                "--eval-every",
                "0",
            ])
            .args(["--mirror", "none", "--threads", "1"])
            .arg("--data")
            .arg(mnist_dir())
            .arg("--run-dir")
            .arg(&run_dir)
            .env("UNDERFLOW_CACHE", &cache)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut workers: Vec<Process> = (0..2)
        .map(|_| {
            Process(
                Command::new(binary("worker"))
                    .args(["--connect", &format!("127.0.0.1:{port}"), "--threads", "1"])
                    .arg("--data")
                    .arg(mnist_dir())
                    .env("UNDERFLOW_CACHE", &cache)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // A hang guard, not a speed test: the debug build on the portable kernel spends about
    // 100 s in the final evaluations when another process shares the 2 cores.
    assert!(
        wait(&mut coordinator, Duration::from_secs(400)).success(),
        "coordinator failed"
    );
    for w in &mut workers {
        assert!(
            wait(w, Duration::from_secs(30)).success(),
            "a worker failed"
        );
    }
    for file in ["config.toml", "metrics.jsonl", "theta.f32", "summary.json"] {
        assert!(
            run_dir.join(file).exists(),
            "{file} missing from the run directory"
        );
    }
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert_eq!(line["workers"], 2);
        assert!(
            line["wire_bytes_sent"].as_u64().unwrap() > 2 * 4 * 669_706,
            "θ went to both workers"
        );
    }
}

/// Runs `config` on a root coordinator (audits every generation, θ's bytes sent to at most
/// `relay_fanout` hubs) served by one hub per entry of `hubs`, each with its in-process
/// workers and relaying θ to other hubs as `hub_relay` says; returns the final θ's bytes,
/// the root's metrics lines and how each hub and worker ended (per hub: the hub, then its
/// workers).
async fn hub_run(
    config: &RunConfig,
    scratch: &Scratch,
    name: &str,
    hubs: &[&[TestWorker]],
    hub_relay: Relay,
    relay_fanout: usize,
) -> (
    Vec<u8>,
    Vec<serde_json::Value>,
    Vec<Result<WorkerExit, es_worker::WorkerError>>,
) {
    let options = ClusterOptions {
        workers: hubs.len(),
        audit_every: 1,
        relay_fanout,
        ..ClusterOptions::default()
    };
    let (root, run_dir, coordinator) = start_coordinator(config, scratch, name, options).await;
    let mnist = Arc::new(es_data::mnist::load(&mnist_dir()).unwrap());
    let mut tasks = Vec::new();
    for (h, workers) in hubs.iter().enumerate() {
        let hub_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let hub = cluster::Hub::new(cluster::HubOptions {
            // Each hub joins the root's generations once all its workers are in.
            cluster: ClusterOptions {
                workers: workers.len(),
                audit_every: 1,
                ..ClusterOptions::default()
            },
            listen: hub_addr,
            threads: 1,
        });
        let mut hub_options =
            WorkerOptions::new(root.clone(), DataSource::Loaded(Arc::clone(&mnist)));
        hub_options.threads = workers.iter().map(|w| w.threads).sum();
        hub_options.cache_dir = scratch.path().join("cache");
        hub_options.name = format!("{name}-hub{h}");
        hub_options.relay = relay_options(hub_relay);
        hub_options.delegate = Some(Arc::new(hub));
        tasks.push(tokio::spawn(es_worker::run(
            hub_options,
            std::future::pending::<()>(),
        )));
        tasks.extend(spawn_workers(
            &format!("http://{hub_addr}"),
            workers,
            &format!("{name}-hub{h}"),
            scratch,
            &mnist,
        ));
    }
    let summary = tokio::time::timeout(Duration::from_secs(300), coordinator)
        .await
        .expect("the run through hubs ends")
        .unwrap()
        .unwrap();
    assert_eq!(summary.generations, config.generations);
    let exits = exits_of(tasks).await;
    let metrics = underflow_tests::processes::metrics(&run_dir);
    (
        std::fs::read(run_dir.join("theta.f32")).unwrap(),
        metrics,
        exits,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_hub_theta_is_bit_identical_and_the_root_serves_one_stream() {
    let scratch = Arc::new(Scratch::new("cluster-hub"));
    let config = config();
    let embedded = embedded_theta(&config, &scratch).await;
    let workers = [TestWorker::real(1), TestWorker::real(2)];
    let (theta, metrics, exits) =
        hub_run(&config, &scratch, "hub", &[&workers], Relay::Off, 8).await;
    assert!(
        theta == embedded,
        "θ through a hub differs from the embedded run"
    );
    // The hub, then both of its workers, saw the run finish.
    assert_all_finished(exits);
    assert_eq!(metrics.len(), config.generations as usize);
    for line in &metrics {
        assert_eq!(line["workers"], 1, "the root serves the hub alone: {line}");
        // The hub answered the spread update (its workers summed the noise): the root
        // summed nothing itself.
        assert!(line["sums_delivered"].as_u64().unwrap() > 0, "{line}");
        assert_eq!(line["sums_local"].as_u64(), Some(0), "{line}");
        assert_eq!(line["quarantined"].as_u64(), Some(0), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_quarantines_a_worker_of_other_bits_before_any_of_its_results_go_up() {
    let scratch = Arc::new(Scratch::new("cluster-hub-audit"));
    let config = config();
    let embedded = embedded_theta(&config, &scratch).await;
    let fake = TestWorker {
        fake: true,
        ..TestWorker::real(1)
    };
    let workers = [TestWorker::real(1), fake];
    let (theta, metrics, exits) =
        hub_run(&config, &scratch, "hub-audit", &[&workers], Relay::Off, 8).await;
    assert!(
        theta == embedded,
        "θ through a hub with a wrong worker differs from the embedded run"
    );
    let [hub, real, fake]: [_; 3] = exits.try_into().unwrap();
    assert_eq!(hub.unwrap(), WorkerExit::Finished);
    assert_eq!(real.unwrap(), WorkerExit::Finished);
    let refused = fake.unwrap_err();
    assert!(refused.is_refusal(), "{refused}");
    // The root never saw a wrong result: it audited the hub every generation and
    // quarantined nobody.
    for line in &metrics {
        assert_eq!(line["quarantined"].as_u64(), Some(0), "{line}");
        assert_eq!(line["workers"], 1, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_relay_theta_to_each_other_and_theta_stays_bit_identical() {
    let scratch = Arc::new(Scratch::new("cluster-hub-relay"));
    let config = config();
    let embedded = embedded_theta(&config, &scratch).await;
    let (a, b) = ([TestWorker::real(1)], [TestWorker::real(1)]);
    // The root sends θ's bytes to one hub; the other fetches them from it.
    let (theta, metrics, exits) =
        hub_run(&config, &scratch, "hub-relay", &[&a, &b], Relay::On, 1).await;
    assert!(
        theta == embedded,
        "θ through two relaying hubs differs from the embedded run"
    );
    assert_all_finished(exits);
    assert_eq!(metrics.len(), config.generations as usize);
    for line in &metrics {
        assert_eq!(line["workers"], 2, "{line}");
        assert_eq!(
            line["theta_relayed"].as_u64(),
            Some(1),
            "one hub fetched θ: {line}"
        );
        assert_eq!(
            line["theta_requested"].as_u64(),
            Some(0),
            "no fetch failed: {line}"
        );
        assert_eq!(line["sums_local"].as_u64(), Some(0), "{line}");
    }
}
