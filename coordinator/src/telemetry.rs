//! Prometheus metrics: the process's recorder (installed once, shared by a
//! coordinator and a worker in the same binary), the coordinator's series
//! (gauges read from the state when scraped, counters and histograms as
//! things happen) and their text rendering for `GET /metrics`. The gRPC
//! layer that counts calls is in `telemetry::rpc`. Names follow
//! Prometheus's conventions: `flotilla_` prefix, `_seconds`, `_bytes`,
//! `_total`; `docs/observability.md` lists them.

pub mod rpc;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::coordinator::Coordinator;
use crate::state::JobPhase;
use crate::store::RaftStatus;

/// Where the metrics are served: on the coordinator's API port (tokens
/// of any reading role), and on a `--metrics-addr` listener.
pub const PATH: &str = "/metrics";

/// The content type of Prometheus's text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets of durations, in seconds: 0.5 ms to 2 min.
const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. `None` when
/// another recorder was installed first (a library user's own): then
/// flotilla's series go there and `/metrics` says so.
pub fn recorder() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS));
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => {
                    spawn_upkeep(h.clone());
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not install the Prometheus recorder; /metrics is empty");
                    None
                }
            }
        })
        .as_ref()
}

/// Installs the recorder and shows the coordinator's counters at zero, so
/// that a dashboard reads 0 rather than no series before the first event.
pub fn coordinator_started() {
    if recorder().is_none() {
        return;
    }
    for reason in GENERATION_REASONS {
        metrics::counter!("flotilla_generations_total", "reason" => reason).increment(0);
    }
    metrics::counter!("flotilla_workers_lost_total").increment(0);
    for outcome in ["registered", "failed"] {
        metrics::counter!("flotilla_handoffs_total", "outcome" => outcome).increment(0);
    }
    for code in ["unauthenticated", "permission_denied"] {
        metrics::counter!("flotilla_rpc_refused_total", "code" => code).increment(0);
    }
}

/// Every value of `flotilla_generations_total`'s `reason`.
const GENERATION_REASONS: [&str; 6] = ["start", "resume", "grow", "preemption", "workers_lost", "restart"];

/// How often histogram samples are folded into their buckets when nobody
/// scrapes: the recorder holds each sample until then.
const UPKEEP: Duration = Duration::from_secs(5);

/// Folds histogram samples into buckets every [`UPKEEP`], so that a
/// process nobody scrapes holds bounded memory; a thread of its own, for
/// the life of the process (the recorder lives that long too).
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread; histograms are folded when scraped");
    }
}

/// Histogram buckets of sizes, in bytes: 1 KiB to 4 GiB.
const BYTES_BUCKETS: &[f64] = &[1024.0, 16384.0, 262144.0, 4194304.0, 67108864.0, 1073741824.0, 4294967296.0];

/// The process's series in Prometheus's text format (empty without a
/// recorder).
pub fn render_process() -> String {
    match recorder() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => "# another metrics recorder was installed first; flotilla's series go there\n".into(),
    }
}

/// The coordinator's series, its gauges refreshed from the state first.
pub fn render(c: &Coordinator) -> String {
    if recorder().is_some() {
        refresh(c);
    }
    render_process()
}

/// Every phase, for the `phase` label (a phase with no job reads 0).
const PHASES: [JobPhase; 8] = [
    JobPhase::Pending,
    JobPhase::Running,
    JobPhase::Waiting,
    JobPhase::Succeeded,
    JobPhase::Failed,
    JobPhase::Cancelled,
    JobPhase::Registering,
    JobPhase::TrainedNotRegistered,
];

/// A phase as a label value.
pub fn phase_label(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Pending => "pending",
        JobPhase::Running => "running",
        JobPhase::Waiting => "waiting",
        JobPhase::Succeeded => "succeeded",
        JobPhase::Failed => "failed",
        JobPhase::Cancelled => "cancelled",
        JobPhase::Registering => "registering",
        JobPhase::TrainedNotRegistered => "trained_not_registered",
    }
}

/// The gauges that are read from the state and the meta store.
fn refresh(c: &Coordinator) {
    let state = c.state();
    for phase in PHASES {
        let n = state.jobs.values().filter(|j| j.phase == phase).count();
        metrics::gauge!("flotilla_jobs", "phase" => phase_label(phase)).set(n as f64);
    }
    let queued = state.jobs.values().filter(|j| matches!(j.phase, JobPhase::Pending | JobPhase::Waiting)).count();
    metrics::gauge!("flotilla_queue_length").set(queued as f64);
    let assigned = state.workers.values().filter(|w| w.job.is_some()).count();
    metrics::gauge!("flotilla_workers", "state" => "assigned").set(assigned as f64);
    metrics::gauge!("flotilla_workers", "state" => "free").set((state.workers.len() - assigned) as f64);
    let leading = c.store.is_leader();
    metrics::gauge!("flotilla_leader").set(if leading { 1.0 } else { 0.0 });
    if let Some(r) = c.store.raft_status() {
        raft(&r);
    }
}

fn raft(r: &RaftStatus) {
    metrics::gauge!("flotilla_raft_term").set(r.term as f64);
    metrics::gauge!("flotilla_raft_last_log_index").set(r.last_log_index as f64);
    metrics::gauge!("flotilla_raft_applied_index").set(r.applied_index as f64);
    if let Some(commit) = r.commit_index {
        metrics::gauge!("flotilla_raft_commit_index").set(commit as f64);
    }
}

/// Why a generation started, as a label value: one of a few kinds, never
/// the free text of the reason (which names workers and failures).
pub fn generation_reason(restart: bool, reason: &str) -> &'static str {
    if restart {
        "restart"
    } else if reason == "job started" {
        "start"
    } else if reason == "enough workers again" {
        "resume"
    } else if reason == "workers joined" {
        "grow"
    } else if reason.ends_with("preempted") {
        "preemption"
    } else {
        "workers_lost"
    }
}

/// A generation started (on the leader that proposed it).
pub fn generation_started(kind: &'static str) {
    metrics::counter!("flotilla_generations_total", "reason" => kind).increment(1);
}

/// A worker was removed from the cluster.
pub fn worker_lost() {
    metrics::counter!("flotilla_workers_lost_total").increment(1);
}

/// How a proposal to the meta store ended, and how long it took.
pub fn proposal(took: Duration, outcome: &'static str) {
    metrics::histogram!("flotilla_proposal_duration_seconds", "outcome" => outcome).record(took.as_secs_f64());
}

/// A registry hand-off ended (`registered`, `failed`).
pub fn handoff(outcome: &'static str) {
    metrics::counter!("flotilla_handoffs_total", "outcome" => outcome).increment(1);
}

/// The index a quorum of voters has matched: the leader's commit index.
/// `matched` holds every voter's matched index, the leader's own included.
pub fn quorum_index(mut matched: Vec<u64>) -> Option<u64> {
    if matched.is_empty() {
        return None;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    Some(matched[matched.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_reasons_are_a_few_kinds() {
        for (restart, reason) in [(false, "job started"), (false, "x preempted"), (false, "other"), (true, "")] {
            assert!(GENERATION_REASONS.contains(&generation_reason(restart, reason)), "{reason}");
        }
        assert_eq!(generation_reason(false, "job started"), "start");
        assert_eq!(generation_reason(false, "enough workers again"), "resume");
        assert_eq!(generation_reason(false, "workers joined"), "grow");
        assert_eq!(generation_reason(false, "w-1, w-2 preempted"), "preemption");
        assert_eq!(generation_reason(false, "worker w-3 removed: lease expired"), "workers_lost");
        assert_eq!(generation_reason(true, "job started"), "restart");
    }

    #[test]
    fn the_commit_index_is_what_a_majority_matched() {
        assert_eq!(quorum_index(vec![]), None);
        assert_eq!(quorum_index(vec![7]), Some(7));
        assert_eq!(quorum_index(vec![9, 4, 7]), Some(7));
        assert_eq!(quorum_index(vec![9, 4, 2]), Some(4));
        assert_eq!(quorum_index(vec![5, 5, 1, 1, 5]), Some(5));
        assert_eq!(quorum_index(vec![10, 9, 1, 1]), Some(1), "two of four is no majority");
    }

    #[test]
    fn every_phase_has_its_own_label() {
        let labels: std::collections::BTreeSet<_> = PHASES.iter().map(|p| phase_label(*p)).collect();
        assert_eq!(labels.len(), PHASES.len());
    }
}

#[cfg(test)]
mod route_tests {
    use std::sync::Arc;

    use tower::ServiceExt;

    use crate::auth::Caller;

    async fn scrape(caller: Option<Caller>) -> (u16, String) {
        let store = Arc::new(crate::store::MemStore::new(crate::state::State::new(crate::state::DEFAULT_MAX_RESTARTS)));
        let c = crate::Coordinator::new(store, Default::default(), Default::default());
        let mut req = http::Request::get(super::PATH).body(axum::body::Body::empty()).unwrap();
        if let Some(caller) = caller {
            req.extensions_mut().insert(caller);
        }
        let resp = crate::http::router(c).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// `/metrics` answers the state's gauges in Prometheus's text format,
    /// and only to a request that passed the auth layer.
    #[tokio::test]
    async fn metrics_are_served_to_an_authenticated_caller_only() {
        let (status, body) = scrape(None).await;
        assert_eq!(status, 500, "no caller: {body}");
        let reader = Caller {
            role: crate::Role::Read,
            token_id: "t".into(),
            name: "prometheus".into(),
            worker_key_hash: None,
            open: false,
        };
        let (status, body) = scrape(Some(reader)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("# TYPE flotilla_jobs gauge"), "{body}");
        assert!(body.contains("flotilla_jobs{phase=\"pending\"} 0"), "{body}");
        assert!(body.contains("flotilla_leader 1"), "a store of one leads: {body}");
    }
}
