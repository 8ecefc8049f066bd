//! The job queue: which queued jobs start now and on which free workers,
//! and which free workers a running job may grow into. A pure function of
//! the jobs and workers: the same inputs, in any order, give the same
//! [`Decision`], so the leader's driver and every replica's state machine
//! agree on it.
//!
//! The rules ("Sharing a cluster: the job queue" in docs/operations.md says the same for users):
//! 1. **Order.** Higher `priority` first; equal priorities in submission
//!    order (the job's sequence number in the replicated state).
//! 2. **Gang admission.** A job starts only with at least its minimum world
//!    ([`PlanRequest::min_world`]) and never partially; it takes as many
//!    workers as it can use up to its maximum, in whole replicas.
//! 3. **In order.** Jobs are taken in queue order; each one that fits in the
//!    workers it may use starts.
//! 4. **Reservation and backfill.** The first job that does not fit but
//!    could start once some of the running jobs end is the *head*. Its
//!    *shortfall* is its minimum world less the free workers left at its
//!    turn; its *reach* is the smallest number of workers that some set of
//!    running jobs (those running before, and those started ahead of it)
//!    gives back when they end, among the sets that cover the shortfall.
//!    Jobs behind the head may then use only `reach - shortfall` of the free
//!    workers in all (the *spare*): whichever running jobs end first, the
//!    head can start exactly when it could have without them. A job that
//!    could not start even if every running job ended (it needs more
//!    workers than the cluster has) reserves nothing. Only the head
//!    reserves; the jobs blocked behind it wait for their turn as head.
//! 5. **Growth.** Free workers left after the starts, within the spare when
//!    there is a head, are the [`Decision::spare`]: no queued job can use
//!    them, and running jobs below their maximum may grow into them.

use std::cmp::Reverse;

use super::{natural_key, PlanRequest};

/// A job waiting in the queue (pending, or waiting after losing workers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: String,
    pub priority: i32,
    /// Submission order in the replicated state.
    pub seq: u64,
    pub req: PlanRequest,
    /// Free workers it takes first when it starts (those it ran on until
    /// it fell below its minimum), so that it keeps its ranks.
    pub prefer: Vec<String>,
}

/// A running job and how many workers it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub id: String,
    pub held: u32,
}

/// What happens to a queued job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It starts on these workers (in plan order, before rank hints).
    Start(Vec<String>),
    /// It waits; `usable` is how many free workers it could have had.
    Wait { usable: u32 },
}

/// The job the backfill protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub job: String,
    /// Its minimum world less the free workers left at its turn.
    pub shortfall: u32,
    /// The fewest workers a set of running jobs covering the shortfall
    /// gives back.
    pub reach: u32,
    /// The free workers at its turn.
    pub free_at_turn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Every queued job, in queue order (position = index + 1), with its verdict.
    pub order: Vec<(String, Verdict)>,
    pub head: Option<Head>,
    /// Free workers that no queued job may use: running jobs grow into these.
    pub spare: Vec<String>,
}

impl Decision {
    pub fn verdict(&self, job: &str) -> Option<&Verdict> {
        self.order.iter().find(|(j, _)| j == job).map(|(_, v)| v)
    }

    /// The workers `job` starts on, if it starts now.
    pub fn started(&self, job: &str) -> Option<&[String]> {
        match self.verdict(job)? {
            Verdict::Start(ws) => Some(ws),
            Verdict::Wait { .. } => None,
        }
    }

    /// The job's 1-based place in the queue.
    pub fn position(&self, job: &str) -> Option<u32> {
        self.order.iter().position(|(j, _)| j == job).map(|i| i as u32 + 1)
    }
}

/// Sorts queued jobs into queue order: priority high to low, then
/// submission order (the id breaks ties between equal sequence numbers).
pub fn queue_order(jobs: &mut [Queued]) {
    jobs.sort_by(|a, b| (Reverse(a.priority), a.seq, &a.id).cmp(&(Reverse(b.priority), b.seq, &b.id)));
}

/// Decides the queue (see the module's rules).
pub fn decide(queued: &[Queued], running: &[Running], free: &[String]) -> Decision {
    let mut queued = queued.to_vec();
    queue_order(&mut queued);
    let mut avail: Vec<String> = free.to_vec();
    // Natural order (`w2` before `w10`), the id breaking ties (`w01`, `w1`).
    avail.sort_by(|a, b| (natural_key(a), a).cmp(&(natural_key(b), b)));
    avail.dedup();
    // Sizes of the jobs whose end gives workers back to the head (their
    // order does not matter to a subset sum).
    let mut returning: Vec<u32> = running.iter().map(|r| r.held).filter(|&h| h > 0).collect();
    let mut head: Option<Head> = None;
    // Free workers the jobs behind the head may still use.
    let mut limit: Option<u32> = None;
    let mut order = Vec::with_capacity(queued.len());
    for job in &queued {
        let usable = limit.map_or(avail.len() as u32, |l| l.min(avail.len() as u32));
        if let Some(n) = job.req.target(usable as usize) {
            let workers = take(&mut avail, &job.prefer, n as usize);
            match &mut limit {
                Some(l) => *l -= n,
                None => returning.push(n),
            }
            order.push((job.id.clone(), Verdict::Start(workers)));
            continue;
        }
        // A job no number of workers can start (an impossible fixed world)
        // reserves nothing.
        if head.is_none() && job.req.target(usize::MAX).is_some() {
            let need = job.req.min_world();
            let shortfall = need - need.min(avail.len() as u32);
            if let Some(reach) = smallest_sum_at_least(&returning, shortfall) {
                head = Some(Head { job: job.id.clone(), shortfall, reach, free_at_turn: avail.len() as u32 });
                limit = Some(reach - shortfall);
            }
        }
        order.push((job.id.clone(), Verdict::Wait { usable }));
    }
    let spare_n = limit.map_or(avail.len(), |l| (l as usize).min(avail.len()));
    avail.truncate(spare_n);
    Decision { order, head, spare: avail }
}

/// Takes `n` workers out of `avail`: those in `prefer` first (in its
/// order), then the first in `avail`'s order.
fn take(avail: &mut Vec<String>, prefer: &[String], n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    for w in prefer {
        if out.len() < n && avail.contains(w) && !out.contains(w) {
            out.push(w.clone());
        }
    }
    avail.retain(|w| !out.contains(w));
    let rest = n - out.len();
    out.extend(avail.drain(..rest));
    out
}

/// The smallest sum of a subset of `sizes` that is at least `target`;
/// `None` when even all of them fall short.
pub fn smallest_sum_at_least(sizes: &[u32], target: u32) -> Option<u32> {
    if target == 0 {
        return Some(0);
    }
    let total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    if total < u64::from(target) {
        return None;
    }
    // A minimal subset reaching the target exceeds it by less than its
    // largest member, so sums past target + largest never matter.
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let cap = target as usize + largest as usize;
    let mut reach = vec![false; cap + 1];
    reach[0] = true;
    for &s in sizes {
        let s = s as usize;
        for sum in (s..=cap).rev() {
            if reach[sum - s] {
                reach[sum] = true;
            }
        }
    }
    (target as usize..=cap).find(|&s| reach[s]).map(|s| s as u32)
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
