//! The live progress line on a terminal: generation, evaluations/s, fitness, last test
//! accuracy and ETA, redrawn from the [`Monitor`] by a thread of its own, so the training
//! loops know nothing of it.
//!
//! Log lines still go to stderr: [`LogWriter`] writes each whole event with the bar hidden
//! (indicatif's `suspend`), so the line and the logs never garble each other. Off a terminal
//! there is no bar and the writer is plain stderr.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::monitor::{Monitor, Phase, Snapshot};

/// How often the line is redrawn.
const REDRAW: Duration = Duration::from_millis(250);

/// A progress line that follows a monitor until [`Progress::finish`].
pub struct Progress {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Draws on stderr (indicatif draws nothing when stderr is not a terminal).
    pub fn start(monitor: Monitor) -> Progress {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {wide_bar:.cyan/blue} {msg}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bar, stop) = (bar.clone(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let snapshot = monitor.snapshot(usize::MAX);
                        bar.set_length(u64::from(snapshot.run.generations.max(1)));
                        bar.set_position(u64::from(snapshot.generation));
                        let (prefix, message) = line(&snapshot);
                        bar.set_prefix(prefix);
                        bar.set_message(message);
                        bar.tick();
                        std::thread::sleep(REDRAW);
                    }
                })
                .ok()
        };
        Progress { bar, stop, thread }
    }

    /// The writer for log lines that keeps the bar intact.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter(Some(self.bar.clone()))
    }

    /// Stops redrawing and clears the line (before the summary is printed).
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.bar.finish_and_clear();
    }
}

/// The prefix (where the run is) and the message (how it goes) of the line.
pub fn line(s: &Snapshot) -> (String, String) {
    let prefix = format!("gen {}/{}", s.generation, s.run.generations);
    let message = match s.phase {
        Phase::Starting => "loading data and the noise table".to_string(),
        Phase::WaitingForWorkers => format!("waiting for workers ({} joined)", s.workers.len()),
        Phase::Training | Phase::Finished => {
            let mut parts = Vec::new();
            if let Some(last) = &s.last {
                parts.push(format!("{:.0} evals/s", last.evals_per_sec));
                parts.push(format!("fitness {:.4}", last.fitness_mean));
            }
            if let Some((generation, accuracy, _)) = s.last_test {
                parts.push(format!("test {:.2}% @{generation}", accuracy * 100.0));
            }
            if s.run.mode == "cluster" {
                parts.push(format!("{} workers", s.workers.len()));
            }
            if let Some(eta) = s.eta_secs {
                parts.push(format!("ETA {}", duration(eta)));
            }
            if s.phase == Phase::Finished {
                parts.push("final evaluation".into());
            }
            parts.join(" · ")
        }
    };
    (prefix, message)
}

/// `1h 02m`, `3m 04s` or `12s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m {sec:02}s"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

/// Makes writers for `tracing_subscriber::fmt`: each event is gathered, then written to
/// stderr in one piece with the progress line (if any) hidden meanwhile.
#[derive(Clone, Default)]
pub struct LogWriter(Option<ProgressBar>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            bar: self.0.clone(),
            buffer: Vec::new(),
        }
    }
}

/// One event's bytes, written to stderr when dropped.
pub struct LogLine {
    bar: Option<ProgressBar>,
    buffer: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        // A log line that cannot be written has nowhere else to go.
        let write = || {
            let _ = std::io::stderr().lock().write_all(&self.buffer);
        };
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::RunInfo;
    use crate::run_dir::tests::line as metrics;

    #[test]
    fn the_line_shows_pace_fitness_test_accuracy_and_eta() {
        let monitor = Monitor::default();
        monitor.start(RunInfo {
            mode: "cluster".into(),
            generations: 100,
            ..RunInfo::default()
        });
        let (prefix, message) = line(&monitor.snapshot(usize::MAX));
        assert_eq!(prefix, "gen 0/100");
        assert_eq!(message, "loading data and the noise table");
        monitor.set_phase(Phase::WaitingForWorkers);
        assert_eq!(
            line(&monitor.snapshot(usize::MAX)).1,
            "waiting for workers (0 joined)"
        );
        for g in 0..10 {
            let mut l = metrics(g, f64::from(g + 1) * 2.0);
            if g == 9 {
                l.test_accuracy = Some(0.875);
                l.test_loss = Some(0.4);
            }
            monitor.generation(&l, 32);
        }
        let (prefix, message) = line(&monitor.snapshot(usize::MAX));
        assert_eq!(prefix, "gen 10/100");
        assert_eq!(
            message,
            "100 evals/s · fitness -1.9100 · test 87.50% @10 · 0 workers · ETA 3m 00s"
        );
        assert_eq!(duration(3725.0), "1h 02m");
    }

    #[test]
    fn log_lines_are_written_whole() {
        let writer = LogWriter::default();
        let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
        line.write_all(b"part one, ").unwrap();
        line.write_all(b"part two\n").unwrap();
        assert_eq!(line.buffer, b"part one, part two\n");
        line.buffer.clear(); // nothing to print when it drops
    }
}
