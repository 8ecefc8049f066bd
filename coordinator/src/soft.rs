//! Leader-only soft state: worker leases, closed assignment streams, the
//! latest progress of each job and its metric history, what each rank
//! reported it holds in memory and where its steps went, and unexplained communication failures. None of it is replicated; only the decisions taken
//! from it are committed. Time is passed in, so the logic is testable without
//! a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use flotilla_proto::v1::{MemoryUsage, MetricPoint, StepTimes};

use crate::limits::{MAX_METRIC_POINTS, MAX_RENDEZVOUS_BYTES, MAX_RENDEZVOUS_KEYS};
use crate::state::{JobId, State, WorkerId};

/// What a rank last reported about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankReport {
    pub memory: MemoryUsage,
    /// Where its recent steps went (absent from older workers).
    pub step_times: Option<StepTimes>,
}

#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub generation: u64,
    pub step: u64,
    pub loss: f64,
    pub samples_per_sec: f64,
    /// The latest evaluation: its step, loss and accuracy.
    pub eval: Option<(u64, f64, Option<f64>)>,
}

/// The communication failures reported in one generation of a job.
#[derive(Debug)]
struct CommFailure {
    /// When the first was reported, and what it said.
    since: Instant,
    message: String,
    /// The workers the reports named as the peer that did not answer.
    blamed: BTreeSet<WorkerId>,
}

/// The rendezvous values of one generation of a job, and their bytes.
#[derive(Debug, Default)]
struct Board {
    values: HashMap<String, Vec<u8>>,
    bytes: usize,
}

/// Why a rendezvous value was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoardFull {
    #[error("a generation may publish at most {MAX_RENDEZVOUS_KEYS} rendezvous keys")]
    Keys,
    #[error("a generation may publish at most {MAX_RENDEZVOUS_BYTES} bytes of rendezvous keys and values")]
    Bytes,
}

#[derive(Debug, Default)]
pub struct Soft {
    leases: HashMap<WorkerId, Instant>,
    /// worker -> when its assignment stream closed from its side. An agent
    /// never reopens the stream of a worker id (it registers again), so a
    /// closed stream means the process is gone or cut off.
    disconnected: HashMap<WorkerId, Instant>,
    pub progress: HashMap<JobId, Progress>,
    pub metrics: HashMap<JobId, Vec<MetricPoint>>,
    /// (job, generation) -> the communication failures reported in it.
    comm_failures: HashMap<(JobId, u64), CommFailure>,
    /// job -> since when it has had at least `min` free workers.
    ready_since: HashMap<JobId, Instant>,
    /// (job, generation) -> what its ranks published.
    rendezvous: HashMap<(JobId, u64), Board>,
    /// (job, generation) -> rank -> the latest report of that rank.
    memory: HashMap<(JobId, u64), BTreeMap<u32, RankReport>>,
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
        self.disconnected.remove(worker);
    }

    /// The worker's assignment stream closed from its side at `now`.
    pub fn disconnected(&mut self, worker: &str, now: Instant) {
        self.disconnected.entry(worker.to_string()).or_insert(now);
    }

    /// The worker (re)opened its assignment stream.
    pub fn connected(&mut self, worker: &str) {
        self.disconnected.remove(worker);
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
        let eval = point
            .eval_loss
            .map(|l| (point.step, l, point.eval_accuracy))
            .or_else(|| self.progress.get(job).and_then(|p| p.eval));
        self.progress.insert(
            job.to_string(),
            Progress {
                generation: point.generation,
                step: point.step,
                loss: point.loss,
                samples_per_sec: point.samples_per_sec,
                eval,
            },
        );
        let history = self.metrics.entry(job.to_string()).or_default();
        if history.len() < MAX_METRIC_POINTS {
            history.push(point);
        }
    }

    /// A rank of `job`'s `generation` reported a failed collective, naming
    /// the worker that did not answer when it knew it.
    pub fn record_comm_failure(
        &mut self,
        job: &str,
        generation: u64,
        message: String,
        blamed: Option<WorkerId>,
        now: Instant,
    ) {
        let failure = self.comm_failures.entry((job.to_string(), generation)).or_insert_with(|| CommFailure {
            since: now,
            message,
            blamed: BTreeSet::new(),
        });
        failure.blamed.extend(blamed);
    }

    /// Workers that a peer in a current generation reported unreachable and
    /// whose assignment stream has closed: two independent signs that the
    /// process is gone, so they are removed without waiting for the lease.
    pub fn blamed_and_disconnected(&mut self, state: &State) -> Vec<WorkerId> {
        self.disconnected.retain(|w, _| state.workers.contains_key(w));
        let mut out = BTreeSet::new();
        for ((job, generation), failure) in &self.comm_failures {
            let current = state.jobs.get(job).is_some_and(|j| j.generation == *generation && j.phase.is_active());
            if current {
                out.extend(failure.blamed.iter().filter(|w| self.disconnected.contains_key(*w)).cloned());
            }
        }
        out.into_iter().collect()
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
            .filter(|(_, f)| now.duration_since(f.since) >= grace)
            .map(|((job, g), f)| (job.clone(), *g, f.message.clone()))
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
    /// what older generations of the job published. Refused past
    /// [`MAX_RENDEZVOUS_KEYS`] keys or [`MAX_RENDEZVOUS_BYTES`] bytes in one
    /// generation (replacing a key's value counts only the difference).
    pub fn publish(&mut self, job: &str, generation: u64, key: &str, value: Vec<u8>) -> Result<(), BoardFull> {
        self.rendezvous.retain(|(j, g), _| j != job || *g >= generation);
        let board = self.rendezvous.entry((job.to_string(), generation)).or_default();
        let old = board.values.get(key).map(|v| key.len() + v.len());
        if old.is_none() && board.values.len() >= MAX_RENDEZVOUS_KEYS {
            return Err(BoardFull::Keys);
        }
        let bytes = board.bytes - old.unwrap_or(0) + key.len() + value.len();
        if bytes > MAX_RENDEZVOUS_BYTES {
            return Err(BoardFull::Bytes);
        }
        board.bytes = bytes;
        board.values.insert(key.to_string(), value);
        Ok(())
    }

    pub fn lookup(&self, job: &str, generation: u64, key: &str) -> Option<&Vec<u8>> {
        self.rendezvous.get(&(job.to_string(), generation))?.values.get(key)
    }

    /// Keeps `report` as what `rank` of the job's `generation` holds now
    /// and where its steps went, dropping what older generations of the
    /// job reported.
    pub fn record_rank(&mut self, job: &str, generation: u64, rank: u32, report: RankReport) {
        self.memory.retain(|(j, g), _| j != job || *g >= generation);
        self.memory.entry((job.to_string(), generation)).or_default().insert(rank, report);
    }

    /// What `rank` of the job's `generation` last reported.
    pub fn rank(&self, job: &str, generation: u64, rank: u32) -> Option<&RankReport> {
        self.memory.get(&(job.to_string(), generation))?.get(&rank)
    }

    /// What `rank` of the job's `generation` last reported it holds.
    pub fn memory(&self, job: &str, generation: u64, rank: u32) -> Option<&MemoryUsage> {
        self.rank(job, generation, rank).map(|r| &r.memory)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::Command;

    #[test]
    fn rendezvous_values_belong_to_one_generation() {
        let mut soft = Soft::default();
        soft.publish("j-1", 1, "nccl", vec![1]).unwrap();
        assert_eq!(soft.lookup("j-1", 1, "nccl"), Some(&vec![1]));
        assert_eq!(soft.lookup("j-1", 2, "nccl"), None);
        soft.publish("j-1", 2, "nccl", vec![2]).unwrap();
        assert_eq!(soft.lookup("j-1", 1, "nccl"), None, "older generations are dropped");
        assert_eq!(soft.lookup("j-1", 2, "nccl"), Some(&vec![2]));
    }

    #[test]
    fn a_generation_publishes_a_bounded_number_of_keys_and_bytes() {
        let mut soft = Soft::default();
        for i in 0..MAX_RENDEZVOUS_KEYS {
            soft.publish("j-1", 1, &format!("k{i}"), vec![0]).unwrap();
        }
        assert_eq!(soft.publish("j-1", 1, "one-more", vec![0]), Err(BoardFull::Keys));
        // Replacing a value is not a new key; another job has its own board.
        soft.publish("j-1", 1, "k0", vec![1, 2]).unwrap();
        soft.publish("j-2", 1, "k0", vec![1]).unwrap();
        // A new generation starts empty.
        soft.publish("j-1", 2, "k0", vec![0; 64 * 1024]).unwrap();
        let mut full = Err(BoardFull::Keys);
        for i in 1..MAX_RENDEZVOUS_KEYS {
            full = soft.publish("j-1", 2, &format!("k{i}"), vec![0; 64 * 1024]);
            if full.is_err() {
                break;
            }
        }
        assert_eq!(full, Err(BoardFull::Bytes));
        assert_eq!(soft.lookup("j-1", 1, "k0"), None, "generation 1 was dropped");
    }

    fn usage(params_bytes: u64) -> MemoryUsage {
        MemoryUsage { params_bytes, grads_bytes: 1, optimizer_bytes: 2, activation_bytes: 3, ..Default::default() }
    }

    fn report(params_bytes: u64) -> RankReport {
        RankReport { memory: usage(params_bytes), step_times: None }
    }

    #[test]
    fn memory_reports_keep_the_latest_per_rank_of_one_generation() {
        let mut soft = Soft::default();
        soft.record_rank("j-1", 1, 0, report(10));
        soft.record_rank("j-1", 1, 1, report(11));
        let times = StepTimes { step: 7, steps: 3, step_ms: 4.0, compute_ms: 2.0, ..Default::default() };
        soft.record_rank("j-1", 1, 0, RankReport { memory: usage(20), step_times: Some(times) });
        soft.record_rank("j-2", 1, 0, report(30));
        assert_eq!(soft.rank("j-1", 1, 0).and_then(|r| r.step_times), Some(times), "the step times are kept");
        assert_eq!(soft.rank("j-1", 1, 1).and_then(|r| r.step_times), None);
        assert_eq!(soft.memory("j-1", 1, 0), Some(&usage(20)), "the latest report wins");
        assert_eq!(soft.memory("j-1", 1, 1), Some(&usage(11)));
        assert_eq!(soft.memory("j-1", 2, 0), None);
        soft.record_rank("j-1", 2, 1, report(40));
        assert_eq!(soft.memory("j-1", 1, 0), None, "older generations are dropped");
        assert_eq!(soft.memory("j-1", 2, 0), None, "rank 0 has not reported in generation 2");
        assert_eq!(soft.memory("j-1", 2, 1), Some(&usage(40)));
        assert_eq!(soft.memory("j-2", 1, 0), Some(&usage(30)), "other jobs keep theirs");
    }

    /// Workers `w1` and `w2` running generation 1 of job `j-1` (min 1, max 2).
    pub(crate) fn running_pair() -> State {
        let mut state = State::new(3);
        for addr in ["a", "b"] {
            state
                .apply(Command::RegisterWorker {
                    metrics_addr: String::new(),
                    device: String::new(),
                    data_addr: addr.into(),
                    hostname: "h".into(),
                    rank_hint: None,
                    key_hash: String::new(),
                    at_ms: 0,
                })
                .unwrap();
        }
        state
            .apply(Command::SubmitJob {
                name: "j".into(),
                spec_json: "{}".into(),
                min_workers: 1,
                max_workers: 2,
                fixed_world: None,
                stages: 1,
                total_steps: 100,
                keep_checkpoints: 2,
                output_root: "/runs".into(),
                submission_id: None,
                spec_yaml: String::new(),
                registry: None,
                uid: String::new(),
                data_key: Default::default(),
                owner: None,
                priority: 0,
                at_ms: 1,
            })
            .unwrap();
        state.apply(Command::Schedule { job: "j-1".into(), at_ms: 2 }).unwrap();
        assert_eq!(state.jobs["j-1"].generation, 1);
        state
    }

    #[test]
    fn a_worker_is_unreachable_only_when_blamed_and_disconnected() {
        let state = running_pair();
        let t0 = Instant::now();
        let mut soft = Soft::default();
        // Blamed by its peer, but its stream is open: the lease and the comm
        // grace decide, as before.
        soft.record_comm_failure("j-1", 1, "rank 0: closed".into(), Some("w2".into()), t0);
        assert!(soft.blamed_and_disconnected(&state).is_empty());
        // Its stream closes: gone.
        soft.disconnected("w2", t0 + Duration::from_millis(5));
        assert_eq!(soft.blamed_and_disconnected(&state), vec!["w2".to_string()]);

        // The other order: the stream closes first, the report follows.
        let mut soft = Soft::default();
        soft.disconnected("w1", t0);
        assert!(soft.blamed_and_disconnected(&state).is_empty(), "a closed stream alone waits for the lease");
        soft.record_comm_failure("j-1", 1, "rank 1: closed".into(), None, t0);
        assert!(soft.blamed_and_disconnected(&state).is_empty(), "a report naming no peer blames nobody");
        soft.record_comm_failure("j-1", 1, "rank 1: closed".into(), Some("w1".into()), t0);
        assert_eq!(soft.blamed_and_disconnected(&state), vec!["w1".to_string()]);
        // A worker that opens its stream again is not gone.
        soft.connected("w1");
        assert!(soft.blamed_and_disconnected(&state).is_empty());
    }

    #[test]
    fn blame_from_an_older_generation_removes_nobody() {
        let mut state = running_pair();
        state
            .apply(Command::RestartGeneration { job: "j-1".into(), generation: 1, reason: "test".into(), at_ms: 3 })
            .unwrap();
        let t0 = Instant::now();
        let mut soft = Soft::default();
        soft.disconnected("w2", t0);
        soft.record_comm_failure("j-1", 1, "rank 0: closed".into(), Some("w2".into()), t0);
        assert!(soft.blamed_and_disconnected(&state).is_empty());
        soft.record_comm_failure("j-1", 2, "rank 0: closed".into(), Some("w2".into()), t0);
        assert_eq!(soft.blamed_and_disconnected(&state), vec!["w2".to_string()]);
        soft.forget("w2");
        assert!(soft.blamed_and_disconnected(&state).is_empty(), "a removed worker is forgotten");
    }

    #[test]
    fn a_lease_lapses_only_after_its_term_and_renewal_extends_it() {
        let mut state = State::new(3);
        state
            .apply(Command::RegisterWorker {
                metrics_addr: String::new(),
                device: String::new(),
                data_addr: "a".into(),
                hostname: "h".into(),
                rank_hint: None,
                key_hash: String::new(),
                at_ms: 0,
            })
            .unwrap();
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
        state
            .apply(Command::RegisterWorker {
                metrics_addr: String::new(),
                device: String::new(),
                data_addr: "a".into(),
                hostname: "h".into(),
                rank_hint: None,
                key_hash: String::new(),
                at_ms: 0,
            })
            .unwrap();
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
