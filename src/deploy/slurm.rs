//! `flotilla slurm render`: a job as an sbatch script. One task per worker
//! (per GPU with `--gpus-per-node`), each `srun flotilla worker --submit`;
//! the coordinator runs in the batch step on the allocation's first node
//! unless an existing one is named. `--signal=USR1@<lead>` and
//! `scancel --signal=USR1` reach the job steps, that is the workers, which
//! checkpoint the job and leave; the batch step (and so the coordinator)
//! does not get the signal.

use flotilla_jobspec::JobSpec;

use super::{bad, shell_quote, world_size, RenderError};

/// What `flotilla slurm render` is told besides the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmOptions {
    /// The job file as the tasks will read it (an absolute path on a shared
    /// filesystem, as rendered by the CLI).
    pub job_file: String,
    /// The flotilla binary on the nodes.
    pub flotilla: String,
    /// An existing coordinator (its replicas' URLs, comma-separated); none:
    /// start one in the batch step.
    pub coordinator: Option<String>,
    /// How the workers reach the started coordinator (default: the first
    /// node's hostname, `$(hostname)` in the batch step).
    pub coordinator_host: Option<String>,
    pub coordinator_port: u16,
    /// Where the started coordinator keeps its log, one folder per Slurm job
    /// (`<dir>/<SLURM_JOB_ID>`); relative to the submission directory.
    pub coordinator_dir: String,
    /// GPUs per node: one task per GPU, `--gpus-per-task=1`. 0: no GPUs.
    pub gpus_per_node: u32,
    pub cpus_per_task: Option<u32>,
    /// `--time`, e.g. `4:00:00`.
    pub time: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Seconds a preempted worker waits for its checkpoint before leaving.
    pub preemption_grace_s: u64,
    /// Seconds before the time limit that Slurm sends USR1 (default: the
    /// grace plus 30).
    pub signal_lead_s: Option<u64>,
    /// The API token file the tasks read (a shared path). Default with a
    /// started coordinator: the admin token file it writes in its folder.
    pub token_file: Option<String>,
}

impl Default for SlurmOptions {
    fn default() -> Self {
        SlurmOptions {
            job_file: "job.yaml".into(),
            flotilla: "flotilla".into(),
            coordinator: None,
            coordinator_host: None,
            coordinator_port: 7070,
            coordinator_dir: "flotilla-coordinator".into(),
            gpus_per_node: 0,
            cpus_per_task: None,
            time: None,
            partition: None,
            account: None,
            preemption_grace_s: 60,
            signal_lead_s: None,
            token_file: None,
        }
    }
}

/// Characters Slurm option values may hold here (they go on `#SBATCH` lines,
/// which no shell reads).
fn sbatch_safe(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:,=@+/".contains(c))
}

/// Renders the sbatch script for `spec`.
pub fn render(spec: &JobSpec, opts: &SlurmOptions) -> Result<String, RenderError> {
    for (option, value) in [("--time", &opts.time), ("--partition", &opts.partition), ("--account", &opts.account)] {
        if let Some(v) = value {
            if !sbatch_safe(v) {
                return Err(bad(option, v, "letters, digits and -_.:,=@+/ only"));
            }
        }
    }
    if let Some(c) = &opts.coordinator {
        if c.split(',').all(|a| a.trim().is_empty()) || !sbatch_safe(c) {
            return Err(bad("--coordinator", c, "comma-separated URLs like http://10.0.0.1:7070"));
        }
    }
    if let Some(h) = &opts.coordinator_host {
        if !sbatch_safe(h) {
            return Err(bad("--coordinator-host", h, "a hostname or an IP address"));
        }
    }
    if opts.coordinator.is_some() && opts.token_file.is_none() {
        return Err(bad(
            "--node-token-file",
            "",
            "with --coordinator, the path of an API token file the nodes can read (`flotilla token create \
             --role admin --name slurm --out FILE`)",
        ));
    }
    if opts.coordinator_port == 0 {
        return Err(bad("--coordinator-port", "0", "a port from 1 to 65535"));
    }
    let lead = opts.signal_lead_s.unwrap_or(opts.preemption_grace_s + 30);
    if lead == 0 || lead > 65535 {
        return Err(bad("--signal-lead-s", &lead.to_string(), "1 to 65535 seconds"));
    }
    let n = world_size(spec);
    let mut s = String::new();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line("#!/bin/bash");
    line(&format!(
        "# flotilla job `{}` on Slurm, rendered by `flotilla slurm render`: submit it with sbatch.",
        spec.name
    ));
    line(&format!("# {n} tasks, each one `flotilla worker`; USR1 (sent {lead} s before the time limit, or by"));
    line("# `scancel --signal=USR1 JOBID`) makes every worker checkpoint the job and leave.");
    line(&format!("#SBATCH --job-name=flotilla-{}", spec.name));
    if opts.gpus_per_node > 0 {
        let per_node = opts.gpus_per_node as usize;
        line(&format!("#SBATCH --nodes={}", n.div_ceil(per_node)));
        line(&format!("#SBATCH --ntasks={n}"));
        line(&format!("#SBATCH --ntasks-per-node={}", per_node.min(n)));
        line("#SBATCH --gpus-per-task=1");
        // Each task sees its own GPU; a task that sees them all takes
        // the one of its SLURM_LOCALID (flotilla worker --gpu).
        line("#SBATCH --gpu-bind=per_task:1");
    } else {
        line(&format!("#SBATCH --ntasks={n}"));
    }
    if let Some(c) = opts.cpus_per_task {
        line(&format!("#SBATCH --cpus-per-task={c}"));
    }
    if let Some(t) = &opts.time {
        line(&format!("#SBATCH --time={t}"));
    }
    if let Some(p) = &opts.partition {
        line(&format!("#SBATCH --partition={p}"));
    }
    if let Some(a) = &opts.account {
        line(&format!("#SBATCH --account={a}"));
    }
    // No `B:`: the signal goes to the job steps (the workers), not to the
    // batch step that holds the coordinator.
    line(&format!("#SBATCH --signal=USR1@{lead}"));
    line("#SBATCH --output=flotilla-%x-%j.out");
    line("");
    line("set -u");
    line(&format!("flotilla={}", shell_quote(&opts.flotilla)));
    line(&format!("job_file={}", shell_quote(&opts.job_file)));
    line("# USR1 is for the workers; this script only notes it if it gets it too.");
    line("trap 'echo \"flotilla: USR1 received; the workers checkpoint and leave\" >&2' USR1");
    line("");
    match &opts.coordinator {
        Some(url) => {
            line(&format!("export FLOTILLA_COORDINATOR={}", shell_quote(url)));
            line("# TLS: FLOTILLA_TLS_DIR (exported when sbatch runs) names the coordinator's TLS folder.");
        }
        None => {
            let host = match &opts.coordinator_host {
                Some(h) => shell_quote(h),
                None => "\"$(hostname)\"".into(),
            };
            line("# The coordinator: in the batch step, on the allocation's first node, with");
            line("# USR1 ignored. Its Raft log is kept per Slurm job, so a requeued job");
            line("# (same job id) goes on from its last committed checkpoint.");
            line(&format!("coordinator_host={host}"));
            line(&format!("coordinator_port={}", opts.coordinator_port));
            line(&format!("coordinator_dir={}/\"$SLURM_JOB_ID\"", shell_quote(&opts.coordinator_dir)));
            line("mkdir -p \"$coordinator_dir\"");
            line("# It writes its admin token (mode 0600) into its folder; the tasks read it there.");
            line("(trap '' USR1; exec \"$flotilla\" coordinator --listen \"0.0.0.0:$coordinator_port\" \\");
            line("    --advertise \"http://$coordinator_host:$coordinator_port\" --data-dir \"$coordinator_dir/data\" \\");
            line("    --admin-token-file \"$coordinator_dir/admin.token\") \\");
            line("    >\"$coordinator_dir/coordinator.out\" 2>\"$coordinator_dir/coordinator.log\" &");
            line("coordinator_pid=$!");
            line("trap 'kill \"$coordinator_pid\" 2>/dev/null; wait \"$coordinator_pid\" 2>/dev/null' EXIT");
            line("export FLOTILLA_COORDINATOR=\"http://$coordinator_host:$coordinator_port\"");
            line("for _ in $(seq 600); do");
            line("  grep -q '^coordinator listening on' \"$coordinator_dir/coordinator.out\" 2>/dev/null && break");
            line("  if ! kill -0 \"$coordinator_pid\" 2>/dev/null; then");
            line("    echo \"flotilla: the coordinator did not start; see $coordinator_dir/coordinator.log\" >&2");
            line("    exit 1");
            line("  fi");
            line("  sleep 0.1");
            line("done");
            line("# TLS: the workers use the folder FLOTILLA_TLS_DIR names, else the one the");
            line("# coordinator made in its data directory (on the shared file system).");
            line("export FLOTILLA_TLS_DIR=\"${FLOTILLA_TLS_DIR:-$coordinator_dir/data/tls}\"");
        }
    }
    match &opts.token_file {
        Some(file) => line(&format!("export FLOTILLA_TOKEN_FILE={}", shell_quote(file))),
        None => line("export FLOTILLA_TOKEN_FILE=\"$coordinator_dir/admin.token\""),
    }
    line("");
    line("# One worker per task. Each asks for rank $SLURM_PROCID; all submit the job with");
    line("# one submission id, so it is created once. A worker exits 0 when the job");
    line(&format!("# succeeds, 1 if it fails, {} if it left on USR1 after the checkpoint.", super::EXIT_PREEMPTED));
    line("srun --kill-on-bad-exit=0 --label \"$flotilla\" worker --submit \"$job_file\" --submission-id \"slurm-$SLURM_JOB_ID\" \\");
    line(&format!("    --preemption-signal USR1 --preemption-grace-s {}", opts.preemption_grace_s));
    line("rc=$?");
    line("echo \"flotilla: workers finished (exit $rc)\" >&2");
    if opts.coordinator.is_none() {
        line("# A job with a registry is done when its model is handed over: keep this");
        line("# coordinator until then (exit 3: trained, not registered).");
        line("if [ \"$rc\" = 0 ]; then");
        line("  \"$flotilla\" submit \"$job_file\" --submission-id \"slurm-$SLURM_JOB_ID\" --wait >&2");
        line("  rc=$?");
        line("fi");
    }
    line("exit $rc");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workers: &str) -> JobSpec {
        let text = format!(
            "name: tiny\nmodel: {{kind: mlp, layers: [4, 8, 2]}}\ndata: {{kind: synthetic}}\ntrain: {{steps: 10, global_batch: 8}}\nworkers: {workers}\n"
        );
        flotilla_jobspec::parse(&text, "job.yaml").unwrap()
    }

    fn directives(script: &str) -> Vec<&str> {
        script.lines().filter_map(|l| l.strip_prefix("#SBATCH ")).collect()
    }

    #[test]
    fn one_task_per_worker_and_usr1_before_the_time_limit() {
        let opts = SlurmOptions { time: Some("1:00:00".into()), preemption_grace_s: 90, ..SlurmOptions::default() };
        let s = render(&spec("{min: 1, max: 3}"), &opts).unwrap();
        assert_eq!(
            directives(&s),
            [
                "--job-name=flotilla-tiny",
                "--ntasks=3",
                "--time=1:00:00",
                "--signal=USR1@120",
                "--output=flotilla-%x-%j.out"
            ]
        );
        assert!(s.contains("--preemption-signal USR1 --preemption-grace-s 90\n"), "{s}");
        assert!(s.contains("srun --kill-on-bad-exit=0 --label \"$flotilla\" worker --submit \"$job_file\""), "{s}");
        assert!(s.contains("(trap '' USR1; exec \"$flotilla\" coordinator"), "{s}");
        assert!(s.contains("coordinator_host=\"$(hostname)\"\n"), "{s}");
    }

    #[test]
    fn gpus_spread_tasks_over_nodes() {
        let opts = SlurmOptions { gpus_per_node: 4, ..SlurmOptions::default() };
        let s = render(&spec("{min: 2, max: 6}"), &opts).unwrap();
        let d = directives(&s);
        for want in ["--nodes=2", "--ntasks=6", "--ntasks-per-node=4", "--gpus-per-task=1", "--gpu-bind=per_task:1"] {
            assert!(d.contains(&want), "{want}: {d:?}");
        }
    }

    /// The GPU each of a node's four tasks computes on, as the worker picks
    /// it from what Slurm gives the task: its SLURM_LOCALID and either its
    /// own GPU alone (bound: CUDA_VISIBLE_DEVICES names one) or all of
    /// them (unbound). Returns physical GPU numbers.
    fn node_gpus(bound: bool) -> Vec<usize> {
        (0..4)
            .map(|task: usize| {
                let id = task.to_string();
                let env = |k: &str| (k == "SLURM_LOCALID").then(|| id.clone());
                let visible: Vec<usize> = if bound { vec![task] } else { (0..4).collect() };
                let (index, _) = flotilla_trainer::device::pick_gpu(None, env, visible.len()).unwrap().unwrap();
                visible[index]
            })
            .collect()
    }

    #[test]
    fn each_task_of_a_gpu_node_picks_its_own_gpu() {
        let opts = SlurmOptions { gpus_per_node: 4, ..SlurmOptions::default() };
        let s = render(&spec("{min: 4, max: 4}"), &opts).unwrap();
        // The tasks' workers take no --gpu: they pick from Slurm's variables.
        assert!(!s.contains("--gpu "), "{s}");
        assert_eq!(node_gpus(true), [0, 1, 2, 3], "bound to a GPU each");
        assert_eq!(node_gpus(false), [0, 1, 2, 3], "seeing every GPU of the node");
    }

    #[test]
    fn an_existing_coordinator_is_used_as_is() {
        let opts = SlurmOptions {
            coordinator: Some("http://10.0.0.1:7070,http://10.0.0.2:7070".into()),
            token_file: Some("/shared/secrets/flotilla token".into()),
            ..SlurmOptions::default()
        };
        let s = render(&spec("{min: 1, max: 2}"), &opts).unwrap();
        assert!(s.contains("export FLOTILLA_COORDINATOR=http://10.0.0.1:7070,http://10.0.0.2:7070\n"), "{s}");
        assert!(s.contains("export FLOTILLA_TOKEN_FILE='/shared/secrets/flotilla token'\n"), "{s}");
        assert!(!s.contains("coordinator --listen"), "{s}");
        let without = SlurmOptions { token_file: None, ..opts };
        let e = render(&spec("{min: 1, max: 2}"), &without).unwrap_err().to_string();
        assert!(e.starts_with("--node-token-file"), "{e}");
    }

    #[test]
    fn a_started_coordinator_writes_the_token_the_tasks_read() {
        let s = render(&spec("{min: 1, max: 2}"), &SlurmOptions::default()).unwrap();
        assert!(s.contains("--admin-token-file \"$coordinator_dir/admin.token\""), "{s}");
        let export = s.find("export FLOTILLA_TOKEN_FILE=\"$coordinator_dir/admin.token\"").expect("token exported");
        assert!(export < s.find("srun ").unwrap(), "the token must be exported before the tasks start:\n{s}");
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        let opts = SlurmOptions { job_file: "/shared/my jobs/a.yaml".into(), ..SlurmOptions::default() };
        let s = render(&spec("{min: 1, max: 1}"), &opts).unwrap();
        assert!(s.contains("job_file='/shared/my jobs/a.yaml'\n"), "{s}");
    }

    #[test]
    fn bad_options_are_named() {
        let opts = SlurmOptions { partition: Some("gpu; rm -rf /".into()), ..SlurmOptions::default() };
        assert!(render(&spec("{min: 1, max: 1}"), &opts).unwrap_err().to_string().starts_with("--partition"));
        let opts = SlurmOptions { signal_lead_s: Some(0), ..SlurmOptions::default() };
        assert!(render(&spec("{min: 1, max: 1}"), &opts).unwrap_err().to_string().starts_with("--signal-lead-s"));
    }
}
