//! Tests of the Kubernetes renderer ([`super::k8s`]).

use super::k8s::*;
use flotilla_jobspec::JobSpec;

use super::IMAGE_BINARY;

const JOB: &str = "# a comment kept as written\nname: tiny\nmodel: {kind: mlp, layers: [4, 8, 2]}\ndata: {kind: synthetic}\ntrain: {steps: 10, global_batch: 8}\nworkers: {min: 2, max: 3}\ncheckpoint: {url: 's3://bucket/runs'}\n";

fn spec() -> JobSpec {
    flotilla_jobspec::parse(JOB, "job.yaml").unwrap()
}

#[test]
fn one_pod_per_worker_with_the_job_file_and_the_grace() {
    let out = render(&spec(), JOB, &K8sOptions::default()).unwrap();
    let m = &out.manifests;
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert!(m.contains("kind: ConfigMap\n"));
    assert!(m.contains("    # a comment kept as written\n    name: tiny\n"), "{m}");
    assert!(m.contains("  completionMode: Indexed\n  completions: 3\n  parallelism: 3\n"), "{m}");
    assert!(m.contains("terminationGracePeriodSeconds: 90\n"), "{m}");
    assert!(m.contains("nvidia.com/gpu: 1\n"), "{m}");
    assert!(m.contains(&format!("fieldPath: \"metadata.labels['{CONTROLLER_UID_LABEL}']\"")), "{m}");
    assert!(!m.contains("nodeSelector"), "no cloud, no spot pool: {m}");
}

#[test]
fn the_worker_command_submits_serves_and_knows_its_grace() {
    let opts = K8sOptions { preemption_grace_s: 120, cloud: Cloud::Gke, ..K8sOptions::default() };
    let cmd = worker_command(&opts);
    assert_eq!(&cmd[..4], [IMAGE_BINARY, "worker", "--submit", JOB_FILE]);
    let grace = cmd.iter().position(|a| a == "--preemption-grace-s").unwrap();
    assert_eq!(cmd[grace + 1], "120");
    assert!(cmd.windows(2).any(|w| w == ["--gce-metadata-url", "http://metadata.google.internal"]));
    assert!(cmd.windows(2).any(|w| w == ["--metrics-addr", &format!("0.0.0.0:{METRICS_PORT}")]));
    let m = render(&spec(), JOB, &opts).unwrap().manifests;
    assert!(m.contains("terminationGracePeriodSeconds: 150\n"), "{m}");
}

#[test]
fn spot_pools_per_cloud() {
    let eks = render(&spec(), JOB, &K8sOptions { cloud: Cloud::Eks, ..K8sOptions::default() }).unwrap().manifests;
    assert!(eks.contains("nodeSelector:\n        eks.amazonaws.com/capacityType: SPOT\n"), "{eks}");
    assert!(eks.contains("--aws-metadata-url"));
    let gke = render(&spec(), JOB, &K8sOptions { cloud: Cloud::Gke, ..K8sOptions::default() }).unwrap().manifests;
    assert!(gke.contains("nodeSelector:\n        cloud.google.com/gke-spot: \"true\"\n"), "{gke}");
    let on_demand = render(&spec(), JOB, &K8sOptions { cloud: Cloud::Gke, spot: false, ..K8sOptions::default() })
        .unwrap()
        .manifests;
    assert!(!on_demand.contains("gke-spot"), "{on_demand}");
}

#[test]
fn a_gpu_pod_s_worker_computes_on_the_pod_s_one_gpu() {
    let opts = K8sOptions::default();
    assert_eq!(opts.gpus, 1);
    let cmd = worker_command(&opts);
    assert!(cmd.windows(2).any(|w| w == ["--gpu", "0"]), "{cmd:?}");
    // The device plugin leaves the pod one visible GPU: the worker takes it.
    let gpu = flotilla_trainer::device::pick_gpu(Some(0), |_| None, 1).unwrap();
    assert_eq!(gpu.map(|g| g.0), Some(0));
    assert!(!worker_command(&K8sOptions { gpus: 0, ..K8sOptions::default() }).contains(&"--gpu".to_string()));
    // One worker per GPU: a pod of two GPUs would leave one idle.
    let e = render(&spec(), JOB, &K8sOptions { gpus: 2, ..K8sOptions::default() }).unwrap_err().to_string();
    assert!(e.contains("--gpus") && e.contains("one GPU"), "{e}");
}

#[test]
fn cpu_workers_ask_for_no_gpu_and_credentials_come_from_a_secret() {
    let opts = K8sOptions { gpus: 0, credentials_secret: Some("s3-creds".into()), ..K8sOptions::default() };
    let m = render(&spec(), JOB, &opts).unwrap().manifests;
    assert!(!m.contains("nvidia.com/gpu"), "{m}");
    assert!(m.contains("envFrom:\n            - secretRef:\n                name: s3-creds\n"), "{m}");
}

#[test]
fn local_checkpoints_are_warned_about() {
    let text = JOB.replace("'s3://bucket/runs'", "runs");
    let spec = flotilla_jobspec::parse(&text, "job.yaml").unwrap();
    let out = render(&spec, &text, &K8sOptions::default()).unwrap();
    assert!(out.warnings.iter().any(|w| w.contains("checkpoint.url `runs`")), "{:?}", out.warnings);
    let shared = K8sOptions { workdir_claim: Some("shared".into()), ..K8sOptions::default() };
    let out = render(&spec, &text, &shared).unwrap();
    assert!(out.warnings.is_empty());
    assert!(out.manifests.contains("claimName: shared"));
}

#[test]
fn bad_options_are_named() {
    let long = K8sOptions { job_name: Some("x".repeat(60)), ..K8sOptions::default() };
    let e = render(&spec(), JOB, &long).unwrap_err().to_string();
    assert!(e.starts_with("--job-name"), "{e}");
    let ns = K8sOptions { namespace: "Bad_NS".into(), ..K8sOptions::default() };
    assert!(render(&spec(), JOB, &ns).unwrap_err().to_string().starts_with("--namespace \"Bad_NS\""));
    let mem = K8sOptions { memory: "lots".into(), ..K8sOptions::default() };
    assert!(render(&spec(), JOB, &mem).unwrap_err().to_string().starts_with("--memory"));
}

#[test]
fn quantities() {
    for q in ["4", "500m", "16Gi", "0.5", "1G"] {
        assert!(is_quantity(q), "{q}");
    }
    for q in ["", "Gi", "4 Gi", "1.2.3", "4X"] {
        assert!(!is_quantity(q), "{q}");
    }
}
