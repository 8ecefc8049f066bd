use proptest::prelude::*;

use super::*;

const JOB: &str = "name: base\n\
model: {kind: mlp, layers: [4, 8, 3]}\n\
data: {kind: synthetic, seed: 7}\n\
train: {steps: 10, global_batch: 8}\n";

fn no_files(_: &str, _: u64) -> Result<String, String> {
    Err("no files here".into())
}

const GRID: &str = "name: grid\njob: job.yaml\nparameters:\n  train.optimizer.lr: {values: [0.1, 0.01]}\n  \
train.global_batch: {values: [8, 16]}\nmax_parallel: 2\n";

#[test]
fn a_grid_runs_every_combination_first_parameter_slowest() {
    let s = parse_sweep(GRID, "s.yaml").unwrap();
    assert!(!s.random);
    assert_eq!(s.trials, 4);
    assert_eq!(s.max_parallel, 2);
    let a = assignments(&s);
    let shown: Vec<String> = a.iter().map(|r| format!("{}/{}", r[0].1, r[1].1)).collect();
    // BTreeMap order: train.global_batch before train.optimizer.lr.
    assert_eq!(shown, ["8/0.1", "8/0.01", "16/0.1", "16/0.01"]);
    let t = trials(&s, JOB, "job.yaml", &no_files).unwrap();
    assert_eq!(t.len(), 4);
    let spec = crate::parse_with(&t[3].job_yaml, "t3", &no_files).unwrap();
    assert_eq!(spec.train.global_batch, 16);
}

#[test]
fn a_trial_that_fails_validation_rejects_the_sweep_naming_it() {
    let s = parse_sweep("name: bad\njob: job.yaml\nparameters:\n  train.global_batch: {values: [8, 0]}\n", "s.yaml")
        .unwrap();
    let e = trials(&s, JOB, "job.yaml", &no_files).unwrap_err();
    assert!(e.origin.contains("trial 1"), "{e}");
    assert_eq!(e.path, "train.global_batch", "{e}");
}

#[test]
fn a_misspelt_override_is_an_unknown_field() {
    let s = parse_sweep("name: bad\njob: job.yaml\nparameters:\n  train.lrr: {values: [1]}\n", "s.yaml").unwrap();
    let e = trials(&s, JOB, "job.yaml", &no_files).unwrap_err();
    assert!(e.to_string().contains("lrr"), "{e}");
}

#[test]
fn bad_sweep_files_name_the_field_and_line() {
    let cases = [
        (
            "name: x\njob: j\nparameters:\n  a.b: {distribution: normal, min: 0, max: 1}\ntrials: 2\n",
            "parameters.a.b.distribution",
            4,
        ),
        ("name: x\njob: j\nparameters:\n  a.b: {values: [1]}\ntrials: 2\n", "trials", 5),
        ("name: x\njob: j\nparameters:\n  a.b: {distribution: uniform, min: 0, max: 1}\n", "trials", 4),
        ("name: x\njob: j\nparameters:\n  a.b: {values: [1]}\nmetric: {name: acc}\n", "metric.name", 5),
        ("name: x\njob: j\nparameters:\n  a.b: {values: [1]}\nmax_parallel: 0\n", "max_parallel", 5),
        ("name: x\njob: j\nparameters:\n  a.b: {values: [1]}\nbogus: 1\n", "bogus", 5),
        (
            "name: x\njob: j\nparameters:\n  a.b: {distribution: log_uniform, min: 0, max: 1}\ntrials: 1\n",
            "parameters.a.b.min",
            4,
        ),
    ];
    for (src, path, line) in cases {
        let e = parse_sweep(src, "s.yaml").unwrap_err();
        assert!(e.path.starts_with(path) || e.message.contains(path), "{src}: {e}");
        assert_eq!(e.line, line, "{src}: {e}");
    }
}

fn random_sweep(seed: u64, trials: u64) -> SweepSpec {
    parse_sweep(
        &format!(
            "name: r\njob: j\nparameters:\n  a: {{distribution: log_uniform, min: 0.001, max: 0.1}}\n  \
b: {{distribution: int, min: -2, max: 3}}\n  c: {{distribution: choice, values: [sgd, adam]}}\n  \
d: {{distribution: uniform, min: 1, max: 2}}\ntrials: {trials}\nseed: {seed}\n"
        ),
        "s.yaml",
    )
    .unwrap()
}

proptest! {
    #[test]
    fn random_trials_are_in_range_and_the_seed_decides_them(seed in any::<u64>(), n in 1u64..40) {
        let s = random_sweep(seed, n);
        let a = assignments(&s);
        prop_assert_eq!(a.len() as u64, n);
        prop_assert_eq!(&a, &assignments(&s));
        for row in &a {
            let a = row[0].1.as_f64().unwrap();
            prop_assert!((0.001..=0.1 + 1e-12).contains(&a));
            let b = row[1].1.as_i64().unwrap();
            prop_assert!((-2..=3).contains(&b));
            prop_assert!(row[2].1 == "sgd" || row[2].1 == "adam", "{:?}", row);
            let d = row[3].1.as_f64().unwrap();
            prop_assert!((1.0..2.0).contains(&d));
        }
    }

    #[test]
    fn a_grid_has_the_product_of_its_values_each_once(x in 1usize..5, y in 1usize..5) {
        let xs: Vec<String> = (0..x).map(|i| i.to_string()).collect();
        let ys: Vec<String> = (0..y).map(|i| (i * 10).to_string()).collect();
        let src = format!("name: g\njob: j\nparameters:\n  p.x: {{values: [{}]}}\n  p.y: {{values: [{}]}}\n", xs.join(", "), ys.join(", "));
        let s = parse_sweep(&src, "s.yaml").unwrap();
        let a = assignments(&s);
        prop_assert_eq!(a.len(), x * y);
        let mut seen: Vec<String> = a.iter().map(|r| format!("{}/{}", r[0].1, r[1].1)).collect();
        seen.sort();
        seen.dedup();
        prop_assert_eq!(seen.len(), x * y);
    }
}

#[test]
fn set_path_makes_the_mappings_on_the_way_and_refuses_to_go_through_a_value() {
    let mut doc = serde_json::json!({"train": {"steps": 3}});
    set_path(&mut doc, "train.optimizer.lr", serde_json::json!(0.5)).unwrap();
    assert_eq!(doc["train"]["optimizer"]["lr"], 0.5);
    assert!(set_path(&mut doc, "train.steps.x", serde_json::json!(1)).is_err());
}

#[test]
fn the_sample_sweep_makes_valid_trials_of_the_quickstart_job() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let src = std::fs::read_to_string(dir.join("sweeps/lr.yaml")).unwrap();
    let s = parse_sweep(&src, "configs/sweeps/lr.yaml").unwrap();
    assert!(s.random && s.trials == 6 && s.early_stopping == Some(50));
    let job = std::fs::read_to_string(dir.join("sweeps").join(&s.job)).unwrap();
    let read = crate::files_under(dir.clone());
    let t = trials(&s, &job, "configs/quickstart.yaml", &read).unwrap();
    assert_eq!(t.len(), 6);
    for trial in &t {
        let lr = trial.spec.train.optimizer.lr;
        assert!((0.0003..=0.03).contains(&lr), "{lr}");
    }
}
