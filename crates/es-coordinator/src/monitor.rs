//! What a running coordinator shows people while it trains: one shared, synchronous record of
//! the run (its configuration, every generation's metrics, the workers and the cluster's
//! counters), written by the training loop and read by the progress line, the Prometheus
//! endpoint and the dashboard.
//!
//! The training loops only push facts in ([`Monitor::generation`], [`Monitor::workers`], …);
//! they never wait on a reader. Readers take a [`Snapshot`] under the same short lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::run_dir::MetricsLine;

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading data and the noise table.
    Starting,
    /// The cluster waits for its first workers.
    WaitingForWorkers,
    Training,
    /// The loop ended; the final evaluation and files are being written, or are written.
    Finished,
}

/// The run as it was configured: shown on the dashboard and in the progress line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    /// `embedded` or `cluster`.
    pub mode: String,
    /// The resolved configuration, as written to `config.toml`.
    pub config_toml: String,
    /// Generations the run trains for.
    pub generations: u32,
    /// The wall-clock budget in seconds (0: none).
    pub time_limit_secs: f64,
    /// The generation the run (or this resumption) started at.
    pub first_generation: u32,
}

/// One worker as the dashboard lists it. In the embedded mode the single entry is this
/// machine's evaluator pool.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerInfo {
    pub id: u64,
    pub name: String,
    pub threads: u32,
    /// Mirrored pairs whose results were accepted from this worker since it was proven.
    pub pairs_accepted: u64,
    /// Evaluations (two per pair) per second over the last measured interval.
    pub evals_per_sec: f64,
}

/// Cluster counters since the coordinator started (Prometheus counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Counters {
    pub evaluations: u64,
    pub workers_joined: u64,
    pub workers_lost: u64,
    /// Perturbation pairs handed out a second time after a lease ended or a worker left.
    pub pairs_reassigned: u64,
    pub rejected_messages: u64,
    pub workers_quarantined: u64,
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
}

/// Everything a reader sees at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub run: RunInfo,
    pub phase: Phase,
    /// Seconds since the coordinator started the run (not only training).
    pub uptime_secs: f64,
    /// Generations completed so far (the next one to run).
    pub generation: u32,
    /// Metrics of generations from the `since` asked for (all of them by default).
    pub history: Vec<MetricsLine>,
    /// Lines of history before `history[0]` that were left out.
    pub history_offset: usize,
    pub last: Option<MetricsLine>,
    /// The latest test-set evaluation: (generation, accuracy, loss).
    pub last_test: Option<(u32, f64, f64)>,
    pub workers: Vec<WorkerInfo>,
    pub counters: Counters,
    /// Estimated seconds to the end of the run (generations or time limit, whichever first).
    pub eta_secs: Option<f64>,
}

#[derive(Debug)]
struct Inner {
    run: RunInfo,
    phase: Phase,
    started: Instant,
    generation: u32,
    history: Vec<MetricsLine>,
    last_test: Option<(u32, f64, f64)>,
    workers: Vec<WorkerInfo>,
    /// The pairs accepted per worker id at the last rate measurement, and when.
    rate_marks: HashMap<u64, (u64, Instant)>,
    counters: Counters,
}

/// A cheap handle on the shared record; clones see the same run.
#[derive(Clone, Debug)]
pub struct Monitor(Arc<Mutex<Inner>>);

impl Default for Monitor {
    fn default() -> Self {
        Monitor(Arc::new(Mutex::new(Inner {
            run: RunInfo::default(),
            phase: Phase::Starting,
            started: Instant::now(),
            generation: 0,
            history: Vec::new(),
            last_test: None,
            workers: Vec::new(),
            rate_marks: HashMap::new(),
            counters: Counters::default(),
        })))
    }
}

/// The shortest interval over which a worker's rate is measured: shorter ones are noise.
const RATE_INTERVAL_SECS: f64 = 1.0;

impl Monitor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking writer leaves plain data behind: still worth showing.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run begins: what it is and where it starts.
    pub fn start(&self, run: RunInfo) {
        let mut inner = self.lock();
        inner.generation = run.first_generation;
        inner.run = run;
        inner.started = Instant::now();
    }

    /// A resumed run's earlier generations (its `metrics.jsonl`), so that its curves start
    /// at the beginning. They add to no counter: counters are this process's.
    pub fn preload(&self, lines: Vec<MetricsLine>) {
        let mut inner = self.lock();
        inner.last_test = lines.iter().rev().find_map(|l| {
            let loss = l.test_loss.unwrap_or(f64::NAN);
            l.test_accuracy.map(|a| (l.generation + 1, a, loss))
        });
        inner.history = lines;
    }

    pub fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    /// A generation of `evaluations` evaluations completed and was written to
    /// `metrics.jsonl` as `line`.
    pub fn generation(&self, line: &MetricsLine, evaluations: u64) {
        let mut inner = self.lock();
        inner.phase = Phase::Training;
        inner.generation = line.generation + 1;
        inner.counters.evaluations += evaluations;
        if let Some(accuracy) = line.test_accuracy {
            inner.last_test = Some((
                line.generation + 1,
                accuracy,
                line.test_loss.unwrap_or(f64::NAN),
            ));
        }
        let c = &mut inner.counters;
        c.pairs_reassigned += u64::from(line.reassigned.unwrap_or(0));
        c.rejected_messages += line.rejected_messages.unwrap_or(0);
        c.workers_quarantined += line.quarantined.unwrap_or(0);
        c.wire_bytes_sent += line.wire_bytes_sent.unwrap_or(0);
        c.wire_bytes_received += line.wire_bytes_received.unwrap_or(0);
        inner.history.push(line.clone());
    }

    /// A worker was proven and joined the run.
    pub fn worker_joined(&self) {
        self.lock().counters.workers_joined += 1;
    }

    /// A worker's stream ended while the run went on (it died, stalled, left or was
    /// disconnected).
    pub fn worker_lost(&self) {
        self.lock().counters.workers_lost += 1;
    }

    /// The workers now in the run: (id, name, threads, pairs accepted). Each one's rate is
    /// measured from its accepted pairs since the previous call at least a second ago.
    pub fn workers(&self, workers: impl IntoIterator<Item = (u64, String, u32, u64)>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let previous: HashMap<u64, f64> = inner
            .workers
            .iter()
            .map(|w| (w.id, w.evals_per_sec))
            .collect();
        let mut list = Vec::new();
        let mut marks = HashMap::new();
        for (id, name, threads, pairs_accepted) in workers {
            let mut evals_per_sec = previous.get(&id).copied().unwrap_or(0.0);
            let mark = match inner.rate_marks.get(&id) {
                Some(&(pairs, at)) => {
                    let secs = now.duration_since(at).as_secs_f64();
                    if secs >= RATE_INTERVAL_SECS {
                        evals_per_sec = 2.0 * pairs_accepted.saturating_sub(pairs) as f64 / secs;
                        (pairs_accepted, now)
                    } else {
                        (pairs, at)
                    }
                }
                None => (pairs_accepted, now),
            };
            marks.insert(id, mark);
            list.push(WorkerInfo {
                id,
                name,
                threads,
                pairs_accepted,
                evals_per_sec,
            });
        }
        list.sort_by_key(|w| w.id);
        inner.workers = list;
        inner.rate_marks = marks;
    }

    /// What readers see, with the history from generation line `since` on.
    pub fn snapshot(&self, since: usize) -> Snapshot {
        let inner = self.lock();
        let since = since.min(inner.history.len());
        let last = inner.history.last().cloned();
        Snapshot {
            run: inner.run.clone(),
            phase: inner.phase,
            uptime_secs: inner.started.elapsed().as_secs_f64(),
            generation: inner.generation,
            history: inner.history[since..].to_vec(),
            history_offset: since,
            eta_secs: eta(&inner.run, inner.generation, &inner.history),
            last,
            last_test: inner.last_test,
            workers: inner.workers.clone(),
            counters: inner.counters,
        }
    }
}

/// Generations whose pace predicts the rest of the run.
const ETA_WINDOW: usize = 20;

/// Seconds to the end: the pace of the last generations times those left, capped by what
/// remains of the time limit. Only this resumption's lines count: each restarts the clock.
fn eta(run: &RunInfo, generation: u32, history: &[MetricsLine]) -> Option<f64> {
    let history = &history[history.partition_point(|l| l.generation < run.first_generation)..];
    let last = history.last()?;
    let by_limit =
        (run.time_limit_secs > 0.0).then(|| (run.time_limit_secs - last.wall_secs).max(0.0));
    let window = &history[history.len().saturating_sub(ETA_WINDOW + 1)..];
    let by_generations = match window {
        [first, .., last] if last.generation > first.generation => {
            let per_generation =
                (last.wall_secs - first.wall_secs) / f64::from(last.generation - first.generation);
            Some(per_generation * f64::from(run.generations.saturating_sub(generation)))
        }
        _ => None,
    };
    match (by_generations, by_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_dir::tests::line;

    #[test]
    fn eta_follows_the_pace_and_the_time_limit() {
        let monitor = Monitor::default();
        monitor.start(RunInfo {
            generations: 100,
            ..RunInfo::default()
        });
        assert_eq!(monitor.snapshot(0).eta_secs, None, "nothing measured yet");
        for g in 0..10 {
            monitor.generation(&line(g, f64::from(g + 1) * 0.5), 32);
        }
        let snap = monitor.snapshot(0);
        assert_eq!(snap.generation, 10);
        let eta = snap.eta_secs.unwrap();
        assert!((eta - 45.0).abs() < 1e-9, "90 generations at 0.5 s: {eta}");
        monitor.start(RunInfo {
            generations: 100,
            time_limit_secs: 8.0,
            ..RunInfo::default()
        });
        let eta = monitor.snapshot(0).eta_secs.unwrap();
        assert!((eta - 3.0).abs() < 1e-9, "the limit ends it at 8 s: {eta}");
    }

    #[test]
    fn a_resumed_run_shows_its_earlier_curve_and_times_only_itself() {
        let monitor = Monitor::default();
        monitor.start(RunInfo {
            generations: 20,
            first_generation: 10,
            ..RunInfo::default()
        });
        let earlier: Vec<MetricsLine> = (0..10)
            .map(|g| MetricsLine {
                test_accuracy: (g == 4).then_some(0.5),
                ..line(g, f64::from(g) * 100.0)
            })
            .collect();
        monitor.preload(earlier);
        let snap = monitor.snapshot(0);
        assert_eq!((snap.history.len(), snap.generation), (10, 10));
        assert_eq!(snap.last_test.map(|t| (t.0, t.1)), Some((5, 0.5)));
        assert_eq!(
            snap.eta_secs, None,
            "the earlier clock says nothing of this one"
        );
        assert_eq!(snap.counters.evaluations, 0);
        for g in 10..12 {
            monitor.generation(&line(g, f64::from(g - 9)), 32);
        }
        let eta = monitor.snapshot(0).eta_secs.unwrap();
        assert!((eta - 8.0).abs() < 1e-9, "8 generations at 1 s: {eta}");
    }

    #[test]
    fn history_since_and_cluster_counters() {
        let monitor = Monitor::default();
        for g in 0..5 {
            monitor.generation(
                &MetricsLine {
                    reassigned: Some(g),
                    test_accuracy: (g == 3).then_some(0.8),
                    test_loss: (g == 3).then_some(0.6),
                    ..line(g, f64::from(g))
                },
                32,
            );
        }
        let snap = monitor.snapshot(3);
        assert_eq!(snap.history_offset, 3);
        assert_eq!(
            snap.history
                .iter()
                .map(|l| l.generation)
                .collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(snap.counters.pairs_reassigned, 1 + 2 + 3 + 4);
        assert_eq!(snap.counters.evaluations, 5 * 32);
        assert_eq!(snap.last_test, Some((4, 0.8, 0.6)));
        assert_eq!(
            monitor.snapshot(99).history.len(),
            0,
            "past the end: nothing"
        );
    }

    #[test]
    fn worker_rates_come_from_accepted_pairs_over_time() {
        let monitor = Monitor::default();
        monitor.workers([(1, "a".to_string(), 2, 10)]);
        assert_eq!(monitor.snapshot(0).workers[0].evals_per_sec, 0.0);
        // Backdate the mark instead of sleeping.
        {
            let mut inner = monitor.lock();
            let mark = inner.rate_marks.get_mut(&1).unwrap();
            mark.1 -= std::time::Duration::from_secs(2);
        }
        monitor.workers([(1, "a".to_string(), 2, 30), (2, "b".to_string(), 1, 0)]);
        let workers = monitor.snapshot(0).workers;
        assert_eq!(workers.len(), 2);
        let rate = workers[0].evals_per_sec;
        assert!((rate - 20.0).abs() < 0.1, "2 × 20 pairs in ~2 s: {rate}");
        // Within a second the rate is kept, not measured over a tiny interval.
        monitor.workers([(1, "a".to_string(), 2, 31)]);
        assert_eq!(monitor.snapshot(0).workers[0].evals_per_sec, rate);
    }
}
