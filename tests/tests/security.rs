//! Only members of a run can join, read θ or submit results, and no one client can exhaust
//! the coordinator: the shared token (missing, wrong, right), TLS with a test CA made here
//! (never committed), mutual TLS, the refusal to serve unauthenticated beyond loopback, an
//! oversized message, and a flood of bogus results from a member.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use es_coordinator::RunError;
use es_coordinator::auth::{ServerTls, Token};
use es_coordinator::cluster::{self, ClusterOptions};
use es_coordinator::config::RunConfig;
use es_coordinator::embedded::{self, RunSummary};
use es_proto::pb::coordinator_client::CoordinatorClient;
use es_proto::pb::{self, join_reply::Outcome};
use es_worker::{ClientTls, DataSource, WorkerError, WorkerExit, WorkerOptions};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use underflow_tests::{Scratch, binary, environment, mnist_dir, small_run};

const TOKEN: &str = "the-right-token";

/// Sends `authorization: Bearer <token>` when it has a token.
#[derive(Clone)]
struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {t}")).unwrap();
            r.metadata_mut().insert("authorization", value);
        }
        Ok(r)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

fn client(channel: Channel, token: Option<&str>) -> Client {
    CoordinatorClient::with_interceptor(channel, Bearer(token.map(str::to_owned)))
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

fn plain(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

fn mnist() -> Arc<es_data::mnist::Mnist> {
    Arc::new(es_data::mnist::load(&mnist_dir()).unwrap())
}

fn join_request(digest: &[u8]) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: String::new(),
        data_digest: digest.to_vec(),
        threads: 1,
        name: "test".into(),
        kernel: "portable".into(),
        sums_noise: false,
        relay_port: 0,
        relay_host: String::new(),
        carried_credits: false,
        hub: false,
        join_key: 0,
    }
}

/// Joins, retrying while the coordinator loads its data (it accepts connections at once but
/// serves only once its golden proof is ready); returns the last status if it never answers.
async fn join(client: &mut Client, request: &pb::JoinRequest) -> Result<Outcome, tonic::Status> {
    let mut last = None;
    for _ in 0..300 {
        match tokio::time::timeout(Duration::from_secs(5), client.join(request.clone())).await {
            Ok(Ok(reply)) => return Ok(reply.into_inner().outcome.expect("an outcome")),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => last = Some(status),
            Ok(Err(status)) => return Err(status),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| tonic::Status::deadline_exceeded("join never answered")))
}

struct Coordinator {
    addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<RunSummary, RunError>>,
}

async fn coordinator(
    scratch: &Scratch,
    run: &str,
    config: RunConfig,
    options: ClusterOptions,
) -> Coordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let env = environment(scratch, run, 1);
    let handle = tokio::spawn(cluster::run(
        config,
        env,
        options,
        listener,
        Box::pin(async move {
            let _ = stopped.await;
        }),
    ));
    Coordinator { addr, stop, handle }
}

fn token() -> Option<Token> {
    Some(Token::new(TOKEN).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_token_joins_or_streams() {
    let scratch = Scratch::new("security-token");
    let options = ClusterOptions {
        workers: 5, // never starts training
        token: token(),
        ..ClusterOptions::default()
    };
    let c = coordinator(&scratch, "run", small_run(1), options).await;
    let data = mnist();
    let request = join_request(&data.digest);

    // The right token joins (this also waits until the coordinator serves).
    let mut right = client(plain(&c.addr), Some(TOKEN));
    let outcome = join(&mut right, &request).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");

    let mut missing = client(plain(&c.addr), None);
    let e = missing.join(request.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().starts_with("missing token"), "{e}");

    let mut wrong = client(plain(&c.addr), Some("not-the-token"));
    let e = wrong.join(request.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().starts_with("wrong token"), "{e}");

    // The work stream (where θ is read and results are written) is closed to them too.
    for client in [&mut missing, &mut wrong] {
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::WorkerMessage>(1);
        let e = client.work(ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }

    // Health checks need no token (Kubernetes probes cannot present one).
    let mut health = es_proto::tonic_health::pb::health_client::HealthClient::new(plain(&c.addr));
    let status = health
        .check(es_proto::tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, 1, "SERVING");

    // A real worker with a wrong token stops at once with the reason, instead of retrying.
    let mut options = WorkerOptions::new(format!("http://{}", c.addr), DataSource::Loaded(data));
    options.token = Some("not-the-token".into());
    options.cache_dir = scratch.path().join("cache");
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        es_worker::run(options, std::future::pending::<()>()),
    )
    .await
    .expect("the worker gives up")
    .unwrap_err();
    assert!(
        matches!(&e, WorkerError::Rejected { status, .. } if status.code() == tonic::Code::Unauthenticated),
        "{e}"
    );
    assert!(
        e.to_string().contains("wrong token") && e.to_string().contains("--token-file"),
        "{e}"
    );

    let _ = c.stop.send(());
    c.handle.await.unwrap().unwrap();
}

/// A CA, a server certificate for `localhost` and 127.0.0.1, and a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki(name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages.push(usage);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf(vec!["worker".into()], ExtendedKeyUsagePurpose::ClientAuth);
    Pki { ca, server, client }
}

/// A TLS channel to `addr` that trusts `ca` and presents `identity`.
fn tls_channel(addr: &str, ca: &str, identity: Option<&(String, String)>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_test_ca_trains_and_refuses_strangers() {
    let scratch = Scratch::new("security-tls");
    let good = pki("run");
    let other = pki("other");
    let options = ClusterOptions {
        workers: 1,
        token: token(),
        tls: Some(ServerTls {
            cert_pem: good.server.0.clone().into_bytes(),
            key_pem: good.server.1.clone().into_bytes(),
            client_ca_pem: Some(good.ca.clone().into_bytes()),
        }),
        ..ClusterOptions::default()
    };
    let config = RunConfig {
        eval_every: 0,
        ..small_run(2)
    };
    let c = coordinator(&scratch, "run", config, options).await;
    let data = mnist();
    let request = join_request(&data.digest);

    // A member (the CA, a certificate, the token) gets in; this also waits until the
    // coordinator serves. A join alone does not start the run.
    let mut member = client(
        tls_channel(&c.addr, &good.ca, Some(&good.client)),
        Some(TOKEN),
    );
    let outcome = join(&mut member, &request).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");

    let once = |channel: Channel| {
        let request = request.clone();
        async move {
            let mut c = client(channel, Some(TOKEN));
            tokio::time::timeout(Duration::from_secs(20), c.join(request))
                .await
                .expect("a refused connection fails promptly")
        }
    };
    // A client that trusts another CA refuses the coordinator's certificate.
    let e = once(tls_channel(&c.addr, &other.ca, Some(&good.client)))
        .await
        .unwrap_err();
    println!("trusting another CA: {e:?}");
    // A client without a certificate is refused by the coordinator (mutual TLS).
    let e = once(tls_channel(&c.addr, &good.ca, None))
        .await
        .unwrap_err();
    println!("no client certificate: {e:?}");
    // A client certificate from another CA is refused as well.
    let e = once(tls_channel(&c.addr, &good.ca, Some(&other.client)))
        .await
        .unwrap_err();
    println!("client certificate of another CA: {e:?}");
    // Plain HTTP/2 to a TLS port gets nowhere.
    let e = once(plain(&c.addr)).await.unwrap_err();
    println!("cleartext: {e:?}");

    // A worker with the CA, its certificate and the token trains the run to its end.
    let mut options = WorkerOptions::new(format!("https://{}", c.addr), DataSource::Loaded(data));
    options.token = Some(TOKEN.into());
    options.cache_dir = scratch.path().join("cache");
    options.threads = 2;
    options.tls = Some(ClientTls {
        ca_pem: good.ca.clone().into_bytes(),
        identity: Some((
            good.client.0.clone().into_bytes(),
            good.client.1.clone().into_bytes(),
        )),
        domain: Some("localhost".into()),
    });
    let worker = tokio::spawn(es_worker::run(options, std::future::pending::<()>()));
    let summary = tokio::time::timeout(Duration::from_secs(300), c.handle)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    assert_eq!(summary.generations, 2);
    let exit = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker exits")
        .unwrap()
        .unwrap();
    assert_eq!(exit, WorkerExit::Finished);
    drop(c.stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_needs_a_token_or_insecure() {
    let scratch = Scratch::new("security-exposed");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = cluster::run(
        small_run(1),
        environment(&scratch, "run", 1),
        ClusterOptions::default(),
        listener,
        Box::pin(std::future::pending()),
    )
    .await
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, RunError::Exposed(_)), "{text}");
    assert!(
        text.contains("without authentication") && text.contains("--insecure"),
        "{text}"
    );

    // The binary says so and exits before it loads anything.
    let output = Command::new(binary("coordinator"))
        .args([
            "--workers",
            "1",
            "--listen",
            "0.0.0.0:0",
            "--mirror",
            "none",
        ])
        .env_remove("UNDERFLOW_TOKEN")
        .env_remove("UNDERFLOW_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure"), "{stderr}");
}

/// A child process killed when the test ends, whatever happens.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn oversized_messages_are_refused_without_the_coordinator_growing() {
    let scratch = Scratch::new("security-oversized");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let coordinator = Process(
        Command::new(binary("coordinator"))
            .args(["--workers", "5", "--listen", &addr, "--generations", "1"])
            .args(["--population", "16", "--batch", "32"])
            .args(["--noise-table-len", "4194304", "--eval-every", "0"])
            .args(["--mirror", "none", "--threads", "1"])
            .arg("--data")
            .arg(mnist_dir())
            .arg("--run-dir")
            .arg(scratch.path().join("run"))
            .env("UNDERFLOW_CACHE", scratch.path().join("cache"))
            .env("UNDERFLOW_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = coordinator.0.id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let data = mnist();
        let request = join_request(&data.digest);
        let mut good = client(plain(&addr), Some(TOKEN));
        assert!(matches!(
            join(&mut good, &request).await.unwrap(),
            Outcome::Accepted(_)
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);

        // Sample the coordinator's memory while 16 clients each send a 9 MiB message: a
        // Join with a huge name, and a work stream whose first message is huge.
        let sampling = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicU64::new(before));
        let sampler = {
            let (sampling, peak) = (Arc::clone(&sampling), Arc::clone(&peak));
            std::thread::spawn(move || {
                while sampling.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let huge = "x".repeat(9 << 20);
        let mut calls = Vec::new();
        for i in 0..16 {
            let (addr, huge, request) = (addr.clone(), huge.clone(), request.clone());
            calls.push(tokio::spawn(async move {
                let mut c = client(plain(&addr), Some(TOKEN));
                if i % 2 == 0 {
                    let big = pb::JoinRequest {
                        name: huge,
                        ..request
                    };
                    c.join(big).await.map(drop)
                } else {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    let message = pb::WorkerMessage::from(pb::Prove {
                        protocol_version: es_proto::PROTOCOL_VERSION,
                        run_id: huge,
                        worker_id: 1,
                        golden: None,
                        cached_theta_digest: Vec::new(),
                    });
                    tx.send(message).await.unwrap();
                    let result = match c.work(ReceiverStream::new(rx)).await {
                        Ok(response) => response.into_inner().message().await.map(drop),
                        Err(status) => Err(status),
                    };
                    drop(tx);
                    result
                }
            }));
        }
        let mut codes = Vec::new();
        for call in calls {
            let result = tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .expect("an oversized call ends")
                .unwrap();
            codes.push(result.map_err(|s| s.code()));
        }
        sampling.store(false, Ordering::SeqCst);
        sampler.join().unwrap();
        let after = rss_kib(pid);
        let peak = peak.load(Ordering::SeqCst);
        println!(
            "coordinator RSS: {before} KiB before, peak {peak} KiB while 16 × 9 MiB arrived, {after} KiB after; outcomes {codes:?}"
        );
        assert!(
            codes.iter().all(|c| c.is_err()),
            "every oversized message is refused: {codes:?}"
        );
        // tonic answers a message over the decoding limit with OUT_OF_RANGE ("decoded
        // message length too large"); RESOURCE_EXHAUSTED would do as well.
        assert!(
            codes.iter().all(|c| matches!(
                c,
                Err(tonic::Code::OutOfRange | tonic::Code::ResourceExhausted)
            )),
            "{codes:?}"
        );
        // 16 × 9 MiB = 144 MiB arrived; none of it may stay, and far less than one message
        // per client may be buffered at once.
        assert!(
            peak < before + 48 * 1024,
            "the coordinator grew from {before} KiB to {peak} KiB"
        );
        assert!(after < before + 16 * 1024, "{before} KiB → {after} KiB");
        // And it still serves members.
        assert!(matches!(
            join(&mut good, &request).await.unwrap(),
            Outcome::Accepted(_)
        ));
    });
}

/// The golden proof of `config`'s run, computed as the coordinator does.
fn golden_proof(scratch: &Scratch, config: &RunConfig) -> pb::GoldenProof {
    let env = environment(scratch, "golden", 1);
    let data = embedded::load_data(&env).unwrap();
    let noise = embedded::open_noise(config, &env).unwrap();
    let train = es_core::train::Dataset {
        images: &data.train.images,
        labels: &data.train.labels,
    };
    let golden = es_core::train::golden_task(
        &config.net().unwrap(),
        &config.es().unwrap(),
        config.seed,
        &noise,
        train,
        0,
        0,
        env.kernel,
    )
    .unwrap();
    let [center, plus, minus] = golden.map(|g| es_proto::GoldenEval::new(&g.evaluation, &g.logits));
    (&es_proto::GoldenProof {
        center,
        plus,
        minus,
    })
        .into()
}

#[derive(Debug, Default)]
struct FloodStats {
    messages: AtomicU64,
    streams: AtomicU64,
}

/// A member gone bad: joins with the right token and a correct proof, then sends bogus
/// results (indices it was never given, other generations, NaN, more pairs than a
/// generation) and theta requests as fast as the coordinator takes them; when it is
/// disconnected it joins again. Never grants credits, so it is never given work.
async fn flood(
    addr: String,
    digest: Vec<u8>,
    proof: pb::GoldenProof,
    stop: Arc<AtomicBool>,
) -> FloodStats {
    let stats = FloodStats::default();
    let mut c = client(plain(&addr), Some(TOKEN));
    let request = join_request(&digest);
    while !stop.load(Ordering::SeqCst) {
        let accepted = match c
            .join(request.clone())
            .await
            .map(|r| r.into_inner().outcome)
        {
            Ok(Some(Outcome::Accepted(a))) => a,
            _ => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(
            pb::Prove {
                protocol_version: es_proto::PROTOCOL_VERSION,
                run_id: accepted.run_id.clone(),
                worker_id: accepted.worker_id,
                golden: Some(proof.clone()),
                cached_theta_digest: Vec::new(),
            }
            .into(),
        )
        .await
        .unwrap();
        let Ok(response) = c.work(ReceiverStream::new(rx)).await else {
            continue;
        };
        stats.streams.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(AtomicU32::new(0));
        let open = Arc::new(AtomicBool::new(true));
        let reader = {
            let (generation, open) = (Arc::clone(&generation), Arc::clone(&open));
            let mut inbound = response.into_inner();
            tokio::spawn(async move {
                while let Ok(Some(m)) = inbound.message().await {
                    if let Some(pb::coordinator_message::Kind::Generation(g)) = m.kind {
                        generation.store(g.generation, Ordering::SeqCst);
                    }
                }
                open.store(false, Ordering::SeqCst);
            })
        };
        let mut n: u32 = 0;
        while open.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            n = n.wrapping_add(1);
            let t = generation.load(Ordering::SeqCst);
            let bogus = |index: u32, fitness: f64| pb::PairResult {
                index,
                fitness_plus: Some(fitness),
                fitness_minus: Some(-fitness),
                correct_plus: 3,
                correct_minus: 4,
            };
            let message: pb::WorkerMessage = match n % 5 {
                0 => pb::ThetaRequest {
                    generation: t,
                    theta_digest: vec![0; 32],
                }
                .into(),
                1 => pb::Results {
                    generation: t.saturating_sub(1),
                    pairs: (0..16).map(|i| bogus(i, -1.0)).collect(),
                    credits: 0,
                }
                .into(),
                2 => pb::Results {
                    generation: t + 1,
                    pairs: vec![bogus(0, -1.0)],
                    credits: 0,
                }
                .into(),
                3 => pb::Results {
                    generation: t,
                    pairs: (0..40).map(|i| bogus(i % 16, f64::NAN)).collect(),
                    credits: 0,
                }
                .into(),
                _ => pb::Results {
                    generation: t,
                    pairs: (0..16).map(|i| bogus(i, -0.5 - f64::from(i))).collect(),
                    credits: 0,
                }
                .into(),
            };
            if tx.send(message).await.is_err() {
                break;
            }
            stats.messages.fetch_add(1, Ordering::Relaxed);
        }
        drop(tx);
        reader.abort();
    }
    stats
}

/// Runs `config` with two honest in-process workers (one thread each), and a flooder once
/// the first generation is done if `flooder`; returns the training time, θ's bytes and the
/// flooder's counts.
async fn timed_run(
    scratch: &Scratch,
    name: &str,
    config: &RunConfig,
    proof: Option<pb::GoldenProof>,
) -> (Duration, Vec<u8>, Option<FloodStats>) {
    let options = ClusterOptions {
        workers: 2,
        token: token(),
        ..ClusterOptions::default()
    };
    let started = Instant::now();
    let c = coordinator(scratch, name, config.clone(), options).await;
    let run_dir = scratch.path().join(name);
    let data = mnist();
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut options = WorkerOptions::new(
            format!("http://{}", c.addr),
            DataSource::Loaded(Arc::clone(&data)),
        );
        options.threads = 1;
        options.token = Some(TOKEN.into());
        options.cache_dir = scratch.path().join("cache");
        options.name = format!("{name}-{i}");
        workers.push(tokio::spawn(es_worker::run(
            options,
            std::future::pending::<()>(),
        )));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = proof.map(|proof| {
        let (addr, digest, stop) = (c.addr.clone(), data.digest.to_vec(), Arc::clone(&stop));
        let metrics = run_dir.join("metrics.jsonl");
        tokio::spawn(async move {
            // Start once the honest workers are in and the first generation is done.
            while !std::fs::read_to_string(&metrics).is_ok_and(|m| !m.is_empty()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            flood(addr, digest, proof, stop).await
        })
    });
    // The coordinator ends even though the flooder never closes its connections.
    let summary = tokio::time::timeout(Duration::from_secs(300), c.handle)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    println!(
        "{name}: training {:.2} s, coordinator up {:.2} s",
        summary.wall_secs,
        started.elapsed().as_secs_f64()
    );
    // Training time, from the workers' arrival to the final evaluation: the coordinator's
    // exit also waits (boundedly) for clients to close their connections.
    let elapsed = Duration::from_secs_f64(summary.wall_secs);
    assert_eq!(summary.generations, config.generations);
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let exit = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a worker exits")
            .unwrap()
            .unwrap();
        assert_eq!(exit, WorkerExit::Finished);
    }
    let stats = match flooder {
        Some(f) => Some(
            tokio::time::timeout(Duration::from_secs(30), f)
                .await
                .expect("the flooder stops")
                .unwrap(),
        ),
        None => None,
    };
    drop(c.stop);
    (
        elapsed,
        std::fs::read(run_dir.join("theta.f32")).unwrap(),
        stats,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_results_neither_changes_theta_nor_stalls_the_run() {
    let scratch = Scratch::new("security-flood");
    let config = RunConfig {
        eval_every: 0,
        ..small_run(12)
    };
    let proof = {
        let config = config.clone();
        let scratch = &scratch;
        tokio::task::block_in_place(|| golden_proof(scratch, &config))
    };
    let (calm, calm_theta, _) = timed_run(&scratch, "calm", &config, None).await;
    let (flooded, flooded_theta, stats) =
        timed_run(&scratch, "flooded", &config, Some(proof)).await;
    let stats = stats.unwrap();
    println!(
        "undisturbed run {:.2} s, flooded run {:.2} s; the flooder sent {} messages on {} streams",
        calm.as_secs_f64(),
        flooded.as_secs_f64(),
        stats.messages.load(Ordering::Relaxed),
        stats.streams.load(Ordering::Relaxed),
    );
    assert!(
        stats.messages.load(Ordering::Relaxed) > 100,
        "the flooder flooded"
    );
    assert!(
        flooded_theta == calm_theta,
        "θ of the flooded run differs from the undisturbed run"
    );
    assert!(
        flooded <= calm * 3 + Duration::from_secs(5),
        "the flood slowed the run from {calm:?} to {flooded:?}"
    );
}
