//! What a rank measures about itself: the heap's growth during a step
//! (the activations it keeps for backward passes), its peak memory once it
//! is set up and at the end, and per-step timings (where a step's time
//! went: passes, waiting on other stages, waiting on collectives, the
//! update). With `FLOTILLA_STATS_DIR` set, each rank writes them at the end
//! of its generation as `<dir>/<job>-g<generation>-rank<rank>.json`, for
//! benches and for whoever wants to look at a layout's bubble, overlap and
//! memory.

use std::cell::Cell;

use serde::Serialize;

use crate::types::{Assignment, MemoryUsage};

/// Environment variable naming the folder rank statistics go to.
pub const STATS_DIR_ENV: &str = "FLOTILLA_STATS_DIR";

/// Bytes the process's allocator has handed out and not taken back
/// (libtorch's CPU tensors come from it).
pub fn heap_in_use() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        (m.uordblks + m.hblkhd) as u64
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// The process's peak resident set size (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// The process's resident set size now (VmRSS), in bytes.
pub fn rss() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// A size in `/proc/self/status` (`key` with its colon), in bytes; 0 where
/// there is none.
fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The heap's largest growth above where it stood when the step began,
/// over the samples taken during the step.
pub struct HeapPeak {
    base: u64,
    peak: Cell<u64>,
}

impl HeapPeak {
    pub fn start() -> HeapPeak {
        HeapPeak { base: heap_in_use(), peak: Cell::new(0) }
    }

    pub fn sample(&self) {
        self.peak.set(self.peak.get().max(heap_in_use().saturating_sub(self.base)));
    }

    pub fn peak(&self) -> u64 {
        self.sample();
        self.peak.get()
    }
}

/// Where one step's time went on one rank.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: u64,
    /// The whole step.
    pub wall_ms: f64,
    /// The forward and backward passes (with the waits between them).
    pub passes_ms: f64,
    /// Waiting for activations or their gradients from another stage.
    pub waited_ms: f64,
    /// Waiting for collectives (gradient reductions, ZeRO's gathers, the
    /// step's control exchange): the communication the passes did not hide.
    pub comm_wait_ms: f64,
    /// Clipping, the AdamW update and (ZeRO 1-2) gathering the parameters.
    pub optimizer_ms: f64,
    /// Reading the step's samples (part of the passes).
    pub data_wait_ms: f64,
    /// The parts of `comm_wait_ms` spent within `passes_ms` (ZeRO-3's
    /// gathers) and within `optimizer_ms` (ZeRO 1-2's gathers).
    pub comm_in_passes_ms: f64,
    pub comm_in_update_ms: f64,
}

impl StepTiming {
    /// The passes without any wait: the forward and backward computation.
    pub fn compute_ms(&self) -> f64 {
        (self.passes_ms - self.waited_ms - self.data_wait_ms - self.comm_in_passes_ms).max(0.0)
    }

    /// Clipping and the update, without the gathers inside them.
    pub fn update_ms(&self) -> f64 {
        (self.optimizer_ms - self.comm_in_update_ms).max(0.0)
    }
}

/// Where a run of steps went on one rank: the mean of each part, the parts
/// not overlapping (what a rank reports to the coordinator).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSplit {
    /// The last step counted, and how many the means are over.
    pub step: u64,
    pub steps: u32,
    pub step_ms: f64,
    pub compute_ms: f64,
    pub stage_wait_ms: f64,
    pub comm_ms: f64,
    pub optimizer_ms: f64,
    pub data_wait_ms: f64,
}

impl StepSplit {
    /// The means over `steps`; `None` when there are none.
    pub fn of(steps: &[StepTiming]) -> Option<StepSplit> {
        let last = steps.last()?;
        let n = steps.len() as f64;
        let mean = |f: &dyn Fn(&StepTiming) -> f64| steps.iter().map(f).sum::<f64>() / n;
        Some(StepSplit {
            step: last.step,
            steps: steps.len() as u32,
            step_ms: mean(&|t| t.wall_ms),
            compute_ms: mean(&|t| t.compute_ms()),
            stage_wait_ms: mean(&|t| t.waited_ms),
            comm_ms: mean(&|t| t.comm_wait_ms),
            optimizer_ms: mean(&|t| t.update_ms()),
            data_wait_ms: mean(&|t| t.data_wait_ms),
        })
    }
}

/// What a rank measured over its generation.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub memory: MemoryUsage,
    /// Peak resident memory once the rank had built or loaded its state,
    /// before its first step.
    pub start_peak_rss: u64,
    pub steps: Vec<StepTiming>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(step: u64, wall_ms: f64) -> StepTiming {
        StepTiming {
            step,
            wall_ms,
            passes_ms: 6.0,
            waited_ms: 1.0,
            comm_wait_ms: 3.0,
            optimizer_ms: 2.0,
            data_wait_ms: 0.5,
            comm_in_passes_ms: 1.5,
            comm_in_update_ms: 0.5,
        }
    }

    #[test]
    fn a_split_takes_each_wait_out_of_the_part_it_happened_in() {
        assert_eq!(StepSplit::of(&[]), None);
        let split = StepSplit::of(&[timing(4, 10.0), timing(5, 12.0)]).unwrap();
        assert_eq!((split.step, split.steps, split.step_ms), (5, 2, 11.0));
        assert_eq!(split.compute_ms, 6.0 - 1.0 - 0.5 - 1.5);
        assert_eq!((split.stage_wait_ms, split.comm_ms, split.data_wait_ms), (1.0, 3.0, 0.5));
        assert_eq!(split.optimizer_ms, 1.5);
        let parts = split.compute_ms + split.stage_wait_ms + split.comm_ms + split.optimizer_ms + split.data_wait_ms;
        assert!(parts <= split.step_ms, "the parts do not overlap: {parts} of {}", split.step_ms);
    }
}

#[derive(Serialize)]
struct RankStats<'a> {
    job: &'a str,
    generation: u64,
    rank: usize,
    world: usize,
    stage: usize,
    replica: usize,
    stages: usize,
    zero: u8,
    schedule: &'static str,
    precision: &'static str,
    overlap: bool,
    memory: MemoryUsage,
    start_peak_rss_bytes: u64,
    peak_rss_bytes: u64,
    steps: &'a [StepTiming],
}

/// Writes this rank's statistics when `FLOTILLA_STATS_DIR` is set.
pub fn write(a: &Assignment, run: &RunStats) {
    let Some(dir) = std::env::var_os(STATS_DIR_ENV) else { return };
    let stats = RankStats {
        job: &a.job,
        generation: a.generation,
        rank: a.rank,
        world: a.world,
        stage: a.stage,
        replica: a.replica,
        stages: a.stages,
        zero: a.spec.parallelism.zero,
        schedule: a.spec.parallelism.schedule.name(),
        precision: a.spec.train.precision.name(),
        overlap: a.spec.parallelism.overlap,
        memory: run.memory,
        start_peak_rss_bytes: run.start_peak_rss,
        peak_rss_bytes: peak_rss(),
        steps: &run.steps,
    };
    let path = std::path::Path::new(&dir).join(format!("{}-g{}-rank{}.json", a.job, a.generation, a.rank));
    let json = serde_json::to_vec_pretty(&stats).expect("stats serialize");
    if let Err(e) = std::fs::write(&path, json) {
        tracing::warn!(path = %path.display(), error = %e, "could not write rank statistics");
    }
}
