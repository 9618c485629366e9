//! How every row is timed: a warm-up call, a calibration of how many calls fill a round,
//! then several timed rounds of which the median is reported.
//!
//! The median (not the mean or the minimum) because the benchmark may share the machine with
//! other work: one round that lost the core to another process should not move the result,
//! and the minimum would report a speed the machine rarely delivers. The spread of the rounds
//! is reported beside it so that a noisy row is visible as such.

use std::time::{Duration, Instant};

/// How long to spend on one row.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Total time of the timed rounds of one row (warm-up and calibration come on top).
    pub per_row: Duration,
    /// Number of timed rounds; the median of their per-call times is the result.
    pub rounds: usize,
}

/// Seconds per call over the timed rounds of one row.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Median over the rounds of (round time / calls in the round).
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Calls per round.
    pub reps: usize,
    pub rounds: usize,
}

impl Stats {
    /// (max − min) / median over the rounds: how much the machine disturbed this row.
    pub fn spread(&self) -> f64 {
        (self.max - self.min) / self.median
    }

    /// Stats of rounds that each timed one call (`per_call` seconds each).
    pub fn from_rounds(mut per_call: Vec<f64>, reps: usize) -> Stats {
        assert!(!per_call.is_empty(), "at least one timed round");
        per_call.sort_by(f64::total_cmp);
        let n = per_call.len();
        // Even counts: the mean of the two middle rounds.
        let median = if n % 2 == 1 {
            per_call[n / 2]
        } else {
            (per_call[n / 2 - 1] + per_call[n / 2]) / 2.0
        };
        Stats {
            median,
            min: per_call[0],
            max: per_call[n - 1],
            reps,
            rounds: n,
        }
    }
}

/// Times `f`: one warm-up call (first-use allocation, page faults, cold caches), then enough
/// calls per round for each of `budget.rounds` rounds to take about
/// `budget.per_row / budget.rounds`, at least one call per round.
pub fn measure(budget: Budget, mut f: impl FnMut()) -> Stats {
    let rounds = budget.rounds.max(1);
    let round_target = budget.per_row.as_secs_f64() / rounds as f64;
    let reps = calibrate(round_target, &mut f);
    let times = (0..rounds).map(|_| time_round(reps, &mut f)).collect();
    Stats::from_rounds(times, reps)
}

/// Two ways of doing the same work, timed side by side ([`measure_pair`]).
#[derive(Clone, Copy, Debug)]
pub struct Paired {
    pub a: Stats,
    pub b: Stats,
    /// Median over the rounds of (A's time per call / B's) in the same round: B's speed-up.
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

/// Times `a` and `b` in alternating rounds (`budget.rounds` of each, `budget.per_row` for
/// both together): A then B in even rounds, B then A in odd ones, so that other work on the
/// machine falls on both alike. Only such same-run ratios mean anything on a shared machine.
pub fn measure_pair(budget: Budget, mut a: impl FnMut(), mut b: impl FnMut()) -> Paired {
    let rounds = budget.rounds.max(1);
    let round_target = budget.per_row.as_secs_f64() / (2 * rounds) as f64;
    let reps_a = calibrate(round_target, &mut a);
    let reps_b = calibrate(round_target, &mut b);
    let (mut times_a, mut times_b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (ta, tb) = if r % 2 == 0 {
            let ta = time_round(reps_a, &mut a);
            (ta, time_round(reps_b, &mut b))
        } else {
            let tb = time_round(reps_b, &mut b);
            (time_round(reps_a, &mut a), tb)
        };
        times_a.push(ta);
        times_b.push(tb);
        ratios.push(ta / tb);
    }
    let ratio = Stats::from_rounds(ratios, 1);
    Paired {
        a: Stats::from_rounds(times_a, reps_a),
        b: Stats::from_rounds(times_b, reps_b),
        ratio: ratio.median,
        ratio_min: ratio.min,
        ratio_max: ratio.max,
    }
}

/// Seconds per call over one round of `reps` calls.
fn time_round(reps: usize, f: &mut impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() / reps as f64
}

/// Calls per round of about `round_target` seconds, after a warm-up call.
fn calibrate(round_target: f64, f: &mut impl FnMut()) -> usize {
    let start = Instant::now();
    f();
    let first = start.elapsed().as_secs_f64();
    // The warm-up call over-estimates a call; calibrate on doubling batches until one takes
    // a quarter of a round, which is long enough for the timer and short enough to be cheap.
    let quarter = round_target / 4.0;
    let mut per_call = first;
    let mut calls = 1usize;
    if first < quarter {
        loop {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            let took = start.elapsed().as_secs_f64();
            per_call = took / calls as f64;
            if took >= quarter {
                break;
            }
            calls *= 2;
        }
    }
    ((round_target / per_call).round() as usize).max(1)
}

/// Wall-clock seconds of one call of `f`, and its result.
pub fn time_once<R>(f: impl FnOnce() -> R) -> (f64, R) {
    let start = Instant::now();
    let r = f();
    (start.elapsed().as_secs_f64(), r)
}

/// `Duration` from seconds, for budgets.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_rounds() {
        let s = Stats::from_rounds(vec![3.0, 1.0, 2.0], 4);
        assert_eq!((s.median, s.min, s.max, s.reps), (2.0, 1.0, 3.0, 4));
        assert_eq!(Stats::from_rounds(vec![4.0, 1.0, 2.0, 3.0], 1).median, 2.5);
        assert!((s.spread() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn measure_calls_at_least_once_per_round() {
        let mut calls = 0;
        let budget = Budget {
            per_row: Duration::ZERO,
            rounds: 3,
        };
        let s = measure(budget, || calls += 1);
        assert_eq!(s.rounds, 3);
        assert!(calls >= 4, "warm-up plus one call per round, got {calls}");
    }
}
