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
