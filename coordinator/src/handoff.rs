//! The leader's registry work: hands trained models over (retrying failed
//! hand-offs with backoff) and, while jobs train, sends their new metric
//! points to the tracking server in batches. The outcome of every attempt is
//! committed (`HandoffDone`, `HandoffFailed`), so a new leader takes over
//! any hand-off that is not done, and none is done twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_registry::handoff::{HandoffRequest, TrackedJob};
use flotilla_registry::record::{CheckpointLineage, GenerationLineage};
use flotilla_registry::MetricRecord;

use crate::coordinator::{now_ms, Coordinator};
use crate::state::{Command, Job, JobPhase, RegisteredModel};

/// The driver's period when nothing wakes it.
const POLL: Duration = Duration::from_millis(250);
/// How soon a tracking run is created for a job that started.
const NEW_RUN_EVERY: Duration = Duration::from_millis(500);

/// Delay before retry number `attempts` (after that many failures): the base
/// doubled per failure, capped.
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempts.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// Whether `job`'s hand-off should be tried at `now_ms`.
pub fn due(job: &Job, now_ms: i64, base: Duration, max: Duration) -> bool {
    match job.phase {
        JobPhase::Registering => true,
        JobPhase::TrainedNotRegistered => {
            let h = job.handoff.clone().unwrap_or_default();
            now_ms >= h.last_attempt_ms + backoff(h.attempts, base, max).as_millis() as i64
        }
        _ => false,
    }
}

fn tracked(job: &Job) -> Option<TrackedJob> {
    Some(TrackedJob {
        job_id: job.id.clone(),
        job_uid: if job.uid.is_empty() { job.id.clone() } else { job.uid.clone() },
        job_name: job.name.clone(),
        spec_json: job.spec_json.clone(),
        registry: job.registry.clone()?,
        submitted_ms: job.submitted_at_ms,
    })
}

/// What the registrar needs to hand `job` over.
pub fn request(job: &Job) -> Option<HandoffRequest> {
    Some(HandoffRequest {
        job: tracked(job)?,
        spec_yaml: job.spec_yaml.clone(),
        final_model: job.final_model.clone()?,
        total_steps: job.total_steps,
        generations: job
            .history
            .iter()
            .map(|g| GenerationLineage {
                generation: g.generation,
                world_size: g.world_size,
                reason: g.reason.clone(),
                at_ms: g.at_ms,
                resumed_from_step: g.resumed_from_step,
            })
            .collect(),
        checkpoints: job
            .checkpoints
            .iter()
            .map(|c| CheckpointLineage { step: c.step, generation: c.generation, location: c.location.clone() })
            .collect(),
        tracking_run: job.tracking_run.clone(),
    })
}

impl Coordinator {
    /// Runs hand-offs and metric tracking while this replica leads, until
    /// shutdown.
    pub async fn run_registry(self: Arc<Self>) {
        let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut cursors: HashMap<String, usize> = HashMap::new();
        let mut tracking: Option<tokio::task::JoinHandle<HashMap<String, usize>>> = None;
        let mut last_track = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = self.handoff_wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            if !self.store.is_leader() {
                continue;
            }
            let state = self.state();
            let now = now_ms();
            for job in state.jobs.values() {
                if !due(job, now, self.cfg.handoff_retry, self.cfg.handoff_retry_max) {
                    continue;
                }
                if !in_flight.lock().expect("in-flight lock").insert(job.id.clone()) {
                    continue;
                }
                let (c, job, flights) = (self.clone(), job.clone(), in_flight.clone());
                tokio::spawn(async move {
                    c.attempt_handoff(&job).await;
                    flights.lock().expect("in-flight lock").remove(&job.id);
                    // A hand-off retried by hand meanwhile is due at once.
                    c.handoff_wake.notify_one();
                });
            }
            // Tracking: one pass at a time, every `track_every`.
            if let Some(done) = tracking.take_if(|t| t.is_finished()) {
                // Finished: the await returns at once.
                if let Ok(updated) = done.await {
                    cursors = updated;
                }
            }
            // A job that needs a tracking run gets one soon after it starts.
            let needs_run = state.jobs.values().any(|j| {
                j.phase.is_active()
                    && j.tracking_run.is_none()
                    && j.registry.as_ref().is_some_and(|r| r.kind == flotilla_jobspec::RegistryKind::Mlflow)
            });
            let every = if needs_run { self.cfg.track_every.min(NEW_RUN_EVERY) } else { self.cfg.track_every };
            if tracking.is_none() && last_track.elapsed() >= every {
                last_track = Instant::now();
                let c = self.clone();
                let start = std::mem::take(&mut cursors);
                tracking = Some(tokio::spawn(async move { c.track_pass(start).await }));
            }
        }
    }

    async fn attempt_handoff(&self, job: &Job) {
        let Some(req) = request(job) else {
            let cmd = Command::HandoffFailed {
                job: job.id.clone(),
                error: "the job has no registry section or no final model".into(),
                at_ms: now_ms(),
            };
            let _ = self.propose(cmd).await;
            return;
        };
        tracing::info!(job = %job.id, registry = %req.job.registry.url, model = %req.job.registry.model, "handing the model over");
        let registrar = self.registrar();
        let started = Instant::now();
        let result = match tokio::time::timeout(self.cfg.handoff_timeout, registrar.hand_off(&req)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.cfg.handoff_timeout)),
        };
        let cmd = match result {
            Ok(r) => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(job = %job.id, model = %r.model, version = r.version, hand_off_ms = ms, "model registered");
                if job.tracking_run.is_none() && !r.run_id.is_empty() {
                    let _ =
                        self.propose(Command::SetTrackingRun { job: job.id.clone(), run_id: r.run_id.clone() }).await;
                }
                Command::HandoffDone {
                    job: job.id.clone(),
                    registered: RegisteredModel {
                        registry: req.job.registry.url.clone(),
                        model: r.model,
                        version: r.version,
                        uri: r.uri,
                        run_id: r.run_id,
                        at_ms: now_ms(),
                    },
                    at_ms: now_ms(),
                }
            }
            Err(error) => {
                tracing::warn!(job = %job.id, error = %error, "registry hand-off failed; will retry");
                Command::HandoffFailed { job: job.id.clone(), error, at_ms: now_ms() }
            }
        };
        if let Err(e) = self.propose(cmd).await {
            tracing::warn!(job = %job.id, error = %e, "could not record the hand-off's outcome");
        }
    }

    /// Sends each training job's metric points since `cursors` to its
    /// tracking run; returns the new cursors.
    async fn track_pass(&self, mut cursors: HashMap<String, usize>) -> HashMap<String, usize> {
        let state = self.state();
        let registrar = self.registrar();
        for job in state.jobs.values().filter(|j| j.registry.is_some() && j.phase.is_active()) {
            let Some(t) = tracked(job) else { continue };
            let from = cursors.get(&job.id).copied().unwrap_or(0);
            let points: Vec<MetricRecord> = {
                let soft = self.soft();
                soft.metrics
                    .get(&job.id)
                    .map_or_else(Vec::new, |m| m.iter().skip(from).map(crate::convert::metric_record).collect())
            };
            if points.is_empty() && job.tracking_run.is_some() {
                continue;
            }
            match registrar.track(&t, job.tracking_run.as_deref(), &points).await {
                Ok(run) => {
                    cursors.insert(job.id.clone(), from + points.len());
                    if let (Some(run), None) = (run, &job.tracking_run) {
                        let _ = self.propose(Command::SetTrackingRun { job: job.id.clone(), run_id: run }).await;
                    }
                }
                Err(e) => tracing::warn!(job = %job.id, error = %e, "could not send metrics to the tracking server"),
            }
        }
        cursors.retain(|id, _| state.jobs.get(id).is_some_and(|j| j.phase.is_active()));
        cursors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let (base, max) = (Duration::from_secs(2), Duration::from_secs(60));
        let delays: Vec<u64> = (1..=7).map(|a| backoff(a, base, max).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(u32::MAX, base, max), max);
    }
}
