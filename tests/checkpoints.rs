//! Checkpoints on the local file system: retention keeps exactly the newest
//! K, and a torn or corrupt newest checkpoint is detected by its manifest and
//! checksums and skipped in favour of the previous committed one.

mod support;

use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::*;

#[test]
fn retention_keeps_the_newest_three_of_ten_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "job",
        "
name: keep
model: {kind: mlp, layers: [8, 16, 3]}
data: {kind: synthetic}
train: {steps: 110, global_batch: 8}
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 10, keep: 3}
",
    );
    let out = flotilla(dir.path(), &["run", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run = dir.path().join("runs/keep-1");
    let mut left: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    left.sort();
    assert_eq!(left, vec!["step-00000080", "step-00000090", "step-00000100"], "{stdout}");
    for s in &left {
        let files: Vec<String> =
            std::fs::read_dir(run.join(s)).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert_eq!(files.len(), 4, "{s}: two shards, a manifest and the metric history, no partial files: {files:?}");
        assert!(run.join(s).join("manifest.json").exists());
        // The history of every step up to the checkpoint's, carried on at a resume.
        let step: u64 = s.trim_start_matches("step-").parse().unwrap();
        let history = read_metrics(&run.join(s).join("metrics.jsonl"));
        assert_eq!(history.iter().map(|h| h.0).collect::<Vec<_>>(), (1..=step).collect::<Vec<_>>(), "{s}");
    }
    for step in [80, 90, 100] {
        assert!(stdout.contains(&format!("step {step:>8}")), "the run lists retained step {step}: {stdout}");
    }
    // Saving is asynchronous: training stood still only to copy the state.
    for line in stdout.lines().filter(|l| l.contains("(blocked ")) {
        let num = |key: &str| -> f64 { line.split(key).nth(1).unwrap().split(" ms").next().unwrap().parse().unwrap() };
        let (blocked, total) = (num("(blocked "), num("saved in "));
        assert!(blocked <= total, "{line}");
    }
}

const SLOW: &str = "
name: torn
model: {kind: gpt, layers: 2, d_model: 64, heads: 4, context: 64, vocab: 64}
data: {kind: synthetic, seed: 4, samples: 4096}
train: {steps: 200, global_batch: 32, micro_batch: 16}
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 40, keep: 3}
";

enum Damage {
    MissingManifest,
    TruncatedShard,
    FlippedByte,
}

fn damaged_newest_checkpoint_is_skipped(damage: Damage) {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    let mut a = worker(dir.path(), &url, "worker-a");
    let b = worker(dir.path(), &url, "worker-b");
    let job = job_file(dir.path(), "job", SLOW);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c_log;
    let (newest, previous) = runtime().block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, "torn-1", Duration::from_secs(60), |s| s.checkpoints.len() >= 2).await;
        let newest = s.checkpoints.last().unwrap().clone();
        let previous = s.checkpoints[s.checkpoints.len() - 2].clone();
        let dir = std::path::PathBuf::from(&newest.location);
        match damage {
            Damage::MissingManifest => std::fs::remove_file(dir.join("manifest.json")).unwrap(),
            Damage::TruncatedShard => {
                let shard = dir.join("rank-00001.safetensors");
                let len = std::fs::metadata(&shard).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len / 2).unwrap();
            }
            Damage::FlippedByte => {
                let shard = dir.join("rank-00000.safetensors");
                let mut bytes = std::fs::read(&shard).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x40;
                std::fs::write(&shard, bytes).unwrap();
            }
        }
        a.kill9();
        (newest, previous)
    });
    let c = worker(dir.path(), &url, "worker-c");
    c_log = c.log.clone();
    runtime().block_on(async {
        let mut cl = client(&url).await;
        let done = wait_for(&mut cl, "torn-1", Duration::from_secs(120), |s| {
            s.phase != pb::JobPhase::Running as i32 && s.phase != pb::JobPhase::Waiting as i32
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        let resumed = done.generations.iter().skip(1).find(|g| g.world_size == 2).unwrap();
        assert_eq!(resumed.resumed_from_step, newest.step, "the coordinator offered the newest committed one");
    });
    // Both ranks of the new generation skipped the damaged checkpoint and
    // said why, then loaded the previous one.
    for log in [c_log, b.log.clone()] {
        let text = std::fs::read_to_string(&log).unwrap();
        let skip =
            text.lines().find(|l| l.contains("skipping checkpoint")).unwrap_or_else(|| panic!("no skip in {text}"));
        assert!(skip.contains(&newest.location), "{skip}");
        match damage {
            Damage::MissingManifest => assert!(skip.contains("manifest"), "{skip}"),
            Damage::TruncatedShard => assert!(skip.contains("rank-00001.safetensors"), "{skip}"),
            Damage::FlippedByte => assert!(skip.contains("rank-00000.safetensors has checksum"), "{skip}"),
        }
        assert!(
            text.lines()
                .any(|l| l.contains("resumed from checkpoint") && l.contains(&format!("step={}", previous.step))),
            "{text}"
        );
    }
}

#[test]
fn a_torn_newest_checkpoint_is_skipped_for_the_previous_one() {
    damaged_newest_checkpoint_is_skipped(Damage::MissingManifest);
    damaged_newest_checkpoint_is_skipped(Damage::TruncatedShard);
    damaged_newest_checkpoint_is_skipped(Damage::FlippedByte);
}

/// A checkpoint written by the release before this engine (manifest format
/// 2: one checksum per shard, the dtype spelled "f32", two data-parallel
/// ranks), committed as a fixture with the job that wrote it: it loads
/// under another layout (ZeRO-3 on three ranks, each reading only its
/// pieces), its history carries over, and the job goes on along the curve
/// a run from scratch follows.
#[test]
fn a_format_2_checkpoint_of_the_release_before_loads_and_resumes() {
    let fixture = repo().join("tests/fixtures/checkpoint-format2");
    let step20 = fixture.join("step-00000020");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step20.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], "flotilla-checkpoint/2", "the fixture is of the old format");
    assert_eq!(manifest["tensors"][0]["dtype"], "f32");
    let yaml = std::fs::read_to_string(fixture.join("job.yaml")).unwrap();
    let run = |dir: &std::path::Path, yaml: &str| -> Vec<f64> {
        let job = job_file(dir, "job", yaml);
        let out = flotilla(dir, &["run", job.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        read_metrics(&dir.join("runs/format2-1/final/metrics.jsonl")).iter().map(|m| m.1).collect()
    };
    let scratch = run(tempfile::tempdir().unwrap().path(), &yaml);
    let copy = tempfile::tempdir().unwrap();
    let resume_from = copy.path().join("step-00000020");
    std::fs::create_dir(&resume_from).unwrap();
    for f in std::fs::read_dir(&step20).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), resume_from.join(f.file_name())).unwrap();
    }
    let resumed =
        yaml.replace("workers: {min: 2, max: 2}", "workers: {min: 3, max: 3}\nparallelism: {dp: 3, zero: 3}").replace(
            "checkpoint: {every: 20}",
            &format!("checkpoint: {{every: 20, resume_from: '{}'}}", resume_from.display()),
        );
    assert_ne!(resumed, yaml, "the job file names the fixture");
    let rest = run(tempfile::tempdir().unwrap().path(), &resumed);
    let old_history: Vec<f64> = read_metrics(&step20.join("metrics.jsonl")).iter().map(|m| m.1).collect();
    assert_eq!(old_history.len(), 20);
    assert_eq!(&rest[..20], &old_history[..], "the old run's history is carried over");
    for (s, (a, b)) in scratch.iter().zip(&rest).enumerate().skip(20) {
        let rel = (a - b).abs() / a.abs();
        assert!(rel <= 1e-5, "step {}: from scratch {a}, resumed from the old checkpoint {b}", s + 1);
    }
    for (s, (a, b)) in scratch.iter().zip(&old_history).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(rel <= 1e-5, "step {}: this release {a}, the release before {b}", s + 1);
    }
}
