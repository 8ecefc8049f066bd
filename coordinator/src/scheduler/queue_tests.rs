//! The queue, tested by the decisions it returns: examples of each rule,
//! and properties checked against brute force.

use proptest::prelude::*;

use super::*;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

fn job(id: &str, priority: i32, seq: u64, min: u32, max: u32) -> Queued {
    Queued { id: id.into(), priority, seq, req: PlanRequest { min, max, fixed: None, stages: 1 }, prefer: Vec::new() }
}

fn running(id: &str, held: u32) -> Running {
    Running { id: id.into(), held }
}

fn started(d: &Decision) -> Vec<(&str, usize)> {
    d.order
        .iter()
        .filter_map(|(j, v)| match v {
            Verdict::Start(ws) => Some((j.as_str(), ws.len())),
            Verdict::Wait { .. } => None,
        })
        .collect()
}

#[test]
fn a_higher_priority_starts_first_and_equal_ones_in_submission_order() {
    let q = [job("a", 0, 1, 1, 1), job("b", 0, 2, 1, 1), job("c", 5, 3, 1, 1)];
    let d = decide(&q, &[], &ids("w", 2));
    assert_eq!(d.order.iter().map(|(j, _)| j.as_str()).collect::<Vec<_>>(), ["c", "a", "b"]);
    assert_eq!(d.started("c"), Some(&["w1".to_string()][..]));
    assert_eq!(d.started("a"), Some(&["w2".to_string()][..]));
    assert_eq!(d.verdict("b"), Some(&Verdict::Wait { usable: 0 }));
    assert_eq!(d.position("b"), Some(3));
}

#[test]
fn a_job_never_starts_below_its_minimum() {
    let d = decide(&[job("big", 0, 1, 3, 4)], &[], &ids("w", 2));
    assert_eq!(d.verdict("big"), Some(&Verdict::Wait { usable: 2 }));
    assert_eq!(d.head, None, "nothing runs whose end could make room: no reservation");
    assert_eq!(d.spare, ids("w", 2));
}

#[test]
fn the_queue_head_takes_up_to_its_maximum_first() {
    let d = decide(&[job("a", 0, 1, 1, 4), job("b", 0, 2, 1, 1)], &[], &ids("w", 5));
    assert_eq!(started(&d), [("a", 4), ("b", 1)]);
    let d = decide(&[job("a", 0, 1, 1, 4), job("b", 0, 2, 1, 1)], &[], &ids("w", 4));
    assert_eq!(started(&d), [("a", 4)]);
    assert!(d.spare.is_empty());
}

#[test]
fn a_small_job_backfills_beside_a_large_one_that_waits() {
    // r holds 2 workers; 3 are free; `large` needs 4: it starts when r
    // ends, with 5 workers, so one free worker is spare until then.
    let q = [job("large", 0, 1, 4, 4), job("small", 0, 2, 1, 1), job("small2", 0, 3, 1, 1)];
    let d = decide(&q, &[running("r", 2)], &ids("w", 3));
    assert_eq!(d.head, Some(Head { job: "large".into(), shortfall: 1, reach: 2, free_at_turn: 3 }));
    assert_eq!(started(&d), [("small", 1)]);
    assert_eq!(d.verdict("small2"), Some(&Verdict::Wait { usable: 0 }));
    assert!(d.spare.is_empty());
}

#[test]
fn backfill_that_would_delay_the_head_waits() {
    // r holds 2, 2 are free, `large` needs exactly 4: every free worker is reserved.
    let q = [job("large", 0, 1, 4, 4), job("small", 0, 2, 1, 1)];
    let d = decide(&q, &[running("r", 2)], &ids("w", 2));
    assert_eq!(d.head.as_ref().map(|h| (h.shortfall, h.reach)), Some((2, 2)));
    assert_eq!(d.verdict("small"), Some(&Verdict::Wait { usable: 0 }));
}

#[test]
fn the_reservation_counts_the_fewest_workers_that_can_come_back() {
    // `large` is 1 short; r1 (3) or r2 (5) ending covers it: whichever ends
    // first, 2 workers beyond its need come back, so 2 free ones are spare.
    let q = [job("large", 0, 1, 4, 4), job("small", 0, 2, 1, 2)];
    let d = decide(&q, &[running("r2", 5), running("r1", 3)], &ids("w", 3));
    assert_eq!(d.head.as_ref().map(|h| (h.shortfall, h.reach)), Some((1, 3)));
    assert_eq!(started(&d), [("small", 2)]);
}

#[test]
fn a_job_larger_than_the_cluster_reserves_nothing() {
    let q = [job("huge", 9, 1, 8, 8), job("small", 0, 2, 1, 1)];
    let d = decide(&q, &[running("r", 2)], &ids("w", 3));
    assert_eq!(d.head, None);
    assert_eq!(started(&d), [("small", 1)]);
    assert_eq!(d.spare, ids("w", 3)[1..].to_vec(), "running jobs may grow into the rest");
}

#[test]
fn a_blocked_job_behind_the_head_waits_for_its_own_turn() {
    // The head (4, 1 short) leaves 1 spare; `mid` needs 2 and waits, `small` takes the spare one.
    let q = [job("head", 3, 1, 4, 4), job("mid", 2, 2, 2, 2), job("small", 0, 3, 1, 1)];
    let d = decide(&q, &[running("r", 2)], &ids("w", 3));
    assert_eq!(d.head.as_ref().map(|h| h.job.as_str()), Some("head"));
    assert_eq!(d.verdict("mid"), Some(&Verdict::Wait { usable: 1 }));
    assert_eq!(started(&d), [("small", 1)]);
}

#[test]
fn a_job_that_fell_below_its_minimum_takes_its_own_workers_back_first() {
    let mut q = job("j", 0, 1, 2, 2);
    q.prefer = vec!["w7".into(), "w9".into(), "w7".into()];
    let free: Vec<String> = ["w1", "w7", "w9"].map(String::from).to_vec();
    let d = decide(&[q], &[], &free);
    assert_eq!(d.started("j"), Some(&["w7".to_string(), "w9".to_string()][..]));
    assert_eq!(d.spare, ["w1".to_string()]);
}

#[test]
fn pipeline_jobs_start_on_whole_replicas() {
    let req = PlanRequest { min: 2, max: 6, fixed: None, stages: 2 };
    let q = [Queued { id: "pipe".into(), priority: 0, seq: 1, req, prefer: Vec::new() }];
    let d = decide(&q, &[], &ids("w", 5));
    assert_eq!(started(&d), [("pipe", 4)]);
    assert_eq!(d.spare, ["w5".to_string()]);
}

#[test]
fn the_smallest_sum_covering_a_target() {
    assert_eq!(smallest_sum_at_least(&[], 0), Some(0));
    assert_eq!(smallest_sum_at_least(&[], 1), None);
    assert_eq!(smallest_sum_at_least(&[5, 3], 1), Some(3));
    assert_eq!(smallest_sum_at_least(&[5, 3], 4), Some(5));
    assert_eq!(smallest_sum_at_least(&[5, 3], 6), Some(8));
    assert_eq!(smallest_sum_at_least(&[5, 3], 9), None);
    assert_eq!(smallest_sum_at_least(&[4, 4, 3], 7), Some(7));
}

// ------------------------------------------------------------ properties

/// A queue of up to 6 jobs (1 or 2 stages, 1..=3 replicas at least, maybe
/// a fixed world), up to 5 running jobs and up to 12 free workers.
fn cluster() -> impl Strategy<Value = (Vec<Queued>, Vec<Running>, Vec<String>)> {
    let one = (0i32..3, 1u32..3, 1u32..4, 0u32..3, any::<bool>(), 0usize..3);
    let queued = proptest::collection::vec(one, 0..6).prop_map(|jobs| {
        jobs.into_iter()
            .enumerate()
            .map(|(i, (priority, stages, min_r, extra_r, fixed, prefer))| {
                let (min, max) = (min_r * stages, (min_r + extra_r) * stages);
                let req = PlanRequest { min, max, fixed: fixed.then_some(max), stages };
                let prefer = (0..prefer).map(|k| format!("w{}", 3 * i + k)).collect();
                Queued { id: format!("j{i}"), priority, seq: i as u64 + 1, req, prefer }
            })
            .collect::<Vec<_>>()
    });
    let running = proptest::collection::vec(1u32..6, 0..5).prop_map(|held| {
        held.into_iter().enumerate().map(|(i, h)| Running { id: format!("r{i}"), held: h }).collect::<Vec<_>>()
    });
    (queued, running, 0usize..12).prop_map(|(q, r, n)| (q, r, (0..n).map(|i| format!("w{i}")).collect()))
}

/// Whether some set of jobs of `sizes` ending would let the head start
/// with `before` free workers, but not with `after`.
fn delays(sizes: &[u32], need: u32, before: u32, after: u32) -> bool {
    (0u32..1 << sizes.len()).any(|mask| {
        let back: u32 = sizes.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, s)| s).sum();
        before + back >= need && after + back < need
    })
}

/// Per queued job in queue order: its request, and the free workers left at
/// its turn; and the sizes that return to the head (running jobs and jobs
/// started ahead of it).
struct Replay {
    turns: Vec<(Queued, u32, Option<usize>)>,
    head_sizes: Vec<u32>,
}

fn replay(queued: &[Queued], running: &[Running], free: &[String], d: &Decision) -> Replay {
    let mut sorted = queued.to_vec();
    queue_order(&mut sorted);
    let mut left = free.len() as u32;
    let mut head_sizes: Vec<u32> = running.iter().map(|r| r.held).collect();
    let mut seen_head = false;
    let mut turns = Vec::new();
    for (q, (id, v)) in sorted.into_iter().zip(&d.order) {
        assert_eq!(&q.id, id, "the decision lists the queue in queue order");
        let got = d.started(id).map(<[String]>::len);
        turns.push((q.clone(), left, got));
        seen_head |= d.head.as_ref().is_some_and(|h| &h.job == id);
        if let Verdict::Start(ws) = v {
            left -= ws.len() as u32;
            if !seen_head {
                head_sizes.push(ws.len() as u32);
            }
        }
    }
    Replay { turns, head_sizes }
}

proptest! {
    /// Every start is a whole gang within the job's limits, on free workers
    /// no other job got; the spare workers are free ones nobody got.
    #[test]
    fn no_job_starts_below_its_minimum_and_no_worker_is_in_two_jobs((queued, running, free) in cluster()) {
        let d = decide(&queued, &running, &free);
        prop_assert_eq!(d.order.len(), queued.len());
        let mut used: Vec<&String> = d.spare.iter().collect();
        for (id, v) in &d.order {
            if let Verdict::Start(ws) = v {
                let req = queued.iter().find(|q| &q.id == id).unwrap().req;
                let n = ws.len() as u32;
                prop_assert!(n >= req.min_world() && n <= req.max_world(), "{} started on {}", id, n);
                prop_assert_eq!(n % req.stages.max(1), 0);
                used.extend(ws);
            }
        }
        prop_assert!(used.iter().all(|w| free.contains(w)));
        let count = used.len();
        used.sort();
        used.dedup();
        prop_assert_eq!(used.len(), count, "a worker given twice");
    }

    /// The same jobs and workers in any order give the same decision.
    #[test]
    fn same_inputs_same_decision(
        (queued, running, free) in cluster(),
        seed in any::<u64>(),
    ) {
        let d = decide(&queued, &running, &free);
        let shuffle = |n: usize| {
            let mut idx: Vec<usize> = (0..n).collect();
            let mut s = seed | 1;
            for i in (1..n).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                idx.swap(i, (s % (i as u64 + 1)) as usize);
            }
            idx
        };
        let q2: Vec<Queued> = shuffle(queued.len()).into_iter().map(|i| queued[i].clone()).collect();
        let r2: Vec<Running> = shuffle(running.len()).into_iter().map(|i| running[i].clone()).collect();
        let f2: Vec<String> = shuffle(free.len()).into_iter().map(|i| free[i].clone()).collect();
        prop_assert_eq!(&decide(&q2, &r2, &f2), &d);
        prop_assert_eq!(decide(&queued, &running, &free), d);
    }

    /// Backfill never delays the head: for every set of running jobs whose
    /// end would have let it start, it still can, with what the decision
    /// leaves free (the spare counted as taken).
    #[test]
    fn backfill_never_delays_the_head((queued, running, free) in cluster()) {
        let d = decide(&queued, &running, &free);
        let Some(head) = &d.head else { return Ok(()) };
        let r = replay(&queued, &running, &free, &d);
        let (hq, at_turn, _) = r.turns.iter().find(|(q, _, _)| q.id == head.job).unwrap();
        prop_assert_eq!(*at_turn, head.free_at_turn);
        let given: u32 = d.order.iter().filter_map(|(j, _)| d.started(j)).map(|w| w.len() as u32).sum();
        let left = free.len() as u32 - given - d.spare.len() as u32;
        let need = hq.req.min_world();
        prop_assert!(!delays(&r.head_sizes, need, *at_turn, left));
    }

    /// A job waits only when it must: it does not fit in the free workers
    /// left at its turn, or starting it would delay the head ahead of it.
    /// So a job of higher priority never waits while a lower one starts on
    /// workers it could have used; and no waiting job fits in the spare.
    #[test]
    fn a_job_waits_only_when_it_must((queued, running, free) in cluster()) {
        let d = decide(&queued, &running, &free);
        let r = replay(&queued, &running, &free, &d);
        let mut head: Option<(u32, u32)> = None;
        for (q, at_turn, got) in &r.turns {
            let need = q.req.min_world();
            if got.is_none() {
                let fits = need <= *at_turn;
                let delays_head =
                    fits && head.is_some_and(|(hneed, hfree)| delays(&r.head_sizes, hneed, hfree, at_turn - need));
                prop_assert!(!fits || delays_head, "{} waits with {} free, needing {}", q.id, at_turn, need);
                prop_assert!(need > d.spare.len() as u32, "{} could use the spare", q.id);
            }
            if d.head.as_ref().is_some_and(|h| h.job == q.id) {
                head = Some((need, *at_turn));
            }
        }
        // The first waiting job is never held back by a reservation.
        if let Some((q, at_turn, _)) = r.turns.iter().find(|(_, _, got)| got.is_none()) {
            prop_assert!(q.req.min_world() > *at_turn);
        }
    }
}
