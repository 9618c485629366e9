//! The coordinator's HTTP port: the live dashboard (`/`), its data (`/api/status`) and the
//! Prometheus endpoint (`/metrics`). Read-only: nothing here can change the run, so it needs
//! no token; it binds loopback unless told otherwise.
//!
//! The handlers only read a [`Monitor`] snapshot; the exposition format is written by hand
//! ([`prometheus_text`]): about twenty plain gauges and counters held in one struct do not
//! need a metrics registry, and the text format (version 0.0.4) is small and stable.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use serde::Deserialize;

use crate::RunError;
use crate::monitor::{Monitor, Phase, Snapshot};

/// The dashboard: one self-contained page (HTML, CSS and JS inline, no CDN), drawn with SVG.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

/// The address `--http` binds unless told otherwise: loopback, the port OpenTelemetry's
/// Prometheus exporters use.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// Binds the HTTP port, saying what to do when it is taken.
pub fn bind(addr: &str) -> Result<std::net::TcpListener, RunError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "the port is in use (another coordinator?): choose another with --http ADDR, e.g. --http 127.0.0.1:0 for any free port, or turn the dashboard off with --http off"
        } else {
            "give an address as HOST:PORT with --http, or --http off"
        };
        RunError::Serve(format!("HTTP on {addr}: {e}; {hint}"))
    })?;
    // Tokio needs a non-blocking socket.
    listener
        .set_nonblocking(true)
        .map_err(|e| RunError::Serve(format!("HTTP on {addr}: {e}")))?;
    Ok(listener)
}

/// The routes, reading `monitor`.
pub fn router(monitor: Monitor) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .with_state(monitor)
}

/// Serves the dashboard and `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: std::net::TcpListener,
    monitor: Monitor,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(monitor))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves on a thread of its own (a one-thread runtime), for the embedded mode, whose
/// training loop runs no async runtime. The server ends with the process.
pub fn spawn_thread(listener: std::net::TcpListener, monitor: Monitor) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Serve(format!("HTTP: no runtime: {e}")))?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            if let Err(error) = runtime.block_on(serve(listener, monitor, std::future::pending())) {
                tracing::error!(%error, "the HTTP server stopped");
            }
        })
        .map_err(|e| RunError::Serve(format!("HTTP: no thread: {e}")))?;
    Ok(())
}

/// Logs where the dashboard is.
pub fn announce(addr: SocketAddr) {
    tracing::info!(
        dashboard = %format!("http://{addr}/"),
        metrics = %format!("http://{addr}/metrics"),
        "serving the dashboard"
    );
}

#[derive(Deserialize)]
struct Since {
    /// History lines the page already has.
    #[serde(default)]
    since: usize,
}

async fn status(State(monitor): State<Monitor>, Query(q): Query<Since>) -> Json<Snapshot> {
    Json(monitor.snapshot(q.since))
}

async fn metrics(State(monitor): State<Monitor>) -> impl IntoResponse {
    // Only the last line of history is needed.
    let snapshot = monitor.snapshot(usize::MAX);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus_text(&snapshot),
    )
}

/// One metric family: its help, its type and its samples (label set, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {}", number(*value));
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of `s`: `underflow_` names, `_total` counters, base units.
pub fn prometheus_text(s: &Snapshot) -> String {
    let mut out = String::new();
    let one = |v: f64| vec![(String::new(), v)];
    let opt = |v: Option<f64>| {
        v.map(|v| (String::new(), v))
            .into_iter()
            .collect::<Vec<_>>()
    };
    let info = format!(
        "{{run_id=\"{}\",mode=\"{}\",phase=\"{}\"}}",
        label(&s.run.run_id),
        label(&s.run.mode),
        match s.phase {
            Phase::Starting => "starting",
            Phase::WaitingForWorkers => "waiting_for_workers",
            Phase::Training => "training",
            Phase::Finished => "finished",
        }
    );
    family(
        &mut out,
        "underflow_run_info",
        "gauge",
        "The run: its id, embedded or cluster, and its phase (always 1).",
        &[(info, 1.0)],
    );
    let c = &s.counters;
    let last = s.last.as_ref();
    // Gauges of one sample each; `None` (nothing measured yet) leaves the family out.
    let gauges: [(&str, &str, Option<f64>); 13] = [
        (
            "underflow_generation",
            "Generations completed.",
            Some(f64::from(s.generation)),
        ),
        (
            "underflow_generations_target",
            "Generations the run trains for.",
            Some(f64::from(s.run.generations)),
        ),
        (
            "underflow_evaluations_per_second",
            "Evaluations per second in the last generation.",
            last.map(|l| l.evals_per_sec),
        ),
        (
            "underflow_fitness_mean",
            "Mean fitness (minus the mean cross-entropy) of the last generation's evaluations.",
            last.map(|l| l.fitness_mean),
        ),
        (
            "underflow_fitness_max",
            "Best fitness of the last generation's evaluations.",
            last.map(|l| l.fitness_max),
        ),
        (
            "underflow_batch_accuracy_ratio",
            "Mean accuracy of the last generation's perturbed networks on its minibatch.",
            last.map(|l| l.batch_accuracy),
        ),
        (
            "underflow_test_accuracy_ratio",
            "Accuracy on the 10,000 test images at the last test evaluation.",
            s.last_test.map(|t| t.1),
        ),
        (
            "underflow_test_loss",
            "Mean cross-entropy on the test images at the last test evaluation.",
            s.last_test.map(|t| t.2),
        ),
        (
            "underflow_update_seconds",
            "Seconds the last update of theta took.",
            last.map(|l| l.update_secs),
        ),
        (
            "underflow_training_seconds",
            "Seconds since training (or this resumption) started.",
            last.map(|l| l.wall_secs),
        ),
        (
            "underflow_eta_seconds",
            "Estimated seconds to the end of the run.",
            s.eta_secs,
        ),
        (
            "underflow_theta_norm",
            "Euclidean norm of theta after the last update.",
            last.map(|l| l.theta_norm),
        ),
        (
            "underflow_gradient_norm",
            "Euclidean norm of the last gradient estimate.",
            last.map(|l| l.grad_norm),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help, &opt(value));
    }
    let counters: [(&str, &str, u64); 8] = [
        (
            "underflow_evaluations_total",
            "Perturbed networks evaluated on a minibatch (two per mirrored pair).",
            c.evaluations,
        ),
        (
            "underflow_workers_joined_total",
            "Workers proven and admitted to the run.",
            c.workers_joined,
        ),
        (
            "underflow_workers_lost_total",
            "Worker streams that ended while the run went on.",
            c.workers_lost,
        ),
        (
            "underflow_pairs_reassigned_total",
            "Perturbation pairs handed out again after a lease ran out or a worker left.",
            c.pairs_reassigned,
        ),
        (
            "underflow_rejected_messages_total",
            "Worker messages (or results in them) refused.",
            c.rejected_messages,
        ),
        (
            "underflow_workers_quarantined_total",
            "Workers quarantined for computing other bits than the coordinator.",
            c.workers_quarantined,
        ),
        (
            "underflow_wire_sent_bytes_total",
            "Protobuf payload bytes sent to workers.",
            c.wire_bytes_sent,
        ),
        (
            "underflow_wire_received_bytes_total",
            "Protobuf payload bytes received from workers.",
            c.wire_bytes_received,
        ),
    ];
    family(
        &mut out,
        "underflow_workers_connected",
        "gauge",
        "Workers in the run now (evaluator threads count as one in the embedded mode).",
        &one(s.workers.len() as f64),
    );
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help, &one(value as f64));
    }
    let per_worker = |value: fn(&crate::monitor::WorkerInfo) -> f64| {
        s.workers
            .iter()
            .map(|w| {
                (
                    format!("{{worker_id=\"{}\",name=\"{}\"}}", w.id, label(&w.name)),
                    value(w),
                )
            })
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "underflow_worker_pairs_accepted_total",
        "counter",
        "Mirrored pairs accepted from each worker since it joined.",
        &per_worker(|w| w.pairs_accepted as f64),
    );
    family(
        &mut out,
        "underflow_worker_evaluations_per_second",
        "gauge",
        "Each worker's evaluations per second, measured over its last accepted results.",
        &per_worker(|w| w.evals_per_sec),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::RunInfo;
    use crate::run_dir::tests::line;

    fn sample() -> Monitor {
        let monitor = Monitor::default();
        monitor.start(RunInfo {
            run_id: "7-\"x\"".into(),
            mode: "cluster".into(),
            generations: 10,
            ..RunInfo::default()
        });
        monitor.worker_joined();
        monitor.workers([(3, "w\\one".to_string(), 2, 40)]);
        for g in 0..3 {
            monitor.generation(
                &crate::run_dir::MetricsLine {
                    reassigned: Some(2),
                    test_accuracy: (g == 2).then_some(0.5),
                    test_loss: (g == 2).then_some(1.25),
                    ..line(g, f64::from(g))
                },
                32,
            );
        }
        monitor
    }

    #[test]
    fn exposition_follows_the_text_format() {
        let text = prometheus_text(&sample().snapshot(0));
        for expected in [
            "underflow_generation 3\n",
            "underflow_evaluations_total 96\n",
            "underflow_pairs_reassigned_total 6\n",
            "underflow_workers_connected 1\n",
            "underflow_workers_joined_total 1\n",
            "underflow_test_accuracy_ratio 0.5\n",
            "underflow_test_loss 1.25\n",
            "underflow_update_seconds 0.05\n",
            "# TYPE underflow_workers_lost_total counter\n",
            "underflow_worker_pairs_accepted_total{worker_id=\"3\",name=\"w\\\\one\"} 40\n",
            "underflow_run_info{run_id=\"7-\\\"x\\\"\",mode=\"cluster\",phase=\"training\"} 1\n",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
        // Every sample belongs to a family announced with HELP and TYPE just before it; every
        // counter ends in _total; names are valid.
        let mut family = String::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter"].contains(&kind), "{l}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
                assert!(name.starts_with("underflow_"), "{l}");
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{l}"
                );
                family = name.to_string();
            } else if !l.starts_with("# HELP ") {
                let name = l.split(['{', ' ']).next().unwrap();
                assert_eq!(name, family, "sample outside its family: {l}");
                let value = l.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok() || value == "NaN", "{l}");
            }
        }
    }

    #[test]
    fn nothing_measured_means_no_sample() {
        let text = prometheus_text(&Monitor::default().snapshot(0));
        assert!(text.contains("underflow_generation 0\n"), "{text}");
        assert!(!text.contains("underflow_test_accuracy_ratio"), "{text}");
        assert!(!text.contains("underflow_fitness_mean"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_page_the_status_and_the_metrics() {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, sample(), async {
            let _ = stopped.await;
        }));
        let page = get_text(addr, "/").await;
        assert!(
            page.contains("text/html") && page.contains("<svg"),
            "{page}"
        );
        let status = get_text(addr, "/api/status?since=2").await;
        let body = status.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["history_offset"], 2);
        assert_eq!(json["history"].as_array().unwrap().len(), 1);
        assert_eq!(json["workers"][0]["name"], "w\\one");
        let metrics = get_text(addr, "/metrics").await;
        assert!(
            metrics.contains("text/plain; version=0.0.4")
                && metrics.contains("underflow_generation 3"),
            "{metrics}"
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        // A taken port is refused with what to do.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind(&addr).unwrap_err().to_string();
        assert!(err.contains("in use") && err.contains("--http"), "{err}");
    }

    /// One HTTP/1.1 GET over a plain socket: the response head and body.
    async fn get_text(addr: SocketAddr, path: &str) -> String {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .await
        .unwrap()
    }
}
