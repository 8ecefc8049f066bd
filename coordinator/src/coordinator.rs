//! The coordinator process core: the meta store, the leader's soft state and
//! the driver task that turns soft state into committed decisions (lapsed
//! leases, workers gone by two signs, starting jobs, restarting after
//! unexplained failures).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_registry::{Registrar, Registries};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::auth::AuthMode;
use crate::scheduler::queue::Verdict;
use crate::soft::Soft;
use crate::state::{Command, Event, State};
use crate::store::{MetaStore, StoreError};
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A worker that has not heartbeated for this long is lost.
    pub lease: Duration,
    /// How often workers heartbeat (told to them at registration).
    pub heartbeat_interval: Duration,
    /// How long a job with at least `workers.min` (but fewer than
    /// `workers.max`) free workers waits for more before it starts.
    pub start_grace: Duration,
    /// How long a reported communication failure may stay unexplained by a
    /// lost worker before the generation is restarted.
    pub comm_grace: Duration,
    /// The driver's period.
    pub tick: Duration,
    /// A failed registry hand-off is retried after this, doubled per
    /// failure up to `handoff_retry_max`.
    pub handoff_retry: Duration,
    pub handoff_retry_max: Duration,
    /// One hand-off attempt may take this long.
    pub handoff_timeout: Duration,
    /// How often training jobs' new metric points go to their tracking run.
    pub track_every: Duration,
    /// Whether calls need API tokens (see `auth`).
    pub auth: AuthMode,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(1000),
            start_grace: Duration::from_secs(3),
            comm_grace: Duration::from_secs(8),
            tick: Duration::from_millis(100),
            handoff_retry: Duration::from_secs(2),
            handoff_retry_max: Duration::from_secs(60),
            handoff_timeout: Duration::from_secs(30 * 60),
            track_every: Duration::from_secs(2),
            auth: AuthMode::Open,
        }
    }
}

pub struct Coordinator {
    pub(crate) store: Arc<dyn MetaStore>,
    pub(crate) soft: Mutex<Soft>,
    /// Bumped whenever soft state that clients watch changes (progress).
    pub(crate) soft_version: watch::Sender<u64>,
    /// Whether this replica leads, as the driver last saw it.
    pub(crate) leading: watch::Sender<bool>,
    pub(crate) cfg: CoordinatorConfig,
    pub(crate) shutdown: CancellationToken,
    /// Wakes the registry driver (a job finished training, a retry by hand).
    pub(crate) handoff_wake: Notify,
    registrar: Mutex<Arc<dyn Registrar>>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Coordinator {
    pub fn new(store: Arc<dyn MetaStore>, cfg: CoordinatorConfig, shutdown: CancellationToken) -> Arc<Self> {
        let (soft_version, _) = watch::channel(0);
        let (leading, _) = watch::channel(false);
        Arc::new(Coordinator {
            store,
            soft: Mutex::new(Soft::default()),
            soft_version,
            leading,
            cfg,
            shutdown,
            handoff_wake: Notify::new(),
            registrar: Mutex::new(Arc::new(Registries)),
        })
    }

    /// Replaces the registrar (MLflow and the built-in registry by default).
    pub fn set_registrar(&self, r: Arc<dyn Registrar>) {
        *self.registrar.lock().expect("registrar lock") = r;
    }

    pub(crate) fn registrar(&self) -> Arc<dyn Registrar> {
        self.registrar.lock().expect("registrar lock").clone()
    }

    pub fn state(&self) -> Arc<State> {
        self.store.snapshot()
    }

    pub async fn propose(&self, cmd: Command) -> Result<Vec<Event>, StoreError> {
        let restart = matches!(cmd, Command::RestartGeneration { .. });
        let started = Instant::now();
        let result = self.store.propose(cmd).await;
        telemetry::proposal(
            started.elapsed(),
            match &result {
                Ok(_) => "ok",
                Err(StoreError::Rejected(_)) => "rejected",
                Err(StoreError::NotLeader { .. }) => "not_leader",
                Err(_) => "unavailable",
            },
        );
        let events = result?;
        for e in &events {
            match e {
                Event::WorkerRemoved { worker, reason } => {
                    tracing::warn!(worker = %worker, reason = %reason, "worker removed");
                    telemetry::worker_lost();
                    self.soft().forget(worker);
                }
                Event::GenerationStarted { job, generation, world_size, resume_step, reason } => {
                    tracing::info!(job = %job, gen = generation, world = world_size, resume_step, reason = %reason, "generation started");
                    telemetry::generation_started(telemetry::generation_reason(restart, reason));
                }
                Event::ModelRegistered { .. } => telemetry::handoff("registered"),
                Event::HandoffFailed { .. } => telemetry::handoff("failed"),
                Event::JobWaiting { job, generation, reason } => {
                    tracing::warn!(job = %job, gen = generation, reason = %reason, "job waiting for workers");
                }
                Event::JobFailed { job, reason } => tracing::error!(job = %job, reason = %reason, "job failed"),
                Event::JobSucceeded { job } => tracing::info!(job = %job, "job succeeded"),
                Event::JobTrained { job } => {
                    tracing::info!(job = %job, "job trained; handing the model to its registry");
                    self.handoff_wake.notify_one();
                }
                Event::CheckpointCommitted { job, step } => tracing::info!(job = %job, step, "checkpoint committed"),
                _ => {}
            }
        }
        Ok(events)
    }

    pub(crate) fn soft(&self) -> std::sync::MutexGuard<'_, Soft> {
        self.soft.lock().expect("soft state lock")
    }

    pub(crate) fn bump_soft(&self) {
        self.soft_version.send_modify(|v| *v += 1);
    }

    /// Runs the driver until shutdown.
    pub async fn drive(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leader = self.store.is_leader();
            if leader != *self.leading.borrow() {
                if leader {
                    tracing::info!("this replica leads now; every known worker gets a fresh lease");
                    self.soft().new_term();
                } else {
                    tracing::warn!(leader = ?self.store.leader_hint(), "this replica no longer leads");
                }
                self.leading.send_replace(leader);
            }
            if leader {
                self.drive_once(Instant::now()).await;
            }
        }
    }

    /// Removes the workers that a peer reported unreachable and whose
    /// assignment stream closed, at once rather than when their lease
    /// lapses. Called when either sign arrives, and by the driver.
    pub async fn remove_unreachable(&self) {
        if !self.store.is_leader() {
            return;
        }
        let state = self.state();
        let gone = self.soft().blamed_and_disconnected(&state);
        for worker in gone {
            let reason = "its connection closed and a peer could not reach it".to_string();
            let cmd = Command::RemoveWorker { worker: worker.clone(), reason, at_ms: now_ms() };
            match self.propose(cmd).await {
                Ok(_) => {}
                // Removed meanwhile by another caller.
                Err(StoreError::Rejected(_)) => {}
                Err(e) => tracing::warn!(worker = %worker, error = %e, "could not remove an unreachable worker"),
            }
        }
    }

    /// The worker's assignment stream closed from its side.
    pub async fn stream_closed(&self, worker: &str, now: Instant) {
        tracing::info!(worker = %worker, "assignment stream closed");
        self.soft().disconnected(worker, now);
        self.remove_unreachable().await;
    }

    /// One pass of the leader's decisions.
    pub async fn drive_once(&self, now: Instant) {
        self.remove_unreachable().await;
        let state = self.state();
        let lapsed = self.soft().lapsed(&state, now, self.cfg.lease);
        for worker in lapsed {
            let cmd = Command::RemoveWorker { worker: worker.clone(), reason: "lease lapsed".into(), at_ms: now_ms() };
            if let Err(e) = self.propose(cmd).await {
                tracing::warn!(worker = %worker, error = %e, "could not remove lapsed worker");
            }
        }

        let state = self.state();
        let due = self.soft().stale_comm_failures(&state, now, self.cfg.comm_grace);
        for (job, generation, message) in due {
            let reason = format!("unexplained communication failure on {message}");
            let cmd = Command::RestartGeneration { job: job.clone(), generation, reason, at_ms: now_ms() };
            if let Err(e) = self.propose(cmd).await {
                tracing::warn!(job = %job, error = %e, "could not restart generation");
            }
        }

        self.drive_sweeps().await;
        self.start_queued(now).await;
    }

    /// Starts the queued jobs the queue lets start ([`State::queue`]), one
    /// `Schedule` at a time, deciding again after each. A job that would
    /// start below its maximum first waits `start_grace` for more workers,
    /// keeping its place and the workers the queue gives it.
    async fn start_queued(&self, now: Instant) {
        let mut tried: Vec<String> = Vec::new();
        loop {
            let state = self.state();
            let decision = state.queue();
            let mut next = None;
            for (job, verdict) in &decision.order {
                let Verdict::Start(workers) = verdict else {
                    self.soft().not_ready(job);
                    continue;
                };
                if tried.contains(job) {
                    continue;
                }
                let max = state.jobs.get(job).map_or(0, |j| j.plan_request().max_world());
                if (workers.len() as u32) < max && !self.soft().ready_for(job, now, self.cfg.start_grace) {
                    continue;
                }
                next = Some(job.clone());
                break;
            }
            let Some(job) = next else { return };
            self.soft().not_ready(&job);
            if let Err(e) = self.propose(Command::Schedule { job: job.clone(), at_ms: now_ms() }).await {
                tracing::warn!(job = %job, error = %e, "could not schedule job");
            }
            tried.push(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn running_pair(cfg: CoordinatorConfig) -> Arc<Coordinator> {
        let store = Arc::new(MemStore::new(crate::soft::tests::running_pair()));
        Coordinator::new(store, cfg, CancellationToken::new())
    }

    #[tokio::test]
    async fn a_blamed_worker_whose_stream_closed_is_removed_before_its_lease_lapses() {
        let cfg = CoordinatorConfig { lease: Duration::from_secs(60), ..CoordinatorConfig::default() };
        let c = running_pair(cfg);
        let t0 = Instant::now();
        // Leases are fresh: nothing happens on its own.
        c.drive_once(t0).await;
        assert_eq!(c.state().jobs["j-1"].generation, 1);

        c.soft().record_comm_failure("j-1", 1, "rank 0: rank 1 closed".into(), Some("w2".into()), t0);
        c.drive_once(t0 + Duration::from_millis(100)).await;
        assert_eq!(c.state().jobs["j-1"].generation, 1, "a report alone waits for the lease or the comm grace");

        c.stream_closed("w2", t0 + Duration::from_millis(150)).await;
        let state = c.state();
        let job = &state.jobs["j-1"];
        assert_eq!(job.generation, 2);
        assert_eq!(job.world_size(), 1);
        assert!(!state.workers.contains_key("w2"));
        assert!(job.message.contains("w2 removed"), "{}", job.message);
    }

    #[tokio::test]
    async fn a_closed_stream_alone_leaves_the_decision_to_the_lease() {
        let cfg = CoordinatorConfig { lease: Duration::from_secs(5), ..CoordinatorConfig::default() };
        let c = running_pair(cfg);
        let t0 = Instant::now();
        c.drive_once(t0).await;
        c.stream_closed("w2", t0).await;
        c.drive_once(t0 + Duration::from_secs(1)).await;
        assert!(c.state().workers.contains_key("w2"));
        c.soft().renew("w1", t0 + Duration::from_secs(5), Duration::from_secs(5));
        c.drive_once(t0 + Duration::from_secs(6)).await;
        assert!(!c.state().workers.contains_key("w2"), "removed when its lease lapsed");
        assert_eq!(c.state().jobs["j-1"].generation, 2);
    }
}
