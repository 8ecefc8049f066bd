//! The train loop of one generation of a job on one rank. It runs on its own
//! thread (libtorch work is blocking), talks to its peers through a process
//! group, and tells its agent what happened through a callback.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_comm::{CommError, CommListener, ProcessGroup, RingConfig, SingleProcess, TcpRing};
use flotilla_jobspec::JobSpec;
use tch::Tensor;

use crate::buckets::{self, CommThread};
use crate::checkpoint::{self, BackgroundCopy, Layout};
use crate::data::Dataset;
use crate::model::Model;
use crate::optim::{self, AdamW};
use crate::sampler::Sampler;
use crate::saver::{Saved, Saver};
use crate::stats::{HeapPeak, StepTiming};
use crate::storage::Storage;
use flotilla_registry::MetricRecord;

/// After a checkpoint the coordinator asked for, how long ranks wait for the
/// new generation before they train on.
const REQUESTED_CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// What the coordinator asked this rank to do.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job: String,
    pub generation: u64,
    pub rank: usize,
    pub world: usize,
    pub peers: Vec<SocketAddr>,
    pub spec: JobSpec,
    pub spec_json: String,
    /// Where the job's checkpoints and final model go (path or URL).
    pub output_dir: String,
    /// Committed checkpoints (paths or URLs), newest first.
    pub checkpoints: Vec<String>,
    /// The agent's runtime, for storage I/O from the train thread.
    pub io: tokio::runtime::Handle,
    /// The coordinator's checkpoint request counter, kept current by the
    /// agent: rank 0 asks for a checkpoint when it grows.
    pub checkpoint_request: Arc<AtomicU64>,
    /// This rank's pipeline stage and data-parallel replica, as the
    /// coordinator's plan says (`rank = replica * stages + stage`).
    pub stage: usize,
    pub replica: usize,
    /// Pipeline stages of the plan (`parallelism.pp`).
    pub stages: usize,
}

/// The bytes a rank holds, by kind: what `flotilla status` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryUsage {
    /// Parameters kept between steps (all of the stage's, or this rank's
    /// partition under ZeRO-3).
    pub params: u64,
    /// Gradients kept for the update (the stage's, or this rank's
    /// partition under ZeRO-2 and 3).
    pub grads: u64,
    /// AdamW's moments (the stage's, or this rank's partition under ZeRO 1-3).
    pub optimizer: u64,
    /// Peak growth of the process's heap during a step's passes above what
    /// it held when the step began: the activations kept for backward
    /// passes, and the parameters gathered for them under ZeRO-3.
    pub activations: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    Progress {
        step: u64,
        loss: f64,
        lr: f64,
        samples_per_sec: f64,
        grad_norm: f64,
        /// When the step finished, wall-clock milliseconds since the Unix epoch.
        time_ms: i64,
    },
    /// Rank 0 wrote the manifest of this checkpoint; commit it.
    Checkpoint {
        step: u64,
        location: String,
        /// How long training stood still for it, and how long it took in all.
        blocked_ms: f64,
        total_ms: f64,
    },
    /// Rank 0 finished the last step and wrote the final model.
    Finished { step: u64, final_model: String },
    /// What this rank holds (every rank sends it after its first step of a
    /// generation, and again when it changes).
    Memory(MemoryUsage),
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("{0}")]
    Fatal(String),
}

impl TrainError {
    pub(crate) fn fatal(context: &str, e: impl std::fmt::Display) -> TrainError {
        TrainError::Fatal(format!("{context}: {e}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { connect_timeout: Duration::from_secs(30), op_timeout: Duration::from_secs(120) }
    }
}

/// Parameters as tensors and as one flat buffer, kept in step.
struct Params {
    layout: Layout,
    tensors: Vec<Tensor>,
    flat: Vec<f32>,
}

impl Params {
    fn new(model: &Model) -> Params {
        let (layout, flat) = model.flat();
        let tensors: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t).collect();
        Params { layout, tensors, flat }
    }

    /// Copies the flat buffer into the tensors.
    fn push(&mut self) {
        tch::no_grad(|| {
            for (i, t) in self.tensors.iter_mut().enumerate() {
                let off = self.layout.offsets[i];
                let n = t.numel();
                let src = Tensor::from_slice(&self.flat[off..off + n]).view(t.size().as_slice());
                t.copy_(&src);
            }
        });
    }

    /// The gradients of flat range `range` into `buf` (zeros where a
    /// parameter got none).
    fn pull_grads(&self, range: Range<usize>, buf: &mut [f32]) {
        for (i, t) in self.tensors.iter().enumerate() {
            let off = self.layout.offsets[i];
            let n = t.numel();
            let (a, b) = (range.start.max(off), range.end.min(off + n));
            if a >= b {
                continue;
            }
            let dst = &mut buf[a - range.start..b - range.start];
            let g = t.grad();
            if g.defined() {
                g.contiguous().view([-1]).narrow(0, (a - off) as i64, (b - a) as i64).copy_data(dst, b - a);
            } else {
                dst.fill(0.0);
            }
        }
    }

    fn zero_grads(&mut self) {
        for t in self.tensors.iter_mut() {
            t.zero_grad();
        }
    }
}

pub(crate) fn connect(
    a: &Assignment,
    listener: &CommListener,
    opts: &TrainOptions,
) -> Result<Box<dyn ProcessGroup>, CommError> {
    if a.world == 1 {
        return Ok(Box::new(SingleProcess::new(a.generation)));
    }
    let cfg = RingConfig {
        job: a.job.clone(),
        generation: a.generation,
        rank: a.rank,
        world: a.world,
        peers: a.peers.clone(),
        connect_timeout: opts.connect_timeout,
        op_timeout: opts.op_timeout,
    };
    Ok(Box::new(TcpRing::connect(listener, cfg)?))
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The checkpoints a generation may start from, best first: the job's own
/// committed ones, or else the one its job file names in
/// `checkpoint.resume_from`.
pub(crate) fn resume_candidates(a: &Assignment) -> Vec<String> {
    if a.checkpoints.is_empty() {
        a.spec.checkpoint.resume_from.iter().cloned().collect()
    } else {
        a.checkpoints.clone()
    }
}

/// The newest checkpoint that loads ([`resume_candidates`], torn ones
/// skipped) as a whole snapshot in `layout`, and (on rank 0) its metric
/// history; `None` to start from scratch. Fails when there were
/// candidates and none loads.
pub(crate) fn load_newest(
    a: &Assignment,
    layout: &checkpoint::Layout,
) -> Result<Option<(checkpoint::Snapshot, Vec<MetricRecord>)>, TrainError> {
    let candidates = resume_candidates(a);
    let mut skipped = Vec::new();
    for location in &candidates {
        let loaded = match Storage::open(location) {
            Ok(dir) => a.io.block_on(checkpoint::load(&dir, layout)),
            Err(e) => Err(e.into()),
        };
        match loaded {
            Ok((m, snap)) => {
                check_resume(&m, &a.spec, location)?;
                let history =
                    if a.rank == 0 { a.io.block_on(checkpoint::read_history(location, snap.step)) } else { Vec::new() };
                tracing::info!(job = %a.job, gen = a.generation, rank = a.rank, step = snap.step, "resumed from checkpoint");
                return Ok(Some((snap, history)));
            }
            Err(e) => {
                tracing::warn!(job = %a.job, rank = a.rank, error = %e, "skipping checkpoint");
                skipped.push(e.to_string());
            }
        }
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(TrainError::Fatal(format!("no committed checkpoint loads: {}", skipped.join("; "))))
    }
}

/// Refuses a checkpoint taken with another global batch or seed: resuming
/// from it would not continue the same run.
pub(crate) fn check_resume(m: &checkpoint::Manifest, spec: &JobSpec, location: &str) -> Result<(), TrainError> {
    let train = &spec.train;
    if m.sampler.global_batch != train.global_batch as u64 || m.sampler.seed != train.seed {
        return Err(TrainError::Fatal(format!(
            "checkpoint {} was taken with global_batch {} and seed {}, the job has {} and {}",
            location, m.sampler.global_batch, m.sampler.seed, train.global_batch, train.seed
        )));
    }
    Ok(())
}

/// After a checkpoint the coordinator asked for (a worker is leaving): the
/// coordinator starts a new generation from it as soon as it is committed.
/// Waits for that rather than train steps that would be redone.
pub(crate) fn wait_for_new_generation(cancel: &AtomicBool) {
    let until = Instant::now() + REQUESTED_CHECKPOINT_WAIT;
    while !cancel.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the assignment until the job's last step, a cancellation or an error.
pub fn run(
    a: &Assignment,
    listener: &CommListener,
    opts: &TrainOptions,
    cancel: &AtomicBool,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    if a.stages > 1 || a.spec.parallelism.zero > 0 {
        return crate::engine::run(a, listener, opts, cancel, emit);
    }
    tch::set_num_threads(1);
    let spec = &a.spec;
    let train = &spec.train;
    let data = Dataset::load(&spec.data, &spec.model).map_err(|e| TrainError::fatal("load data", e))?;
    let model = Model::build(&spec.model, train.seed);
    let mut params = Params::new(&model);
    let mut adam = AdamW::new(params.layout.total);
    let mut start = 0u64;
    // Rank 0's record of every step the weights went through: carried in
    // each checkpoint (resumed with it) and written beside the final model.
    let mut history: Vec<MetricRecord> = Vec::new();

    let out = Storage::open(&a.output_dir).map_err(|e| TrainError::fatal("open the output location", e))?;
    if let Some((snap, h)) = load_newest(a, &params.layout)? {
        start = snap.step;
        params.flat = snap.params;
        adam = AdamW { m: snap.m, v: snap.v, step: snap.optimizer_step };
        params.push();
        history = h;
    }

    let comm = CommThread::spawn(connect(a, listener, opts)?);
    let mut sampler = Sampler::new(data.len(), train.seed, train.global_batch as u64);
    let ranges = buckets::bucket_ranges(params.layout.total, buckets::bucket_elems(spec.parallelism.bucket_mb));
    let mut spare: Vec<Vec<f32>> = Vec::new();
    let global = train.global_batch as f64;
    let mut seen_request = a.checkpoint_request.load(Ordering::Relaxed);
    let mut saver = Saver::default();
    let mut reported = MemoryUsage::default();
    let mut timings: Vec<StepTiming> = Vec::new();
    let held = checkpoint::even_holding(&params.layout, a.rank, a.world);
    // A checkpoint's copy of the state, running beside the next forward and
    // backward passes. Declared after the state it reads, so that an early
    // return drops (joins) it first.
    let mut copying: Option<BackgroundCopy> = None;
    let committed = |saved: Saved| TrainEvent::Checkpoint {
        step: saved.step,
        location: saved.location,
        blocked_ms: saved.blocked.as_secs_f64() * 1e3,
        total_ms: saved.total.as_secs_f64() * 1e3,
    };

    for step in start..train.steps {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Outcome::Cancelled);
        }
        let t0 = Instant::now();
        let lr = optim::learning_rate(&train.optimizer, &train.schedule, step, train.steps);
        params.zero_grads();
        let indices = sampler.indices(step, a.rank, a.world);
        let mut local_loss = 0f64;
        let heap = HeapPeak::start();
        for mb in crate::engine::micro_batches(indices.len(), indices.len(), spec) {
            if mb.is_empty() {
                continue;
            }
            let (x, y) = data.batch(&indices[mb]);
            let loss = model.loss_sum(&x, &y);
            heap.sample();
            local_loss += loss.double_value(&[]);
            (loss / global).backward();
        }
        let activations = heap.peak();
        let t_compute = t0.elapsed();
        // Pack bucket by bucket while the comm thread reduces the ones before.
        // The loss sum and rank 0's "checkpoint now" flag ride at the end of
        // the last bucket, so every rank sees the same decision.
        let wanted = a.checkpoint_request.load(Ordering::Relaxed);
        let flag = if a.rank == 0 && wanted > seen_request { 1.0 } else { 0.0 };
        let uploaded = if saver.local_done() { 1.0 } else { 0.0 };
        let last = ranges.len() - 1;
        for (k, r) in ranges.iter().enumerate() {
            let mut b = spare.pop().unwrap_or_default();
            b.resize(r.len() + if k == last { 3 } else { 0 }, 0.0);
            params.pull_grads(r.clone(), &mut b[..r.len()]);
            if k == last {
                b[r.len()] = local_loss as f32;
                b[r.len() + 1] = flag;
                b[r.len() + 2] = uploaded;
            }
            comm.submit(b);
        }
        let t_pull = t0.elapsed();
        // Without clipping, each bucket is applied as soon as it is reduced;
        // with clipping, the norm is summed as they arrive and applied after.
        // The optimizer writes the state next: the copy must be done.
        if let Some(copy) = copying.take() {
            let (snap, since, blocked) = copy.finish();
            saver.start_blocked(a, &out, &params.layout, held.clone(), snap, since, blocked);
        }
        adam.begin();
        let mut reduced = Vec::with_capacity(ranges.len());
        let mut squares = 0f64;
        for r in &ranges {
            let b = comm.next_reduced()?;
            squares += b[..r.len()].iter().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>();
            if train.grad_clip.is_none() {
                adam.apply(&train.optimizer, lr, r.start, &mut params.flat[r.clone()], &b[..r.len()]);
            }
            reduced.push(b);
        }
        let t_comm = t0.elapsed();
        let loss = f64::from(reduced[last][ranges[last].len()]) / global;
        let requested = reduced[last][ranges[last].len() + 1] > 0.5;
        // Every rank's shard of the pending checkpoint is up: finish it now,
        // at the same step everywhere.
        let all_uploaded = saver.is_pending() && reduced[last][ranges[last].len() + 2] > a.world as f32 - 0.5;
        if requested && a.rank == 0 {
            seen_request = wanted;
        }
        if !loss.is_finite() {
            return Err(TrainError::Fatal(format!("loss is {loss} at step {}", step + 1)));
        }
        let grad_norm = squares.sqrt();
        if let Some(max) = train.grad_clip {
            let coef = optim::clip_coef(grad_norm, max);
            for (r, b) in ranges.iter().zip(reduced.iter_mut()) {
                let g = &mut b[..r.len()];
                if let Some(c) = coef {
                    g.iter_mut().for_each(|x| *x *= c);
                }
                adam.apply(&train.optimizer, lr, r.start, &mut params.flat[r.clone()], g);
            }
        }
        spare = reduced;
        params.push();
        let done = step + 1;
        let total = params.layout.total as u64 * 4;
        let usage = MemoryUsage { params: total, grads: total, optimizer: 2 * total, activations };
        // The first step of a generation also allocates the gradients and
        // libtorch's own buffers: memory is reported from the second on.
        let measured = done > start + 1 || done == train.steps;
        if measured && (reported.activations == 0 || usage.activations > reported.activations * 21 / 20) {
            emit(TrainEvent::Memory(usage));
            reported = usage;
        }
        timings.push(StepTiming {
            step: done,
            wall_ms: t0.elapsed().as_secs_f64() * 1e3,
            passes_ms: t_compute.as_secs_f64() * 1e3,
            waited_ms: 0.0,
        });
        // Where a step's time goes, cumulative from its start (FLOTILLA_LOG=flotilla_trainer=debug).
        tracing::debug!(
            step = done,
            forward_backward_ms = t_compute.as_secs_f64() * 1e3,
            pull_grads_ms = t_pull.as_secs_f64() * 1e3,
            all_reduce_ms = t_comm.as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "step timing"
        );
        if a.rank == 0 {
            record_step(a, &mut history, done, loss, lr, grad_norm, t0.elapsed(), emit);
        }
        if all_uploaded {
            if let Some(saved) = saver.finish(a, &comm, &params.layout, &history)? {
                emit(committed(saved));
            }
        }
        let every = spec.checkpoint.every;
        let periodic = every > 0 && done % every == 0;
        if (periodic || requested) && done < train.steps {
            // One checkpoint in flight at a time: a slow upload holds the
            // next checkpoint (all ranks reach this at the same step).
            if let Some(saved) = saver.finish(a, &comm, &params.layout, &history)? {
                emit(committed(saved));
            }
            // SAFETY: nothing writes to the flat parameters or the moments
            // before the copy is finished: the next write is the optimizer's,
            // after `copying.take()` above; an early return drops `copying`
            // (joining the thread) before the state.
            let copy =
                unsafe { BackgroundCopy::start(saver.buffers(), done, adam.step, &params.flat, &adam.m, &adam.v) };
            if !requested {
                copying = Some(copy);
            } else {
                let (snap, since, blocked) = copy.finish();
                saver.start_blocked(a, &out, &params.layout, held.clone(), snap, since, blocked);
            }
            if requested {
                // A worker is leaving: this one is finished at once, and the
                // coordinator starts a new generation from it as soon as it
                // is committed. Wait for that rather than train steps that
                // would be redone.
                if let Some(saved) = saver.finish(a, &comm, &params.layout, &history)? {
                    emit(committed(saved));
                }
                wait_for_new_generation(cancel);
            }
        }
    }

    if let Some(saved) = saver.finish(a, &comm, &params.layout, &history)? {
        emit(committed(saved));
    }
    crate::stats::write(a, &reported, &timings);
    // Every replica must hold the same weights: compare digests before
    // handing the model over.
    let digest = checkpoint::digest(&params.flat);
    let digests: Vec<String> = comm
        .all_gather_bytes(digest.as_bytes().to_vec())?
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .collect();
    if digests.iter().any(|d| *d != digest) {
        return Err(TrainError::Fatal(format!("replicas diverged: parameter digests per rank {digests:?}")));
    }
    if a.rank == 0 {
        write_final(a, &out, &params.layout, &params.flat, &digests, &history, emit)?;
    }
    Ok(Outcome::Finished)
}

/// Rank 0's record of step `step`, which took `took`: into the metric
/// history and to the coordinator.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_step(
    a: &Assignment,
    history: &mut Vec<MetricRecord>,
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    took: Duration,
    emit: &mut dyn FnMut(TrainEvent),
) {
    let samples_per_sec = a.spec.train.global_batch as f64 / took.as_secs_f64().max(1e-9);
    let time_ms = wall_ms();
    history.push(MetricRecord {
        step,
        loss,
        lr,
        samples_per_sec,
        grad_norm,
        generation: a.generation,
        world_size: a.world as u32,
        time_ms,
    });
    emit(TrainEvent::Progress { step, loss, lr, samples_per_sec, grad_norm, time_ms });
}

/// Rank 0's last work: the final model, the replicas' digests and the
/// metric history beside it; then the job is finished.
pub(crate) fn write_final(
    a: &Assignment,
    out: &Storage,
    layout: &checkpoint::Layout,
    flat: &[f32],
    digests: &[String],
    history: &[MetricRecord],
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<(), TrainError> {
    let path =
        a.io.block_on(checkpoint::write_final(out, layout, flat, &a.spec_json))
            .map_err(|e| TrainError::fatal("write final model", e))?;
    a.io.block_on(checkpoint::write_replica_digests(out, digests))
        .map_err(|e| TrainError::fatal("write replica digests", e))?;
    a.io.block_on(checkpoint::write_history(&out.child("final"), history))
        .map_err(|e| TrainError::fatal("write the metric history", e))?;
    emit(TrainEvent::Finished { step: a.spec.train.steps, final_model: path });
    Ok(())
}
