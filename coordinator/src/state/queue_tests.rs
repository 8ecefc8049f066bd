//! The queue in the state machine: `Schedule` starts what the queue lets
//! start, growth and re-plans take only spare workers, and a job that falls
//! below its minimum goes back to its place in the queue.

use proptest::prelude::*;

use crate::scheduler::queue::{Decision, Verdict};
use crate::state::*;
use crate::state_tests::{commit, ranks, register, submit_prioritized as submit, workers};

fn schedule(s: &mut State, job: &str) -> Result<Vec<Event>, Rejection> {
    s.apply(Command::Schedule { job: job.into(), at_ms: 5 })
}

fn remove(s: &mut State, worker: &str) -> Vec<Event> {
    s.apply(Command::RemoveWorker { worker: worker.into(), reason: "lease lapsed".into(), at_ms: 6 }).unwrap()
}

#[test]
fn schedule_starts_the_queue_s_choice_and_refuses_a_job_behind_it() {
    let mut s = State::new(3);
    let w = workers(&mut s, 2);
    let low = submit(&mut s, "low", 2, 2, 0);
    let high = submit(&mut s, "high", 2, 2, 5);
    assert_eq!(s.queue_position(&high), Some(1));
    assert_eq!(s.queue_position(&low), Some(2));
    let before = s.clone();
    let err = schedule(&mut s, &low).unwrap_err();
    assert_eq!(err, Rejection::NotEnoughWorkers { job: low.clone(), free: 0, needed: 2 });
    assert_eq!(s, before, "a refused schedule changes nothing");
    schedule(&mut s, &high).unwrap();
    assert_eq!(ranks(&s, &high), w);
    assert_eq!((s.queue_position(&high), s.queue_position(&low)), (None, Some(1)));
}

#[test]
fn a_running_job_grows_only_into_workers_no_queued_job_can_use() {
    let mut s = State::new(3);
    let w1 = register(&mut s, "127.0.0.1:1");
    let elastic = submit(&mut s, "elastic", 1, 4, 0);
    schedule(&mut s, &elastic).unwrap();
    let w = workers(&mut s, 2);
    let queued = submit(&mut s, "queued", 2, 2, 0);
    let events = commit(&mut s, &elastic, 1, 10);
    assert!(!events.iter().any(|e| matches!(e, Event::GenerationStarted { .. })), "{events:?}");
    assert_eq!(ranks(&s, &elastic), std::slice::from_ref(&w1));
    schedule(&mut s, &queued).unwrap();
    assert_eq!(ranks(&s, &queued), w);
    // A worker nobody queued for: the running job grows into it.
    let w4 = register(&mut s, "127.0.0.1:4");
    commit(&mut s, &elastic, 1, 20);
    assert_eq!(ranks(&s, &elastic), [w1, w4]);
}

#[test]
fn a_job_above_its_minimum_does_not_refill_with_a_worker_the_queue_needs() {
    let mut s = State::new(3);
    let w = workers(&mut s, 2);
    let a = submit(&mut s, "a", 1, 2, 0);
    schedule(&mut s, &a).unwrap();
    let w3 = register(&mut s, "127.0.0.1:3");
    let b = submit(&mut s, "b", 1, 1, 0);
    remove(&mut s, &w[1]);
    assert_eq!(ranks(&s, &a), [w[0].clone()], "w3 is b's");
    schedule(&mut s, &b).unwrap();
    assert_eq!(ranks(&s, &b), [w3]);
}

#[test]
fn a_job_below_its_minimum_goes_back_to_its_place_in_the_queue() {
    let mut s = State::new(3);
    let w = workers(&mut s, 2);
    let low = submit(&mut s, "low", 2, 2, 0);
    schedule(&mut s, &low).unwrap();
    let w3 = register(&mut s, "127.0.0.1:3");
    let high = submit(&mut s, "high", 2, 2, 1);
    let events = remove(&mut s, &w[0]);
    assert!(matches!(events.last(), Some(Event::JobWaiting { .. })), "{events:?}");
    assert_eq!(s.jobs[&low].phase, JobPhase::Waiting);
    assert_eq!((s.queue_position(&high), s.queue_position(&low)), (Some(1), Some(2)));
    schedule(&mut s, &high).unwrap();
    assert_eq!(ranks(&s, &high), [w[1].clone(), w3]);
}

#[test]
fn a_job_below_its_minimum_that_the_queue_lets_start_keeps_its_workers_first() {
    let mut s = State::new(3);
    let w = workers(&mut s, 3);
    let job = submit(&mut s, "j", 2, 2, 0);
    // w2 and w3 run it; w1 is free.
    s.apply(Command::PreemptWorker { worker: w[0].clone(), reason: "spot".into(), at_ms: 4 }).unwrap();
    let w4 = register(&mut s, "127.0.0.1:4");
    schedule(&mut s, &job).unwrap();
    assert_eq!(ranks(&s, &job), [w[1].clone(), w[2].clone()]);
    let events = remove(&mut s, &w[1]);
    assert!(matches!(events.last(), Some(Event::GenerationStarted { generation: 2, .. })), "{events:?}");
    assert_eq!(ranks(&s, &job), [w[2].clone(), w4], "its remaining worker keeps rank 0");
}

/// One step of a cluster's life, as the driver and workers cause them.
#[derive(Debug, Clone)]
enum Step {
    Submit {
        min: u32,
        extra: u32,
        priority: i32,
    },
    Register,
    Remove(usize),
    Checkpoint(usize),
    Finish(usize),
    /// The driver: `Schedule` every job the queue lets start.
    Drive,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u32..4, 0u32..3, 0i32..3).prop_map(|(min, extra, priority)| Step::Submit { min, extra, priority }),
        Just(Step::Register),
        Just(Step::Register),
        (0usize..16).prop_map(Step::Remove),
        (0usize..8).prop_map(Step::Checkpoint),
        (0usize..8).prop_map(Step::Finish),
        Just(Step::Drive),
        Just(Step::Drive),
    ]
}

fn play(s: &mut State, st: &Step) {
    let jobs: Vec<JobId> = s.jobs_in_order().iter().map(|j| j.id.clone()).collect();
    let running = |s: &State, i: usize| {
        let id = jobs.get(i % jobs.len().max(1))?;
        let j = &s.jobs[id];
        (j.phase == JobPhase::Running).then(|| (id.clone(), j.generation))
    };
    match st {
        Step::Submit { min, extra, priority } => {
            submit(s, "j", *min, min + extra, *priority);
        }
        Step::Register => {
            register(s, "127.0.0.1:1");
        }
        Step::Remove(i) => {
            if let Some(worker) = s.workers.keys().nth(i % s.workers.len().max(1)).cloned() {
                s.apply(Command::RemoveWorker { worker, reason: "gone".into(), at_ms: 6 }).unwrap();
            }
        }
        Step::Checkpoint(i) => {
            if let Some((job, generation)) = running(s, *i) {
                let step = s.jobs[&job].latest_checkpoint().map_or(1, |c| c.step + 1);
                commit(s, &job, generation, step);
            }
        }
        Step::Finish(i) => {
            if let Some((job, generation)) = running(s, *i) {
                let finish = Command::FinishJob { job, generation, step: 100, final_model: "m".into(), at_ms: 7 };
                s.apply(finish).unwrap();
            }
        }
        Step::Drive => {
            while let Some(job) = first_start(&s.queue()) {
                schedule(s, &job).expect("the queue's choice starts");
            }
        }
    }
}

fn first_start(d: &Decision) -> Option<JobId> {
    d.order.iter().find(|(_, v)| matches!(v, Verdict::Start(_))).map(|(j, _)| j.clone())
}

/// What must hold after every step.
fn check(s: &State) -> Result<(), TestCaseError> {
    let mut seen = std::collections::BTreeMap::new();
    for j in s.jobs.values() {
        let n = j.world_size();
        if j.phase == JobPhase::Running {
            prop_assert!(n >= j.plan_request().min_world() && n <= j.max_workers, "{} runs on {}", j.id, n);
        } else {
            prop_assert_eq!(n, 0, "{} holds workers while {:?}", &j.id, j.phase);
        }
        for r in j.plan.iter().flat_map(|p| &p.ranks) {
            prop_assert!(seen.insert(r.worker.clone(), j.id.clone()).is_none(), "{} is in two jobs", r.worker);
            prop_assert_eq!(s.workers.get(&r.worker).and_then(|w| w.job.as_ref()), Some(&j.id));
        }
    }
    Ok(())
}

proptest! {
    /// Whatever happens, no job runs below its minimum or above its
    /// maximum, no worker is in two jobs, and replicas applying the same
    /// log agree; after the driver has run, the queue starts nothing more,
    /// and the first job in the queue waits because it does not fit.
    #[test]
    fn the_state_machine_keeps_the_queue_s_promises(steps in proptest::collection::vec(step(), 1..40)) {
        let mut s = State::new(100);
        let mut replica = State::new(100);
        for st in &steps {
            play(&mut s, st);
            play(&mut replica, st);
            check(&s)?;
            prop_assert_eq!(&s, &replica);
        }
        play(&mut s, &Step::Drive);
        let d = s.queue();
        prop_assert_eq!(first_start(&d), None);
        if let Some((first, Verdict::Wait { usable })) = d.order.first() {
            prop_assert!(s.jobs[first].plan_request().min_world() > *usable);
        }
    }
}
