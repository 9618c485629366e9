//! One generation's spread update: the parts of θ whose noise sums
//! (`es_core::train::noise_sums`) each worker computes, and what came back. Synchronous
//! bookkeeping, like [`crate::scheduler`]; `cluster` sends the requests, feeds the answers in
//! and computes whatever no worker delivered itself.
//!
//! The update reads P noise windows of D values each: at P = 10,000 that is 27 GB per
//! generation, seconds on one machine, while the 2P fitnesses that decide it are 80 KB. So
//! the coordinator sends each worker the P weights and a share of θ's parameters; each
//! element's sum is computed on its own, in index order, so the assembled sums have exactly
//! the bits of the coordinator's own.

use std::collections::HashMap;
use std::ops::Range;

use crate::scheduler::WorkerId;

/// The most parameters in one range: a `NoiseSums` answer is at most 256 KB, whatever the
/// number of workers.
pub const MAX_RANGE_LEN: usize = 1 << 16;

/// Ranges start at multiples of this (the update's block), unless θ is smaller.
const RANGE_ALIGN: usize = 4096;

/// The ranges of θ one worker is asked to sum.
pub type Share = (WorkerId, Vec<Range<usize>>);

/// What became of one `NoiseSums` answer.
#[derive(Debug, PartialEq)]
pub enum SumsSubmitted {
    /// Stored; `complete` once every range has its sums.
    Accepted { complete: bool },
    /// Not the generation being summed (a late answer, or one from the future).
    WrongGeneration { current: u32 },
    /// No range starts there, or it went to another worker.
    NotAssigned,
    /// The range already has its sums (from this worker, or computed by the coordinator).
    Duplicate,
}

/// The spread update of one generation.
#[derive(Debug)]
pub struct SumWork {
    generation: u32,
    ranges: Vec<Range<usize>>,
    /// Who computes each range; `None` once its worker is gone (the coordinator sums it).
    owners: Vec<Option<WorkerId>>,
    sums: Vec<Option<Vec<f32>>>,
    /// The range starting at each start.
    by_start: HashMap<usize, usize>,
}

impl SumWork {
    /// Splits θ's `dim` parameters among `workers` (in the given order, weighted by nothing:
    /// each gets about D/N, in ranges of at most [`MAX_RANGE_LEN`]). Returns the work and
    /// each worker's ranges. With no workers, every range belongs to the coordinator.
    pub fn plan(generation: u32, dim: usize, workers: &[WorkerId]) -> (SumWork, Vec<Share>) {
        SumWork::plan_within(generation, std::slice::from_ref(&(0..dim)), workers)
    }

    /// Like [`SumWork::plan`], over the parameters of `within` only (a hub's share of θ,
    /// which it splits among its own workers): each gets about 1/N of them, in ranges that
    /// never cross from one of `within` to the next.
    pub fn plan_within(
        generation: u32,
        within: &[Range<usize>],
        workers: &[WorkerId],
    ) -> (SumWork, Vec<Share>) {
        let total: usize = within.iter().map(Range::len).sum();
        let share = total.div_ceil(workers.len().max(1));
        let len = share
            .next_multiple_of(RANGE_ALIGN)
            .clamp(1, MAX_RANGE_LEN)
            .min(total.max(1));
        let ranges: Vec<Range<usize>> = within
            .iter()
            .flat_map(|part| {
                part.clone()
                    .step_by(len)
                    .map(move |start| start..(start + len).min(part.end))
            })
            .collect();
        let owners: Vec<Option<WorkerId>> = (0..ranges.len())
            .map(|r| (!workers.is_empty()).then(|| workers[r % workers.len()]))
            .collect();
        let mut assigned: Vec<Share> = workers.iter().map(|&w| (w, Vec::new())).collect();
        for (r, range) in ranges.iter().enumerate() {
            if !workers.is_empty() {
                assigned[r % workers.len()].1.push(range.clone());
            }
        }
        assigned.retain(|(_, ranges)| !ranges.is_empty());
        let by_start = ranges
            .iter()
            .enumerate()
            .map(|(r, x)| (x.start, r))
            .collect();
        let work = SumWork {
            generation,
            sums: vec![None; ranges.len()],
            ranges,
            owners,
            by_start,
        };
        (work, assigned)
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The length of the range `worker` was given at `start`, if it was given one there that
    /// still waits for its sums.
    pub fn expected_len(&self, worker: WorkerId, start: usize) -> Option<usize> {
        let &r = self.by_start.get(&start)?;
        (self.owners[r] == Some(worker) && self.sums[r].is_none()).then(|| self.ranges[r].len())
    }

    /// Stores `worker`'s sums of the range at `start` (already checked to have
    /// [`SumWork::expected_len`] finite values).
    pub fn submit(
        &mut self,
        worker: WorkerId,
        generation: u32,
        start: usize,
        sums: Vec<f32>,
    ) -> SumsSubmitted {
        if generation != self.generation {
            return SumsSubmitted::WrongGeneration {
                current: self.generation,
            };
        }
        let Some(&r) = self.by_start.get(&start) else {
            return SumsSubmitted::NotAssigned;
        };
        if self.sums[r].is_some() {
            return SumsSubmitted::Duplicate;
        }
        if self.owners[r] != Some(worker) || sums.len() != self.ranges[r].len() {
            return SumsSubmitted::NotAssigned;
        }
        self.sums[r] = Some(sums);
        SumsSubmitted::Accepted {
            complete: self.is_complete(),
        }
    }

    /// Every range has its sums.
    pub fn is_complete(&self) -> bool {
        self.sums.iter().all(Option::is_some)
    }

    /// Nothing more can arrive: every range has its sums or no worker computing it.
    pub fn is_settled(&self) -> bool {
        self.sums
            .iter()
            .zip(&self.owners)
            .all(|(s, o)| s.is_some() || o.is_none())
    }

    /// `worker` is gone: its ranges without sums fall to the coordinator, and so (when
    /// `discard` is set: it computed wrong bits) do those it delivered. Returns how many
    /// ranges fell.
    pub fn release_worker(&mut self, worker: WorkerId, discard: bool) -> usize {
        let mut fell = 0;
        for (owner, sums) in self.owners.iter_mut().zip(&mut self.sums) {
            if *owner == Some(worker) && (sums.is_none() || discard) {
                *owner = None;
                *sums = None;
                fell += 1;
            }
        }
        fell
    }

    /// The ranges a worker delivered, with who delivered them.
    pub fn delivered(&self) -> impl Iterator<Item = (WorkerId, Range<usize>, &[f32])> + '_ {
        self.ranges
            .iter()
            .zip(&self.owners)
            .zip(&self.sums)
            .filter_map(|((range, owner), sums)| {
                Some((owner.as_ref().copied()?, range.clone(), sums.as_deref()?))
            })
    }

    /// The ranges still without sums (the coordinator computes them).
    pub fn missing(&self) -> Vec<Range<usize>> {
        self.ranges
            .iter()
            .zip(&self.sums)
            .filter(|(_, s)| s.is_none())
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Stores the coordinator's own sums of the range at `start` (replacing any).
    pub fn fill(&mut self, start: usize, sums: Vec<f32>) {
        if let Some(&r) = self.by_start.get(&start) {
            debug_assert_eq!(sums.len(), self.ranges[r].len());
            self.sums[r] = Some(sums);
        }
    }

    /// The sums of the parameters of `part` (a union of whole ranges, e.g. one of the
    /// ranges of [`SumWork::plan_within`]), in order; `None` if one of its ranges has none.
    pub fn sums_of(&self, part: Range<usize>) -> Option<Vec<f32>> {
        let mut sums = Vec::with_capacity(part.len());
        for (range, range_sums) in self.ranges.iter().zip(&self.sums) {
            if range.start >= part.start && range.end <= part.end {
                sums.extend_from_slice(range_sums.as_deref()?);
            }
        }
        (sums.len() == part.len()).then_some(sums)
    }

    /// The sums of all of θ, in order; `None` if a range has none.
    pub fn assemble(self) -> Option<Vec<f32>> {
        let mut g = Vec::with_capacity(self.ranges.last().map_or(0, |r| r.end));
        for sums in self.sums {
            g.extend(sums?);
        }
        Some(g)
    }
}

#[cfg(test)]
// Lists of one range of θ are what these tests mean, not ranges collected into vectors.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_covers_theta_once_in_aligned_ranges_shared_round_robin() {
        for (dim, workers) in [
            (669_706, 1),
            (669_706, 3),
            (669_706, 32),
            (669_706, 1000),
            (1058, 2),
            (5, 4),
        ] {
            let ids: Vec<WorkerId> = (1..=workers as u64).collect();
            let (work, assigned) = SumWork::plan(9, dim, &ids);
            let mut all: Vec<Range<usize>> = assigned.iter().flat_map(|(_, r)| r.clone()).collect();
            all.sort_by_key(|r| r.start);
            assert_eq!(all, work.ranges, "{dim} over {workers}");
            assert_eq!(all.first().unwrap().start, 0);
            assert_eq!(all.last().unwrap().end, dim);
            for w in all.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{dim} over {workers}: contiguous");
            }
            for r in &all {
                assert!(!r.is_empty() && r.len() <= MAX_RANGE_LEN);
                assert!(r.start % RANGE_ALIGN == 0 || dim < RANGE_ALIGN, "{r:?}");
            }
            let most = assigned.iter().map(|(_, r)| r.len()).max().unwrap();
            let least = assigned.iter().map(|(_, r)| r.len()).min().unwrap();
            assert!(
                most - least <= 1,
                "{dim} over {workers}: {least}..={most} ranges each"
            );
        }
    }

    #[test]
    fn a_plan_within_parts_of_theta_splits_each_part_and_answers_each_part_whole() {
        // A hub's share of θ: two ranges of the root's plan, split over three workers.
        let within = [65_536..131_072, 262_144..300_000];
        let (mut work, assigned) = SumWork::plan_within(2, &within, &[4, 5, 6]);
        let mut all: Vec<Range<usize>> = assigned.iter().flat_map(|(_, r)| r.clone()).collect();
        all.sort_by_key(|r| r.start);
        assert_eq!(all, work.ranges);
        for part in &within {
            let pieces: Vec<&Range<usize>> = all
                .iter()
                .filter(|r| r.start >= part.start && r.end <= part.end)
                .collect();
            assert_eq!(pieces.first().unwrap().start, part.start);
            assert_eq!(pieces.last().unwrap().end, part.end);
            assert!(pieces.windows(2).all(|w| w[0].end == w[1].start));
        }
        assert_eq!(
            all.iter().map(Range::len).sum::<usize>(),
            within.iter().map(Range::len).sum::<usize>(),
            "no range crosses from one part to the next"
        );
        assert!(
            assigned.len() == 3,
            "every worker gets a share: {assigned:?}"
        );
        for (worker, ranges) in &assigned {
            for r in ranges {
                let values = (r.start..r.end).map(|j| j as f32).collect();
                work.submit(*worker, 2, r.start, values);
            }
        }
        let second = work.sums_of(within[1].clone()).unwrap();
        assert_eq!(second.len(), within[1].len());
        assert_eq!((second[0], second[37_855]), (262_144.0, 299_999.0));
        assert!(
            work.sums_of(65_536..70_000).is_none(),
            "not a union of whole ranges"
        );
    }

    #[test]
    fn sums_are_accepted_once_from_their_owner_and_assemble_in_order() {
        let (mut work, assigned) = SumWork::plan(4, 10_000, &[7, 8]);
        assert_eq!(
            assigned,
            vec![(7, vec![0..8192]), (8, vec![8192..10_000])],
            "two ranges of whole blocks"
        );
        assert_eq!(work.expected_len(8, 8192), Some(1808));
        assert_eq!(work.expected_len(7, 8192), None, "another worker's range");
        assert_eq!(
            work.submit(7, 3, 0, vec![1.0; 8192]),
            SumsSubmitted::WrongGeneration { current: 4 }
        );
        assert_eq!(
            work.submit(7, 4, 8192, vec![1.0; 1808]),
            SumsSubmitted::NotAssigned
        );
        assert_eq!(work.submit(7, 4, 5, vec![1.0]), SumsSubmitted::NotAssigned);
        assert_eq!(
            work.submit(8, 4, 8192, vec![2.0; 1808]),
            SumsSubmitted::Accepted { complete: false }
        );
        assert_eq!(
            work.submit(8, 4, 8192, vec![2.0; 1808]),
            SumsSubmitted::Duplicate
        );
        assert!(!work.is_settled());
        assert_eq!(
            work.submit(7, 4, 0, vec![1.0; 8192]),
            SumsSubmitted::Accepted { complete: true }
        );
        assert_eq!(work.delivered().count(), 2);
        let g = work.assemble().unwrap();
        assert_eq!((g.len(), g[8191], g[8192]), (10_000, 1.0, 2.0));
    }

    #[test]
    fn a_lost_or_discarded_worker_leaves_its_ranges_to_the_coordinator() {
        let (mut work, _) = SumWork::plan(0, 3 * 4096, &[1, 2, 3]);
        work.submit(1, 0, 0, vec![1.0; 4096]);
        work.submit(2, 0, 4096, vec![2.0; 4096]);
        assert_eq!(work.release_worker(3, false), 1, "its range without sums");
        assert!(work.is_settled() && !work.is_complete());
        assert_eq!(work.missing(), vec![8192..12_288]);
        assert_eq!(
            work.submit(3, 0, 8192, vec![3.0; 4096]),
            SumsSubmitted::NotAssigned,
            "a released range is no longer the worker's"
        );
        assert_eq!(work.release_worker(2, true), 1, "its delivered range too");
        assert_eq!(work.missing(), vec![4096..8192, 8192..12_288]);
        work.fill(4096, vec![5.0; 4096]);
        work.fill(8192, vec![6.0; 4096]);
        assert!(work.is_complete());
        let g = work.assemble().unwrap();
        assert_eq!((g[0], g[4096], g[8192]), (1.0, 5.0, 6.0));
        let (alone, assigned) = SumWork::plan(0, 100, &[]);
        assert!(assigned.is_empty() && alone.is_settled());
        assert_eq!(alone.missing(), vec![0..100]);
    }
}
