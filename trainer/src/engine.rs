//! The train loop for pipeline stages and ZeRO: what a rank runs when the
//! job has `parallelism.pp > 1` or `parallelism.zero > 0`.
//!
//! The plan's ranks form a grid: `rank = replica * pp + stage`. Stage `s`
//! holds a contiguous run of the model's units ([`Unit`]): a GPT's
//! embedding, blocks and head, an MLP's linear layers. The ranks of one
//! stage form its data-parallel group, where ZeRO partitions state: each
//! unit's flat parameters are cut into `dp` chunks ([`chunk_range`]), and
//! replica `r` owns chunk `r` of every unit of its stage.
//!
//! - ZeRO 0: every rank of a stage holds its parameters, gradients and
//!   AdamW moments; gradients are all-reduced.
//! - ZeRO 1: the moments of its chunks only; gradients are reduce-scattered,
//!   each rank updates its chunks, and the parameters are all-gathered.
//! - ZeRO 2: also only its chunks' gradients are kept past the step's passes.
//! - ZeRO 3: also only its chunks' parameters; a unit's are all-gathered just
//!   before its forward pass and released after, gathered again for its
//!   backward pass, and its gradients reduce-scattered right after.
//!
//! Each micro-batch goes through the stage unit by unit, each unit's input
//! a leaf of its own graph, so that backward passes run unit by unit too
//! (ZeRO-3 needs a unit's parameters only while it runs). Activations and
//! their gradients travel between stages point to point, on connections of
//! their own: a sender thread per direction writes them while the stage's
//! thread computes or waits for the next message, so two stages sending
//! each other large messages never wait on each other.
//!
//! Every rank adds to one small all-reduce per step over the whole world:
//! the loss (from the last stages), the squared gradient norm of what it
//! owns, rank 0's checkpoint decision and the upload flags. Checkpoints
//! hold what each rank owns as pieces of the logical tensors, so they load
//! under any other layout.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla_comm::chunk::chunk_range;
use flotilla_comm::{Buf, CommError, CommListener, F32Collectives, ProcessGroup, RingConfig, TcpRing};
use flotilla_jobspec::{JobSpec, PipelineSchedule};
use flotilla_registry::MetricRecord;
use tch::{Kind, Tensor};

use crate::buckets::CommThread;
use crate::checkpoint::{self, Held, Layout, Snapshot};
use crate::data::Dataset;
use crate::model::{self, Model, Unit};
use crate::optim::{self, AdamW};
use crate::sampler::Sampler;
use crate::saver::{Saved, Saver};
use crate::stats::{self, HeapPeak, StepTiming};
use crate::storage::Storage;
use crate::train::{self, Assignment, MemoryUsage, Outcome, TrainError, TrainEvent, TrainOptions};

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

/// What a stage runs, in order: `(forward, micro-batch)`.
pub fn schedule(kind: PipelineSchedule, stages: usize, stage: usize, micro: usize) -> Vec<(bool, usize)> {
    match kind {
        PipelineSchedule::Gpipe => (0..micro).map(|j| (true, j)).chain((0..micro).map(|j| (false, j))).collect(),
        PipelineSchedule::OneFOneB => {
            let warmup = (stages - stage - 1).min(micro);
            let mut out: Vec<(bool, usize)> = (0..warmup).map(|j| (true, j)).collect();
            for j in warmup..micro {
                out.push((true, j));
                out.push((false, j - warmup));
            }
            out.extend((micro - warmup..micro).map(|j| (false, j)));
            out
        }
    }
}

/// One unit of this rank's stage and where its state lives.
struct LocalUnit {
    unit: Unit,
    /// Its tensors' indices in the model's layout, and their shapes.
    tensors: Vec<usize>,
    shapes: Vec<Vec<i64>>,
    /// Its parameters' range in the stage's flat buffer.
    offset: usize,
    len: usize,
    /// The unit-relative chunk this rank owns, and where that chunk lives in
    /// the rank's compact buffers of owned state.
    own: Range<usize>,
    own_off: usize,
}

impl LocalUnit {
    fn stage_range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }

    fn own_stage_range(&self) -> Range<usize> {
        self.offset + self.own.start..self.offset + self.own.end
    }

    fn own_local_range(&self) -> Range<usize> {
        self.own_off..self.own_off + self.own.len()
    }

    /// Gives `leaves` (made by [`LocalUnit::leaves`]) the values of `flat`
    /// and zero gradients, keeping their memory.
    fn assign(&self, leaves: &mut [Tensor], flat: &[f32]) {
        let mut at = 0;
        tch::no_grad(|| {
            for (t, shape) in leaves.iter_mut().zip(&self.shapes) {
                let n = t.numel();
                t.copy_(&Tensor::from_slice(&flat[at..at + n]).view(shape.as_slice()));
                t.zero_grad();
                at += n;
            }
        });
    }

    /// Leaf tensors (requiring gradients) with the values of `flat`, the
    /// unit's parameters.
    fn leaves(&self, flat: &[f32]) -> Vec<Tensor> {
        let mut at = 0;
        self.shapes
            .iter()
            .map(|shape| {
                let n: i64 = shape.iter().product();
                let t = Tensor::from_slice(&flat[at..at + n as usize]).view(shape.as_slice()).set_requires_grad(true);
                at += n as usize;
                t
            })
            .collect()
    }
}

/// Copies the gradients of `leaves` (zeros where one got none) into `buf`.
fn pull_grads(leaves: &[Tensor], buf: &mut [f32]) {
    let mut at = 0;
    for t in leaves {
        let n = t.numel();
        let g = t.grad();
        if g.defined() {
            g.contiguous().view([-1]).copy_data(&mut buf[at..at + n], n);
        } else {
            buf[at..at + n].fill(0.0);
        }
        at += n;
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.contiguous().view([-1]).copy_data(&mut v, n);
    v
}

/// Point-to-point messages written on their own thread, in order.
struct SendThread {
    tx: Option<mpsc::Sender<SendJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum SendJob {
    Send(Vec<f32>),
    Flush(mpsc::Sender<Result<(), CommError>>),
}

impl SendThread {
    /// Sends to rank `to` of `group`.
    fn spawn(mut group: Box<dyn ProcessGroup>, to: usize) -> SendThread {
        let (tx, rx) = mpsc::channel::<SendJob>();
        let thread = std::thread::Builder::new()
            .name("pipeline-send".into())
            .spawn(move || {
                // The first error is handed over once, with the peer it
                // names; later messages are skipped.
                let (mut failed, mut broken): (Option<CommError>, Option<String>) = (None, None);
                for job in rx {
                    match job {
                        SendJob::Send(mut buf) => {
                            if failed.is_none() && broken.is_none() {
                                if let Err(e) = group.send(to, &Buf::f32(&mut buf)) {
                                    broken = Some(e.to_string());
                                    failed = Some(e);
                                }
                            }
                        }
                        SendJob::Flush(reply) => {
                            let r = match (failed.take(), &broken) {
                                (Some(e), _) => Err(e),
                                (None, Some(m)) => Err(CommError::Setup(format!("a pipeline send failed: {m}"))),
                                (None, None) => Ok(()),
                            };
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .expect("spawn the pipeline sender");
        SendThread { tx: Some(tx), thread: Some(thread) }
    }

    fn send(&self, buf: Vec<f32>) {
        let _ = self.tx.as_ref().expect("open until drop").send(SendJob::Send(buf));
    }

    /// Waits until everything queued is written; the first error if any.
    fn flush(&self) -> Result<(), CommError> {
        let (tx, rx) = mpsc::channel();
        let _ = self.tx.as_ref().expect("open until drop").send(SendJob::Flush(tx));
        rx.recv().unwrap_or_else(|_| Err(CommError::Setup("the pipeline sender ended".into())))
    }
}

impl Drop for SendThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This rank's connections: the whole world, its stage's data-parallel
/// group, and its pipeline neighbours (one connection per direction).
struct Groups {
    world: CommThread,
    dp: Option<Box<dyn ProcessGroup>>,
    to_next: Option<SendThread>,
    from_prev: Option<Box<dyn ProcessGroup>>,
    to_prev: Option<SendThread>,
    from_next: Option<Box<dyn ProcessGroup>>,
}

fn ring(
    a: &Assignment,
    listener: &CommListener,
    opts: &TrainOptions,
    name: String,
    members: Vec<usize>,
) -> Result<Box<dyn ProcessGroup>, CommError> {
    let rank = members.iter().position(|r| *r == a.rank).expect("a member of its own group");
    let cfg = RingConfig {
        job: name,
        generation: a.generation,
        rank,
        world: members.len(),
        peers: members.iter().map(|r| a.peers[*r]).collect(),
        connect_timeout: opts.connect_timeout,
        op_timeout: opts.op_timeout,
    };
    let ring = TcpRing::connect(listener, cfg).map_err(|e| e.map_rank(|r| members.get(r).copied().unwrap_or(r)))?;
    Ok(Box::new(Subgroup { inner: Box::new(ring), members }))
}

/// A group of some of the world's ranks whose errors name the peer by its
/// world rank (the rank the coordinator knows, and blames).
struct Subgroup {
    inner: Box<dyn ProcessGroup>,
    members: Vec<usize>,
}

impl Subgroup {
    fn world<T>(&self, r: Result<T, CommError>) -> Result<T, CommError> {
        r.map_err(|e| e.map_rank(|p| self.members.get(p).copied().unwrap_or(p)))
    }
}

impl ProcessGroup for Subgroup {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn generation(&self) -> u64 {
        self.inner.generation()
    }
    fn all_reduce_sum(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError> {
        let r = self.inner.all_reduce_sum(buf);
        self.world(r)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut Buf<'_>) -> Result<Range<usize>, CommError> {
        let r = self.inner.reduce_scatter_sum(buf);
        self.world(r)
    }
    fn all_gather(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError> {
        let r = self.inner.all_gather(buf);
        self.world(r)
    }
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let r = self.inner.all_gather_bytes(mine);
        self.world(r)
    }
    fn broadcast(&mut self, buf: &mut Buf<'_>, root: usize) -> Result<(), CommError> {
        let r = self.inner.broadcast(buf, root);
        self.world(r)
    }
    fn send(&mut self, to: usize, buf: &Buf<'_>) -> Result<(), CommError> {
        let r = self.inner.send(to, buf);
        self.world(r)
    }
    fn recv(&mut self, from: usize, buf: &mut Buf<'_>) -> Result<(), CommError> {
        let r = self.inner.recv(from, buf);
        self.world(r)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        let r = self.inner.barrier();
        self.world(r)
    }
}

impl Groups {
    /// Connects every group of this rank, in one order on every rank (the
    /// world, the stage groups, then the pipeline links stage by stage), so
    /// that no two ranks wait on each other's next connection.
    fn connect(a: &Assignment, listener: &CommListener, opts: &TrainOptions) -> Result<Groups, CommError> {
        let (pp, dp) = (a.stages, a.world / a.stages);
        let at = |stage: usize, replica: usize| replica * pp + stage;
        let world = CommThread::spawn(train::connect(a, listener, opts)?);
        let dp_group = if dp > 1 {
            let members = (0..dp).map(|r| at(a.stage, r)).collect();
            Some(ring(a, listener, opts, format!("{}#dp{}", a.job, a.stage), members)?)
        } else {
            None
        };
        let mut g = Groups { world, dp: dp_group, to_next: None, from_prev: None, to_prev: None, from_next: None };
        for s in 0..pp.saturating_sub(1) {
            if a.stage != s && a.stage != s + 1 {
                continue;
            }
            let pair = vec![at(s, a.replica), at(s + 1, a.replica)];
            let fwd = ring(a, listener, opts, format!("{}#fwd{}.{}", a.job, a.replica, s), pair.clone())?;
            let bwd = ring(a, listener, opts, format!("{}#bwd{}.{}", a.job, a.replica, s), pair)?;
            if a.stage == s {
                g.to_next = Some(SendThread::spawn(fwd, 1));
                g.from_next = Some(bwd);
            } else {
                g.from_prev = Some(fwd);
                g.to_prev = Some(SendThread::spawn(bwd, 0));
            }
        }
        Ok(g)
    }

    fn flush_sends(&self) -> Result<(), CommError> {
        for s in [&self.to_next, &self.to_prev].into_iter().flatten() {
            s.flush()?;
        }
        Ok(())
    }
}

/// A micro-batch between its forward and backward pass: per unit, its
/// input, its output (the scaled loss for the model's last unit) and, under
/// ZeRO-3, the parameter leaves it ran with (released until the backward).
struct Pass {
    units: Vec<(Tensor, Tensor, Vec<Tensor>)>,
    batch: usize,
}

/// This rank's state. Which buffers are full-stage and which hold only its
/// own chunks depends on the ZeRO stage; see the module docs.
struct State {
    zero: u8,
    units: Vec<LocalUnit>,
    /// The stage's parameters (ZeRO 0-2); empty under ZeRO-3.
    flat: Vec<f32>,
    /// Its chunks' parameters (ZeRO-3); empty otherwise.
    own_params: Vec<f32>,
    /// Gradients: the stage's (ZeRO 0-1) or its chunks' (ZeRO 2-3).
    grads: Vec<f32>,
    adam: AdamW,
    stage_len: usize,
    own_len: usize,
}

impl State {
    fn memory(&self, activations: u64) -> MemoryUsage {
        let b = |n: usize| (n * 4) as u64;
        MemoryUsage {
            params: b(if self.zero >= 3 { self.own_len } else { self.stage_len }),
            grads: b(self.grads.len()),
            optimizer: b(self.adam.m.len() + self.adam.v.len()),
            activations,
        }
    }

    /// The pieces of the logical tensors this rank writes into checkpoints,
    /// with `local` offsets into the snapshot [`State::snapshot`] makes.
    fn holding(&self, layout: &Layout, replica: usize, dp: usize) -> Vec<Held> {
        let mut out = Vec::new();
        let mut local = 0;
        for u in &self.units {
            let mut at = 0;
            for &t in &u.tensors {
                let n = layout.numel(t);
                let (a, b) = if self.zero == 0 {
                    checkpoint::shard_range(n, replica, dp)
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

    /// Copies what `held` names into a compact snapshot.
    fn snapshot(&self, layout: &Layout, held: &[Held], step: u64, mut snap: Snapshot) -> Snapshot {
        let total: usize = held.iter().map(|h| h.end - h.start).sum();
        for v in [&mut snap.params, &mut snap.m, &mut snap.v] {
            v.clear();
            v.reserve(total);
        }
        snap.step = step;
        snap.optimizer_step = self.adam.step;
        for h in held {
            let (u, at) = self.unit_of(layout, h.tensor);
            // The piece's range, relative to its unit.
            let rel = at + h.start..at + h.end;
            let stage = u.offset + rel.start..u.offset + rel.end;
            let own = u.own_off + rel.start - u.own.start..u.own_off + rel.end - u.own.start;
            let params = if self.zero >= 3 { &self.own_params[own.clone()] } else { &self.flat[stage.clone()] };
            snap.params.extend_from_slice(params);
            let moments = if self.zero == 0 { stage } else { own };
            snap.m.extend_from_slice(&self.adam.m[moments.clone()]);
            snap.v.extend_from_slice(&self.adam.v[moments]);
        }
        snap
    }

    /// The local unit holding tensor `t`, and the tensor's offset in it.
    fn unit_of(&self, layout: &Layout, t: usize) -> (&LocalUnit, usize) {
        for u in &self.units {
            let mut at = 0;
            for &x in &u.tensors {
                if x == t {
                    return (u, at);
                }
                at += layout.numel(x);
            }
        }
        unreachable!("tensor {t} is not in this stage")
    }

    /// Takes this rank's parts of a whole (unit-ordered) snapshot.
    fn load(&mut self, snap: &Snapshot, stage_start: usize) {
        let whole = stage_start..stage_start + self.stage_len;
        if self.zero < 3 {
            self.flat = snap.params[whole.clone()].to_vec();
        }
        if self.zero == 0 {
            self.adam.m = snap.m[whole.clone()].to_vec();
            self.adam.v = snap.v[whole].to_vec();
        } else {
            for u in &self.units {
                let src = stage_start + u.offset + u.own.start..stage_start + u.offset + u.own.end;
                let dst = u.own_local_range();
                self.adam.m[dst.clone()].copy_from_slice(&snap.m[src.clone()]);
                self.adam.v[dst.clone()].copy_from_slice(&snap.v[src.clone()]);
                if self.zero >= 3 {
                    self.own_params[dst].copy_from_slice(&snap.params[src]);
                }
            }
        }
        self.adam.step = snap.optimizer_step;
    }
}

/// A unit's parameters all-gathered from the stage group (ZeRO-3).
fn gather_unit(dp: &mut Option<Box<dyn ProcessGroup>>, st: &State, u: &LocalUnit) -> Result<Vec<f32>, CommError> {
    let mut buf = vec![0f32; u.len];
    buf[u.own.clone()].copy_from_slice(&st.own_params[u.own_local_range()]);
    if let Some(g) = dp.as_mut() {
        g.all_gather_f32(&mut buf)?;
    }
    Ok(buf)
}

/// Sums `buf` (a unit's gradients) over the stage group; returns the range
/// of `buf` this rank owns, now reduced.
fn reduce_unit(dp: &mut Option<Box<dyn ProcessGroup>>, buf: &mut [f32]) -> Result<Range<usize>, CommError> {
    match dp.as_mut() {
        Some(g) => g.reduce_scatter_f32(buf),
        None => Ok(0..buf.len()),
    }
}

fn empty() -> Tensor {
    Tensor::empty([0], (Kind::Float, tch::Device::Cpu))
}

/// Runs the assignment (pipeline stages and/or ZeRO) until the job's last
/// step, a cancellation or an error.
pub(crate) fn run(
    a: &Assignment,
    listener: &CommListener,
    opts: &TrainOptions,
    cancel: &AtomicBool,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    tch::set_num_threads(1);
    let spec = &a.spec;
    let train = &spec.train;
    let par = &spec.parallelism;
    let (pp, dp) = (a.stages, a.world / a.stages);
    if pp * dp != a.world || a.stage >= pp || a.replica >= dp || a.rank != a.replica * pp + a.stage {
        return Err(TrainError::Fatal(format!(
            "rank {} of {} is not stage {} of replica {} in a grid of {pp} stages",
            a.rank, a.world, a.stage, a.replica
        )));
    }
    let model_spec = &spec.model;
    let data = Dataset::load(&spec.data, model_spec).map_err(|e| TrainError::fatal("load data", e))?;

    // The model in unit order; this stage's units and state.
    let (layout, init) = Model::build(model_spec, train.seed).flat_by_unit();
    let all_units = Unit::all(model_spec);
    let index: std::collections::HashMap<&str, usize> =
        layout.names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let unit_tensors: Vec<Vec<usize>> =
        all_units.iter().map(|(_, names)| names.iter().map(|n| index[n.as_str()]).collect()).collect();
    let unit_sizes: Vec<usize> = unit_tensors.iter().map(|ts| ts.iter().map(|&t| layout.numel(t)).sum()).collect();
    let stages = split_stages(&unit_sizes, pp, par.split.as_deref());
    let mine = stages[a.stage].clone();
    let stage_start = layout.offsets[unit_tensors[mine.start][0]];
    let mut units = Vec::new();
    let (mut offset, mut own_off) = (0, 0);
    for u in mine.clone() {
        let len = unit_sizes[u];
        let own = if par.zero == 0 { 0..len } else { chunk_range(len, dp, a.replica) };
        let tensors = unit_tensors[u].clone();
        let shapes = tensors.iter().map(|&t| layout.shapes[t].iter().map(|d| *d as i64).collect()).collect();
        units.push(LocalUnit { unit: all_units[u].0, tensors, shapes, offset, len, own: own.clone(), own_off });
        offset += len;
        own_off += own.len();
    }
    let (stage_len, own_len) = (offset, own_off);
    let zero = par.zero;
    let mut st = State {
        zero,
        flat: if zero < 3 { init[stage_start..stage_start + stage_len].to_vec() } else { Vec::new() },
        own_params: Vec::new(),
        grads: vec![0.0; if zero >= 2 { own_len } else { stage_len }],
        adam: AdamW::new(if zero == 0 { stage_len } else { own_len }),
        units,
        stage_len,
        own_len,
    };
    if zero >= 3 {
        st.own_params = vec![0.0; own_len];
        for u in &st.units {
            let src = stage_start + u.offset + u.own.start..stage_start + u.offset + u.own.end;
            st.own_params[u.own_local_range()].copy_from_slice(&init[src]);
        }
    }
    drop(init);

    // Resume from the newest checkpoint that loads, whatever layout wrote it.
    let mut start = 0u64;
    let mut history: Vec<MetricRecord> = Vec::new();
    let out = Storage::open(&a.output_dir).map_err(|e| TrainError::fatal("open the output location", e))?;
    if let Some((snap, h)) = train::load_newest(a, &layout)? {
        start = snap.step;
        st.load(&snap, stage_start);
        history = h;
    }

    let mut groups = Groups::connect(a, listener, opts)?;
    let (first, last) = (a.stage == 0, a.stage == pp - 1);
    let mut sampler = Sampler::new(data.len(), train.seed, train.global_batch as u64);
    let global = train.global_batch as f64;
    let held = st.holding(&layout, a.replica, dp);
    let mut saver = Saver::default();
    let mut seen_request = a.checkpoint_request.load(Ordering::Relaxed);
    let mut reported = MemoryUsage::default();
    let mut timings: Vec<StepTiming> = Vec::new();
    let committed = |saved: Saved| TrainEvent::Checkpoint {
        step: saved.step,
        location: saved.location,
        blocked_ms: saved.blocked.as_secs_f64() * 1e3,
        total_ms: saved.total.as_secs_f64() * 1e3,
    };
    // The unit whose output this stage receives (none for the first stage).
    let input_unit = (!first).then(|| all_units[mine.start - 1].0);
    // Parameter leaves shared by every micro-batch (ZeRO 0-2), made once.
    let mut leaves: Vec<Vec<Tensor>> =
        if zero < 3 { st.units.iter().map(|u| u.leaves(&st.flat[u.stage_range()])).collect() } else { Vec::new() };
    let last_unit = st.units[st.units.len() - 1].unit;

    for step in start..train.steps {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Outcome::Cancelled);
        }
        let t0 = Instant::now();
        let mut waited = Duration::ZERO;
        let lr = optim::learning_rate(&train.optimizer, &train.schedule, step, train.steps);
        let indices = sampler.indices(step, a.replica, dp);
        let mbs = micro_batches(indices.len(), train.global_batch.div_ceil(dp), spec);
        // The parameter leaves take this step's values; their gradients
        // (kept from step to step, like the tensors') start from zero.
        for (u, l) in st.units.iter().zip(leaves.iter_mut()) {
            u.assign(l, &st.flat[u.stage_range()]);
        }
        let heap = HeapPeak::start();
        if zero >= 3 {
            st.grads.fill(0.0);
        }
        let mut passes: Vec<Option<Pass>> = (0..mbs.len()).map(|_| None).collect();
        let mut local_loss = 0f64;
        for (forward, j) in schedule(par.schedule, pp, a.stage, mbs.len()) {
            let batch = &indices[mbs[j].clone()];
            let b = batch.len();
            if b == 0 {
                // A replica with fewer samples: nothing to compute or send
                // (its other stages skip it too), but the stage group's
                // collectives of ZeRO-3 still need this rank.
                if zero >= 3 && forward {
                    for u in &st.units {
                        gather_unit(&mut groups.dp, &st, u)?;
                    }
                } else if zero >= 3 {
                    for u in st.units.iter().rev() {
                        gather_unit(&mut groups.dp, &st, u)?;
                        reduce_unit(&mut groups.dp, &mut vec![0f32; u.len])?;
                    }
                }
                continue;
            }
            if forward {
                let (x, y) = data.batch(batch);
                let mut input = if first {
                    x
                } else {
                    let shape = model::output_shape(model_spec, input_unit.expect("a previous stage"), b);
                    let mut buf = vec![0f32; shape.iter().product::<i64>() as usize];
                    let w = Instant::now();
                    groups.from_prev.as_mut().expect("a previous stage").recv_f32(0, &mut buf)?;
                    waited += w.elapsed();
                    Tensor::from_slice(&buf).view(shape.as_slice()).set_requires_grad(true)
                };
                let mut pass = Pass { units: Vec::with_capacity(st.units.len()), batch: b };
                for (k, u) in st.units.iter().enumerate() {
                    let (params, keep) = if zero >= 3 {
                        let p = u.leaves(&gather_unit(&mut groups.dp, &st, u)?);
                        let keep = p.iter().map(|t| t.shallow_clone()).collect();
                        (p, keep)
                    } else {
                        (leaves[k].iter().map(|t| t.shallow_clone()).collect(), Vec::new())
                    };
                    let x_in = if k == 0 { input.shallow_clone() } else { input.detach().set_requires_grad(true) };
                    let mut out = model::forward(model_spec, u.unit, &params, &x_in);
                    if last && k + 1 == st.units.len() {
                        let loss = model::loss_sum(model_spec, &out, &y);
                        local_loss += loss.double_value(&[]);
                        out = loss / global;
                    }
                    if zero >= 3 {
                        // Released until the backward pass gathers it again.
                        for mut t in params {
                            t.set_data(&empty());
                        }
                    }
                    heap.sample();
                    pass.units.push((x_in, out.shallow_clone(), keep));
                    input = out;
                }
                if !last {
                    groups.to_next.as_ref().expect("a next stage").send(to_vec(&input));
                }
                heap.sample();
                passes[j] = Some(pass);
            } else {
                let pass = passes[j].take().expect("forward before backward");
                let mut grad = if last {
                    None
                } else {
                    let shape = model::output_shape(model_spec, last_unit, pass.batch);
                    let mut buf = vec![0f32; shape.iter().product::<i64>() as usize];
                    let w = Instant::now();
                    groups.from_next.as_mut().expect("a next stage").recv_f32(1, &mut buf)?;
                    waited += w.elapsed();
                    Some(Tensor::from_slice(&buf).view(shape.as_slice()))
                };
                for (k, (x_in, out, mut keep)) in pass.units.into_iter().enumerate().rev() {
                    let u = &st.units[k];
                    if zero >= 3 {
                        let full = gather_unit(&mut groups.dp, &st, u)?;
                        let fresh = u.leaves(&full);
                        for (t, f) in keep.iter_mut().zip(&fresh) {
                            t.set_data(&f.detach());
                        }
                    }
                    match &grad {
                        None => out.backward(),
                        Some(g) => (&out * g).sum(Kind::Float).backward(),
                    }
                    if zero >= 3 {
                        let mut buf = vec![0f32; u.len];
                        pull_grads(&keep, &mut buf);
                        drop(keep);
                        let own = reduce_unit(&mut groups.dp, &mut buf)?;
                        for (g, v) in st.grads[u.own_local_range()].iter_mut().zip(&buf[own]) {
                            *g += *v;
                        }
                    }
                    grad = (k > 0 || !first).then(|| x_in.grad());
                }
                if !first {
                    groups
                        .to_prev
                        .as_ref()
                        .expect("a previous stage")
                        .send(to_vec(grad.as_ref().expect("an input grad")));
                }
            }
        }
        let t_passes = t0.elapsed();
        let activations = heap.peak();
        // Reduce the gradients within the stage group.
        let mut squares = 0f64;
        let sq = |v: &[f32]| v.iter().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>();
        match zero {
            0 => {
                for (u, l) in st.units.iter().zip(&leaves) {
                    pull_grads(l, &mut st.grads[u.stage_range()]);
                }
                if let Some(g) = groups.dp.as_mut() {
                    g.all_reduce_f32(&mut st.grads)?;
                }
                if a.replica == 0 {
                    squares = sq(&st.grads);
                }
            }
            1 => {
                for (u, l) in st.units.iter().zip(&leaves) {
                    pull_grads(l, &mut st.grads[u.stage_range()]);
                    reduce_unit(&mut groups.dp, &mut st.grads[u.stage_range()])?;
                    squares += sq(&st.grads[u.own_stage_range()]);
                }
            }
            2 => {
                for (u, l) in st.units.iter().zip(&leaves) {
                    let mut buf = vec![0f32; u.len];
                    pull_grads(l, &mut buf);
                    let own = reduce_unit(&mut groups.dp, &mut buf)?;
                    st.grads[u.own_local_range()].copy_from_slice(&buf[own]);
                }
                squares = sq(&st.grads);
            }
            _ => squares = sq(&st.grads),
        }
        let wanted = a.checkpoint_request.load(Ordering::Relaxed);
        let flag = if a.rank == 0 && wanted > seen_request { 1.0 } else { 0.0 };
        let uploaded = if saver.local_done() { 1.0 } else { 0.0 };
        groups.world.submit(vec![local_loss as f32, flag, uploaded, squares as f32]);
        let reduced = groups.world.next_reduced()?;
        groups.flush_sends()?;
        let loss = f64::from(reduced[0]) / global;
        let requested = reduced[1] > 0.5;
        let all_uploaded = saver.is_pending() && reduced[2] > a.world as f32 - 0.5;
        if requested && a.rank == 0 {
            seen_request = wanted;
        }
        if !loss.is_finite() {
            return Err(TrainError::Fatal(format!("loss is {loss} at step {}", step + 1)));
        }
        let grad_norm = f64::from(reduced[3]).sqrt();
        let coef = train.grad_clip.and_then(|max| optim::clip_coef(grad_norm, max));
        if let Some(c) = coef {
            st.grads.iter_mut().for_each(|g| *g *= c);
        }
        // The update, and (ZeRO 1-2) the parameters gathered back.
        st.adam.begin();
        let opt = &train.optimizer;
        match zero {
            0 => st.adam.apply(opt, lr, 0, &mut st.flat, &st.grads),
            1 | 2 => {
                for u in &st.units {
                    let g = if zero == 1 { &st.grads[u.own_stage_range()] } else { &st.grads[u.own_local_range()] };
                    st.adam.apply(opt, lr, u.own_off, &mut st.flat[u.own_stage_range()], g);
                    if let Some(group) = groups.dp.as_mut() {
                        group.all_gather_f32(&mut st.flat[u.stage_range()])?;
                    }
                }
            }
            _ => st.adam.apply(opt, lr, 0, &mut st.own_params, &st.grads),
        }
        let done = step + 1;
        let wall = t0.elapsed();
        timings.push(StepTiming {
            step: done,
            wall_ms: wall.as_secs_f64() * 1e3,
            passes_ms: t_passes.as_secs_f64() * 1e3,
            waited_ms: waited.as_secs_f64() * 1e3,
        });
        // The first step of a generation also allocates the gradients and
        // libtorch's own buffers: memory is reported from the second on.
        if done > start + 1 || done == train.steps {
            let usage = st.memory(activations.max(reported.activations));
            if reported == MemoryUsage::default() || usage.activations > reported.activations * 21 / 20 {
                emit(TrainEvent::Memory(usage));
                reported = usage;
            }
        }
        if a.rank == 0 {
            train::record_step(a, &mut history, done, loss, lr, grad_norm, wall, emit);
        }
        if all_uploaded {
            if let Some(saved) = saver.finish(a, &groups.world, &layout, &history)? {
                emit(committed(saved));
            }
        }
        let every = spec.checkpoint.every;
        if ((every > 0 && done % every == 0) || requested) && done < train.steps {
            if let Some(saved) = saver.finish(a, &groups.world, &layout, &history)? {
                emit(committed(saved));
            }
            let since = Instant::now();
            let snap = st.snapshot(&layout, &held, done, saver.buffers());
            saver.start_blocked(a, &out, &layout, held.clone(), snap, since, since.elapsed());
            if requested {
                if let Some(saved) = saver.finish(a, &groups.world, &layout, &history)? {
                    emit(committed(saved));
                }
                train::wait_for_new_generation(cancel);
            }
        }
    }

    if let Some(saved) = saver.finish(a, &groups.world, &layout, &history)? {
        emit(committed(saved));
    }
    stats::write(a, &st.memory(reported.activations), &timings);
    // Replicas of a stage must hold the same weights (ZeRO 0-2), and every
    // rank's pieces go to rank 0 for the final model.
    let digest = if zero < 3 { checkpoint::digest(&st.flat) } else { String::new() };
    let mine = encode_pieces(a.stage, &digest, &held, &st.snapshot(&layout, &held, train.steps, Snapshot::default()));
    let all = groups.world.all_gather_bytes(mine)?;
    let mut digests = Vec::with_capacity(all.len());
    let mut whole = if a.rank == 0 { vec![0f32; layout.total] } else { Vec::new() };
    let mut by_stage: Vec<Option<String>> = vec![None; pp];
    for bytes in &all {
        let (stage, digest, pieces) =
            decode_pieces(bytes).ok_or_else(|| TrainError::Fatal("a peer's final pieces are malformed".into()))?;
        if zero < 3 {
            match &by_stage[stage] {
                Some(d) if *d != digest => {
                    return Err(TrainError::Fatal(format!(
                        "replicas of stage {stage} diverged: parameter digests {d} and {digest}"
                    )))
                }
                _ => by_stage[stage] = Some(digest.clone()),
            }
        }
        digests.push(digest);
        if a.rank == 0 {
            for (h, values) in pieces {
                let off = layout.offsets[h.tensor];
                whole[off + h.start..off + h.end].copy_from_slice(&values);
            }
        }
    }
    if a.rank == 0 {
        train::write_final(a, &out, &layout, &whole, &digests, &history, emit)?;
    }
    Ok(Outcome::Finished)
}

/// A rank's final parameters as bytes: its stage, its digest, and each
/// piece it holds with the piece's values.
fn encode_pieces(stage: usize, digest: &str, held: &[Held], snap: &Snapshot) -> Vec<u8> {
    let header = serde_json::to_vec(&(stage, digest, held)).expect("pieces serialize");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for v in &snap.params {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[allow(clippy::type_complexity)]
fn decode_pieces(bytes: &[u8]) -> Option<(usize, String, Vec<(Held, Vec<f32>)>)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let (stage, digest, held): (usize, String, Vec<Held>) = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let values: Vec<f32> =
        bytes.get(8 + n..)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut out = Vec::with_capacity(held.len());
    for h in held {
        let piece = values.get(h.local..h.local + h.end - h.start)?.to_vec();
        out.push((h, piece));
    }
    Some((stage, digest, out))
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    for (f, j) in &ops {
                        if *f {
                            live += 1;
                            fwd.push(*j);
                        } else {
                            assert!(fwd.contains(j), "backward of {j} before its forward");
                            live -= 1;
                            bwd.push(*j);
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
}
