//! `flotilla k8s render`: a job's workers on Kubernetes, as a ConfigMap with
//! the job file and an Indexed Job with one pod per worker. Every pod runs
//! `flotilla worker --submit`: the first to reach the coordinator submits the
//! job (the Job's uid is the submission id, so there is one job however many
//! pods submit and however often they restart), each serves it with its
//! completion index as rank hint, and all exit 0 once it has succeeded.

use flotilla_jobspec::JobSpec;

use super::yaml::{self, map, strs, Node};
use super::{bad, data_paths, is_dns_label, is_object_store, world_size, RenderError, EXIT_PREEMPTED, IMAGE_BINARY};

/// The port workers listen on for their peers' collectives.
pub const DATA_PORT: u16 = 29500;
/// The port workers serve Prometheus metrics on (`--metrics-addr`), which
/// the pods' `prometheus.io/*` annotations name.
pub const METRICS_PORT: u16 = 9464;
/// Where the ConfigMap's job file is mounted in a worker pod.
pub const JOB_FILE: &str = "/etc/flotilla/job.yaml";
/// The workers' working directory: relative paths of the job resolve here.
pub const WORKDIR: &str = "/work";
/// What the ServiceAccount of `deploy/kubernetes/base` is called.
pub const WORKER_SERVICE_ACCOUNT: &str = "flotilla-worker";
/// Seconds Kubernetes waits after SIGTERM beyond the worker's preemption grace.
pub const GRACE_MARGIN_S: u64 = 30;
/// The pod label Kubernetes sets to the uid of the Job that owns a pod.
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// The Secret holding the cluster's TLS folder (`flotilla certs init`),
/// shared with the coordinator's StatefulSet.
pub const TLS_SECRET: &str = "flotilla-tls";
/// Where a pod finds it (`FLOTILLA_TLS_DIR`).
pub const TLS_DIR: &str = "/var/run/flotilla/tls";

/// Which managed Kubernetes the workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// Any cluster: no cloud-specific node pools or metadata.
    None,
    /// Amazon EKS: spot capacity by `eks.amazonaws.com/capacityType`, the
    /// spot interruption notice from the instance metadata (IMDSv2).
    Eks,
    /// Google GKE: Spot VMs by `cloud.google.com/gke-spot`, the preempted
    /// flag from the metadata server.
    Gke,
}

/// What `flotilla k8s render` is told besides the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sOptions {
    /// The worker image (see `deploy/docker/`).
    pub image: String,
    pub namespace: String,
    /// The coordinator replicas' URLs, comma-separated.
    pub coordinator: String,
    pub cloud: Cloud,
    /// Schedule on spot/preemptible nodes (EKS and GKE only).
    pub spot: bool,
    /// GPUs per worker pod (`nvidia.com/gpu`): 1, or 0 for CPU workers (a
    /// worker computes on one GPU).
    pub gpus: u32,
    /// CPU and memory requested per worker pod.
    pub cpu: String,
    pub memory: String,
    /// Seconds a preempted worker waits for its checkpoint before leaving.
    pub preemption_grace_s: u64,
    /// A Secret whose keys become the workers' environment (object-store
    /// credentials: AWS_*, GOOGLE_*, AZURE_*).
    pub credentials_secret: Option<String>,
    pub service_account: String,
    /// A ReadWriteMany PersistentVolumeClaim mounted as the working
    /// directory, shared by all workers (for local checkpoint paths).
    pub workdir_claim: Option<String>,
    /// The Kubernetes Job's name (default `flotilla-<job name>`).
    pub job_name: Option<String>,
    /// The Secret holding the API token the workers use (key `token`),
    /// mounted read-only at [`TOKEN_DIR`]. The workers submit the job as
    /// well as run it, so the token needs the admin role (default: the
    /// base's admin token Secret).
    pub token_secret: String,
}

/// The Secret of `deploy/kubernetes/base` holding the admin token.
pub const ADMIN_TOKEN_SECRET: &str = "flotilla-admin-token";
/// Where a worker pod finds its API token Secret.
pub const TOKEN_DIR: &str = "/var/run/secrets/flotilla/token";

/// The coordinator of `deploy/kubernetes/base`: its three StatefulSet
/// replicas through their headless Service.
pub fn default_coordinator() -> String {
    (0..3)
        .map(|i| format!("http://flotilla-coordinator-{i}.flotilla-coordinator-peers:7070"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Default for K8sOptions {
    fn default() -> Self {
        K8sOptions {
            image: format!("flotilla:{}-cuda", env!("CARGO_PKG_VERSION")),
            namespace: "flotilla".into(),
            coordinator: default_coordinator(),
            cloud: Cloud::None,
            spot: true,
            gpus: 1,
            cpu: "4".into(),
            memory: "16Gi".into(),
            preemption_grace_s: 60,
            credentials_secret: None,
            service_account: WORKER_SERVICE_ACCOUNT.into(),
            workdir_claim: None,
            job_name: None,
            token_secret: ADMIN_TOKEN_SECRET.into(),
        }
    }
}

/// The manifests, and what the user should know about them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub manifests: String,
    pub warnings: Vec<String>,
}

/// Longest Job name: its pods are named `<job>-<index>-<5 random>` and
/// hostnames stop at 63 characters.
pub const MAX_JOB_NAME: usize = 52;

/// Renders the ConfigMap and the Indexed Job of `spec`, whose file text is
/// `job_yaml`.
pub fn render(spec: &JobSpec, job_yaml: &str, opts: &K8sOptions) -> Result<Rendered, RenderError> {
    let name = opts.job_name.clone().unwrap_or_else(|| format!("flotilla-{}", spec.name));
    if !is_dns_label(&name, MAX_JOB_NAME) {
        return Err(bad(
            "--job-name",
            &name,
            format!("a Kubernetes Job name is lowercase letters, digits and '-', at most {MAX_JOB_NAME} characters; give a shorter --job-name"),
        ));
    }
    if !is_dns_label(&opts.namespace, 63) {
        return Err(bad("--namespace", &opts.namespace, "not a DNS label"));
    }
    if opts.image.trim().is_empty() || opts.image.contains(char::is_whitespace) {
        return Err(bad("--image", &opts.image, "an image reference has no spaces"));
    }
    if opts.coordinator.split(',').all(|a| a.trim().is_empty()) {
        return Err(bad("--coordinator", &opts.coordinator, "no address"));
    }
    for (option, value) in [("--cpu", &opts.cpu), ("--memory", &opts.memory)] {
        if !is_quantity(value) {
            return Err(bad(option, value, "not a Kubernetes quantity (like 4, 500m, 16Gi)"));
        }
    }
    if !is_dns_label(&opts.token_secret, 253) {
        return Err(bad("--token-secret", &opts.token_secret, "not a Kubernetes object name"));
    }
    for (option, value) in
        [("--credentials-secret", &opts.credentials_secret), ("--workdir-claim", &opts.workdir_claim)]
    {
        if let Some(v) = value {
            if !is_dns_label(v, 253) {
                return Err(bad(option, v, "not a Kubernetes object name"));
            }
        }
    }
    if !is_dns_label(&opts.service_account, 253) {
        return Err(bad("--service-account", &opts.service_account, "not a Kubernetes object name"));
    }
    if opts.gpus > 1 {
        return Err(bad(
            "--gpus",
            &opts.gpus.to_string(),
            "a worker computes on one GPU: render pods of one GPU each (--gpus 1) and give the job more workers",
        ));
    }

    let mut warnings = Vec::new();
    if opts.workdir_claim.is_none() {
        if !is_object_store(&spec.checkpoint.url) {
            warnings.push(format!(
                "checkpoint.url `{}` is a path: each pod would write its shards to its own disk, which is lost with the pod; \
                 use s3://, gs:// or az://, or share a ReadWriteMany volume with --workdir-claim",
                spec.checkpoint.url
            ));
        }
        for p in data_paths(spec) {
            if !p.starts_with('/') && !is_object_store(p) {
                warnings.push(format!(
                    "data.path `{p}` resolves against {WORKDIR} in the pods, an empty directory without --workdir-claim"
                ));
            }
        }
    }
    let labels = |component: &str| {
        map([
            ("app.kubernetes.io/name", "flotilla".into()),
            ("app.kubernetes.io/component", component.into()),
            ("app.kubernetes.io/instance", name.clone().into()),
        ])
    };
    let config_name = format!("{name}-job");
    let config = map([
        ("apiVersion", "v1".into()),
        ("kind", "ConfigMap".into()),
        (
            "metadata",
            map([
                ("name", config_name.clone().into()),
                ("namespace", opts.namespace.clone().into()),
                ("labels", labels("job-file")),
            ]),
        ),
        ("data", map([("job.yaml", Node::Block(job_yaml.to_string()))])),
    ]);

    let world = world_size(spec);
    let job = map([
        ("apiVersion", "batch/v1".into()),
        ("kind", "Job".into()),
        (
            "metadata",
            map([
                ("name", name.clone().into()),
                ("namespace", opts.namespace.clone().into()),
                ("labels", labels("worker")),
            ]),
        ),
        (
            "spec",
            map([
                ("completionMode", "Indexed".into()),
                ("completions", world.into()),
                ("parallelism", world.into()),
                // Pods lost for other reasons than a disruption are replaced
                // up to this many times in all.
                ("backoffLimit", (4 * world).into()),
                ("podFailurePolicy", pod_failure_policy()),
                (
                    "template",
                    map([
                        ("metadata", map([("labels", labels("worker")), ("annotations", scrape_annotations())])),
                        ("spec", pod_spec(&config_name, opts)),
                    ]),
                ),
            ]),
        ),
    ]);
    Ok(Rendered { manifests: yaml::documents(&[config, job]), warnings })
}

/// The annotations that Prometheus's usual Kubernetes scrape config reads:
/// scrape this pod's `/metrics` on the metrics port.
fn scrape_annotations() -> Node {
    map([
        ("prometheus.io/scrape", "true".into()),
        ("prometheus.io/port", METRICS_PORT.to_string().into()),
        ("prometheus.io/path", "/metrics".into()),
    ])
}

/// A disrupted pod (node drained, spot reclaimed, evicted) is replaced
/// without counting against `backoffLimit`; a worker that says the training
/// job failed (exit 1) or that its job file is bad (exit 2) fails the Job at
/// once; a worker that left on a preemption notice (exit 75) is replaced.
fn pod_failure_policy() -> Node {
    map([(
        "rules",
        Node::List(vec![
            map([
                ("action", "Ignore".into()),
                (
                    "onPodConditions",
                    Node::List(vec![map([("type", "DisruptionTarget".into()), ("status", "True".into())])]),
                ),
            ]),
            map([
                ("action", "FailJob".into()),
                (
                    "onExitCodes",
                    map([
                        ("containerName", "worker".into()),
                        ("operator", "In".into()),
                        ("values", Node::List(vec![1u32.into(), 2u32.into()])),
                    ]),
                ),
            ]),
            map([
                ("action", "Count".into()),
                (
                    "onExitCodes",
                    map([
                        ("containerName", "worker".into()),
                        ("operator", "In".into()),
                        ("values", Node::List(vec![(EXIT_PREEMPTED as u32).into()])),
                    ]),
                ),
            ]),
        ]),
    )])
}

/// The worker's command line in a pod.
pub fn worker_command(opts: &K8sOptions) -> Vec<String> {
    let mut cmd: Vec<String> = [
        IMAGE_BINARY,
        "worker",
        "--submit",
        JOB_FILE,
        "--data-addr",
        &format!("0.0.0.0:{DATA_PORT}"),
        "--advertise-host",
        "$(POD_IP)",
        "--metrics-addr",
        &format!("0.0.0.0:{METRICS_PORT}"),
        "--preemption-grace-s",
        &opts.preemption_grace_s.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if opts.gpus > 0 {
        // The one GPU the device plugin gave the pod.
        cmd.extend(["--gpu".into(), "0".into()]);
    }
    match opts.cloud {
        Cloud::Eks => cmd.extend(["--aws-metadata-url".into(), "http://169.254.169.254".into()]),
        Cloud::Gke => cmd.extend(["--gce-metadata-url".into(), "http://metadata.google.internal".into()]),
        Cloud::None => {}
    }
    cmd
}

fn env_value(name: &str, value: &str) -> Node {
    map([("name", name.into()), ("value", value.into())])
}

fn env_field(name: &str, field: &str) -> Node {
    map([("name", name.into()), ("valueFrom", map([("fieldRef", map([("fieldPath", field.into())]))]))])
}

fn pod_spec(config_name: &str, opts: &K8sOptions) -> Node {
    let env = Node::List(vec![
        env_value("FLOTILLA_COORDINATOR", &opts.coordinator),
        // Every pod of one Job submits with the same id: one training job.
        env_field("FLOTILLA_SUBMISSION_ID", &format!("metadata.labels['{CONTROLLER_UID_LABEL}']")),
        env_field("POD_IP", "status.podIP"),
        env_value("FLOTILLA_LOG", "info"),
        env_value(flotilla_proto::auth::TOKEN_FILE_ENV, &format!("{TOKEN_DIR}/token")),
        env_value("FLOTILLA_TLS_DIR", TLS_DIR),
    ]);
    let mut requests = map([("cpu", opts.cpu.clone().into()), ("memory", opts.memory.clone().into())]);
    let mut resources = map([]);
    if opts.gpus > 0 {
        requests.push("nvidia.com/gpu", opts.gpus.into());
        resources.push("limits", map([("nvidia.com/gpu", opts.gpus.into())]));
    }
    resources.push("requests", requests);

    let mut mounts = vec![
        map([("name", "job".into()), ("mountPath", "/etc/flotilla".into()), ("readOnly", true.into())]),
        map([("name", "work".into()), ("mountPath", WORKDIR.into())]),
        map([("name", "token".into()), ("mountPath", TOKEN_DIR.into()), ("readOnly", true.into())]),
        map([("name", "tls".into()), ("mountPath", TLS_DIR.into()), ("readOnly", true.into())]),
    ];
    let work = match &opts.workdir_claim {
        Some(claim) => map([("name", "work".into()), ("persistentVolumeClaim", map([("claimName", claim.into())]))]),
        None => map([("name", "work".into()), ("emptyDir", map([]))]),
    };
    // A worker needs the CA and the client certificate, not the replicas' key.
    let items = ["ca.pem", "client.pem", "client.key"].map(|f| map([("key", f.into()), ("path", f.into())]));
    let tls = map([
        ("secretName", TLS_SECRET.into()),
        ("items", Node::List(items.to_vec())),
        ("defaultMode", 0o400u32.into()),
    ]);
    let token = map([
        ("name", "token".into()),
        ("secret", map([("secretName", opts.token_secret.clone().into()), ("defaultMode", 0o400u32.into())])),
    ]);
    let mut volumes = vec![
        map([("name", "job".into()), ("configMap", map([("name", config_name.into())]))]),
        work,
        token,
        map([("name", "tls".into()), ("secret", tls)]),
    ];
    if opts.gpus > 0 {
        // NCCL uses shared memory between processes; the default /dev/shm is 64 MiB.
        mounts.push(map([("name", "dshm".into()), ("mountPath", "/dev/shm".into())]));
        volumes.push(map([("name", "dshm".into()), ("emptyDir", map([("medium", "Memory".into())]))]));
    }

    let mut container = map([
        ("name", "worker".into()),
        ("image", opts.image.clone().into()),
        ("command", strs(&worker_command(opts))),
        ("workingDir", WORKDIR.into()),
        ("env", env),
    ]);
    if let Some(secret) = &opts.credentials_secret {
        container.push("envFrom", Node::List(vec![map([("secretRef", map([("name", secret.into())]))])]));
    }
    container.push(
        "ports",
        Node::List(vec![
            map([("name", "collectives".into()), ("containerPort", u32::from(DATA_PORT).into())]),
            map([("name", "metrics".into()), ("containerPort", u32::from(METRICS_PORT).into())]),
        ]),
    );
    container.push("resources", resources);
    container.push("volumeMounts", Node::List(mounts));

    let mut pod = map([
        ("restartPolicy", "Never".into()),
        ("serviceAccountName", opts.service_account.clone().into()),
        // SIGTERM is a preemption notice: room for the checkpoint, then some.
        ("terminationGracePeriodSeconds", (opts.preemption_grace_s + GRACE_MARGIN_S).into()),
    ]);
    let (selector, mut tolerations) = spot_placement(opts);
    if opts.gpus > 0 {
        tolerations.push(map([
            ("key", "nvidia.com/gpu".into()),
            ("operator", "Exists".into()),
            ("effect", "NoSchedule".into()),
        ]));
    }
    if let Some(selector) = selector {
        pod.push("nodeSelector", selector);
    }
    if !tolerations.is_empty() {
        pod.push("tolerations", Node::List(tolerations));
    }
    pod.push("containers", Node::List(vec![container]));
    pod.push("volumes", Node::List(volumes));
    pod
}

/// The node selector and tolerations of a spot/preemptible node pool.
fn spot_placement(opts: &K8sOptions) -> (Option<Node>, Vec<Node>) {
    if !opts.spot {
        return (None, Vec::new());
    }
    let (key, value) = match opts.cloud {
        Cloud::Eks => ("eks.amazonaws.com/capacityType", "SPOT"),
        Cloud::Gke => ("cloud.google.com/gke-spot", "true"),
        Cloud::None => return (None, Vec::new()),
    };
    let toleration = map([
        ("key", key.into()),
        ("operator", "Equal".into()),
        ("value", value.into()),
        ("effect", "NoSchedule".into()),
    ]);
    (Some(map([(key, value.into())])), vec![toleration])
}

/// A Kubernetes resource quantity, loosely: digits with an optional
/// fraction and suffix.
pub(crate) fn is_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|c| *c == '.').count() <= 1
        && ["", "m", "k", "M", "G", "T", "P", "Ki", "Mi", "Gi", "Ti", "Pi"].contains(&suffix)
}
