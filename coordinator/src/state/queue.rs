//! The state's side of the job queue: the scheduler's inputs read from the
//! replicated state (queued jobs, running jobs, free workers), so that the
//! driver, `Schedule`, growth and re-plans all ask the same pure question.

use crate::scheduler::queue::{self, Decision, Queued, Running};

use super::{job_seq, JobPhase, State, WorkerId};

impl State {
    /// The queue's decision on the state as it is.
    pub fn queue(&self) -> Decision {
        self.queue_preferring(None)
    }

    /// [`State::queue`], with `prefer`'s job taking its listed free workers
    /// first if it starts (a job that fell below its minimum keeps its ranks).
    pub(super) fn queue_preferring(&self, prefer: Option<(&str, &[WorkerId])>) -> Decision {
        let queued = self.queued(prefer);
        let running: Vec<Running> = self
            .jobs
            .values()
            .filter(|j| j.phase == JobPhase::Running)
            .map(|j| Running { id: j.id.clone(), held: self.held_by(&j.id) })
            .collect();
        let free: Vec<WorkerId> = self.free_workers().iter().map(|w| w.id.clone()).collect();
        queue::decide(&queued, &running, &free)
    }

    /// The pending and waiting jobs, as the scheduler reads them.
    fn queued(&self, prefer: Option<(&str, &[WorkerId])>) -> Vec<Queued> {
        self.jobs
            .values()
            .filter(|j| matches!(j.phase, JobPhase::Pending | JobPhase::Waiting))
            .map(|j| Queued {
                id: j.id.clone(),
                priority: j.priority,
                seq: job_seq(&j.id),
                req: j.plan_request(),
                prefer: prefer.filter(|(id, _)| *id == j.id).map(|(_, ws)| ws.to_vec()).unwrap_or_default(),
            })
            .collect()
    }

    /// Workers on `job` that give themselves back when it ends (not leaving).
    fn held_by(&self, job: &str) -> u32 {
        let Some(plan) = self.jobs.get(job).and_then(|j| j.plan.as_ref()) else { return 0 };
        plan.ranks.iter().filter(|r| self.workers.get(&r.worker).is_some_and(|w| w.leaving.is_none())).count() as u32
    }

    /// The 1-based place of every queued job in the queue, by job id.
    pub fn queue_positions(&self) -> std::collections::BTreeMap<String, u32> {
        let mut queued = self.queued(None);
        queue::queue_order(&mut queued);
        queued.into_iter().enumerate().map(|(i, q)| (q.id, i as u32 + 1)).collect()
    }

    /// The job's 1-based place in the queue; `None` when it is not queued.
    pub fn queue_position(&self, job: &str) -> Option<u32> {
        self.queue_positions().get(job).copied()
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
