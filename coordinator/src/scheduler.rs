//! The scheduler: a pure function from a job's size limits, the workers it
//! has and the free workers to the ordered list of workers of its next plan
//! (index = rank). A job of `stages` pipeline stages runs on a whole number
//! of replicas of `stages` workers each (`rank = replica * stages + stage`).
//! Workers already in the job keep their order; new ones are appended in a
//! stable order, so the same inputs always give the same plan. Which jobs
//! get workers at all, and in what order, is the queue's decision
//! ([`queue`]).

pub mod queue;

/// The job's size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRequest {
    pub min: u32,
    pub max: u32,
    /// An exact world size the job asks for (`parallelism.dp` replicas of
    /// `parallelism.pp` workers).
    pub fixed: Option<u32>,
    /// Pipeline stages (`parallelism.pp`): every world is a multiple of it.
    /// 0 is read as 1.
    pub stages: u32,
}

impl PlanRequest {
    fn stages(&self) -> u32 {
        self.stages.max(1)
    }

    /// The smallest world the job can run on: its minimum, rounded up to a
    /// whole number of replicas.
    pub fn min_world(&self) -> u32 {
        self.fixed.unwrap_or(self.min).max(1).div_ceil(self.stages()).saturating_mul(self.stages())
    }

    /// The largest world the job may use.
    pub fn max_world(&self) -> u32 {
        self.fixed.unwrap_or(self.max)
    }

    /// The world size to plan when `available` workers could be used: as
    /// many as the job's maximum allows, rounded down to a whole number of
    /// replicas; `None` when that is below the job's minimum.
    pub fn target(&self, available: usize) -> Option<u32> {
        let upto = u64::from(self.max_world()).min(available as u64) as u32;
        let target = upto - upto % self.stages();
        (target >= self.min_world()).then_some(target)
    }
}

/// Picks the workers of the next plan: everyone in `current` (in order) and
/// then free workers (in `free`'s order, sorted naturally by id) up to the
/// job's [`PlanRequest::target`]. `None` when fewer than the job's minimum
/// are available.
pub fn plan(req: &PlanRequest, current: &[String], free: &[String]) -> Option<Vec<String>> {
    let mut extra: Vec<&String> = free.iter().filter(|w| !current.contains(w)).collect();
    let target = req.target(current.len() + extra.len())? as usize;
    extra.sort_by_key(|w| natural_key(w));
    let mut out: Vec<String> = current.iter().take(target).cloned().collect();
    out.extend(extra.into_iter().take(target - out.len()).cloned());
    Some(out)
}

/// Reorders a job's first plan by the ranks its workers asked for (Slurm's
/// task id, an indexed Job's index): a worker whose hint is below the plan's
/// size and not taken by a worker before it gets that rank; the others fill
/// the remaining ranks in the plan's order. Without hints the plan is
/// unchanged.
pub fn apply_rank_hints(workers: Vec<String>, hint: impl Fn(&str) -> Option<u32>) -> Vec<String> {
    let n = workers.len();
    let mut slots: Vec<Option<String>> = vec![None; n];
    let mut rest = Vec::new();
    for w in workers {
        match hint(&w).map(|h| h as usize) {
            Some(h) if h < n && slots[h].is_none() => slots[h] = Some(w),
            _ => rest.push(w),
        }
    }
    let mut rest = rest.into_iter();
    slots.into_iter().map(|s| s.or_else(|| rest.next()).expect("one worker per empty slot")).collect()
}

/// Sort key that orders `w2` before `w10`.
pub fn natural_key(id: &str) -> (String, u64) {
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (prefix, num) = id.split_at(id.len() - digits);
    (prefix.to_string(), num.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn too_few_workers_gives_no_plan() {
        let req = PlanRequest { min: 2, max: 4, fixed: None, stages: 1 };
        assert_eq!(plan(&req, &[], &ids(&["w1"])), None);
    }

    #[test]
    fn fills_up_to_max_in_natural_order() {
        let req = PlanRequest { min: 1, max: 3, fixed: None, stages: 1 };
        assert_eq!(plan(&req, &[], &ids(&["w10", "w2", "w1", "w3"])), Some(ids(&["w1", "w2", "w3"])));
    }

    #[test]
    fn current_workers_keep_their_ranks() {
        let req = PlanRequest { min: 1, max: 3, fixed: None, stages: 1 };
        assert_eq!(plan(&req, &ids(&["w5", "w2"]), &ids(&["w9", "w1"])), Some(ids(&["w5", "w2", "w1"])));
    }

    #[test]
    fn fixed_world_needs_exactly_that_many() {
        let req = PlanRequest { min: 1, max: 4, fixed: Some(3), stages: 1 };
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2"])), None);
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2", "w3", "w4"])), Some(ids(&["w1", "w2", "w3"])));
    }

    #[test]
    fn a_pipeline_job_runs_on_whole_replicas() {
        let req = PlanRequest { min: 2, max: 6, fixed: None, stages: 2 };
        assert_eq!(plan(&req, &[], &ids(&["w1"])), None);
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2", "w3"])), Some(ids(&["w1", "w2"])));
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2", "w3", "w4", "w5"])), Some(ids(&["w1", "w2", "w3", "w4"])));
        let seven: Vec<String> = (1..=7).map(|i| format!("w{i}")).collect();
        assert_eq!(plan(&req, &[], &seven).map(|p| p.len()), Some(6));
    }

    #[test]
    fn a_pipeline_job_that_lost_a_worker_refills_or_drops_a_replica() {
        // Four workers in two replicas of two stages; w2 died.
        let req = PlanRequest { min: 2, max: 4, fixed: None, stages: 2 };
        let left = ids(&["w1", "w3", "w4"]);
        assert_eq!(plan(&req, &left, &ids(&["w5"])), Some(ids(&["w1", "w3", "w4", "w5"])));
        assert_eq!(plan(&req, &left, &[]), Some(ids(&["w1", "w3"])));
        // Below one replica: nothing to run on.
        let req = PlanRequest { min: 4, max: 4, fixed: None, stages: 2 };
        assert_eq!(plan(&req, &left, &[]), None);
    }

    #[test]
    fn a_fixed_pipeline_world_needs_all_its_replicas() {
        // dp: 2 replicas of pp: 2 workers.
        let req = PlanRequest { min: 2, max: 6, fixed: Some(4), stages: 2 };
        assert_eq!(req.min_world(), 4);
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2", "w3"])), None);
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2", "w3", "w4", "w5"])), Some(ids(&["w1", "w2", "w3", "w4"])));
    }

    #[test]
    fn a_minimum_below_one_replica_still_needs_a_whole_replica() {
        let req = PlanRequest { min: 1, max: 4, fixed: None, stages: 3 };
        assert_eq!(req.min_world(), 3);
        assert_eq!(plan(&req, &[], &ids(&["w1", "w2"])), None);
        assert_eq!(req.target(5), Some(3));
        assert_eq!(PlanRequest { stages: 0, ..req }.target(2), Some(2), "0 stages is 1");
    }

    fn hinted(workers: &[&str], hints: &[(&str, u32)]) -> Vec<String> {
        let hints: std::collections::HashMap<&str, u32> = hints.iter().copied().collect();
        apply_rank_hints(ids(workers), |w| hints.get(w).copied())
    }

    #[test]
    fn rank_hints_order_a_plan() {
        assert_eq!(hinted(&["w1", "w2", "w3"], &[("w1", 2), ("w2", 0), ("w3", 1)]), ids(&["w2", "w3", "w1"]));
    }

    #[test]
    fn workers_without_hints_fill_the_free_ranks_in_plan_order() {
        assert_eq!(hinted(&["w1", "w2", "w3"], &[("w3", 0)]), ids(&["w3", "w1", "w2"]));
        assert_eq!(hinted(&["w1", "w2"], &[]), ids(&["w1", "w2"]));
    }

    #[test]
    fn out_of_range_and_repeated_hints_fall_back_to_plan_order() {
        // w2 asks for rank 5 of 2; w3 asks for rank 0, which w1 took first.
        assert_eq!(hinted(&["w1", "w2", "w3"], &[("w1", 0), ("w2", 5), ("w3", 0)]), ids(&["w1", "w2", "w3"]));
        assert_eq!(hinted(&["w1", "w2"], &[("w1", 1), ("w2", 1)]), ids(&["w2", "w1"]));
    }

    proptest! {
        /// Hints only permute a plan: the same workers, each once.
        #[test]
        fn rank_hints_keep_the_plan_s_workers(hints in proptest::collection::vec(proptest::option::of(0u32..6), 0..6)) {
            let workers: Vec<String> = (0..hints.len()).map(|i| format!("w{i}")).collect();
            let out = apply_rank_hints(workers.clone(), |w| hints[w[1..].parse::<usize>().unwrap()]);
            let mut sorted = out.clone();
            sorted.sort();
            let mut expected = workers.clone();
            expected.sort();
            prop_assert_eq!(sorted, expected);
            for (rank, w) in out.iter().enumerate() {
                if let Some(h) = hints[w[1..].parse::<usize>().unwrap()] {
                    // A worker whose hint was honoured sits at its hint.
                    let first_with_hint = workers.iter().find(|x| hints[x[1..].parse::<usize>().unwrap()] == Some(h)).unwrap();
                    if (h as usize) < workers.len() && first_with_hint == w {
                        prop_assert_eq!(rank, h as usize);
                    }
                }
            }
        }

        /// Every plan is a whole number of replicas within the job's limits;
        /// the workers it keeps come first, in their order; and there is a
        /// plan exactly when the workers at hand make one replica-rounded
        /// world of at least the minimum.
        #[test]
        fn plans_are_whole_replicas_that_keep_current_workers_in_order(
            stages in 1u32..4,
            min_replicas in 1u32..3,
            extra_replicas in 0u32..3,
            fixed_replicas in proptest::option::of(1u32..4),
            current_n in 0usize..8,
            lost in proptest::collection::vec(any::<bool>(), 8),
            free_n in 0usize..8,
        ) {
            let (min, max) = (min_replicas * stages, (min_replicas + extra_replicas) * stages);
            let fixed = fixed_replicas.map(|r| r * stages).filter(|f| (min..=max).contains(f));
            let req = PlanRequest { min, max, fixed, stages };
            let current: Vec<String> =
                (0..current_n).filter(|i| !lost[*i]).map(|i| format!("w{i}")).collect();
            let free: Vec<String> = (0..free_n).map(|i| format!("w{}", 100 + i)).collect();
            let available = (current.len() + free.len()) as u32;
            let rounded = available.min(req.max_world()) / stages * stages;
            match plan(&req, &current, &free) {
                Some(p) => {
                    let n = p.len() as u32;
                    prop_assert_eq!(n % stages, 0);
                    prop_assert!(n >= req.min_world() && n <= req.max_world());
                    prop_assert_eq!(n, rounded);
                    let kept = current.len().min(p.len());
                    prop_assert_eq!(&p[..kept], &current[..kept]);
                    let mut dedup = p.clone();
                    dedup.sort();
                    dedup.dedup();
                    prop_assert_eq!(dedup.len(), p.len());
                    prop_assert_eq!(plan(&req, &p, &[]), Some(p.clone()), "replanning the plan changes nothing");
                }
                None => prop_assert!(rounded < req.min_world()),
            }
        }

        /// Planning again with the plan's own workers and nothing free gives the same plan.
        #[test]
        fn replanning_an_unchanged_cluster_is_idempotent(min in 1u32..4, extra in 0u32..4, n in 0usize..8) {
            let req = PlanRequest { min, max: min + extra, fixed: None, stages: 1 };
            let free: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
            if let Some(first) = plan(&req, &[], &free) {
                prop_assert!(first.len() as u32 >= min && first.len() as u32 <= min + extra);
                let again = plan(&req, &first, &[]).unwrap();
                prop_assert_eq!(&again, &first);
                let mut dedup = first.clone();
                dedup.sort();
                dedup.dedup();
                prop_assert_eq!(dedup.len(), first.len());
            } else {
                prop_assert!((n as u32) < min);
            }
        }
    }
}
