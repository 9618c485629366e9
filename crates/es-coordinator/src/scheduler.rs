//! The bookkeeping of one generation's work, as plain synchronous code: which perturbation
//! indices are waiting, which are leased to which worker and until when, which results have
//! arrived. The network code calls it under a lock; the tests drive it directly.
//!
//! Results are stored by index and handed to the update in index order, so θ does not depend
//! on which worker evaluated what, in which order results arrived, or which were repeated.
//!
//! The coordinator's generation wants every index from the start ([`GenerationWork::new`]).
//! A generation can also open empty and be granted indices as they come
//! ([`GenerationWork::open`], [`GenerationWork::extend`]): the shape of the work of a node
//! that is itself given chunks by another coordinator and hands them on to its own workers,
//! answering each of its chunks once every index of it has a result
//! ([`GenerationWork::results_of`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use es_core::train::PairResult;

/// A worker's id within a run.
pub type WorkerId = u64;

/// A run of perturbation indices `first .. first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub first: u32,
    pub count: u32,
}

impl Chunk {
    fn indices(self) -> std::ops::Range<u32> {
        self.first..self.first + self.count
    }
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    worker: WorkerId,
    chunk: Chunk,
    deadline: Instant,
    /// Indices of the chunk still without a result: the lease ends when it reaches 0 (a
    /// count, so that a result costs O(1) rather than a scan of its chunk).
    pending: u32,
}

/// What happened to one submitted result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Submitted {
    /// Stored; `complete` when it was the last one missing.
    Accepted { complete: bool },
    /// The index already had an identical result (e.g. from a worker whose lease expired).
    Duplicate,
    /// The index already had a *different* result: one of the two workers computes other bits.
    Conflict { first: PairResult },
    /// The result is for another generation.
    WrongGeneration { current: u32 },
    /// The index is outside `0..population`.
    OutOfRange { population: u32 },
    /// The index was never leased to this worker (done or not).
    NotAssigned,
    /// The worker's lease on the index ended before it delivered: dropped.
    Late,
    /// A fitness is NaN or +∞ (fitness is minus a loss: −∞ is a diverged network, +∞ is
    /// impossible).
    NotFinite,
}

/// Why a grant of indices was refused ([`GenerationWork::extend`]); nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtendError {
    #[error("a grant of generation {generation} holds no index (count 0); expected at least 1")]
    Empty { generation: u32 },
    #[error(
        "a grant of indices {first}..{first}+{count} of generation {generation} reaches past the population of {population}"
    )]
    OutOfRange {
        generation: u32,
        first: u32,
        count: u32,
        population: u32,
    },
    #[error(
        "a grant of indices {first}..{first}+{count} of generation {generation} repeats index {index}, granted before; expected new indices only"
    )]
    Overlap {
        generation: u32,
        first: u32,
        count: u32,
        index: u32,
    },
}

/// The work of one generation.
#[derive(Debug)]
pub struct GenerationWork {
    generation: u32,
    population: u32,
    chunk_size: u32,
    /// Whether each index was granted (is wanted this generation).
    granted: Vec<bool>,
    /// Indices granted so far; the generation is complete when each has a result.
    wanted: u32,
    waiting: VecDeque<Chunk>,
    /// Leases by the first index of their chunk.
    leases: BTreeMap<u32, Lease>,
    results: Vec<Option<PairResult>>,
    /// Which worker delivered each index first (for conflict reports), by index: a vector
    /// rather than a map because every index of the population gets one per generation.
    delivered_by: Vec<Option<WorkerId>>,
    /// Chunks whose lease ended before they were done, per worker: their late results are
    /// dropped, after a cross-check against the result that is in.
    past_leases: HashMap<WorkerId, Vec<Chunk>>,
    received: u32,
    /// Evaluations that were handed out a second time after a lease ended.
    reassigned: u32,
}

impl GenerationWork {
    /// `population` indices in chunks of `chunk_size`, all waiting.
    pub fn new(generation: u32, population: u32, chunk_size: u32) -> GenerationWork {
        let mut work = GenerationWork::open(generation, population, chunk_size);
        if population > 0 {
            work.extend(Chunk {
                first: 0,
                count: population,
            })
            .expect("the whole population is one valid grant");
        }
        work
    }

    /// A generation of `population` indices of which none is wanted yet: [`Self::extend`]
    /// grants them. Granted indices are handed out in chunks of at most `chunk_size`.
    pub fn open(generation: u32, population: u32, chunk_size: u32) -> GenerationWork {
        GenerationWork {
            generation,
            population,
            chunk_size: chunk_size.max(1),
            granted: vec![false; population as usize],
            wanted: 0,
            waiting: VecDeque::new(),
            leases: BTreeMap::new(),
            results: vec![None; population as usize],
            delivered_by: vec![None; population as usize],
            past_leases: HashMap::new(),
            received: 0,
            reassigned: 0,
        }
    }

    /// Wants the indices of `grant` too: they wait, after those granted before, in chunks of
    /// at most the chunk size. A grant that is empty, reaches past the population or repeats
    /// an index is refused and changes nothing.
    pub fn extend(&mut self, grant: Chunk) -> Result<(), ExtendError> {
        let generation = self.generation;
        let (first, count) = (grant.first, grant.count);
        if count == 0 {
            return Err(ExtendError::Empty { generation });
        }
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.population)
        {
            return Err(ExtendError::OutOfRange {
                generation,
                first,
                count,
                population: self.population,
            });
        }
        if let Some(index) = grant.indices().find(|&i| self.granted[i as usize]) {
            return Err(ExtendError::Overlap {
                generation,
                first,
                count,
                index,
            });
        }
        for i in grant.indices() {
            self.granted[i as usize] = true;
        }
        self.wanted += count;
        let end = first + count;
        self.waiting.extend(
            (first..end)
                .step_by(self.chunk_size as usize)
                .map(|first| Chunk {
                    first,
                    count: self.chunk_size.min(end - first),
                }),
        );
        Ok(())
    }

    /// The runs of `indices` (clamped to the population) not granted yet, in order: what a
    /// repeated grant adds (a coordinator upstream hands out again indices whose lease ended).
    pub fn ungranted(&self, indices: std::ops::Range<u32>) -> Vec<Chunk> {
        let end = indices.end.min(self.population);
        let mut runs: Vec<Chunk> = Vec::new();
        for i in indices.start.min(end)..end {
            if self.granted[i as usize] {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.first + run.count == i => run.count += 1,
                _ => runs.push(Chunk { first: i, count: 1 }),
            }
        }
        runs
    }

    /// The results of `indices` in index order, once every one of them has a result (they
    /// stay in the generation: duplicates are still compared with them); `None` before, or
    /// for indices outside the population.
    pub fn results_of(&self, indices: std::ops::Range<u32>) -> Option<Vec<PairResult>> {
        self.results
            .get(indices.start as usize..indices.end as usize)?
            .iter()
            .copied()
            .collect()
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The number of indices (mirrored pairs) of the generation.
    pub fn population(&self) -> u32 {
        self.population
    }

    /// Leases the next waiting chunk (at most `max_count` indices of it; the rest waits) to
    /// `worker` until `now + lease`.
    pub fn assign(
        &mut self,
        worker: WorkerId,
        max_count: u32,
        now: Instant,
        lease: Duration,
    ) -> Option<Chunk> {
        let chunk = self.take_waiting(max_count)?;
        Some(self.lease(worker, chunk, now, lease))
    }

    /// Leases `max_count` waiting indices in a row as one chunk (a hub's share, for which the
    /// chunk size is far too small: one `Assign` and one `Results` at the root instead of one
    /// per chunk): the next waiting chunk and the chunks that follow it without a gap, as
    /// far as `max_count` reaches. Fewer when a gap or the end of the queue comes first.
    pub fn assign_run(
        &mut self,
        worker: WorkerId,
        max_count: u32,
        now: Instant,
        lease: Duration,
    ) -> Option<Chunk> {
        let mut chunk = self.take_waiting(max_count)?;
        while chunk.count < max_count {
            match self.waiting.front() {
                Some(next) if next.first == chunk.first + chunk.count => {
                    let more = self
                        .take_waiting(max_count - chunk.count)
                        .expect("a front chunk was seen");
                    chunk.count += more.count;
                }
                _ => break,
            }
        }
        Some(self.lease(worker, chunk, now, lease))
    }

    /// Leases `chunk` (just taken from the queue) to `worker` until `now + lease`.
    fn lease(&mut self, worker: WorkerId, chunk: Chunk, now: Instant, lease: Duration) -> Chunk {
        let pending = chunk
            .indices()
            .filter(|&i| self.results[i as usize].is_none())
            .count() as u32;
        self.leases.insert(
            chunk.first,
            Lease {
                worker,
                chunk,
                deadline: now + lease,
                pending,
            },
        );
        chunk
    }

    /// Stores one result from `worker`.
    pub fn submit(&mut self, worker: WorkerId, generation: u32, result: PairResult) -> Submitted {
        if generation != self.generation {
            return Submitted::WrongGeneration {
                current: self.generation,
            };
        }
        if result.index >= self.population {
            return Submitted::OutOfRange {
                population: self.population,
            };
        }
        let impossible = |f: f64| f.is_nan() || f == f64::INFINITY;
        if impossible(result.plus.fitness) || impossible(result.minus.fitness) {
            return Submitted::NotFinite;
        }
        let slot = result.index as usize;
        let holds_lease = self
            .lease_of(result.index)
            .is_some_and(|l| l.worker == worker);
        if let Some(first) = self.results[slot] {
            // Only a worker that was given the index can dispute it: anyone else's result is
            // unasked for, and must not make the coordinator evaluate the index itself.
            let involved = holds_lease
                || self.was_leased_to(worker, result.index)
                || self.delivered_by[slot] == Some(worker);
            return if !involved {
                Submitted::NotAssigned
            } else if same_result(&first, &result) {
                Submitted::Duplicate
            } else {
                Submitted::Conflict { first }
            };
        }
        // New results come only from the current lease holder. A worker whose lease ended
        // (it stalled or lost its stream) is late: its results are dropped (DESIGN.md §3),
        // after the cross-check above if the index is done.
        if !holds_lease {
            return if self.was_leased_to(worker, result.index) {
                Submitted::Late
            } else {
                Submitted::NotAssigned
            };
        }
        self.results[slot] = Some(result);
        self.delivered_by[slot] = Some(worker);
        self.received += 1;
        self.count_arrival(result.index);
        Submitted::Accepted {
            complete: self.is_complete(),
        }
    }

    /// The front waiting chunk, or its first `max_count` indices (the rest stays in front).
    fn take_waiting(&mut self, max_count: u32) -> Option<Chunk> {
        if max_count == 0 {
            return None;
        }
        let mut chunk = self.waiting.pop_front()?;
        if chunk.count > max_count {
            self.waiting.push_front(Chunk {
                first: chunk.first + max_count,
                count: chunk.count - max_count,
            });
            chunk.count = max_count;
        }
        Some(chunk)
    }

    /// The worker that delivered `index` first.
    pub fn delivered_by(&self, index: u32) -> Option<WorkerId> {
        self.delivered_by.get(index as usize).copied().flatten()
    }

    fn lease_of(&self, index: u32) -> Option<&Lease> {
        self.leases
            .range(..=index)
            .next_back()
            .map(|(_, l)| l)
            .filter(|l| l.chunk.indices().contains(&index))
    }

    /// Leases that ended (expired or released) are remembered per worker so that their late
    /// results can be told from unassigned ones, and cross-checked.
    fn was_leased_to(&self, worker: WorkerId, index: u32) -> bool {
        self.past_leases
            .get(&worker)
            .is_some_and(|chunks| chunks.iter().any(|c| c.indices().contains(&index)))
    }

    /// A result for `index` arrived: the lease that covers it has one fewer to wait for, and
    /// ends when it has none.
    fn count_arrival(&mut self, index: u32) {
        let Some((&first, lease)) = self.leases.range_mut(..=index).next_back() else {
            return;
        };
        if !lease.chunk.indices().contains(&index) {
            return;
        }
        lease.pending = lease.pending.saturating_sub(1);
        if lease.pending == 0 {
            self.leases.remove(&first);
        }
    }

    /// Returns every unfinished index leased to `worker` to the front of the queue (its
    /// stream closed). Returns how many indices went back.
    pub fn release_worker(&mut self, worker: WorkerId) -> u32 {
        let ended: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.worker == worker)
            .copied()
            .collect();
        self.requeue(ended)
    }

    /// Ends every lease past its deadline; returns the workers whose leases expired and how
    /// many indices went back.
    pub fn expire(&mut self, now: Instant) -> (Vec<WorkerId>, u32) {
        let ended: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.deadline <= now)
            .copied()
            .collect();
        let mut workers: Vec<WorkerId> = ended.iter().map(|l| l.worker).collect();
        workers.sort_unstable();
        workers.dedup();
        (workers, self.requeue(ended))
    }

    fn requeue(&mut self, ended: Vec<Lease>) -> u32 {
        let mut returned = 0;
        // Reverse order so that the lowest indices end up first in the queue.
        for lease in ended.into_iter().rev() {
            self.leases.remove(&lease.chunk.first);
            self.past_leases
                .entry(lease.worker)
                .or_default()
                .push(lease.chunk);
            // Split the chunk into its runs of missing indices.
            let mut runs = Vec::new();
            let mut start = None;
            for i in lease.chunk.indices() {
                let missing = self.results[i as usize].is_none();
                match (missing, start) {
                    (true, None) => start = Some(i),
                    (false, Some(s)) => {
                        runs.push(Chunk {
                            first: s,
                            count: i - s,
                        });
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                runs.push(Chunk {
                    first: s,
                    count: lease.chunk.indices().end - s,
                });
            }
            for run in runs.into_iter().rev() {
                returned += run.count;
                self.waiting.push_front(run);
            }
        }
        self.reassigned += returned;
        returned
    }

    /// Replaces the stored result of `truth.index` by `truth`: the coordinator's own evaluation
    /// settled a dispute against the worker that delivered it first. Returns whether the
    /// stored result changed. An index that was never granted is left alone.
    pub fn settle(&mut self, truth: PairResult) -> bool {
        if !self
            .granted
            .get(truth.index as usize)
            .copied()
            .unwrap_or(false)
        {
            return false;
        }
        let slot = &mut self.results[truth.index as usize];
        let changed = !slot.is_some_and(|stored| same_result(&stored, &truth));
        let arrived = slot.is_none();
        *slot = Some(truth);
        if arrived {
            self.received += 1;
            self.count_arrival(truth.index);
        }
        self.delivered_by[truth.index as usize] = None;
        changed
    }

    /// Forgets everything `worker` did this generation (it was quarantined): its leases end,
    /// the results it delivered are dropped, and all of those indices wait again. Returns how
    /// many indices went back.
    pub fn discard_worker(&mut self, worker: WorkerId) -> u32 {
        let mut returned = self.release_worker(worker);
        self.past_leases.remove(&worker);
        let delivered: Vec<u32> = (0..self.population)
            .filter(|&i| self.delivered_by[i as usize] == Some(worker))
            .collect();
        for &index in delivered.iter().rev() {
            self.delivered_by[index as usize] = None;
            self.results[index as usize] = None;
            self.received -= 1;
            self.waiting.push_front(Chunk {
                first: index,
                count: 1,
            });
        }
        returned += delivered.len() as u32;
        self.reassigned += delivered.len() as u32;
        returned
    }

    /// Whether every granted index has a result (with [`Self::new`], every index).
    pub fn is_complete(&self) -> bool {
        self.received == self.wanted
    }

    /// Indices granted so far (with [`Self::new`], the population).
    pub fn wanted(&self) -> u32 {
        self.wanted
    }

    /// Indices handed out again after a lease ended, so far.
    pub fn reassigned(&self) -> u32 {
        self.reassigned
    }

    pub fn received(&self) -> u32 {
        self.received
    }

    /// The results in index order, once every index of the population has one.
    pub fn into_results(self) -> Option<Vec<PairResult>> {
        if self.received != self.population {
            return None;
        }
        Some(
            self.results
                .into_iter()
                .map(|r| r.expect("complete"))
                .collect(),
        )
    }
}

/// Two results for one index agree when their fitnesses have the same bits.
/// Whether two results of one index agree bit for bit (fitness) and in counts.
pub fn same_result(a: &PairResult, b: &PairResult) -> bool {
    a.plus.fitness.to_bits() == b.plus.fitness.to_bits()
        && a.minus.fitness.to_bits() == b.minus.fitness.to_bits()
        && a.plus.correct == b.plus.correct
        && a.minus.correct == b.minus.correct
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_kernel::Evaluation;

    fn result(index: u32, f: f64) -> PairResult {
        let e = |fitness| Evaluation {
            fitness,
            correct: 1,
            samples: 2,
        };
        PairResult {
            index,
            plus: e(f),
            minus: e(-f),
        }
    }

    const LEASE: Duration = Duration::from_secs(5);

    #[test]
    fn chunks_cover_the_population_once_and_complete_in_index_order() {
        let now = Instant::now();
        let mut work = GenerationWork::new(3, 10, 4);
        let a = work.assign(1, 100, now, LEASE).unwrap();
        let b = work.assign(2, 2, now, LEASE).unwrap();
        let c = work.assign(1, 100, now, LEASE).unwrap();
        let d = work.assign(2, 100, now, LEASE).unwrap();
        assert_eq!(
            [a, b, c, d],
            [
                Chunk { first: 0, count: 4 },
                Chunk { first: 4, count: 2 },
                Chunk { first: 6, count: 2 },
                Chunk { first: 8, count: 2 },
            ]
        );
        assert_eq!(work.assign(1, 100, now, LEASE), None);
        // Results arrive out of order.
        for (worker, chunk) in [(2, d), (1, c), (2, b), (1, a)] {
            for i in chunk.indices().rev() {
                let done = work.submit(worker, 3, result(i, i as f64));
                assert!(matches!(done, Submitted::Accepted { .. }), "{done:?}");
            }
        }
        assert!(work.is_complete());
        let results = work.into_results().unwrap();
        assert_eq!(
            results.iter().map(|r| r.index).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_run_spans_the_chunks_that_follow_without_a_gap() {
        let now = Instant::now();
        let mut work = GenerationWork::new(2, 20, 3);
        // Chunks 0..3, 3..6, ...: a run of 7 takes two whole chunks and one index of a third.
        let a = work.assign_run(1, 7, now, LEASE).unwrap();
        assert_eq!(a, Chunk { first: 0, count: 7 });
        // A worker that is not a hub still gets the rest of the cut chunk, then whole ones.
        let b = work.assign(2, 100, now, LEASE).unwrap();
        assert_eq!(b, Chunk { first: 7, count: 2 });
        // Worker 1's run expires with two results in: its missing indices wait in front, in
        // runs (0..2 and 4..7 are missing around 2..4), and a run stops at the gap between them.
        for i in [2, 3] {
            assert!(matches!(
                work.submit(1, 2, result(i, 1.0)),
                Submitted::Accepted { .. }
            ));
        }
        let mut late = now + LEASE;
        let (expired, returned) = work.expire(late);
        assert_eq!((expired, returned), (vec![1, 2], 7));
        late += Duration::from_millis(1);
        let runs: Vec<Chunk> =
            std::iter::from_fn(|| work.assign_run(3, 100, late, LEASE)).collect();
        assert_eq!(
            runs,
            [
                Chunk { first: 0, count: 2 },
                Chunk {
                    first: 4,
                    count: 16
                },
            ]
        );
        // Every index is leased once more and the generation completes.
        for i in (0..2).chain(4..20) {
            work.submit(3, 2, result(i, 1.0));
        }
        assert!(work.is_complete());
    }

    #[test]
    fn bad_results_are_rejected_and_change_nothing() {
        let now = Instant::now();
        let mut work = GenerationWork::new(7, 4, 2);
        work.assign(1, 2, now, LEASE).unwrap();
        assert_eq!(
            work.submit(1, 6, result(0, 1.0)),
            Submitted::WrongGeneration { current: 7 }
        );
        assert_eq!(
            work.submit(1, 7, result(4, 1.0)),
            Submitted::OutOfRange { population: 4 }
        );
        assert_eq!(work.submit(1, 7, result(2, 1.0)), Submitted::NotAssigned);
        assert_eq!(work.submit(2, 7, result(0, 1.0)), Submitted::NotAssigned);
        assert_eq!(work.submit(1, 7, result(0, f64::NAN)), Submitted::NotFinite);
        assert_eq!(
            work.submit(1, 7, result(0, f64::INFINITY)),
            Submitted::NotFinite
        );
        assert!(
            matches!(
                work.submit(
                    1,
                    7,
                    PairResult {
                        plus: result(1, f64::NEG_INFINITY).plus,
                        ..result(1, -1.0)
                    }
                ),
                Submitted::Accepted { .. }
            ),
            "−∞ is the fitness of a diverged network, a legitimate result"
        );
        assert_eq!(work.received(), 1);
        assert_eq!(
            work.submit(1, 7, result(0, 1.0)),
            Submitted::Accepted { complete: false }
        );
        assert_eq!(work.submit(1, 7, result(0, 1.0)), Submitted::Duplicate);
        assert_eq!(
            work.submit(1, 7, result(0, 2.0)),
            Submitted::Conflict {
                first: result(0, 1.0)
            }
        );
        assert_eq!(work.received(), 2);
    }

    #[test]
    fn a_lost_worker_returns_only_its_unfinished_indices() {
        let now = Instant::now();
        let mut work = GenerationWork::new(0, 8, 4);
        let a = work.assign(1, 4, now, LEASE).unwrap();
        let b = work.assign(2, 4, now, LEASE).unwrap();
        work.submit(1, 0, result(1, 1.0));
        work.submit(1, 0, result(3, 1.0));
        assert_eq!(work.release_worker(1), 2);
        // Indices 0 and 2 come back first, as two chunks.
        assert_eq!(
            work.assign(2, 10, now, LEASE),
            Some(Chunk { first: 0, count: 1 })
        );
        assert_eq!(
            work.assign(2, 10, now, LEASE),
            Some(Chunk { first: 2, count: 1 })
        );
        assert_eq!(work.assign(2, 10, now, LEASE), None);
        assert_eq!(work.reassigned(), 2);
        for i in [0, 2].into_iter().chain(b.indices()) {
            work.submit(2, 0, result(i, 1.0));
        }
        assert!(work.is_complete());
        // A late result of the lost worker for an index it held is a duplicate, or a conflict.
        assert_eq!(
            work.submit(1, 0, result(a.first, 1.0)),
            Submitted::Duplicate
        );
        assert!(matches!(
            work.submit(1, 0, result(2, 9.0)),
            Submitted::Conflict { .. }
        ));
        // A worker that was never given an index cannot dispute it.
        assert_eq!(work.submit(3, 0, result(2, 9.0)), Submitted::NotAssigned);
        assert_eq!(work.submit(3, 0, result(2, 1.0)), Submitted::NotAssigned);
    }

    #[test]
    fn a_quarantined_worker_loses_its_results_and_a_settled_dispute_keeps_the_truth() {
        let now = Instant::now();
        let lease = Duration::from_secs(10);
        let mut work = GenerationWork::new(3, 6, 3);
        let a = work.assign(1, 3, now, lease).unwrap();
        let b = work.assign(2, 3, now, lease).unwrap();
        for i in a.indices() {
            assert!(matches!(
                work.submit(1, 3, result(i, -1.0)),
                Submitted::Accepted { .. }
            ));
        }
        work.submit(2, 3, result(b.first, -2.0));
        // Worker 2 is found lying: its delivered index and its unfinished ones wait again.
        assert_eq!(work.discard_worker(2), 3);
        assert_eq!(work.received(), 3);
        assert_eq!(
            work.submit(2, 3, result(b.first + 1, -2.0)),
            Submitted::NotAssigned,
            "nothing of a quarantined worker is accepted"
        );
        let again = work.assign(1, 3, now, lease).unwrap();
        assert_eq!(again, Chunk { first: 3, count: 1 });
        // The coordinator settles index 0 against worker 1.
        assert!(work.settle(result(0, -0.5)));
        assert!(
            !work.settle(result(0, -0.5)),
            "settling twice changes nothing"
        );
        assert_eq!(work.received(), 3);
    }

    #[test]
    fn expired_leases_go_back_and_the_first_result_wins() {
        let now = Instant::now();
        let mut work = GenerationWork::new(0, 4, 4);
        work.assign(1, 4, now, LEASE).unwrap();
        assert_eq!(work.expire(now + LEASE / 2), (vec![], 0));
        assert_eq!(work.expire(now + LEASE), (vec![1], 4));
        let again = work.assign(2, 4, now + LEASE, LEASE).unwrap();
        assert_eq!(again, Chunk { first: 0, count: 4 });
        // The stalled worker wakes up and delivers index 0 before the new holder: late,
        // dropped.
        assert_eq!(work.submit(1, 0, result(0, 1.0)), Submitted::Late);
        assert_eq!(work.received(), 0);
        assert_eq!(
            work.submit(2, 0, result(0, 1.0)),
            Submitted::Accepted { complete: false }
        );
        assert_eq!(work.delivered_by(0), Some(2));
        // Once the index is in, a late result is cross-checked.
        assert_eq!(work.submit(1, 0, result(0, 1.0)), Submitted::Duplicate);
        assert_eq!(
            work.submit(1, 0, result(0, 3.0)),
            Submitted::Conflict {
                first: result(0, 1.0)
            }
        );
        for i in 1..4 {
            work.submit(2, 0, result(i, 1.0));
        }
        assert!(work.is_complete());
    }

    #[test]
    fn a_lease_ends_with_its_last_result_in_any_order_and_not_before() {
        let now = Instant::now();
        let mut work = GenerationWork::new(0, 8, 4);
        work.assign(1, 4, now, LEASE).unwrap();
        work.assign(2, 4, now, LEASE).unwrap();
        // Worker 1 delivers three of its four, out of order; worker 2 all of its.
        for i in [3, 0, 2] {
            work.submit(1, 0, result(i, 1.0));
        }
        for i in [7, 5, 4, 6] {
            work.submit(2, 0, result(i, 1.0));
        }
        // Only worker 1's lease is still open: at the deadline index 1 alone goes back.
        assert_eq!(work.expire(now + LEASE), (vec![1], 1));
        let again = work.assign(3, 4, now + LEASE, LEASE).unwrap();
        assert_eq!(again, Chunk { first: 1, count: 1 });
        assert_eq!(
            work.submit(3, 0, result(1, 1.0)),
            Submitted::Accepted { complete: true }
        );
        // Its lease ended with that result: nothing is left to expire.
        assert_eq!(work.expire(now + 4 * LEASE), (vec![], 0));
    }

    #[test]
    fn an_open_generation_hands_out_only_granted_indices_and_answers_each_grant_once_whole() {
        let now = Instant::now();
        let mut work = GenerationWork::open(5, 20, 3);
        assert_eq!(work.assign(1, 100, now, LEASE), None, "nothing granted yet");
        assert!(work.is_complete() && work.results_of(10..14).is_none());
        work.extend(Chunk {
            first: 10,
            count: 4,
        })
        .unwrap();
        work.extend(Chunk { first: 2, count: 2 }).unwrap();
        assert_eq!(work.wanted(), 6);
        // Grants wait in the order they came, cut to the chunk size.
        let handed: Vec<Chunk> = std::iter::from_fn(|| work.assign(1, 100, now, LEASE)).collect();
        assert_eq!(
            handed,
            [
                Chunk {
                    first: 10,
                    count: 3
                },
                Chunk {
                    first: 13,
                    count: 1
                },
                Chunk { first: 2, count: 2 },
            ]
        );
        assert_eq!(
            work.submit(1, 5, result(0, 1.0)),
            Submitted::NotAssigned,
            "an index never granted"
        );
        for i in [3, 12, 10, 2] {
            assert!(matches!(
                work.submit(1, 5, result(i, f64::from(i))),
                Submitted::Accepted { complete: false }
            ));
        }
        assert!(
            work.results_of(10..14).is_none(),
            "only the grant 2..4 is whole"
        );
        assert_eq!(
            work.results_of(2..4)
                .unwrap()
                .iter()
                .map(|r| r.index)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        work.submit(1, 5, result(11, 11.0));
        assert_eq!(
            work.submit(1, 5, result(13, 13.0)),
            Submitted::Accepted { complete: true }
        );
        assert_eq!(
            work.results_of(10..14)
                .unwrap()
                .iter()
                .map(|r| r.plus.fitness)
                .collect::<Vec<_>>(),
            [10.0, 11.0, 12.0, 13.0]
        );
        assert!(work.results_of(19..21).is_none(), "past the population");
        // Answered results still count against duplicates.
        assert_eq!(work.submit(1, 5, result(12, 12.0)), Submitted::Duplicate);
        // A repeated grant adds only the indices not granted before.
        assert_eq!(
            work.ungranted(1..12),
            [Chunk { first: 1, count: 1 }, Chunk { first: 4, count: 6 }]
        );
        assert_eq!(
            work.ungranted(18..25),
            [Chunk {
                first: 18,
                count: 2
            }]
        );
        assert!(work.ungranted(10..14).is_empty());
        // More indices reopen the generation; the whole population never arrived.
        work.extend(Chunk { first: 0, count: 1 }).unwrap();
        assert!(!work.is_complete());
        assert!(work.into_results().is_none());
    }

    #[test]
    fn a_bad_grant_is_refused_and_changes_nothing() {
        let now = Instant::now();
        let mut work = GenerationWork::open(9, 8, 4);
        work.extend(Chunk { first: 2, count: 3 }).unwrap();
        assert_eq!(
            work.extend(Chunk { first: 6, count: 0 }),
            Err(ExtendError::Empty { generation: 9 })
        );
        assert_eq!(
            work.extend(Chunk { first: 6, count: 3 }),
            Err(ExtendError::OutOfRange {
                generation: 9,
                first: 6,
                count: 3,
                population: 8
            })
        );
        assert!(matches!(
            work.extend(Chunk {
                first: u32::MAX,
                count: 2
            }),
            Err(ExtendError::OutOfRange { .. })
        ));
        let overlap = work.extend(Chunk { first: 0, count: 3 }).unwrap_err();
        assert_eq!(
            overlap,
            ExtendError::Overlap {
                generation: 9,
                first: 0,
                count: 3,
                index: 2
            }
        );
        assert!(overlap.to_string().contains("repeats index 2"), "{overlap}");
        assert_eq!(work.wanted(), 3);
        assert_eq!(
            work.assign(1, 100, now, LEASE),
            Some(Chunk { first: 2, count: 3 })
        );
        assert_eq!(
            work.assign(1, 100, now, LEASE),
            None,
            "index 0 was never granted"
        );
        assert!(
            !work.settle(result(0, 1.0)),
            "an index never granted is not settled"
        );
        assert_eq!(work.received(), 0);
    }

    #[test]
    fn a_grant_that_loses_a_result_is_whole_again_only_when_it_is_redone() {
        let now = Instant::now();
        let mut work = GenerationWork::open(1, 6, 2);
        work.extend(Chunk { first: 0, count: 4 }).unwrap();
        let a = work.assign(1, 2, now, LEASE).unwrap();
        let b = work.assign(2, 2, now, LEASE).unwrap();
        for i in a.indices() {
            work.submit(1, 1, result(i, 1.0));
        }
        work.submit(2, 1, result(b.first, 7.0));
        // Worker 2 is quarantined before its grant was whole: its result is dropped.
        assert_eq!(work.discard_worker(2), 2);
        work.submit(2, 1, result(b.first + 1, 7.0));
        assert!(work.results_of(0..4).is_none());
        let redo: Vec<Chunk> = std::iter::from_fn(|| work.assign(1, 100, now, LEASE)).collect();
        assert_eq!(
            redo.iter().map(|c| c.count).sum::<u32>(),
            2,
            "both of worker 2's indices wait again"
        );
        for chunk in redo {
            for i in chunk.indices() {
                work.submit(1, 1, result(i, 1.0));
            }
        }
        let answered = work.results_of(0..4).unwrap();
        assert!(answered.iter().all(|r| r.plus.fitness == 1.0));
        // A settled dispute whose index had no result yet also completes its grant.
        work.extend(Chunk { first: 4, count: 1 }).unwrap();
        assert!(work.results_of(4..5).is_none());
        assert!(work.settle(result(4, 2.0)));
        assert_eq!(work.results_of(4..5).unwrap()[0].plus.fitness, 2.0);
    }
}
