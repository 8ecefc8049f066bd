//! The worker's GPU: which one it computes on (`flotilla worker --gpu`,
//! `LOCAL_RANK`, `SLURM_LOCALID`), what it is called, and how much of its
//! memory is in use. Indices count the devices libtorch sees, which are the
//! ones `CUDA_VISIBLE_DEVICES` leaves visible.

/// Where the GPU index came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSource {
    Flag,
    LocalRank,
    SlurmLocalId,
    /// The only (or first) visible GPU.
    Default,
}

impl GpuSource {
    pub fn name(self) -> &'static str {
        match self {
            GpuSource::Flag => "--gpu",
            GpuSource::LocalRank => "LOCAL_RANK",
            GpuSource::SlurmLocalId => "SLURM_LOCALID",
            GpuSource::Default => "the default",
        }
    }
}

/// The GPU a worker process computes on, among `visible` CUDA devices:
/// `flag` (`--gpu N`), else `LOCAL_RANK`, else `SLURM_LOCALID`, else 0.
/// A launcher that binds one GPU to each process (Slurm's
/// `--gpus-per-task=1`, a pod with one `nvidia.com/gpu`) leaves one device
/// visible: then a local rank from the environment means that device.
/// `None` when there is no GPU and none was asked for.
pub fn pick_gpu(
    flag: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
    visible: usize,
) -> Result<Option<(usize, GpuSource)>, String> {
    let from_env = |name: &str, source: GpuSource| -> Result<Option<(usize, GpuSource)>, String> {
        match env(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(|n| Some((n, source)))
                .map_err(|_| format!("{name}={v:?} is not a GPU index (a whole number)")),
        }
    };
    let picked = match flag {
        Some(n) => Some((n, GpuSource::Flag)),
        None => match from_env("LOCAL_RANK", GpuSource::LocalRank)? {
            Some(p) => Some(p),
            None => from_env("SLURM_LOCALID", GpuSource::SlurmLocalId)?,
        },
    };
    match (picked, visible) {
        (None, 0) => Ok(None),
        (Some((_, GpuSource::Flag)), 0) => {
            Err("--gpu was given but libtorch sees no CUDA device (no GPU, CUDA_VISIBLE_DEVICES empty, or a CPU build)"
                .into())
        }
        // A local rank on a machine without GPUs: a CPU worker.
        (Some(_), 0) => Ok(None),
        (None, _) => Ok(Some((0, GpuSource::Default))),
        (Some((_, source)), 1) if source != GpuSource::Flag => Ok(Some((0, source))),
        (Some((n, source)), v) if n < v => Ok(Some((n, source))),
        (Some((n, source)), v) => Err(format!(
            "{} {n} asks for GPU {n}, but only {v} are visible (indices 0..{}, within CUDA_VISIBLE_DEVICES)",
            source.name(),
            v - 1
        )),
    }
}

/// How a worker describes what it computes on: `cpu`, or `cuda:N (NAME)`.
pub fn describe(gpu: Option<usize>) -> String {
    match gpu {
        None => "cpu".into(),
        Some(g) => match cuda_name(g) {
            Some(name) => format!("cuda:{g} ({name})"),
            None => format!("cuda:{g}"),
        },
    }
}

/// The CUDA devices libtorch sees.
pub fn visible_gpus() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

/// Device `g`'s name, when the CUDA runtime can be asked.
#[cfg(feature = "cuda")]
pub fn cuda_name(g: usize) -> Option<String> {
    crate::nccl::available().ok()?;
    let prop = cudarc::runtime::result::device::get_device_prop(g as i32).ok()?;
    // SAFETY: the name is a NUL-terminated string inside the struct.
    let name = unsafe { std::ffi::CStr::from_ptr(prop.name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_name(_g: usize) -> Option<String> {
    None
}

/// Bytes in use on CUDA device `g` (the whole device, as the CUDA runtime
/// reports free against total: libtorch's cached blocks and every process
/// on it), when the runtime can be asked.
#[cfg(feature = "cuda")]
pub fn cuda_used(g: usize) -> Option<u64> {
    crate::nccl::available().ok()?;
    cudarc::runtime::result::device::set(g as i32).ok()?;
    let (free, total) = cudarc::runtime::result::mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_used(_g: usize) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_flag_wins_then_local_rank_then_slurm() {
        let vars = [("LOCAL_RANK", "2"), ("SLURM_LOCALID", "3")];
        assert_eq!(pick_gpu(Some(1), env(&vars), 4), Ok(Some((1, GpuSource::Flag))));
        assert_eq!(pick_gpu(None, env(&vars), 4), Ok(Some((2, GpuSource::LocalRank))));
        assert_eq!(pick_gpu(None, env(&vars[1..]), 4), Ok(Some((3, GpuSource::SlurmLocalId))));
        assert_eq!(pick_gpu(None, env(&[]), 4), Ok(Some((0, GpuSource::Default))));
    }

    #[test]
    fn a_process_bound_to_one_gpu_takes_it_whatever_its_local_rank() {
        // Slurm with --gpus-per-task=1 leaves each task one visible device.
        assert_eq!(pick_gpu(None, env(&[("SLURM_LOCALID", "3")]), 1), Ok(Some((0, GpuSource::SlurmLocalId))));
        // Four tasks on a node that sees all four GPUs: each its own.
        let picks: Vec<usize> = (0..4)
            .map(|i| {
                let id = i.to_string();
                pick_gpu(None, env(&[("SLURM_LOCALID", id.as_str())]), 4).unwrap().unwrap().0
            })
            .collect();
        assert_eq!(picks, [0, 1, 2, 3]);
    }

    #[test]
    fn impossible_picks_are_errors_that_say_why() {
        let e = pick_gpu(Some(4), env(&[]), 4).unwrap_err();
        assert!(e.contains("--gpu 4") && e.contains("only 4 are visible"), "{e}");
        let e = pick_gpu(None, env(&[("LOCAL_RANK", "5")]), 2).unwrap_err();
        assert!(e.contains("LOCAL_RANK 5"), "{e}");
        let e = pick_gpu(None, env(&[("LOCAL_RANK", "one")]), 2).unwrap_err();
        assert!(e.contains("not a GPU index"), "{e}");
        let e = pick_gpu(Some(0), env(&[]), 0).unwrap_err();
        assert!(e.contains("no CUDA device"), "{e}");
    }

    #[test]
    fn without_gpus_a_worker_computes_on_its_cpu() {
        assert_eq!(pick_gpu(None, env(&[]), 0), Ok(None));
        assert_eq!(pick_gpu(None, env(&[("LOCAL_RANK", "1")]), 0), Ok(None));
        assert_eq!(describe(None), "cpu");
    }
}
