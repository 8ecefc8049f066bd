//! What a rank computes and holds, worked out from its assignment before any
//! tensor exists: its place in the grid of stages and replicas, the model's
//! units its stage runs, the chunk of each unit ZeRO gives it, the
//! micro-batches of a step and the order of a stage's passes. Pure functions
//! and plain data; no tensors, sockets or clocks.

use std::collections::HashMap;
use std::ops::Range;

use flotilla_comm::chunk::chunk_range;
use flotilla_jobspec::{JobSpec, PipelineSchedule, Precision};

use crate::checkpoint::{Held, Layout};
use crate::model::{self, Unit};
use crate::types::{Assignment, TrainError};

/// One unit of this rank's stage and where its state lives.
#[derive(Debug, Clone)]
pub(crate) struct LocalUnit {
    pub unit: Unit,
    /// Its tensors' indices in the model's layout, and their shapes.
    pub tensors: Vec<usize>,
    pub shapes: Vec<Vec<i64>>,
    /// Its parameters' offset in the stage's flat tensors, and their count.
    pub offset: usize,
    pub len: usize,
    /// The unit-relative chunk this rank owns (all of it without ZeRO), and
    /// where that chunk starts in the rank's compact tensors of owned state.
    pub own: Range<usize>,
    pub own_off: usize,
}

impl LocalUnit {
    pub fn stage_range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }

    /// The owned chunk in the stage's flat tensors.
    pub fn own_stage_range(&self) -> Range<usize> {
        self.offset + self.own.start..self.offset + self.own.end
    }

    /// The owned chunk in the compact tensors of owned state.
    pub fn own_local_range(&self) -> Range<usize> {
        self.own_off..self.own_off + self.own.len()
    }

    /// Element counts of its tensors, in order.
    pub fn numels(&self) -> Vec<i64> {
        self.shapes.iter().map(|s| s.iter().product()).collect()
    }
}

/// Everything about a rank's share of the job that follows from the
/// assignment alone.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub stage: usize,
    pub replica: usize,
    /// Pipeline stages and data-parallel replicas.
    pub pp: usize,
    pub dp: usize,
    pub zero: u8,
    pub precision: Precision,
    pub overlap: bool,
    /// Where the rank's tensors live and its passes run.
    pub device: tch::Device,
    /// The whole model's tensors, in unit order.
    pub layout: Layout,
    /// Indices in the model's unit list of this stage's units.
    pub units_range: Range<usize>,
    pub units: Vec<LocalUnit>,
    /// Parameters of the stage, and of the chunks this rank owns.
    pub stage_len: usize,
    pub own_len: usize,
    /// The unit whose output this stage receives (none for the first stage).
    pub input_unit: Option<Unit>,
}

impl Plan {
    pub fn new(a: &Assignment) -> Result<Plan, TrainError> {
        let spec = &a.spec;
        let par = &spec.parallelism;
        let (pp, dp) = (a.stages, a.world / a.stages.max(1));
        if pp == 0 || pp * dp != a.world || a.stage >= pp || a.replica >= dp || a.rank != a.replica * pp + a.stage {
            return Err(TrainError::Fatal(format!(
                "rank {} of {} is not stage {} of replica {} in a grid of {pp} stages",
                a.rank, a.world, a.stage, a.replica
            )));
        }
        let all_units = Unit::all(&spec.model);
        let layout = model::layout(&spec.model);
        let index: HashMap<&str, usize> = layout.names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let unit_tensors: Vec<Vec<usize>> =
            all_units.iter().map(|(_, names)| names.iter().map(|n| index[n.as_str()]).collect()).collect();
        let unit_sizes: Vec<usize> = unit_tensors.iter().map(|ts| ts.iter().map(|&t| layout.numel(t)).sum()).collect();
        let stages = split_stages(&unit_sizes, pp, par.split.as_deref());
        let mine = stages[a.stage].clone();
        let zero = par.zero;
        let mut units = Vec::new();
        let (mut offset, mut own_off) = (0, 0);
        for u in mine.clone() {
            let len = unit_sizes[u];
            let own = if zero == 0 { 0..len } else { chunk_range(len, dp, a.replica) };
            let tensors = unit_tensors[u].clone();
            let shapes = tensors.iter().map(|&t| layout.shapes[t].iter().map(|d| *d as i64).collect()).collect();
            units.push(LocalUnit { unit: all_units[u].0, tensors, shapes, offset, len, own: own.clone(), own_off });
            offset += len;
            own_off += own.len();
        }
        Ok(Plan {
            stage: a.stage,
            replica: a.replica,
            pp,
            dp,
            zero,
            precision: spec.train.precision,
            overlap: par.overlap,
            device: a.device,
            layout,
            input_unit: (a.stage > 0).then(|| all_units[mine.start - 1].0),
            units_range: mine,
            units,
            stage_len: offset,
            own_len: own_off,
        })
    }

    pub fn first_stage(&self) -> bool {
        self.stage == 0
    }

    pub fn last_stage(&self) -> bool {
        self.stage + 1 == self.pp
    }

    /// Whether the stage reads samples: the first for its inputs, the last
    /// for its targets; the stages between get activations only.
    pub fn reads_data(&self) -> bool {
        self.first_stage() || self.last_stage()
    }

    /// Elements of parameters this rank keeps between steps.
    pub fn params_len(&self) -> usize {
        if self.zero >= 3 {
            self.own_len
        } else {
            self.stage_len
        }
    }

    /// Elements of gradients this rank keeps past a step's passes.
    pub fn grads_len(&self) -> usize {
        if self.zero >= 2 {
            self.own_len
        } else {
            self.stage_len
        }
    }

    /// Elements of each AdamW moment this rank keeps.
    pub fn moments_len(&self) -> usize {
        if self.zero >= 1 {
            self.own_len
        } else {
            self.stage_len
        }
    }

    /// The pieces of the logical tensors this rank writes into checkpoints:
    /// its owned chunks (with ZeRO), or an even share of each of its stage's
    /// tensors (without). `local` is the piece's place in the rank's
    /// snapshot arrays.
    pub fn holding(&self) -> Vec<Held> {
        let mut out = Vec::new();
        let mut local = 0;
        for u in &self.units {
            let mut at = 0;
            for &t in &u.tensors {
                let n = self.layout.numel(t);
                let (a, b) = if self.zero == 0 {
                    crate::checkpoint::shard_range(n, self.replica, self.dp)
                } else {
                    (u.own.start.clamp(at, at + n) - at, u.own.end.clamp(at, at + n) - at)
                };
                if a < b {
                    out.push(Held { tensor: t, start: a, end: b, local });
                    local += b - a;
                }
                at += n;
            }
        }
        out
    }

    /// Where piece `h` (of [`Plan::holding`] or any other piece of this
    /// stage's tensors) lives: its range in the parameter tensor and in the
    /// moment tensors this rank keeps. `None` for a range this rank does
    /// not keep.
    pub fn locate(&self, tensor: usize, start: usize, end: usize) -> (Option<Range<usize>>, Option<Range<usize>>) {
        let (u, at) = self.unit_of(tensor);
        let rel = at + start..at + end;
        let stage = u.offset + rel.start..u.offset + rel.end;
        let owned = rel.start >= u.own.start && rel.end <= u.own.end;
        let own = u.own_off + rel.start.saturating_sub(u.own.start)..u.own_off + rel.end.saturating_sub(u.own.start);
        let params = if self.zero >= 3 { owned.then_some(own.clone()) } else { Some(stage.clone()) };
        let moments = if self.zero == 0 { Some(stage) } else { owned.then_some(own) };
        (params, moments)
    }

    /// The local unit holding tensor `t`, and the tensor's offset in it.
    fn unit_of(&self, t: usize) -> (&LocalUnit, usize) {
        for u in &self.units {
            let mut at = 0;
            for &x in &u.tensors {
                if x == t {
                    return (u, at);
                }
                at += self.layout.numel(x);
            }
        }
        unreachable!("tensor {t} is not in this stage")
    }

    /// What this rank reads from a checkpoint: per state group, the pieces
    /// of logical tensors its parameter and moment tensors hold, in the
    /// order of those tensors.
    pub fn wanted(&self) -> Wanted {
        let mut params = Vec::new();
        let mut moments = Vec::new();
        for u in &self.units {
            let mut at = 0;
            for &t in &u.tensors {
                let n = self.layout.numel(t);
                let own = (u.own.start.clamp(at, at + n) - at, u.own.end.clamp(at, at + n) - at);
                let whole = (0, n);
                let p = if self.zero >= 3 { own } else { whole };
                let m = if self.zero >= 1 { own } else { whole };
                if p.0 < p.1 {
                    params.push((t, p.0..p.1));
                }
                if m.0 < m.1 {
                    moments.push((t, m.0..m.1));
                }
                at += n;
            }
        }
        Wanted { params, moments }
    }
}

/// Pieces of logical tensors to read, as `(tensor, element range)`, in the
/// order they fill a rank's flat tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub params: Vec<(usize, Range<usize>)>,
    pub moments: Vec<(usize, Range<usize>)>,
}

/// The model's units cut into `pp` contiguous stages: `explicit` counts of
/// units per stage, or the cut that minimises the largest stage's parameter
/// count (ties: the earliest cut).
pub fn split_stages(unit_sizes: &[usize], pp: usize, explicit: Option<&[usize]>) -> Vec<Range<usize>> {
    let n = unit_sizes.len();
    assert!(pp >= 1 && pp <= n, "{pp} stages for {n} units");
    if let Some(counts) = explicit {
        let mut start = 0;
        return counts
            .iter()
            .map(|c| {
                start += c;
                start - c..start
            })
            .collect();
    }
    // best[k][i]: the smallest largest-stage size splitting units 0..i into k stages.
    let prefix: Vec<usize> = std::iter::once(0)
        .chain(unit_sizes.iter().scan(0, |s, x| {
            *s += x;
            Some(*s)
        }))
        .collect();
    let mut best = vec![vec![usize::MAX; n + 1]; pp + 1];
    let mut cut = vec![vec![0usize; n + 1]; pp + 1];
    best[0][0] = 0;
    for k in 1..=pp {
        for i in k..=n {
            for j in (k - 1)..i {
                if best[k - 1][j] == usize::MAX {
                    continue;
                }
                let cost = best[k - 1][j].max(prefix[i] - prefix[j]);
                if cost < best[k][i] {
                    best[k][i] = cost;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(pp);
    let mut end = n;
    for k in (1..=pp).rev() {
        let start = cut[k][end];
        out.push(start..end);
        end = start;
    }
    out.reverse();
    out
}

/// The micro-batches of a replica's `n` samples, when the largest replica
/// has `n_max`: `parallelism.micro_batches` even chunks, or chunks of
/// `train.micro_batch` samples. Every replica gets as many as the largest
/// (trailing ones may be empty), so that replicas run the same passes.
pub fn micro_batches(n: usize, n_max: usize, spec: &JobSpec) -> Vec<Range<usize>> {
    match spec.parallelism.micro_batches {
        Some(m) => (0..m).map(|j| chunk_range(n, m, j)).collect(),
        None => {
            let size = spec.train.micro_batch.max(1);
            let count = n_max.div_ceil(size).max(1);
            (0..count).map(|j| (j * size).min(n)..((j + 1) * size).min(n)).collect()
        }
    }
}

/// One pass of a stage over one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward(usize),
    Backward(usize),
}

/// What a stage runs, in order.
pub fn schedule(kind: PipelineSchedule, stages: usize, stage: usize, micro: usize) -> Vec<Pass> {
    match kind {
        PipelineSchedule::Gpipe => (0..micro).map(Pass::Forward).chain((0..micro).map(Pass::Backward)).collect(),
        PipelineSchedule::OneFOneB => {
            let warmup = (stages - stage - 1).min(micro);
            let mut out: Vec<Pass> = (0..warmup).map(Pass::Forward).collect();
            for j in warmup..micro {
                out.push(Pass::Forward(j));
                out.push(Pass::Backward(j - warmup));
            }
            out.extend((micro - warmup..micro).map(Pass::Backward));
            out
        }
    }
}

/// The last bucket (the first one the backward pass fills) is at most this
/// many MiB, so that reducing starts early in the backward pass even when
/// the whole model fits in one bucket.
pub const FIRST_BUCKET_MB: f64 = 1.0;

/// Gradient buckets over a stage whose units take the flat ranges `units`
/// (in order, tiling `0..total`): filled in the order the backward pass
/// finishes the units (last unit first), each at most `cap` elements and the
/// first filled at most `first_cap`. Returned in ascending order; a bucket
/// can be reduced once every unit it touches is done, that is once the unit
/// holding its start is.
pub fn unit_buckets(units: &[Range<usize>], cap: usize, first_cap: usize) -> Vec<Range<usize>> {
    let cap = cap.max(1);
    let mut limit = first_cap.clamp(1, cap);
    let mut out = Vec::new();
    let mut cur: Option<Range<usize>> = None;
    for u in units.iter().rev() {
        let mut end = u.end;
        while end > u.start {
            let len = cur.as_ref().map_or(0, |c| c.len());
            if len == limit {
                out.push(cur.take().expect("a full bucket"));
                limit = cap;
                continue;
            }
            let start = end - (limit - len).min(end - u.start);
            cur = Some(start..cur.map_or(end, |c| c.end));
            end = start;
        }
    }
    out.extend(cur);
    out.reverse();
    out
}

/// Elements per bucket for a size in MiB of f32s.
pub fn bucket_elems(bucket_mb: f64) -> usize {
    ((bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn balanced_split_minimises_the_largest_stage() {
        assert_eq!(split_stages(&[10, 1, 1, 10], 2, None), vec![0..2, 2..4]);
        assert_eq!(split_stages(&[1, 1, 1, 1, 1, 1], 3, None), vec![0..2, 2..4, 4..6]);
        assert_eq!(split_stages(&[5, 1, 1, 1, 1, 5], 3, None), vec![0..1, 1..5, 5..6]);
        assert_eq!(split_stages(&[3, 4], 2, None), vec![0..1, 1..2]);
        assert_eq!(split_stages(&[1, 2, 3], 2, Some(&[2, 1])), vec![0..2, 2..3]);
    }

    #[test]
    fn one_f_one_b_holds_at_most_pp_minus_stage_micro_batches() {
        for (pp, m) in [(2, 4), (3, 6), (3, 2), (4, 8)] {
            for s in 0..pp {
                for kind in [PipelineSchedule::Gpipe, PipelineSchedule::OneFOneB] {
                    let ops = schedule(kind, pp, s, m);
                    let (mut live, mut peak) = (0i64, 0i64);
                    let mut fwd = Vec::new();
                    let mut bwd = Vec::new();
                    for op in &ops {
                        match *op {
                            Pass::Forward(j) => {
                                live += 1;
                                fwd.push(j);
                            }
                            Pass::Backward(j) => {
                                assert!(fwd.contains(&j), "backward of {j} before its forward");
                                live -= 1;
                                bwd.push(j);
                            }
                        }
                        peak = peak.max(live);
                    }
                    assert_eq!(fwd, (0..m).collect::<Vec<_>>());
                    assert_eq!(bwd, (0..m).collect::<Vec<_>>(), "backward passes in order");
                    let bound = if kind == PipelineSchedule::Gpipe { m } else { (pp - s).min(m) };
                    assert_eq!(peak as usize, bound, "{kind:?} pp={pp} stage={s} m={m}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn buckets_tile_the_stage_in_order(sizes in proptest::collection::vec(1usize..400, 1..8), cap in 1usize..700, first in 1usize..700) {
            let mut units = Vec::new();
            let mut at = 0;
            for n in &sizes {
                units.push(at..at + n);
                at += n;
            }
            let r = unit_buckets(&units, cap, first);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r.last().unwrap().end, at);
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            prop_assert!(r.iter().all(|b| !b.is_empty() && b.len() <= cap));
            prop_assert!(r.last().unwrap().len() <= first.min(cap), "the first bucket filled is small");
        }
    }

    #[test]
    fn buckets_fill_from_the_last_unit() {
        // Units of 10, 30, 5: a first bucket of 8, then buckets of up to 20.
        let r = unit_buckets(&[0..10, 10..40, 40..45], 20, 8);
        assert_eq!(r, vec![0..17, 17..37, 37..45]);
        // One bucket when everything fits.
        assert_eq!(unit_buckets(&[0..3, 3..4], 100, 100), vec![0..4]);
    }

    #[test]
    fn mib_to_elements() {
        assert_eq!(bucket_elems(1.0), 262_144);
        assert_eq!(bucket_elems(1e-9), 1);
    }
}
