//! Following a job as server-sent events: `phase` when its phase changes,
//! `progress` when its step, loss, throughput or world changes, `metric`
//! for each metric point rank 0 reports, and `end` (the job's final status)
//! when it ends, after which the stream closes. An `error` event
//! (`{"code", "message"}`) closes it early, for example when this replica
//! stops leading.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use flotilla_proto::v1 as pb;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::{json as j, ApiError, Http, JobId};
use crate::api::{self, JobUpdate};

/// How often an idle stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// What changed between two statuses of a job, as events.
fn events_between(last: Option<&pb::JobStatus>, now: &pb::JobStatus) -> Vec<Event> {
    let mut out = Vec::new();
    if last.is_none_or(|l| l.phase != now.phase || l.message != now.message) {
        out.push(event("phase", &j::phase_event(now)));
    }
    let progress =
        |s: &pb::JobStatus| (s.step, s.loss.to_bits(), s.samples_per_sec.to_bits(), s.generation, s.world_size);
    if last.is_none_or(|l| progress(l) != progress(now)) {
        out.push(event("progress", &j::progress_event(now)));
    }
    if api::ended(now.phase) {
        out.push(event("end", &j::job(now)));
    }
    out
}

pub(super) async fn follow(State(h): State<Arc<Http>>, JobId(job): JobId) -> Result<Response, ApiError> {
    api::lead(&h.c)?;
    let mut updates = api::watch(h.c.clone(), job, true)?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let mut last: Option<pb::JobStatus> = None;
        let mut idle = tokio::time::interval(KEEP_ALIVE);
        idle.tick().await;
        loop {
            let update = tokio::select! {
                u = updates.next() => u,
                _ = idle.tick() => {
                    if tx.send(Ok(Event::default().comment("keep-alive"))).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            let events = match update {
                None => return,
                Some(Ok(JobUpdate::Metric(p))) => vec![event("metric", &j::metric(&p))],
                Some(Ok(JobUpdate::Status(s))) => {
                    let events = events_between(last.as_ref(), &s);
                    last = Some(*s);
                    events
                }
                Some(Err(status)) => vec![event("error", &super::error_body(&status))],
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(events: &[Event]) -> Vec<String> {
        // An event's text starts with its `event:` line.
        events.iter().map(|e| format!("{e:?}")).collect()
    }

    #[test]
    fn a_change_of_step_is_progress_and_an_end_is_announced() {
        let running = pb::JobStatus { job_id: "j".into(), phase: pb::JobPhase::Running as i32, ..Default::default() };
        assert_eq!(events_between(None, &running).len(), 2, "{:?}", names(&events_between(None, &running)));
        assert!(events_between(Some(&running), &running).is_empty());
        let stepped = pb::JobStatus { step: 3, ..running.clone() };
        assert_eq!(events_between(Some(&running), &stepped).len(), 1);
        let done = pb::JobStatus { phase: pb::JobPhase::Succeeded as i32, ..stepped.clone() };
        // phase and end
        assert_eq!(events_between(Some(&stepped), &done).len(), 2);
    }
}
