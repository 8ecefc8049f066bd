//! What a worker learns from the launcher that started it: the rank it
//! should ask for (Slurm's `SLURM_PROCID`, a Kubernetes Indexed Job's
//! `JOB_COMPLETION_INDEX`) and, under Slurm, a submission id shared by every
//! task of one allocation (`slurm-$SLURM_JOB_ID`).

/// Hints read from a launcher's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchEnv {
    /// The rank to ask for, and the variable it came from.
    pub rank_hint: Option<(u32, &'static str)>,
    /// The same for every worker of one Slurm job.
    pub submission_id: Option<String>,
}

/// Variables that carry a rank hint, in order of preference.
pub const RANK_VARS: [&str; 2] = ["SLURM_PROCID", "JOB_COMPLETION_INDEX"];

/// Reads the hints through `get` (`std::env::var` in the binary). A
/// variable that is not a non-negative integer is ignored.
pub fn read(get: impl Fn(&str) -> Option<String>) -> LaunchEnv {
    let rank_hint = RANK_VARS.iter().find_map(|v| get(v).and_then(|s| s.trim().parse::<u32>().ok()).map(|r| (r, *v)));
    let submission_id =
        get("SLURM_JOB_ID").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).map(|id| format!("slurm-{id}"));
    LaunchEnv { rank_hint, submission_id }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> LaunchEnv {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        read(|k| vars.get(k).cloned())
    }

    #[test]
    fn slurm_tasks_hint_their_task_id_and_share_a_submission() {
        let e = env(&[("SLURM_PROCID", "3"), ("SLURM_JOB_ID", "812"), ("SLURM_NTASKS", "4")]);
        assert_eq!(e.rank_hint, Some((3, "SLURM_PROCID")));
        assert_eq!(e.submission_id.as_deref(), Some("slurm-812"));
    }

    #[test]
    fn indexed_job_pods_hint_their_index() {
        let e = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert_eq!(e.rank_hint, Some((1, "JOB_COMPLETION_INDEX")));
        assert_eq!(e.submission_id, None);
    }

    #[test]
    fn no_launcher_no_hints_and_garbage_is_ignored() {
        assert_eq!(env(&[]), LaunchEnv::default());
        assert_eq!(env(&[("SLURM_PROCID", "x"), ("JOB_COMPLETION_INDEX", "-1")]).rank_hint, None);
        assert_eq!(
            env(&[("SLURM_PROCID", "x"), ("JOB_COMPLETION_INDEX", "2")]).rank_hint,
            Some((2, "JOB_COMPLETION_INDEX"))
        );
    }
}
