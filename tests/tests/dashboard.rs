//! The live dashboard in a real browser: a coordinator process trains with one worker
//! process while headless Chromium loads the page from the coordinator's HTTP port; the
//! screenshot must show the curves in their colours across the plot area, and the DOM the
//! worker and the curves. `/metrics` is read from the same port.
//!
//! Chromium comes from Debian (`apt-get install chromium`); without it the test is skipped
//! with a notice, unless `UNDERFLOW_REQUIRE_CHROMIUM=1` (set by `.ci/run`) makes that a
//! failure. `UNDERFLOW_SCREENSHOT_DIR` keeps the screenshot.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use underflow_tests::Scratch;
use underflow_tests::processes::{self, Process, RunPaths, free_port, metrics, wait_for};

const WINDOW: (u32, u32) = (1280, 1200);
/// The dashboard's curve colours (assets/dashboard.html).
const FITNESS_MEAN: [u8; 3] = [0x1f, 0x77, 0xb4];
const TEST_ACCURACY: [u8; 3] = [0xd6, 0x27, 0x28];

/// The Chromium on PATH, if any.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `args`, at most a minute; returns its stdout.
fn browse(chromium: &Path, profile: &Path, url: &str, args: &[String]) -> String {
    let mut child = Process(
        Command::new(chromium)
            .args([
                "--headless",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--no-first-run",
                // Lets the page's timers run (it polls every 1.5 s) before the capture.
                "--virtual-time-budget=6000",
                &format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromium"),
    );
    let mut stdout = child.0.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let status = child.wait(Duration::from_secs(60));
    assert!(status.success(), "chromium failed: {status}");
    reader.join().expect("reading chromium's output")
}

/// One GET over a plain socket: the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("the HTTP port answers");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Pixels within a small distance of `color` (anti-aliased edges are not counted), and the
/// width of the box around them.
fn pixels_of(rgba: &[u8], width: u32, color: [u8; 3]) -> (usize, u32) {
    let (mut count, mut min_x, mut max_x) = (0, u32::MAX, 0);
    for (i, p) in rgba.chunks_exact(4).enumerate() {
        let near = (0..3).all(|c| p[c].abs_diff(color[c]) <= 24);
        if near {
            count += 1;
            let x = i as u32 % width;
            min_x = min_x.min(x);
            max_x = max_x.max(x);
        }
    }
    (count, max_x.saturating_sub(min_x))
}

#[test]
fn the_dashboard_shows_the_curves_and_the_workers_in_a_browser() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("UNDERFLOW_REQUIRE_CHROMIUM").is_none_or(|v| v != "1"),
            "UNDERFLOW_REQUIRE_CHROMIUM=1 but no chromium on PATH: apt-get install chromium"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let scratch = Scratch::new("dashboard");
    let paths = RunPaths::new(scratch.path());
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let mut coordinator = processes::coordinator(
        &[
            "--workers",
            "1",
            "--listen",
            &grpc,
            "--http",
            &http,
            "--generations",
            "100000",
            "--population",
            "16",
            "--batch",
            "64",
            "--eval-every",
            "3",
            "--noise-table-len",
            "4194304",
            "--checkpoint-every",
            "0",
            "--run-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([paths.run_dir.display().to_string()])
        .collect::<Vec<_>>(),
        &paths.cache,
        &paths.log("coordinator"),
    );
    let _worker = processes::worker(
        &grpc,
        &paths.cache,
        &paths.log("worker"),
        &["--name", "browser-test-worker"],
    );
    // Enough generations for curves, and four test evaluations.
    wait_for("12 generations", Duration::from_secs(240), || {
        assert!(!coordinator.has_exited(), "the coordinator exited early");
        metrics(&paths.run_dir).len() >= 12
    });

    let prometheus = http_get(&http, "/metrics");
    for needle in [
        "underflow_workers_connected 1\n",
        "# TYPE underflow_evaluations_total counter",
        "underflow_test_accuracy_ratio ",
        "name=\"browser-test-worker\"",
    ] {
        assert!(
            prometheus.contains(needle),
            "{needle:?} missing:\n{prometheus}"
        );
    }

    let url = format!("http://{http}/");
    let profile = scratch.path().join("chromium");
    let dom = browse(&chromium, &profile, &url, &["--dump-dom".into()]);
    // The page's script holds the row template too: look inside the table only.
    let table = dom
        .split("<table id=\"workers\">")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .unwrap_or_else(|| panic!("no worker table in\n{dom}"));
    let rows = table.matches("<tr class=\"worker\">").count();
    assert_eq!(rows, 1, "one worker row expected in\n{table}");
    assert!(table.contains("browser-test-worker"), "{table}");
    assert!(
        dom.contains("population = 16"),
        "the configuration is shown"
    );
    let points = |series: &str| -> Vec<usize> {
        dom.split(&format!("data-series=\"{series}\" data-points=\""))
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
            .collect()
    };
    // Each series is drawn twice: against generations and against wall time.
    let fitness = points("fitness_mean");
    let test = points("test_accuracy");
    assert_eq!(fitness.len(), 2, "{dom}");
    assert!(fitness.iter().all(|&n| n >= 12), "{fitness:?}");
    assert!(test.len() == 2 && test.iter().all(|&n| n >= 4), "{test:?}");

    let shot = scratch.path().join("dashboard.png");
    browse(
        &chromium,
        &profile,
        &url,
        &[format!("--screenshot={}", shot.display())],
    );
    let decoder = png::Decoder::new(std::fs::File::open(&shot).expect("a screenshot"));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buffer).unwrap();
    assert_eq!((info.width, info.height), WINDOW);
    let rgba: Vec<u8> = match info.color_type {
        png::ColorType::Rgba => buffer[..info.buffer_size()].to_vec(),
        png::ColorType::Rgb => buffer[..info.buffer_size()]
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    if let Some(dir) = std::env::var_os("UNDERFLOW_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("dashboard.png")).unwrap();
    }
    // A legend sample is 14 × 3 pixels; a curve runs across most of its 496-pixel-wide plot
    // area (the test accuracy from generation 3 on), in two charts of one column.
    for (name, color) in [("fitness", FITNESS_MEAN), ("test accuracy", TEST_ACCURACY)] {
        let (count, span) = pixels_of(&rgba, info.width, color);
        eprintln!("{name}: {count} pixels of its colour, spanning {span} px");
        assert!(count > 400, "{name}: only {count} pixels of its colour");
        assert!(span > 250, "{name}: its pixels span only {span} px");
    }

    coordinator.signal("TERM");
    let started = Instant::now();
    assert!(
        coordinator.wait(Duration::from_secs(120)).success(),
        "the coordinator stops cleanly on SIGTERM"
    );
    eprintln!("stopped in {:?}", started.elapsed());
}
