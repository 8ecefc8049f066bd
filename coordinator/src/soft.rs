//! Leader-only soft state: worker leases, the latest progress of each job and
//! its metric history, and unexplained communication failures. None of it is
//! replicated; only the decisions taken from it are committed. Time is passed
//! in, so the logic is testable without a clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flotilla_proto::v1::MetricPoint;

use crate::state::{JobId, State, WorkerId};

/// Keep at most this many metric points per job.
const MAX_METRIC_POINTS: usize = 1_000_000;

#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub generation: u64,
    pub step: u64,
    pub loss: f64,
    pub samples_per_sec: f64,
}

#[derive(Debug, Default)]
pub struct Soft {
    leases: HashMap<WorkerId, Instant>,
    pub progress: HashMap<JobId, Progress>,
    pub metrics: HashMap<JobId, Vec<MetricPoint>>,
    /// (job, generation) -> when the first communication failure was reported.
    comm_failures: HashMap<(JobId, u64), (Instant, String)>,
    /// job -> since when it has had at least `min` free workers.
    ready_since: HashMap<JobId, Instant>,
    /// (job, generation, key) -> value published for that generation.
    rendezvous: HashMap<(JobId, u64, String), Vec<u8>>,
}

impl Soft {
    pub fn renew(&mut self, worker: &str, now: Instant, lease: Duration) {
        self.leases.insert(worker.to_string(), now + lease);
    }

    /// This replica just became the leader: leases, grace periods and
    /// failure reports it may hold from an earlier term are stale. Dropping
    /// them makes [`Soft::lapsed`] grant every known worker a fresh lease, so
    /// a fail-over alone never costs a worker.
    pub fn new_term(&mut self) {
        self.leases.clear();
        self.comm_failures.clear();
        self.ready_since.clear();
    }

    pub fn forget(&mut self, worker: &str) {
        self.leases.remove(worker);
    }

    /// Workers of `state` whose lease lapsed. A worker the leader has no lease
    /// for (a new leader, a restart) gets a fresh one first.
    pub fn lapsed(&mut self, state: &State, now: Instant, lease: Duration) -> Vec<WorkerId> {
        self.leases.retain(|w, _| state.workers.contains_key(w));
        let mut out = Vec::new();
        for id in state.workers.keys() {
            let deadline = *self.leases.entry(id.clone()).or_insert(now + lease);
            if deadline <= now {
                out.push(id.clone());
            }
        }
        out
    }

    pub fn record_progress(&mut self, job: &str, point: MetricPoint) {
        self.progress.insert(
            job.to_string(),
            Progress {
                generation: point.generation,
                step: point.step,
                loss: point.loss,
                samples_per_sec: point.samples_per_sec,
            },
        );
        let history = self.metrics.entry(job.to_string()).or_default();
        if history.len() < MAX_METRIC_POINTS {
            history.push(point);
        }
    }

    pub fn record_comm_failure(&mut self, job: &str, generation: u64, message: String, now: Instant) {
        self.comm_failures.entry((job.to_string(), generation)).or_insert((now, message));
    }

    /// Communication failures older than `grace` whose generation is still
    /// current: nothing else explained them, so the generation restarts.
    pub fn stale_comm_failures(&mut self, state: &State, now: Instant, grace: Duration) -> Vec<(JobId, u64, String)> {
        self.comm_failures.retain(|(job, generation), _| {
            state.jobs.get(job).is_some_and(|j| j.generation == *generation && j.phase.is_active())
        });
        let due: Vec<(JobId, u64, String)> = self
            .comm_failures
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) >= grace)
            .map(|((job, g), (_, msg))| (job.clone(), *g, msg.clone()))
            .collect();
        for (job, g, _) in &due {
            self.comm_failures.remove(&(job.clone(), *g));
        }
        due
    }

    /// Whether `job`, which now has enough free workers, has waited `grace`
    /// for more to arrive.
    pub fn ready_for(&mut self, job: &str, now: Instant, grace: Duration) -> bool {
        let since = *self.ready_since.entry(job.to_string()).or_insert(now);
        now.duration_since(since) >= grace
    }

    pub fn not_ready(&mut self, job: &str) {
        self.ready_since.remove(job);
    }

    /// Publishes `value` under `key` for the job's `generation`, dropping
    /// what older generations of the job published.
    pub fn publish(&mut self, job: &str, generation: u64, key: &str, value: Vec<u8>) {
        self.rendezvous.retain(|(j, g, _), _| j != job || *g >= generation);
        self.rendezvous.insert((job.to_string(), generation, key.to_string()), value);
    }

    pub fn lookup(&self, job: &str, generation: u64, key: &str) -> Option<&Vec<u8>> {
        self.rendezvous.get(&(job.to_string(), generation, key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    #[test]
    fn rendezvous_values_belong_to_one_generation() {
        let mut soft = Soft::default();
        soft.publish("j-1", 1, "nccl", vec![1]);
        assert_eq!(soft.lookup("j-1", 1, "nccl"), Some(&vec![1]));
        assert_eq!(soft.lookup("j-1", 2, "nccl"), None);
        soft.publish("j-1", 2, "nccl", vec![2]);
        assert_eq!(soft.lookup("j-1", 1, "nccl"), None, "older generations are dropped");
        assert_eq!(soft.lookup("j-1", 2, "nccl"), Some(&vec![2]));
    }

    #[test]
    fn a_lease_lapses_only_after_its_term_and_renewal_extends_it() {
        let mut state = State::new(3);
        state.apply(Command::RegisterWorker { data_addr: "a".into(), hostname: "h".into(), at_ms: 0 }).unwrap();
        let mut soft = Soft::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(3);
        // Unknown to this leader: granted a fresh lease, not declared lost.
        assert!(soft.lapsed(&state, t0, lease).is_empty());
        assert!(soft.lapsed(&state, t0 + Duration::from_secs(2), lease).is_empty());
        soft.renew("w1", t0 + Duration::from_secs(2), lease);
        assert!(soft.lapsed(&state, t0 + Duration::from_secs(4), lease).is_empty());
        assert_eq!(soft.lapsed(&state, t0 + Duration::from_secs(5), lease), vec!["w1".to_string()]);
    }

    #[test]
    fn a_new_term_grants_fresh_leases_instead_of_old_deadlines() {
        let mut state = State::new(3);
        state.apply(Command::RegisterWorker { data_addr: "a".into(), hostname: "h".into(), at_ms: 0 }).unwrap();
        let mut soft = Soft::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(3);
        soft.renew("w1", t0, lease);
        // This replica lost the lead at t0 and wins it again at t0 + 10 s:
        // the lease it remembers lapsed long ago, but the worker may have
        // heartbeated the other leader all along.
        soft.new_term();
        let t1 = t0 + Duration::from_secs(10);
        assert!(soft.lapsed(&state, t1, lease).is_empty(), "a fail-over alone costs no worker");
        assert_eq!(soft.lapsed(&state, t1 + lease, lease), vec!["w1".to_string()], "the fresh lease still lapses");
    }
}
