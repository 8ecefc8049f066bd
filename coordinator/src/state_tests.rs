//! The state machine, tested by the events its commands return.

use crate::data_key::DataKey;
use crate::state::*;

pub(crate) fn submit(state: &mut State, name: &str, min: u32, max: u32, keep: u32) -> JobId {
    submit_keyed(state, name, min, max, keep, Default::default())
}

fn submit_keyed(state: &mut State, name: &str, min: u32, max: u32, keep: u32, key: DataKey) -> JobId {
    submit_full(state, name, min, max, keep, key, 0)
}

/// A job of `priority` that needs `min..=max` workers.
pub(crate) fn submit_prioritized(state: &mut State, name: &str, min: u32, max: u32, priority: i32) -> JobId {
    submit_full(state, name, min, max, 3, Default::default(), priority)
}

fn submit_full(state: &mut State, name: &str, min: u32, max: u32, keep: u32, key: DataKey, priority: i32) -> JobId {
    let events = state
        .apply(Command::SubmitJob {
            name: name.into(),
            spec_json: "{}".into(),
            min_workers: min,
            max_workers: max,
            fixed_world: None,
            stages: 1,
            total_steps: 100,
            keep_checkpoints: keep,
            output_root: "/runs".into(),
            submission_id: None,
            spec_yaml: String::new(),
            registry: None,
            uid: String::new(),
            data_key: key,
            owner: None,
            priority,
            at_ms: 1,
        })
        .unwrap();
    match &events[..] {
        [Event::JobSubmitted { job }] => job.clone(),
        other => panic!("unexpected events {other:?}"),
    }
}

pub(crate) fn register(state: &mut State, addr: &str) -> WorkerId {
    match &state
        .apply(Command::RegisterWorker {
            metrics_addr: String::new(),
            device: String::new(),
            data_addr: addr.into(),
            hostname: "h".into(),
            rank_hint: None,
            key_hash: String::new(),
            at_ms: 2,
        })
        .unwrap()[..]
    {
        [Event::WorkerRegistered { worker }] => worker.clone(),
        other => panic!("unexpected events {other:?}"),
    }
}

pub(crate) fn ranks(state: &State, job: &str) -> Vec<String> {
    state.jobs[job].plan.as_ref().map(|p| p.ranks.iter().map(|r| r.worker.clone()).collect()).unwrap_or_default()
}

pub(crate) fn commit(state: &mut State, job: &str, generation: u64, step: u64) -> Vec<Event> {
    state
        .apply(Command::CommitCheckpoint {
            job: job.into(),
            generation,
            step,
            location: format!("/runs/{job}/step-{step}"),
            blocked_ms: 1.0,
            total_ms: 5.0,
            at_ms: 3,
        })
        .unwrap()
}

#[test]
fn submit_assigns_sequential_ids_and_output_folders() {
    let mut s = State::new(3);
    let a = submit(&mut s, "quickstart", 1, 2, 3);
    let b = submit(&mut s, "quickstart", 1, 2, 3);
    assert_eq!((a.as_str(), b.as_str()), ("quickstart-1", "quickstart-2"));
    assert_eq!(s.jobs[&a].phase, JobPhase::Pending);
    assert_eq!(s.jobs[&a].output_dir, "/runs/quickstart-1");
}

#[test]
fn schedule_without_enough_workers_is_rejected_and_changes_nothing() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 2, 2, 3);
    register(&mut s, "127.0.0.1:1");
    let before = s.clone();
    let err = s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap_err();
    assert_eq!(err, Rejection::NotEnoughWorkers { job, free: 1, needed: 2 });
    assert_eq!(s, before);
}

#[test]
fn schedule_starts_generation_one_on_free_workers() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 2, 3);
    let w1 = register(&mut s, "127.0.0.1:1");
    let w2 = register(&mut s, "127.0.0.1:2");
    register(&mut s, "127.0.0.1:3");
    let events = s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert_eq!(
        events,
        vec![Event::GenerationStarted {
            job: job.clone(),
            generation: 1,
            world_size: 2,
            resume_step: 0,
            reason: "job started".into()
        }]
    );
    assert_eq!(ranks(&s, &job), vec![w1.clone(), w2.clone()]);
    assert_eq!(s.rank_of(&w2).map(|(j, r)| (j.id.clone(), r)), Some((job.clone(), 1)));
    assert_eq!(s.free_workers().len(), 1);
}

#[test]
fn losing_a_worker_above_min_starts_a_new_generation_from_the_latest_checkpoint() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 2, 3);
    let w1 = register(&mut s, "127.0.0.1:1");
    let w2 = register(&mut s, "127.0.0.1:2");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    commit(&mut s, &job, 1, 10);
    let events =
        s.apply(Command::RemoveWorker { worker: w1.clone(), reason: "lease lapsed".into(), at_ms: 6 }).unwrap();
    assert_eq!(
        events,
        vec![
            Event::WorkerRemoved { worker: w1.clone(), reason: "lease lapsed".into() },
            Event::GenerationStarted {
                job: job.clone(),
                generation: 2,
                world_size: 1,
                resume_step: 10,
                reason: format!("worker {w1} removed: lease lapsed"),
            }
        ]
    );
    assert_eq!(ranks(&s, &job), vec![w2]);
}

#[test]
fn losing_a_worker_below_min_waits_then_resumes_when_a_replacement_registers() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 2, 2, 3);
    let w1 = register(&mut s, "127.0.0.1:1");
    let w2 = register(&mut s, "127.0.0.1:2");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    commit(&mut s, &job, 1, 20);
    let events =
        s.apply(Command::RemoveWorker { worker: w2.clone(), reason: "lease lapsed".into(), at_ms: 6 }).unwrap();
    assert!(matches!(events[1], Event::JobWaiting { generation: 2, .. }), "{events:?}");
    assert_eq!(s.jobs[&job].phase, JobPhase::Waiting);
    assert!(s.jobs[&job].plan.is_none());
    assert!(s.workers[&w1].job.is_none(), "the remaining worker is released");
    let w3 = register(&mut s, "127.0.0.1:3");
    let events = s.apply(Command::Schedule { job: job.clone(), at_ms: 7 }).unwrap();
    assert!(
        matches!(&events[..], [Event::GenerationStarted { generation: 3, world_size: 2, resume_step: 20, .. }]),
        "{events:?}"
    );
    assert_eq!(ranks(&s, &job), vec![w1, w3]);
}

#[test]
fn retention_keeps_the_newest_checkpoints_and_ignores_older_commits() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 1, 2);
    register(&mut s, "127.0.0.1:1");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    commit(&mut s, &job, 1, 10);
    commit(&mut s, &job, 1, 20);
    let events = commit(&mut s, &job, 1, 30);
    assert_eq!(
        events,
        vec![
            Event::CheckpointCommitted { job: job.clone(), step: 30 },
            Event::CheckpointsDropped { job: job.clone(), steps: vec![10] }
        ]
    );
    let events = commit(&mut s, &job, 1, 20);
    assert!(matches!(events[..], [Event::Ignored { .. }]));
    let steps: Vec<u64> = s.jobs[&job].checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![20, 30]);
}

#[test]
fn a_job_below_max_grows_at_its_next_checkpoint() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 2, 3);
    let w1 = register(&mut s, "127.0.0.1:1");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    let w2 = register(&mut s, "127.0.0.1:2");
    let events = commit(&mut s, &job, 1, 40);
    assert_eq!(
        events[1],
        Event::GenerationStarted {
            job: job.clone(),
            generation: 2,
            world_size: 2,
            resume_step: 40,
            reason: "workers joined".into()
        }
    );
    assert_eq!(ranks(&s, &job), vec![w1, w2]);
}

#[test]
fn finish_from_a_stale_generation_is_ignored_and_the_current_one_succeeds() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 2, 3);
    let w1 = register(&mut s, "127.0.0.1:1");
    register(&mut s, "127.0.0.1:2");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    s.apply(Command::RemoveWorker { worker: w1, reason: "gone".into(), at_ms: 6 }).unwrap();
    let finish = |generation| Command::FinishJob {
        job: job.clone(),
        generation,
        step: 100,
        final_model: "/runs/j-1/final/model.safetensors".into(),
        at_ms: 7,
    };
    assert!(matches!(s.apply(finish(1)).unwrap()[..], [Event::Ignored { .. }]));
    assert_eq!(s.apply(finish(2)).unwrap(), vec![Event::JobSucceeded { job: job.clone() }]);
    assert_eq!(s.jobs[&job].phase, JobPhase::Succeeded);
    assert_eq!(s.free_workers().len(), 1);
    assert!(matches!(s.apply(finish(2)).unwrap()[..], [Event::Ignored { .. }]), "a retried finish changes nothing");
}

#[test]
fn finishing_before_the_last_step_is_rejected() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 1, 3);
    register(&mut s, "127.0.0.1:1");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    let err = s
        .apply(Command::FinishJob { job: job.clone(), generation: 1, step: 99, final_model: "m".into(), at_ms: 7 })
        .unwrap_err();
    assert!(matches!(err, Rejection::Invalid(_)));
    assert_eq!(s.jobs[&job].phase, JobPhase::Running);
}

#[test]
fn restarts_beyond_the_limit_fail_the_job() {
    let mut s = State::new(2);
    let job = submit(&mut s, "j", 1, 1, 3);
    register(&mut s, "127.0.0.1:1");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    for generation in 1..=2 {
        let events = s
            .apply(Command::RestartGeneration { job: job.clone(), generation, reason: "boom".into(), at_ms: 6 })
            .unwrap();
        assert!(matches!(events[..], [Event::GenerationStarted { .. }]), "{events:?}");
    }
    let stale = s
        .apply(Command::RestartGeneration { job: job.clone(), generation: 1, reason: "old".into(), at_ms: 6 })
        .unwrap();
    assert!(matches!(stale[..], [Event::Ignored { .. }]));
    let events = s
        .apply(Command::RestartGeneration { job: job.clone(), generation: 3, reason: "boom".into(), at_ms: 6 })
        .unwrap();
    assert!(matches!(&events[..], [Event::JobFailed { reason, .. }] if reason.contains("boom")), "{events:?}");
    assert_eq!(s.free_workers().len(), 1);
}

#[test]
fn cancel_releases_workers_and_is_idempotent() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 1, 3);
    register(&mut s, "127.0.0.1:1");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert_eq!(
        s.apply(Command::CancelJob { job: job.clone(), at_ms: 6 }).unwrap(),
        vec![Event::JobCancelled { job: job.clone() }]
    );
    assert_eq!(s.free_workers().len(), 1);
    assert!(matches!(s.apply(Command::CancelJob { job: job.clone(), at_ms: 7 }).unwrap()[..], [Event::Ignored { .. }]));
    assert_eq!(
        s.apply(Command::CancelJob { job: "nope-9".into(), at_ms: 7 }).unwrap_err(),
        Rejection::JobNotFound("nope-9".into())
    );
}

#[test]
fn replicas_applying_the_same_log_agree() {
    let log = vec![
        Command::SubmitJob {
            name: "a".into(),
            spec_json: "{}".into(),
            min_workers: 1,
            max_workers: 3,
            fixed_world: None,
            stages: 1,
            total_steps: 10,
            keep_checkpoints: 1,
            output_root: "/r".into(),
            submission_id: Some("s-1".into()),
            spec_yaml: String::new(),
            registry: None,
            uid: String::new(),
            data_key: Default::default(),
            owner: None,
            priority: 0,
            at_ms: 1,
        },
        Command::RegisterWorker {
            metrics_addr: String::new(),
            device: String::new(),
            data_addr: "127.0.0.1:1".into(),
            hostname: "h".into(),
            rank_hint: None,
            key_hash: String::new(),
            at_ms: 2,
        },
        Command::RegisterWorker {
            metrics_addr: String::new(),
            device: String::new(),
            data_addr: "127.0.0.1:2".into(),
            hostname: "h".into(),
            rank_hint: None,
            key_hash: String::new(),
            at_ms: 3,
        },
        Command::Schedule { job: "a-1".into(), at_ms: 4 },
        Command::CommitCheckpoint {
            job: "a-1".into(),
            generation: 1,
            step: 5,
            location: "x".into(),
            blocked_ms: 0.0,
            total_ms: 0.0,
            at_ms: 5,
        },
        Command::RemoveWorker { worker: "w1".into(), reason: "lost".into(), at_ms: 6 },
        Command::FinishJob { job: "a-1".into(), generation: 2, step: 10, final_model: "m".into(), at_ms: 7 },
    ];
    let run = || {
        let mut s = State::new(3);
        let events: Vec<_> = log.iter().map(|c| s.apply(c.clone())).collect();
        (s, events)
    };
    let (a, ea) = run();
    let (b, eb) = run();
    assert_eq!(a, b);
    assert_eq!(ea, eb);
    assert_eq!(a.jobs["a-1"].phase, JobPhase::Succeeded);
}

#[test]
fn a_preempted_worker_triggers_a_checkpoint_and_leaves_when_it_is_committed() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 2, 3);
    let w1 = register(&mut s, "127.0.0.1:1");
    let w2 = register(&mut s, "127.0.0.1:2");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    let events =
        s.apply(Command::PreemptWorker { worker: w2.clone(), reason: "aws: terminate".into(), at_ms: 6 }).unwrap();
    assert_eq!(
        events,
        vec![
            Event::WorkerLeaving { worker: w2.clone(), job: job.clone(), reason: "aws: terminate".into() },
            Event::CheckpointRequested { job: job.clone(), request: 1 },
        ]
    );
    assert_eq!(s.jobs[&job].generation, 1, "the job keeps running until the checkpoint");
    let again = s.apply(Command::PreemptWorker { worker: w2.clone(), reason: "sigterm".into(), at_ms: 7 }).unwrap();
    assert!(matches!(again[..], [Event::Ignored { .. }]));
    let events = commit(&mut s, &job, 1, 31);
    assert_eq!(events[1], Event::WorkerRemoved { worker: w2.clone(), reason: "preempted: aws: terminate".into() });
    assert_eq!(
        events[2],
        Event::GenerationStarted {
            job: job.clone(),
            generation: 2,
            world_size: 1,
            resume_step: 31,
            reason: format!("{w2} preempted")
        }
    );
    assert_eq!(ranks(&s, &job), vec![w1]);
    assert!(!s.workers.contains_key(&w2));
}

#[test]
fn a_preempted_free_worker_is_removed_at_once_and_never_scheduled() {
    let mut s = State::new(3);
    let w1 = register(&mut s, "127.0.0.1:1");
    let events = s.apply(Command::PreemptWorker { worker: w1.clone(), reason: "gce".into(), at_ms: 6 }).unwrap();
    assert_eq!(events, vec![Event::WorkerRemoved { worker: w1, reason: "gce".into() }]);
    assert!(s.workers.is_empty());
}

#[test]
fn a_repeated_submission_returns_the_first_job() {
    let mut state = State::new(3);
    let cmd = |sub: Option<&str>| Command::SubmitJob {
        name: "j".into(),
        spec_json: "{}".into(),
        min_workers: 1,
        max_workers: 1,
        fixed_world: None,
        stages: 1,
        total_steps: 10,
        keep_checkpoints: 1,
        output_root: "/r".into(),
        submission_id: sub.map(str::to_string),
        spec_yaml: String::new(),
        registry: None,
        uid: String::new(),
        data_key: Default::default(),
        owner: None,
        priority: 0,
        at_ms: 1,
    };
    assert_eq!(state.apply(cmd(Some("abc"))).unwrap(), vec![Event::JobSubmitted { job: "j-1".into() }]);
    assert_eq!(state.apply(cmd(Some("abc"))).unwrap(), vec![Event::SubmissionRepeated { job: "j-1".into() }]);
    assert_eq!(state.apply(cmd(Some("other"))).unwrap(), vec![Event::JobSubmitted { job: "j-2".into() }]);
    assert_eq!(state.apply(cmd(None)).unwrap(), vec![Event::JobSubmitted { job: "j-3".into() }]);
    assert_eq!(state.jobs.len(), 3);
}

/// A job with a registry section, trained to its end by one worker.
fn trained_job(s: &mut State) -> JobId {
    let events = s
        .apply(Command::SubmitJob {
            name: "reg".into(),
            spec_json: "{}".into(),
            min_workers: 1,
            max_workers: 1,
            fixed_world: None,
            stages: 1,
            total_steps: 100,
            keep_checkpoints: 2,
            output_root: "/runs".into(),
            submission_id: None,
            spec_yaml: "name: reg\n".into(),
            registry: Some(flotilla_jobspec::RegistrySpec {
                kind: flotilla_jobspec::RegistryKind::Builtin,
                url: "/models".into(),
                model: "reg".into(),
                experiment: String::new(),
                alias: None,
                tags: Default::default(),
            }),
            uid: String::new(),
            data_key: Default::default(),
            owner: None,
            priority: 0,
            at_ms: 1,
        })
        .unwrap();
    let [Event::JobSubmitted { job }] = &events[..] else { panic!("{events:?}") };
    let job = job.clone();
    register(s, "127.0.0.1:1");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 2 }).unwrap();
    let events = s
        .apply(Command::FinishJob {
            job: job.clone(),
            generation: 1,
            step: 100,
            final_model: "/runs/reg-1/final/model.safetensors".into(),
            at_ms: 3,
        })
        .unwrap();
    assert_eq!(events, vec![Event::JobTrained { job: job.clone() }]);
    job
}

fn registered(version: u64) -> RegisteredModel {
    RegisteredModel {
        registry: "http://mlflow".into(),
        model: "reg".into(),
        version,
        uri: "mlflow-artifacts:/1/r/artifacts/model".into(),
        run_id: "r".into(),
        at_ms: 9,
    }
}

#[test]
fn a_job_with_a_registry_is_trained_then_registered_exactly_once() {
    let mut s = State::new(3);
    let job = trained_job(&mut s);
    let j = &s.jobs[&job];
    assert_eq!(j.phase, JobPhase::Registering);
    assert!(!j.phase.is_terminal() && !j.phase.is_active(), "holds no workers, but has not ended");
    assert_eq!(s.free_workers().len(), 1, "its workers are free while the model is handed over");
    assert_eq!(j.spec_yaml, "name: reg\n");

    let done = |v| Command::HandoffDone { job: job.clone(), registered: registered(v), at_ms: 10 };
    let events = s.apply(done(4)).unwrap();
    assert_eq!(
        events,
        vec![
            Event::ModelRegistered { job: job.clone(), model: "reg".into(), version: 4 },
            Event::JobSucceeded { job: job.clone() }
        ]
    );
    assert_eq!(s.jobs[&job].phase, JobPhase::Succeeded);
    // A second attempt's outcome (an old leader's) changes nothing.
    assert!(matches!(s.apply(done(5)).unwrap()[..], [Event::Ignored { .. }]));
    assert_eq!(s.jobs[&job].handoff.as_ref().unwrap().registered.as_ref().unwrap().version, 4);
    assert!(matches!(
        s.apply(Command::RetryHandoff { job: job.clone(), at_ms: 11 }).unwrap()[..],
        [Event::Ignored { .. }]
    ));
    let failed = Command::HandoffFailed { job: job.clone(), error: "late".into(), at_ms: 12 };
    assert!(matches!(s.apply(failed).unwrap()[..], [Event::Ignored { .. }]));
    assert_eq!(s.jobs[&job].phase, JobPhase::Succeeded);
}

#[test]
fn a_failed_hand_off_is_a_distinct_state_that_retries() {
    let mut s = State::new(3);
    let job = trained_job(&mut s);
    let fail = |at_ms| Command::HandoffFailed { job: job.clone(), error: "connection refused".into(), at_ms };
    assert_eq!(
        s.apply(fail(10)).unwrap(),
        vec![Event::HandoffFailed { job: job.clone(), attempts: 1, error: "connection refused".into() }]
    );
    s.apply(fail(20)).unwrap();
    let j = &s.jobs[&job];
    assert_eq!(j.phase, JobPhase::TrainedNotRegistered);
    let h = j.handoff.as_ref().unwrap();
    assert_eq!((h.attempts, h.last_attempt_ms, h.retry_request), (2, 20, 0));
    assert!(j.message.contains("trained, not registered") && j.message.contains("connection refused"), "{}", j.message);

    assert_eq!(
        s.apply(Command::RetryHandoff { job: job.clone(), at_ms: 21 }).unwrap(),
        vec![Event::HandoffRetried { job: job.clone() }]
    );
    assert_eq!(s.jobs[&job].phase, JobPhase::Registering);
    assert_eq!(s.jobs[&job].handoff.as_ref().unwrap().retry_request, 1);
    s.apply(Command::HandoffDone { job: job.clone(), registered: registered(1), at_ms: 22 }).unwrap();
    assert_eq!(s.jobs[&job].phase, JobPhase::Succeeded);
}

#[test]
fn register_by_hand_needs_a_registry_and_a_trained_job() {
    let mut s = State::new(3);
    let plain = submit(&mut s, "plain", 1, 1, 1);
    let err = s.apply(Command::RetryHandoff { job: plain.clone(), at_ms: 1 }).unwrap_err();
    assert!(err.to_string().contains("no registry section"), "{err}");
    // Out of the queue, so that the next job gets the worker.
    s.apply(Command::CancelJob { job: plain, at_ms: 2 }).unwrap();
    let job = trained_job(&mut s);
    s.apply(Command::CancelJob { job: job.clone(), at_ms: 5 }).unwrap();
    let j = &s.jobs[&job];
    assert_eq!(j.phase, JobPhase::Cancelled);
    let model = j.final_model.clone().unwrap();
    assert!(j.message.ends_with(&format!("it stays at {model}")), "says where the model stays: {}", j.message);
    assert!(matches!(
        s.apply(Command::RetryHandoff { job, at_ms: 6 }),
        Err(Rejection::BadPhase { phase: JobPhase::Cancelled, .. })
    ));
}

#[test]
fn the_tracking_run_is_set_once() {
    let mut s = State::new(3);
    let job = trained_job(&mut s);
    let set = |run: &str| Command::SetTrackingRun { job: job.clone(), run_id: run.into() };
    assert_eq!(s.apply(set("a")).unwrap(), vec![Event::TrackingRunSet { job: job.clone(), run_id: "a".into() }]);
    assert!(matches!(s.apply(set("b")).unwrap()[..], [Event::Ignored { .. }]));
    assert_eq!(s.jobs[&job].tracking_run.as_deref(), Some("a"));
}

#[test]
fn a_first_plan_follows_the_workers_rank_hints() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 2, 2, 3);
    let mut hinted = |addr: &str, rank_hint| match &s
        .apply(Command::RegisterWorker {
            metrics_addr: String::new(),
            device: String::new(),
            data_addr: addr.into(),
            hostname: "h".into(),
            rank_hint,
            key_hash: String::new(),
            at_ms: 2,
        })
        .unwrap()[..]
    {
        [Event::WorkerRegistered { worker }] => worker.clone(),
        other => panic!("unexpected events {other:?}"),
    };
    let w1 = hinted("127.0.0.1:1", Some(1));
    let w2 = hinted("127.0.0.1:2", Some(0));
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert_eq!(ranks(&s, &job), vec![w2, w1]);
}

/// Submits a pipeline job of `stages` stages; `fixed`: the exact world.
fn submit_pipeline(state: &mut State, min: u32, max: u32, fixed: Option<u32>, stages: u32) -> Result<JobId, Rejection> {
    let events = state.apply(Command::SubmitJob {
        name: "pp".into(),
        spec_json: "{}".into(),
        min_workers: min,
        max_workers: max,
        fixed_world: fixed,
        stages,
        total_steps: 100,
        keep_checkpoints: 3,
        output_root: "/runs".into(),
        submission_id: None,
        spec_yaml: String::new(),
        registry: None,
        uid: String::new(),
        data_key: Default::default(),
        owner: None,
        priority: 0,
        at_ms: 1,
    })?;
    match &events[..] {
        [Event::JobSubmitted { job }] => Ok(job.clone()),
        other => panic!("unexpected events {other:?}"),
    }
}

pub(crate) fn workers(state: &mut State, n: usize) -> Vec<WorkerId> {
    (0..n).map(|_| register(state, "127.0.0.1:1")).collect()
}

#[test]
fn a_pipeline_job_starts_on_whole_replicas() {
    let mut s = State::new(3);
    let job = submit_pipeline(&mut s, 2, 4, None, 2).unwrap();
    let w = workers(&mut s, 3);
    let events = s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert!(matches!(&events[..], [Event::GenerationStarted { generation: 1, world_size: 2, .. }]), "{events:?}");
    assert_eq!(ranks(&s, &job), w[..2].to_vec());
    assert_eq!(s.free_workers().len(), 1, "the odd worker stays free");
    let j = &s.jobs[&job];
    assert_eq!((0..4).map(|r| j.stage_and_replica(r)).collect::<Vec<_>>(), vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
}

#[test]
fn a_pipeline_job_that_loses_a_worker_takes_a_free_one_or_drops_a_replica() {
    let mut s = State::new(3);
    let job = submit_pipeline(&mut s, 2, 4, None, 2).unwrap();
    let w = workers(&mut s, 5);
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert_eq!(ranks(&s, &job), w[..4].to_vec());

    // One of four dies with one free worker: four again, the others in order.
    let events = s.apply(Command::RemoveWorker { worker: w[1].clone(), reason: "gone".into(), at_ms: 6 }).unwrap();
    assert!(matches!(events[1], Event::GenerationStarted { generation: 2, world_size: 4, .. }), "{events:?}");
    assert_eq!(ranks(&s, &job), vec![w[0].clone(), w[2].clone(), w[3].clone(), w[4].clone()]);

    // Another dies with none free: one replica of two, the rest released.
    let events = s.apply(Command::RemoveWorker { worker: w[2].clone(), reason: "gone".into(), at_ms: 7 }).unwrap();
    assert!(matches!(events[1], Event::GenerationStarted { generation: 3, world_size: 2, .. }), "{events:?}");
    assert_eq!(ranks(&s, &job), vec![w[0].clone(), w[3].clone()]);
    assert_eq!(s.free_workers().iter().map(|x| x.id.clone()).collect::<Vec<_>>(), vec![w[4].clone()]);

    // One free worker is not a replica: no growth at a checkpoint...
    let events = commit(&mut s, &job, 3, 10);
    assert_eq!(events, vec![Event::CheckpointCommitted { job: job.clone(), step: 10 }]);
    // ...two are.
    let w6 = register(&mut s, "127.0.0.1:6");
    let events = commit(&mut s, &job, 3, 20);
    assert!(matches!(events[1], Event::GenerationStarted { generation: 4, world_size: 4, .. }), "{events:?}");
    assert_eq!(ranks(&s, &job), vec![w[0].clone(), w[3].clone(), w[4].clone(), w6]);
}

#[test]
fn a_pipeline_job_left_with_less_than_a_replica_waits() {
    let mut s = State::new(3);
    let job = submit_pipeline(&mut s, 2, 2, None, 2).unwrap();
    let w = workers(&mut s, 2);
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    let events = s.apply(Command::RemoveWorker { worker: w[0].clone(), reason: "gone".into(), at_ms: 6 }).unwrap();
    assert!(matches!(events[1], Event::JobWaiting { generation: 2, .. }), "{events:?}");
    assert!(s.jobs[&job].message.ends_with("waiting for 2 workers"), "{}", s.jobs[&job].message);
    assert!(s.workers[&w[1]].job.is_none());
}

#[test]
fn a_fixed_pipeline_world_waits_for_all_its_replicas() {
    let mut s = State::new(3);
    // dp: 2 replicas of pp: 2.
    let job = submit_pipeline(&mut s, 2, 6, Some(4), 2).unwrap();
    workers(&mut s, 3);
    let err = s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap_err();
    assert_eq!(err, Rejection::NotEnoughWorkers { job: job.clone(), free: 3, needed: 4 });
    workers(&mut s, 3);
    let events = s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert!(matches!(&events[..], [Event::GenerationStarted { world_size: 4, .. }]), "{events:?}");
}

#[test]
fn sizes_that_are_not_whole_replicas_are_rejected() {
    let mut s = State::new(3);
    for (min, max, fixed, stages) in [(3, 4, None, 2), (2, 5, None, 2), (2, 6, Some(3), 2), (1, 1, None, 0)] {
        let err = submit_pipeline(&mut s, min, max, fixed, stages).unwrap_err();
        assert!(matches!(err, Rejection::Invalid(_)), "{min} {max} {fixed:?} {stages}: {err:?}");
    }
    assert!(s.jobs.is_empty());
}

/// State and logs written before pipelines existed have no stage count.
#[test]
fn jobs_and_submissions_persisted_without_stages_have_one() {
    let mut s = State::new(3);
    let job = submit_pipeline(&mut s, 4, 4, None, 2).unwrap();
    let mut value = serde_json::to_value(&s.jobs[&job]).unwrap();
    value.as_object_mut().unwrap().remove("stages").expect("a job records its stages");
    let old: Job = serde_json::from_value(value).unwrap();
    assert_eq!(old.stages, 1);

    let cmd = Command::SubmitJob {
        name: "old".into(),
        spec_json: "{}".into(),
        min_workers: 1,
        max_workers: 1,
        fixed_world: None,
        stages: 1,
        total_steps: 1,
        keep_checkpoints: 1,
        output_root: "/runs".into(),
        submission_id: None,
        spec_yaml: String::new(),
        registry: None,
        uid: String::new(),
        data_key: Default::default(),
        owner: None,
        priority: 0,
        at_ms: 1,
    };
    let mut value = serde_json::to_value(cmd).unwrap();
    value["SubmitJob"].as_object_mut().unwrap().remove("stages").expect("a submission carries its stages");
    match serde_json::from_value::<Command>(value).unwrap() {
        Command::SubmitJob { stages, .. } => assert_eq!(stages, 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_generation_hands_its_workers_one_secret_derived_from_the_job_s_key() {
    let mut s = State::new(3);
    let key = DataKey::random().unwrap();
    let job = &submit_keyed(&mut s, "j", 1, 2, 1, key.clone());
    let (w1, w2) = (register(&mut s, "127.0.0.1:1"), register(&mut s, "127.0.0.1:2"));
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    let (a1, a2) = (crate::convert::assignment(&s, &w1), crate::convert::assignment(&s, &w2));
    assert_eq!(a1.data_secret.len(), 32);
    assert_eq!(a1.data_secret, a2.data_secret, "one secret per generation");
    assert_eq!(a1.data_secret, key.generation_secret(job, 1).as_bytes());

    // A new leader reads the same state from the log or a snapshot: the
    // same secret; and status never carries it.
    let replica: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(crate::convert::assignment(&replica, &w1).data_secret, a1.data_secret);
    assert!(!format!("{:?}", s.jobs[job]).contains(&format!("{:?}", key.as_bytes())));

    commit(&mut s, job, 1, 10);
    s.apply(Command::RemoveWorker { worker: w2, reason: "gone".into(), at_ms: 6 }).unwrap();
    let next = crate::convert::assignment(&s, &w1);
    assert_eq!(next.generation, 2);
    assert_ne!(next.data_secret, a1.data_secret, "a new generation, a new secret");
}

#[test]
fn a_rank_slot_carries_its_worker_s_metrics_address_to_the_job_s_status() {
    let mut s = State::new(3);
    let job = submit(&mut s, "j", 1, 1, 3);
    let events = s
        .apply(Command::RegisterWorker {
            metrics_addr: "10.0.0.7:9464".into(),
            device: "cuda:0 (NVIDIA H200)".into(),
            data_addr: "10.0.0.7:29500".into(),
            hostname: "h".into(),
            rank_hint: None,
            key_hash: String::new(),
            at_ms: 2,
        })
        .unwrap();
    let [Event::WorkerRegistered { worker }] = &events[..] else { panic!("{events:?}") };
    assert_eq!(s.workers[worker].metrics_addr, "10.0.0.7:9464");
    s.apply(Command::Schedule { job: job.clone(), at_ms: 5 }).unwrap();
    assert_eq!(s.jobs[&job].plan.as_ref().unwrap().ranks[0].metrics_addr, "10.0.0.7:9464");
    assert_eq!(s.jobs[&job].plan.as_ref().unwrap().ranks[0].device, "cuda:0 (NVIDIA H200)");
    let status = crate::convert::job_status(&s.jobs[&job], None, &Default::default());
    assert_eq!(status.ranks[0].metrics_addr, "10.0.0.7:9464");
}
