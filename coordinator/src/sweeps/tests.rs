use flotilla_proto::v1::MetricPoint;
use proptest::prelude::*;

use super::*;
use crate::data_key::DataKey;
use crate::state::{JobTemplate, NewSweep};

fn template() -> JobTemplate {
    JobTemplate {
        name: "t".into(),
        spec_json: "{}".into(),
        min_workers: 1,
        max_workers: 1,
        fixed_world: None,
        stages: 1,
        total_steps: 10,
        keep_checkpoints: 1,
        output_root: "/tmp/out".into(),
        spec_yaml: String::new(),
        registry: None,
        priority: 0,
    }
}

fn state_with_sweep(trials: usize, max_parallel: u32, early: Option<u64>) -> State {
    let mut s = State::new(3);
    let sweep = NewSweep {
        name: "sw".into(),
        max_parallel,
        metric: "loss".into(),
        goal: "minimize".into(),
        early_stopping: early,
        trials: (0..trials).map(|i| (vec![("train.lr".into(), i.to_string())], template())).collect(),
    };
    s.apply(Command::SubmitSweep { sweep, owner: None, submission_id: Some("x".into()), at_ms: 1 }).unwrap();
    s
}

fn apply_plan(s: &mut State, metrics: &dyn Fn(&str) -> Vec<MetricPoint>) -> Vec<Action> {
    let sweep = s.sweeps["sw-s1"].clone();
    let actions = plan(s, &sweep, metrics);
    for a in &actions {
        let cmd = match a.clone() {
            Action::Start(at) => Command::StartTrial { at, uid: String::new(), data_key: DataKey::default(), at_ms: 2 },
            Action::Record(at, curve, means) => Command::RecordTrial { at, curve, means },
            Action::Stop { job, reason } => Command::StopTrial { job, reason, at_ms: 3 },
        };
        s.apply(cmd).unwrap();
    }
    actions
}

fn none(_: &str) -> Vec<MetricPoint> {
    Vec::new()
}

fn point(step: u64, loss: f64) -> MetricPoint {
    MetricPoint { step, loss, ..Default::default() }
}

#[test]
fn trials_start_up_to_max_parallel_and_a_repeat_starts_nothing() {
    let mut s = state_with_sweep(4, 2, None);
    let a = apply_plan(&mut s, &none);
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(s.jobs.len(), 2);
    // A new leader proposing the same start again: the trial keeps its job.
    let again = s
        .apply(Command::StartTrial {
            at: TrialRef { sweep: "sw-s1".into(), trial: 0 },
            uid: String::new(),
            data_key: DataKey::default(),
            at_ms: 5,
        })
        .unwrap();
    assert!(matches!(again[0], crate::state::Event::SubmissionRepeated { .. }), "{again:?}");
    assert_eq!(s.jobs.len(), 2);
    assert!(apply_plan(&mut s, &none).is_empty(), "two queued trials fill max_parallel");
    let first = s.sweeps["sw-s1"].trials[0].job.clone().unwrap();
    assert_eq!(s.jobs[&first].sweep.as_ref().unwrap().trial, 0);
    s.apply(Command::CancelJob { job: first, at_ms: 6 }).unwrap();
    let a = apply_plan(&mut s, &none);
    assert!(matches!(&a[0], Action::Record(at, c, _) if at.trial == 0 && c.is_empty()), "{a:?}");
    assert!(matches!(&a[1], Action::Start(at) if at.trial == 2), "{a:?}");
    assert_eq!(s.jobs.len(), 3);
}

#[test]
fn cancelling_a_sweep_cancels_its_trials_and_starts_no_more() {
    let mut s = state_with_sweep(3, 2, None);
    apply_plan(&mut s, &none);
    s.apply(Command::CancelSweep { sweep: "sw-s1".into(), at_ms: 4 }).unwrap();
    assert!(s.jobs.values().all(|j| j.phase == crate::state::JobPhase::Cancelled));
    apply_plan(&mut s, &none);
    assert_eq!(s.jobs.len(), 2, "no trial starts after the cancel");
    assert_eq!(s.sweeps["sw-s1"].phase(&s.jobs), crate::state::SweepPhase::Cancelled);
}

#[test]
fn median_rule_stops_a_trial_worse_than_the_completed_median_after_warmup() {
    let good: Vec<(u64, f64)> = (1..=10).map(|s| (s, 1.0 / s as f64)).collect();
    let also: Vec<(u64, f64)> = (1..=10).map(|s| (s, 2.0 / s as f64)).collect();
    let completed: Vec<&[(u64, f64)]> = vec![&good, &also];
    let bad = vec![(1, 1.0), (2, 1.0), (3, 1.0)];
    assert_eq!(median_rule(&bad, &completed, 5, true), None, "within the warm-up");
    assert!(median_rule(&bad, &completed, 2, true).is_some());
    let fine = vec![(3, 0.2), (4, 0.2)];
    assert_eq!(median_rule(&fine, &completed, 2, true), None);
    assert!(median_rule(&fine, &completed, 2, false).is_some(), "maximizing, low is poor");
    assert_eq!(median_rule(&bad, &[], 0, true), None, "no completed trial, no median");
}

#[test]
fn early_stopping_stops_a_running_trial_and_the_trial_shows_why() {
    let mut s = state_with_sweep(2, 2, Some(2));
    apply_plan(&mut s, &none);
    let [a, b] = [0, 1].map(|i| s.sweeps["sw-s1"].trials[i].job.clone().unwrap());
    s.apply(Command::RegisterWorker {
        metrics_addr: String::new(),
        device: String::new(),
        data_addr: "x:1".into(),
        hostname: "h".into(),
        rank_hint: None,
        key_hash: String::new(),
        at_ms: 1,
    })
    .unwrap();
    s.apply(Command::Schedule { job: a.clone(), at_ms: 2 }).unwrap();
    s.apply(Command::FinishJob { job: a.clone(), generation: 1, step: 10, final_model: "m".into(), at_ms: 3 }).unwrap();
    assert_eq!(s.jobs[&a].phase, crate::state::JobPhase::Succeeded);
    s.apply(Command::Schedule { job: b.clone(), at_ms: 4 }).unwrap();
    let metrics = |job: &str| if job == a { (1..=5).map(|s| point(s, 0.1)).collect() } else { vec![point(1, 9.0)] };
    // The first pass records the finished trial's curve; b is in its warm-up.
    let acts = apply_plan(&mut s, &metrics);
    assert!(
        matches!(&acts[..], [Action::Record(at, c, m)] if at.trial == 0 && c.len() == 5 && m.len() == 5),
        "{acts:?}"
    );
    assert!(s.jobs[&b].phase.is_active());
    let metrics = |job: &str| if job == a { Vec::new() } else { vec![point(1, 9.0), point(3, 9.0)] };
    let acts = apply_plan(&mut s, &metrics);
    assert!(matches!(&acts[..], [Action::Stop { job, .. }] if *job == b), "{acts:?}");
    assert_eq!(s.jobs[&b].phase, crate::state::JobPhase::Cancelled);
    let why = s.sweeps["sw-s1"].trials[1].stopped.clone().unwrap();
    assert!(why.contains("median rule") && s.jobs[&b].message == why, "{why}");
    assert_eq!(s.sweeps["sw-s1"].trials[0].curve.as_ref().unwrap().len(), 5, "the record is kept, not replaced");
}

proptest! {
    #[test]
    fn the_median_rule_never_stops_a_trial_at_least_as_good_as_every_completed_one(
        curves in prop::collection::vec(prop::collection::vec(0.0f64..10.0, 1..8), 1..5),
        step in 1u64..8,
    ) {
        let completed: Vec<Vec<(u64, f64)>> =
            curves.iter().map(|c| c.iter().enumerate().map(|(i, v)| (i as u64 + 1, *v)).collect()).collect();
        let refs: Vec<&[(u64, f64)]> = completed.iter().map(|c| c.as_slice()).collect();
        let best = refs.iter().filter_map(|c| value_at(c, step)).fold(f64::INFINITY, f64::min);
        let best = if best.is_finite() { best } else { 0.0 };
        prop_assert_eq!(median_rule(&[(step, best)], &refs, 0, true), None);
        let worst = refs.iter().filter_map(|c| value_at(c, step)).fold(f64::NEG_INFINITY, f64::max);
        if worst.is_finite() {
            let stopped = median_rule(&[(step, worst + 1.0)], &refs, 0, true).is_some();
            prop_assert!(stopped);
        }
    }

    #[test]
    fn a_curve_keeps_its_last_point_and_at_most_the_bound(n in 0usize..3000) {
        let points: Vec<MetricPoint> = (0..n).map(|i| point(i as u64, i as f64)).collect();
        let c = curve(&points, "loss");
        prop_assert!(c.len() <= MAX_CURVE_POINTS);
        prop_assert_eq!(c.last().map(|p| p.0), n.checked_sub(1).map(|l| l as u64));
    }
}

#[test]
fn means_run_from_the_first_point_and_survive_thinning() {
    let points: Vec<MetricPoint> = (1..=2000).map(|s| point(s, if s % 2 == 0 { 1.0 } else { 3.0 })).collect();
    let m = means(&points, "loss");
    assert!(m.len() <= MAX_CURVE_POINTS);
    assert_eq!(m.last(), Some(&(2000, 2.0)));
    // Trials that trained alike compare equal at any step, thinned or not.
    let short = means(&points[..300], "loss");
    assert_eq!(value_at(&short, 300), Some(2.0));
    assert!((value_at(&m, 300).unwrap() - 2.0).abs() < 0.01);
}

#[tokio::test]
async fn a_trained_trials_history_is_read_from_beside_its_final_model() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<flotilla_registry::MetricRecord> =
        (1..=3).map(|s| crate::convert::metric_record(&point(s, 4.0 - s as f64))).collect();
    std::fs::write(dir.path().join("metrics.jsonl"), flotilla_registry::record::to_jsonl(&records)).unwrap();
    let model = format!("{}/model.safetensors", dir.path().display());
    let points = final_history(Some(&model)).await.unwrap();
    assert_eq!(curve(&points, "loss"), [(1, 3.0), (2, 2.0), (3, 1.0)]);
    assert_eq!(means(&points, "loss").last(), Some(&(3, 2.0)));
    assert!(final_history(Some("/no/such/folder/model.safetensors")).await.is_none());
    assert!(final_history(None).await.is_none());
}
