//! The shipped quickstart, run as a user runs it: `flotilla run` with two
//! local workers.

mod support;

use sha2::{Digest, Sha256};
use support::*;

#[test]
fn quickstart_trains_two_identical_replicas_and_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.yaml");
    let out = flotilla(dir.path(), &["run", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "flotilla run failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("job quickstart-1 succeeded"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Its own throw-away CA: the loopback port is TLS too.
    assert!(stderr.contains("(coordinator https://127.0.0.1:"), "{stderr}");
    // The dashboard's address, and where the token it asks for is.
    let hint = stderr.lines().find(|l| l.starts_with("flotilla: dashboard https://127.0.0.1:"));
    assert!(hint.is_some_and(|l| l.contains("/#/jobs/quickstart-1 (token in ")), "{stderr}");

    let run = dir.path().join("runs/quickstart-1");
    let metrics = read_metrics(&run.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 200, "one metric line per step");
    assert!(metrics.iter().all(|m| m.2 == 2), "every step ran on 2 workers");
    let (first, last) = (metrics[0].1, metrics[199].1);
    assert!(last < 0.25 * first, "loss went from {first} to {last}");

    // Both ranks hold bit-identical parameters, and they are the saved model.
    let replicas: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("final/replicas.json")).unwrap()).unwrap();
    let digests: Vec<&str> =
        replicas["param_sha256_by_rank"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(digests.len(), 2);
    assert_eq!(digests[0], digests[1]);
    let model = read_tensors(&run.join("final/model.safetensors"));
    let mut h = Sha256::new();
    for values in model.values() {
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    let saved: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(saved, digests[0], "the saved model is what the ranks hold");

    // Periodic checkpoints: keep 2 of every 50 steps.
    let mut steps: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["step-00000100", "step-00000150"]);
    for s in &steps {
        assert!(run.join(s).join("manifest.json").exists());
        assert!(run.join(s).join("rank-00001.safetensors").exists());
    }
}
