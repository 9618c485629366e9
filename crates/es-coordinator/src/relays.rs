//! Who gets θ from whom in one generation: the coordinator sends θ's bytes to at most
//! `fanout` workers, and every other worker fetches it from a worker that relays it
//! (`worker --relay-listen`), each relay serving at most `fanout` others. Synchronous and
//! pure; `cluster` turns the plan into `Generation` messages.
//!
//! Why a tree: at 1,000 workers, sending θ (2.7 MB) to each is 2.7 GB per generation out of
//! the coordinator, seconds of its time. With relays its share is `fanout` copies, and the
//! tree is `log_fanout(workers)` hops deep. A failed fetch costs one `ThetaRequest`: the
//! worker asks the coordinator, which then sends the bytes itself.
//!
//! The plan is a breadth-first tree over the relaying workers in id order: the first
//! `fanout` are fed by the coordinator, relay `r` (0-based) feeds relays
//! `fanout·(r+1) .. fanout·(r+2)`, and workers that do not relay are leaves, hung under the
//! relays that still have room, in the same order. Whoever finds no room is fed directly.

use std::collections::HashMap;

use crate::scheduler::WorkerId;

/// Where each worker gets this generation's θ: `None` from the coordinator, `Some(parent)`
/// from that relaying worker.
pub type Plan = HashMap<WorkerId, Option<WorkerId>>;

/// The plan for `relaying` workers (they serve `ThetaRelay`) and `plain` ones (they do not),
/// every one of which needs θ. With `fanout` 0 every worker is fed by the coordinator.
pub fn plan(relaying: &[WorkerId], plain: &[WorkerId], fanout: usize) -> Plan {
    let mut relaying = relaying.to_vec();
    let mut plain = plain.to_vec();
    relaying.sort_unstable();
    plain.sort_unstable();
    let mut plan = Plan::with_capacity(relaying.len() + plain.len());
    if fanout == 0 {
        plan.extend(relaying.iter().chain(&plain).map(|&w| (w, None)));
        return plan;
    }
    // Child number k (over the relays beyond the first `fanout`, then the plain workers)
    // hangs under relay k / fanout: relay r's children are numbered fanout·r ..
    // fanout·(r+1), and a relay's own number (r − fanout) is always below its children's.
    let children = relaying.iter().skip(fanout).chain(&plain);
    for &w in relaying.iter().take(fanout) {
        plan.insert(w, None);
    }
    for (k, &w) in children.enumerate() {
        plan.insert(w, relaying.get(k / fanout).copied());
    }
    plan
}

/// How many hops θ travels to reach the deepest worker of `plan` (1: straight from the
/// coordinator). For logs and tests.
pub fn depth(plan: &Plan) -> usize {
    plan.keys()
        .map(|&w| {
            let mut hops = 1;
            let mut at = w;
            while let Some(Some(parent)) = plan.get(&at) {
                hops += 1;
                at = *parent;
                assert!(hops <= plan.len(), "the plan has a cycle");
            }
            hops
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u64>) -> Vec<WorkerId> {
        range.collect()
    }

    /// Children per parent (`None`: the coordinator).
    fn fed_by(plan: &Plan) -> HashMap<Option<WorkerId>, usize> {
        let mut counts = HashMap::new();
        for parent in plan.values() {
            *counts.entry(*parent).or_default() += 1;
        }
        counts
    }

    #[test]
    fn without_relays_or_fanout_the_coordinator_feeds_everyone() {
        let plain = plan(&[], &ids(1..6), 4);
        assert_eq!(plain.len(), 5);
        assert!(plain.values().all(Option::is_none));
        let off = plan(&ids(1..6), &ids(6..9), 0);
        assert_eq!(off.len(), 8);
        assert!(off.values().all(Option::is_none));
    }

    #[test]
    fn a_thousand_relaying_workers_cost_the_coordinator_fanout_copies() {
        let p = plan(&ids(1..1001), &[], 8);
        assert_eq!(p.len(), 1000);
        let counts = fed_by(&p);
        assert_eq!(counts[&None], 8);
        // Every parent relays, and none serves more than the fanout.
        for (parent, &n) in &counts {
            if let Some(parent) = parent {
                assert!(p.contains_key(parent));
            }
            assert!(n <= 8, "{parent:?} feeds {n}");
        }
        // 8 + 64 + 512 + 4,096 ≥ 1,000: four hops.
        assert_eq!(depth(&p), 4);
    }

    #[test]
    fn plain_workers_hang_under_relays_with_room_and_the_rest_are_fed_directly() {
        // Two relays with fanout 2: both fed directly, with room for 2 children each.
        let p = plan(&[10, 20], &ids(1..7), 2);
        assert_eq!(p[&10], None);
        assert_eq!(p[&20], None);
        let counts = fed_by(&p);
        assert_eq!(counts[&Some(10)], 2);
        assert_eq!(counts[&Some(20)], 2);
        // Six plain workers, four places: two are fed by the coordinator.
        assert_eq!(counts[&None], 4);
        assert_eq!(depth(&p), 2);
        // Plain workers never feed anyone.
        for parent in p.values().flatten() {
            assert!([10, 20].contains(parent));
        }
    }

    #[test]
    fn the_plan_depends_on_the_workers_not_their_order() {
        let a = plan(&[5, 3, 9, 1], &[8, 2], 2);
        let b = plan(&[1, 9, 3, 5], &[2, 8], 2);
        assert_eq!(a, b);
        assert_eq!(a[&1], None);
        assert_eq!(a[&3], None);
        // Relays 5 and 9 (children 0 and 1) hang under relay 1; the plain workers (children
        // 2 and 3) under relay 3.
        assert_eq!(a[&5], Some(1));
        assert_eq!(a[&9], Some(1));
        assert_eq!(a[&2], Some(3));
        assert_eq!(a[&8], Some(3));
    }
}
