//! Wire types as JSON: the HTTP API's (the schemas of `docs/openapi.json`)
//! and `flotilla status --json`'s, one format. Phases are lowercase words,
//! absent values are `null`.

use flotilla_proto::v1 as pb;
use serde_json::{json, Value};

use crate::api::WorkerInfo;

/// A phase by name, as the API and `flotilla status` print it.
pub fn phase(p: i32) -> &'static str {
    match pb::JobPhase::try_from(p).unwrap_or(pb::JobPhase::Unspecified) {
        pb::JobPhase::Pending => "pending",
        pb::JobPhase::Running => "running",
        pb::JobPhase::Waiting => "waiting",
        pb::JobPhase::Succeeded => "succeeded",
        pb::JobPhase::Failed => "failed",
        pb::JobPhase::Cancelled => "cancelled",
        pb::JobPhase::Registering => "registering",
        pb::JobPhase::TrainedNotRegistered => "trained-not-registered",
        pb::JobPhase::Unspecified => "unknown",
    }
}

pub fn checkpoint(c: &pb::CheckpointRef) -> Value {
    json!({
        "step": c.step,
        "location": c.location,
        "generation": c.generation,
        "blocked_ms": c.blocked_ms,
        "total_ms": c.total_ms,
    })
}

pub fn generation(g: &pb::GenerationRecord) -> Value {
    json!({
        "generation": g.generation,
        "world_size": g.world_size,
        "reason": g.reason,
        "at_unix_ms": g.at_unix_ms,
        "resumed_from_step": g.resumed_from_step,
    })
}

pub fn registration(r: Option<&pb::Registration>) -> Value {
    let Some(r) = r else { return Value::Null };
    json!({
        "registry": r.registry,
        "model": r.model,
        "version": r.version,
        "uri": r.uri,
        "run_id": r.run_id,
        "attempts": r.attempts,
        "last_error": r.last_error,
        "tracking_run": r.tracking_run,
    })
}

fn memory(m: Option<&pb::MemoryUsage>) -> Value {
    let Some(m) = m else { return Value::Null };
    json!({
        "params_bytes": m.params_bytes,
        "grads_bytes": m.grads_bytes,
        "optimizer_bytes": m.optimizer_bytes,
        "activation_bytes": m.activation_bytes,
        "device": m.device,
        "device_used_bytes": m.device_used_bytes,
        "device_peak_bytes": m.device_peak_bytes,
    })
}

fn step_times(t: Option<&pb::StepTimes>) -> Value {
    let Some(t) = t else { return Value::Null };
    json!({
        "step": t.step,
        "steps": t.steps,
        "step_ms": t.step_ms,
        "compute_ms": t.compute_ms,
        "stage_wait_ms": t.stage_wait_ms,
        "comm_ms": t.comm_ms,
        "optimizer_ms": t.optimizer_ms,
        "data_wait_ms": t.data_wait_ms,
    })
}

/// A rank of a job's plan: its place, what it holds in bytes and where its
/// recent steps went (each `null` until the rank reports).
pub fn rank(r: &pb::RankInfo) -> Value {
    json!({
        "rank": r.rank,
        "worker_id": r.worker_id,
        "data_addr": r.data_addr,
        "metrics_addr": r.metrics_addr,
        "device": r.device,
        "stage": r.stage,
        "replica": r.replica,
        "memory": memory(r.memory.as_ref()),
        "step_times": step_times(r.step_times.as_ref()),
    })
}

/// A job's status: the fields of `JobStatus`, the phase by name, the
/// latest evaluation as `eval` (`null` before the first), and its ranks
/// (see [`rank`]).
pub fn job(s: &pb::JobStatus) -> Value {
    json!({
        "job_id": s.job_id,
        "name": s.name,
        "phase": phase(s.phase),
        "message": s.message,
        "generation": s.generation,
        "world_size": s.world_size,
        "min_workers": s.min_workers,
        "max_workers": s.max_workers,
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": s.loss,
        "samples_per_sec": s.samples_per_sec,
        "eval": s.eval_loss.map(|loss| json!({ "step": s.eval_step, "loss": loss, "accuracy": s.eval_accuracy })),
        "restarts": s.restarts,
        "priority": s.priority,
        "queue_position": (s.queue_position > 0).then_some(s.queue_position),
        "output_dir": s.output_dir,
        "final_model": s.final_model,
        "submitted_by": s.submitted_by,
        "latest_checkpoint": s.latest_checkpoint.as_ref().map(checkpoint),
        "checkpoints": s.checkpoints.iter().map(checkpoint).collect::<Vec<_>>(),
        "generations": s.generations.iter().map(generation).collect::<Vec<_>>(),
        "ranks": s.ranks.iter().map(rank).collect::<Vec<_>>(),
        "registration": registration(s.registration.as_ref()),
    })
}

pub fn metric(p: &pb::MetricPoint) -> Value {
    json!({
        "step": p.step,
        "loss": p.loss,
        "lr": p.lr,
        "samples_per_sec": p.samples_per_sec,
        "grad_norm": p.grad_norm,
        "generation": p.generation,
        "world_size": p.world_size,
        "time_ms": p.time_ms,
        "eval_loss": p.eval_loss,
        "eval_accuracy": p.eval_accuracy,
    })
}

pub fn worker(w: &WorkerInfo) -> Value {
    json!({
        "worker_id": w.id,
        "hostname": w.hostname,
        "data_addr": w.data_addr,
        "registered_at_ms": w.registered_at_ms,
        "job_id": w.job,
        "rank": w.rank,
        "leaving": w.leaving,
        "metrics_addr": w.metrics_addr,
        "device": w.device,
    })
}

/// The `phase` event of a job's event stream.
pub fn phase_event(s: &pb::JobStatus) -> Value {
    json!({ "job_id": s.job_id, "phase": phase(s.phase), "message": s.message, "generation": s.generation })
}

/// The `progress` event of a job's event stream.
pub fn progress_event(s: &pb::JobStatus) -> Value {
    json!({
        "job_id": s.job_id,
        "phase": phase(s.phase),
        "step": s.step,
        "total_steps": s.total_steps,
        "loss": s.loss,
        "samples_per_sec": s.samples_per_sec,
        "generation": s.generation,
        "world_size": s.world_size,
    })
}

/// A sweep and its leaderboard (`Sweep` in `docs/openapi.json`).
pub fn sweep(s: &pb::SweepStatus) -> Value {
    let trials: Vec<Value> = s
        .trials
        .iter()
        .map(|t| {
            let params: serde_json::Map<String, Value> = t
                .params
                .iter()
                .map(|p| {
                    (p.path.clone(), serde_json::from_str(&p.value).unwrap_or_else(|_| Value::String(p.value.clone())))
                })
                .collect();
            json!({
                "trial": t.trial,
                "job_id": (!t.job_id.is_empty()).then(|| t.job_id.clone()),
                "params": params,
                "state": t.state,
                "metric": t.metric,
                "step": t.step,
                "message": t.message,
                "rank": (t.rank > 0).then_some(t.rank),
            })
        })
        .collect();
    json!({
        "sweep_id": s.sweep_id,
        "name": s.name,
        "state": s.state,
        "metric": s.metric,
        "goal": s.goal,
        "max_parallel": s.max_parallel,
        "submitted_by": s.submitted_by,
        "submitted_at_ms": s.submitted_at_ms,
        "trials": trials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_lowercase_words() {
        assert_eq!(phase(pb::JobPhase::Running as i32), "running");
        assert_eq!(phase(pb::JobPhase::TrainedNotRegistered as i32), "trained-not-registered");
        assert_eq!(phase(999), "unknown");
    }

    #[test]
    fn a_job_without_registry_or_checkpoint_has_nulls() {
        let v = job(&pb::JobStatus { job_id: "j".into(), ..Default::default() });
        assert_eq!(v["registration"], Value::Null);
        assert_eq!(v["latest_checkpoint"], Value::Null);
        assert_eq!(v["eval"], Value::Null);
        assert_eq!(v["checkpoints"], json!([]));
    }
}
