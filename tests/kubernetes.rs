//! The Kubernetes manifests: the kustomize base and its EKS and GKE overlays
//! render with `kubectl kustomize`, and they and `flotilla k8s render`'s
//! output for every shipped config validate with `kubernetes-validate
//! --strict`; the worker pods' command, run as written with the pods'
//! environment, trains a job to the end with ranks from the pods' indexes.
//! kubectl and kubernetes-validate come from `scripts/bootstrap --k8s`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Kubernetes versions the manifests are checked against: the oldest that
/// EKS and GKE still run in standard support, and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

fn tool(name: &str) -> PathBuf {
    let path = repo().join(".deps/k8s/bin").join(name);
    assert!(path.exists(), "{} is missing: run ./scripts/bootstrap --k8s (./scripts/test does this)", path.display());
    path
}

fn kustomize(dir: &str) -> String {
    let out = Command::new(tool("kubectl")).arg("kustomize").arg(repo().join(dir)).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Validates every file, strictly, against each of [`KUBERNETES_VERSIONS`].
fn validate(files: &[PathBuf]) {
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The documents of a YAML stream, as JSON (through the validator's PyYAML).
fn documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(tool("python"))
        .args(["-c", "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not YAML:\n{yaml}");
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {docs:#?}"))
}

#[test]
fn the_base_and_every_overlay_render_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for kustomization in ["deploy/kubernetes/base", "deploy/kubernetes/overlays/eks", "deploy/kubernetes/overlays/gke"]
    {
        let yaml = kustomize(kustomization);
        let docs = documents(&yaml);
        let sts = find(&docs, "StatefulSet", "flotilla-coordinator");
        assert_eq!(sts["spec"]["replicas"], 3);
        assert_eq!(sts["spec"]["serviceName"], "flotilla-coordinator-peers");
        assert_eq!(sts["metadata"]["namespace"], "flotilla");
        let c = &sts["spec"]["template"]["spec"]["containers"][0];
        // Prometheus finds every replica's /metrics on its API port, over TLS.
        let scrape = &sts["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(scrape["prometheus.io/scrape"], "true", "{kustomization}");
        assert_eq!(scrape["prometheus.io/path"], "/metrics");
        assert_eq!(scrape["prometheus.io/scheme"], "https");
        let port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
        assert_eq!(scrape["prometheus.io/port"], port["containerPort"].to_string().as_str());
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert!(c[probe].is_object(), "{kustomization}: no {probe}");
        }
        let script = c["command"][2].as_str().unwrap();
        for peer in 0..3 {
            let url = format!("--peer {}=http://flotilla-coordinator-{peer}.flotilla-coordinator-peers:7070", peer + 1);
            assert!(script.contains(&url), "{kustomization}: {script}");
        }
        assert!(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"].is_string());
        // Every replica accepts the admin token of one Secret, mounted read-only.
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "admin-token").unwrap();
        assert_eq!(mount["readOnly"], true);
        let token_file = format!("{}/token", mount["mountPath"].as_str().unwrap());
        assert!(script.contains(&format!("--admin-token-file {token_file}")), "{kustomization}: {script}");
        let volume = sts["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        let secret = volume.iter().find(|v| v["name"] == "admin-token").unwrap();
        assert_eq!(secret["secret"]["secretName"], flotilla::deploy::k8s::ADMIN_TOKEN_SECRET);
        assert_eq!(find(&docs, "Service", "flotilla-coordinator-peers")["spec"]["clusterIP"], "None");
        find(&docs, "Service", "flotilla-coordinator");
        assert_eq!(find(&docs, "PodDisruptionBudget", "flotilla-coordinator")["spec"]["maxUnavailable"], 1);
        let worker_sa = find(&docs, "ServiceAccount", "flotilla-worker");
        let annotations = &worker_sa["metadata"]["annotations"];
        let pod = &sts["spec"]["template"]["spec"];
        let class = &sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"];
        match kustomization.rsplit('/').next().unwrap() {
            "eks" => {
                assert!(annotations["eks.amazonaws.com/role-arn"].as_str().unwrap().starts_with("arn:aws:iam::"));
                assert_eq!(pod["nodeSelector"]["eks.amazonaws.com/capacityType"], "ON_DEMAND");
                assert_eq!(class, "gp3");
            }
            "gke" => {
                assert!(annotations["iam.gke.io/gcp-service-account"]
                    .as_str()
                    .unwrap()
                    .ends_with(".iam.gserviceaccount.com"));
                let term = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                    ["nodeSelectorTerms"][0]["matchExpressions"][0];
                assert_eq!(
                    (&term["key"], &term["operator"]),
                    (&"cloud.google.com/gke-spot".into(), &"DoesNotExist".into())
                );
                assert_eq!(class, "standard-rwo");
            }
            _ => assert!(annotations.is_null() && class.is_null()),
        }
        let file = dir.path().join(format!("{}.yaml", kustomization.replace('/', "-")));
        std::fs::write(&file, yaml).unwrap();
        files.push(file);
    }
    validate(&files);
}

fn render(cwd: &Path, args: &[&str]) -> String {
    let out = flotilla(cwd, &[&["k8s", "render"], args].concat());
    assert!(out.status.success(), "k8s render {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rendered_workers_validate_for_every_shipped_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo().join("configs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 3, "{configs:?}");
    let variants: [&[&str]; 4] = [
        &[],
        &["--cloud", "eks", "--credentials-secret", "checkpoint-keys"],
        &["--cloud", "gke", "--gpus", "1", "--workdir-claim", "shared-work"],
        &["--cloud", "gke", "--on-demand", "--gpus", "0", "--namespace", "ml", "--preemption-grace-s", "300"],
    ];
    let mut files = Vec::new();
    for config in &configs {
        let text = std::fs::read_to_string(config).unwrap();
        let spec = flotilla::jobspec::parse(&text, &config.display().to_string()).unwrap();
        for (i, variant) in variants.iter().enumerate() {
            let yaml = render(&repo(), &[&[config.to_str().unwrap()], *variant].concat());
            let docs = documents(&yaml);
            let name = format!("flotilla-{}", spec.name);
            let job = find(&docs, "Job", &name);
            let world = flotilla::deploy::world_size(&spec);
            assert_eq!((&job["spec"]["completions"], &job["spec"]["parallelism"]), (&world.into(), &world.into()));
            // The ConfigMap holds the job file exactly as written.
            assert_eq!(find(&docs, "ConfigMap", &format!("{name}-job"))["data"]["job.yaml"], text.as_str());
            let file = dir.path().join(format!("{}-{i}.yaml", spec.name));
            std::fs::write(&file, yaml).unwrap();
            files.push(file);
        }
    }
    validate(&files);
}

#[test]
fn bad_render_options_and_bad_jobs_are_refused_with_the_reason() {
    let out = flotilla(&repo(), &["k8s", "render", "configs/quickstart.yaml", "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--memory \"lots\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = flotilla(&repo(), &["k8s", "render", "configs/bad/unknown-train-field.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown-train-field.yaml:10:3: train.stepz"), "{err}");
    let out = flotilla(&repo(), &["slurm", "render", "configs/bad/unknown-train-field.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("train.stepz"));
}

const POD_JOB: &str = "name: pods
model: {kind: mlp, layers: [16, 32, 4]}
data: {kind: synthetic, seed: 2, samples: 1024}
train: {steps: 30, global_batch: 32}
workers: {min: 2, max: 2}
checkpoint: {url: runs, every: 10}
";

/// The worker pods' command, environment and grace period, checked against
/// what the worker and its preemption watcher need, then run as written (on
/// loopback, with the values Kubernetes would fill in) to train a job.
#[test]
fn the_worker_pods_command_env_and_grace_run_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path(), "job", POD_JOB);
    let grace = 45u64;
    let yaml = render(
        dir.path(),
        &[job.to_str().unwrap(), "--cloud", "eks", "--gpus", "0", "--preemption-grace-s", &grace.to_string()],
    );
    let docs = documents(&yaml);
    let kjob = find(&docs, "Job", "flotilla-pods");
    assert_eq!(kjob["spec"]["completionMode"], "Indexed");
    let pod = &kjob["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    let command: Vec<String> = serde_json::from_value(c["command"].clone()).unwrap();
    assert_eq!(command[0], flotilla::deploy::IMAGE_BINARY);
    assert_eq!(command[1], "worker");
    let arg = |flag: &str| command.iter().position(|a| a == flag).map(|i| command[i + 1].clone());
    // SIGTERM is the preemption notice: Kubernetes must wait longer than the
    // worker waits for its checkpoint.
    assert_eq!(arg("--preemption-grace-s"), Some(grace.to_string()));
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(termination > grace, "terminationGracePeriodSeconds {termination} <= grace {grace}");
    assert_eq!(arg("--aws-metadata-url").as_deref(), Some("http://169.254.169.254"));
    assert_eq!(pod["nodeSelector"]["eks.amazonaws.com/capacityType"], "SPOT");
    // The job file the command reads is the ConfigMap's, mounted where it says.
    let job_path = arg("--submit").unwrap();
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "job").unwrap();
    assert_eq!(Path::new(&job_path).parent().unwrap(), Path::new(mount["mountPath"].as_str().unwrap()));
    let config_name = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "job").unwrap()["configMap"]
        ["name"]
        .as_str()
        .unwrap()
        .to_string();
    let key = Path::new(&job_path).file_name().unwrap().to_str().unwrap();
    let pod_job_text = find(&docs, "ConfigMap", &config_name)["data"][key].as_str().unwrap().to_string();
    assert_eq!(pod_job_text, POD_JOB);
    // Environment: the coordinator, one submission id per Kubernetes Job, the pod's address.
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no {name} in {env:?}"));
    assert!(var("FLOTILLA_COORDINATOR")["value"]
        .as_str()
        .unwrap()
        .contains("flotilla-coordinator-0.flotilla-coordinator-peers:7070"));
    assert_eq!(
        var("FLOTILLA_SUBMISSION_ID")["valueFrom"]["fieldRef"]["fieldPath"],
        format!("metadata.labels['{}']", flotilla::deploy::k8s::CONTROLLER_UID_LABEL)
    );
    assert_eq!(var("POD_IP")["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    // TLS: the client certificate from the Secret the coordinator shares, where FLOTILLA_TLS_DIR says.
    let pod_tls_dir = var("FLOTILLA_TLS_DIR")["value"].as_str().unwrap().to_string();
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").unwrap();
    assert_eq!(mount["mountPath"], pod_tls_dir.as_str());
    let tls = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], flotilla::deploy::k8s::TLS_SECRET);
    let keys: Vec<&str> =
        tls["secret"]["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["ca.pem", "client.pem", "client.key"]);
    // The API token: from the admin token Secret, mounted read-only where
    // FLOTILLA_TOKEN_FILE points.
    let token_file = var("FLOTILLA_TOKEN_FILE")["value"].as_str().unwrap().to_string();
    let token_mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "token").unwrap();
    assert_eq!(Path::new(&token_file).parent().unwrap(), Path::new(token_mount["mountPath"].as_str().unwrap()));
    assert_eq!(token_mount["readOnly"], true);
    let token_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "token").unwrap();
    assert_eq!(token_volume["secret"]["secretName"], flotilla::deploy::k8s::ADMIN_TOKEN_SECRET);
    assert!(command.contains(&"$(POD_IP)".to_string()));
    // Prometheus finds the worker's metrics listener from the pod's annotations.
    let scrape = &kjob["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(scrape["prometheus.io/scrape"], "true");
    assert_eq!(scrape["prometheus.io/path"], "/metrics");
    let metrics_port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").unwrap();
    assert_eq!(scrape["prometheus.io/port"], metrics_port["containerPort"].to_string().as_str());
    assert_eq!(arg("--metrics-addr"), Some(format!("0.0.0.0:{}", metrics_port["containerPort"])));
    // A preempted worker (exit 75) is replaced; a failed job (exit 1) fails the Job.
    let rules = kjob["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    let action_for = |code: i32| {
        rules
            .iter()
            .find(|r| r["onExitCodes"]["values"].as_array().is_some_and(|v| v.contains(&code.into())))
            .map(|r| r["action"].clone())
    };
    assert_eq!(action_for(flotilla::deploy::EXIT_PREEMPTED), Some("Count".into()));
    assert_eq!(action_for(1), Some("FailJob".into()));

    // Run two "pods" here: the command as rendered, with what Kubernetes
    // fills in (the pod IP, the Job's uid, the completion index) and the
    // ConfigMap's file where the pod would have it mounted.
    let (_coordinator, url) = coordinator(dir.path());
    let mounted = dir.path().join("etc-flotilla");
    std::fs::create_dir_all(&mounted).unwrap();
    std::fs::write(mounted.join(key), &pod_job_text).unwrap();
    let workdir = dir.path().join("work");
    std::fs::create_dir_all(&workdir).unwrap();
    let mut pods = Vec::new();
    for index in [1, 0] {
        let args: Vec<String> = command[1..]
            .iter()
            .map(|a| match a.as_str() {
                "$(POD_IP)" => "127.0.0.1".to_string(),
                p if p == job_path => mounted.join(key).display().to_string(),
                // Two pods on one host cannot share the data port.
                p if p.starts_with("0.0.0.0:") => "127.0.0.1:0".to_string(),
                // No instance metadata here: an address that answers nothing.
                "http://169.254.169.254" => "http://127.0.0.1:9".to_string(),
                other => other.to_string(),
            })
            .collect();
        let log = dir.path().join(format!("pod-{index}.log"));
        let mut cmd = support::cmd();
        cmd.args(&args).current_dir(&workdir).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        for e in env {
            if let Some(v) = e["value"].as_str() {
                cmd.env(e["name"].as_str().unwrap(), v);
            }
        }
        // The token Secret's file where the pod would have it mounted.
        cmd.env("FLOTILLA_TOKEN_FILE", admin_token_file());
        // The Secret's files: this test's TLS folder.
        cmd.env("FLOTILLA_COORDINATOR", &url)
            .env("FLOTILLA_TLS_DIR", tls_dir())
            .env("FLOTILLA_SUBMISSION_ID", "0b5c6a1e-uid-of-the-kubernetes-job")
            .env("JOB_COMPLETION_INDEX", index.to_string());
        pods.push((index, Proc { child: cmd.spawn().unwrap(), log }));
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for (index, pod) in &mut pods {
        let status = loop {
            if let Some(s) = pod.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "pod {index} did not finish: {}", pod.log_text());
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = pod.log_text();
        assert!(status.success(), "pod {index}: {status}: {log}");
        assert!(log.contains("job submitted (or found submitted) job=pods-1"), "{log}");
        assert!(log.contains(&format!("rank_hint={index} from=\"JOB_COMPLETION_INDEX\"")), "{log}");
        assert!(log.contains(&format!("starting train loop job=pods-1 gen=1 rank={index} world=2")), "{log}");
    }
    assert!(workdir.join("runs/pods-1/final/model.safetensors").exists());
    runtime().block_on(async {
        let mut c = client(&url).await;
        let jobs = c.list_jobs(flotilla::proto::v1::ListJobsRequest {}).await.unwrap().into_inner().jobs;
        assert_eq!(jobs.len(), 1, "two pods, one job: {jobs:#?}");
    });
}

/// The optional Prometheus Operator component: with the base, its
/// ServiceMonitor selects the coordinator's peers Service (one endpoint
/// per replica) and scrapes it over TLS with a read token, and its
/// PodMonitor selects the rendered worker pods' metrics port. (The
/// Operator's kinds are not Kubernetes's own: they are not validated.)
#[test]
fn the_prometheus_component_scrapes_every_replica_and_worker() {
    let dir = tempfile::tempdir().unwrap();
    let up = "../".repeat(dir.path().components().count() - 1);
    let repo_rel = format!("{up}{}", repo().display().to_string().trim_start_matches('/'));
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {repo_rel}/deploy/kubernetes/base\ncomponents:\n  - {repo_rel}/deploy/kubernetes/components/prometheus\n"
        ),
    )
    .unwrap();
    let out = Command::new(tool("kubectl")).arg("kustomize").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    let sm = find(&docs, "ServiceMonitor", "flotilla-coordinator");
    let peers = find(&docs, "Service", "flotilla-coordinator-peers");
    assert_eq!(sm["metadata"]["namespace"], peers["metadata"]["namespace"]);
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&peers["metadata"]["labels"][k], v, "the ServiceMonitor selects the peers Service");
    }
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], peers["spec"]["ports"][0]["name"]);
    assert_eq!((&endpoint["scheme"], &endpoint["path"]), (&"https".into(), &"/metrics".into()));
    assert_eq!(endpoint["tlsConfig"]["cert"]["secret"]["name"], flotilla::deploy::k8s::TLS_SECRET);
    assert_eq!(endpoint["authorization"]["credentials"]["name"], "flotilla-metrics-token");

    let pm = find(&docs, "PodMonitor", "flotilla-worker");
    let job = job_file(dir.path(), "job", POD_JOB);
    let workers = documents(&render(dir.path(), &[job.to_str().unwrap()]));
    let kjob = find(&workers, "Job", "flotilla-pods");
    assert_eq!(kjob["metadata"]["namespace"], pm["metadata"]["namespace"], "pods in the PodMonitor's namespace");
    let pod = &kjob["spec"]["template"];
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "the PodMonitor selects the worker pods");
    }
    let port = &pm["spec"]["podMetricsEndpoints"][0]["port"];
    assert!(pod["spec"]["containers"][0]["ports"].as_array().unwrap().iter().any(|p| &p["name"] == port));
}
