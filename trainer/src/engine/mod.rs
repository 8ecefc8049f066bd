//! The train engine: what one rank runs for one generation of a job, the
//! same loop for every layout (data parallelism with ZeRO 0-3, pipelines of
//! `pp` stages × `dp` replicas with GPipe or 1F1B, one process).
//!
//! A step, top to bottom ([`run`]):
//! 1. the forward and backward passes of the stage's units over the
//!    replica's micro-batches (`passes`), each unit's gradients handed to the
//!    step's reductions as soon as its last backward pass is done (`grads`),
//!    so that communication overlaps the passes still running;
//! 2. waiting for those reductions: the rank then holds the reduced
//!    gradients of what it owns;
//! 3. the control exchange (`control`): loss, gradient norm, checkpoint
//!    request and upload flags, typed, one small collective over the world;
//! 4. the update (`state`): clipping and AdamW as tensor operations on the
//!    rank's own state, then (ZeRO 1-2) the parameters gathered whole;
//! 5. bookkeeping: the step's record, memory reports, checkpoints (a copy of
//!    the state that runs beside the next step's passes, `weights`, then an
//!    upload, `saver`).
//!
//! Before the first step the rank connects its groups (`groups`) and finds
//! where to start (`resume`); after the last, it hands the model over
//! (`finish`). What a rank holds follows from its place in the grid
//! (`plan`): `rank = replica × pp + stage`; the ranks of a stage form its
//! data-parallel group, where ZeRO partitions each unit's state into `dp`
//! chunks.

pub(crate) mod collective;
mod control;
mod eval;
mod finish;
mod grads;
mod groups;
mod passes;
pub mod plan;
mod resume;
pub mod saver;
mod state;
pub mod tensors;
mod tied;
pub mod weights;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_comm::CommListener;
use flotilla_registry::MetricRecord;

use self::control::StepReport;
use self::grads::StepGrads;
use self::groups::Groups;
use self::passes::StepPasses;
use self::plan::Plan;
use self::saver::{Saved, Saver};
use self::state::{clip_coefficient, State};
use crate::data::Dataset;
use crate::optim;
use crate::sampler::Sampler;
use crate::stats::{self, RunStats, StepSplit, StepTiming};
use crate::storage::Storage;
use crate::telemetry::RankMetrics;
use crate::tensorboard::EventWriter;
use crate::tokenize::TokenCache;
use crate::types::{wall_ms, Assignment, MemoryUsage, Outcome, TrainError, TrainEvent, TrainOptions};

/// After a checkpoint the coordinator asked for, how long ranks wait for the
/// new generation before they train on.
const REQUESTED_CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// Steps ahead of the current one whose samples are read in the background
/// (a corpus of shards; other data sets are in memory).
const READ_AHEAD_STEPS: u64 = 2;

/// How often a rank tells the coordinator where its steps went (and what
/// it holds), at most.
const RANK_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Runs the assignment until the job's last step, a cancellation or an error.
pub fn run(
    a: &Assignment,
    listener: &CommListener,
    opts: &TrainOptions,
    cancel: &AtomicBool,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    tch::set_num_threads(1);
    let spec = &a.spec;
    let train = &spec.train;
    let plan = Plan::new(a)?;
    let out = Storage::open(&a.output_dir).map_err(|e| TrainError::fatal("open the output location", e))?;
    let cache = TokenCache::new(&out, a.io.clone());
    let data = Dataset::load(&spec.data, &spec.model, Some(&cache)).map_err(|e| TrainError::fatal("load data", e))?;
    let eval_data = eval::load(spec, &cache)?;
    let mut groups = Groups::connect(a, &plan, listener, opts)?;
    let tied = tied::Tied::new(&plan, crate::model::tied(&spec.model));

    // Where this generation starts: the newest checkpoint every rank loads
    // its pieces of, or the seed.
    let (mut state, start, mut history) = match resume::newest(a, &plan, &mut groups.world)? {
        Some(r) => (State::from_checkpoint(&plan, &r.loaded), r.loaded.manifest.step, r.history),
        None => (State::init(&plan, &spec.model, train.seed)?, 0, Vec::new()),
    };
    let mut run = RunStats { start_peak_rss: stats::peak_rss(), ..Default::default() };
    let metrics = RankMetrics::new(a);
    let mut events = event_file(a);
    let mut sampler = Sampler::new(data.len(), train.seed, train.global_batch as u64);
    // Steps whose samples are on their way while the current one runs.
    let ahead = |sampler: &mut Sampler, step: u64| {
        if plan.reads_data() && step < train.steps {
            data.prefetch(&sampler.indices(step, plan.replica, plan.dp));
        }
    };
    for s in start..start + READ_AHEAD_STEPS {
        ahead(&mut sampler, s);
    }
    let held = plan.holding();
    let copy_pieces = State::copy_pieces(&plan);
    let mut saver = Saver::default();
    let mut seen_request = a.checkpoint_request.load(Ordering::Relaxed);
    let global = train.global_batch as f64;
    let (mut last_report, mut reported_steps) = (Instant::now(), 0);
    let mut device_peak = 0u64;

    for step in start..train.steps {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Outcome::Cancelled);
        }
        let t0 = Instant::now();
        let lr = optim::learning_rate(&train.optimizer, &train.schedule, step, train.steps);

        // 1. The passes; reductions start as units finish their last one.
        let indices = sampler.indices(step, plan.replica, plan.dp);
        ahead(&mut sampler, step + READ_AHEAD_STEPS);
        let mut grads = StepGrads::start(&plan, &mut state.grads, spec.parallelism.bucket_mb);
        let passes = StepPasses { plan: &plan, spec, data: &data, params: &state.weights.read().params };
        let done_passes = passes.run(&mut groups, &mut grads, &mut state.grads, &indices)?;
        let t_passes = t0.elapsed();
        let comm_in_passes = groups.take_waited();
        let device_used = match plan.device {
            tch::Device::Cuda(g) => crate::device::cuda_used(g).unwrap_or(0),
            _ => 0,
        };
        device_peak = device_peak.max(device_used);

        // 2. The gradients this rank owns, reduced.
        grads.finish(&plan, &mut groups, &mut state.grads)?;
        if let Some(t) = &tied {
            t.sum_grads(&plan, &mut groups, &mut state.grads)?;
        }

        // 3. What every rank needs to know to finish the step.
        let wanted = a.checkpoint_request.load(Ordering::Relaxed);
        let report = StepReport {
            loss_sum: done_passes.loss_sum,
            grad_squares: state.owned_grad_squares(&plan, tied.as_ref()),
            checkpoint_requested: a.rank == 0 && wanted > seen_request,
            shard_done: saver.local_done(),
        };
        let verdict = control::exchange(&mut groups.world, report)?;
        let loss = verdict.loss_sum / global;
        if !loss.is_finite() {
            return Err(TrainError::Fatal(format!("loss is {loss} at step {}", step + 1)));
        }
        if verdict.checkpoint_requested && a.rank == 0 {
            seen_request = wanted;
        }

        // 4. The update; a checkpoint copy still reading the state ends first.
        let comm_before_update = groups.take_waited();
        let t_update = Instant::now();
        let clip = clip_coefficient(train.grad_clip, verdict.grad_norm);
        if let Some(c) = state.update(&plan, &train.optimizer, lr, clip) {
            saver.start(a, &out, &plan.layout, held.clone(), c.snap, c.started, c.blocked);
        }
        state.gather_params(&plan, &mut groups)?;
        let comm_in_update = groups.take_waited();
        let comm_wait = comm_in_passes + comm_before_update + comm_in_update;
        let done = step + 1;

        // 5. Evaluation, with the weights this step made.
        let evaluated = match (&spec.eval, &eval_data) {
            (Some(e), Some(d)) if eval::due(e, done, train.steps) => {
                Some(eval::evaluate(&plan, spec, e, d, &state.weights.read().params, &mut groups)?)
            }
            _ => None,
        };

        // 6. Bookkeeping.
        let wall = t0.elapsed();
        let timing = StepTiming {
            step: done,
            wall_ms: ms(wall),
            passes_ms: ms(t_passes),
            waited_ms: ms(done_passes.pipeline_wait),
            comm_wait_ms: ms(comm_wait),
            optimizer_ms: ms(t_update.elapsed()),
            data_wait_ms: ms(done_passes.data_wait),
            comm_in_passes_ms: ms(comm_in_passes),
            comm_in_update_ms: ms(comm_in_update),
        };
        metrics.step(&timing);
        metrics.progress(loss, lr, verdict.grad_norm);
        metrics.traffic(&groups.take_traffic());
        if let Some(e) = &evaluated {
            metrics.eval(e.loss);
        }
        run.steps.push(timing);
        // The first step of a generation also allocates libtorch's own
        // buffers: memory is reported from the second on, again when it
        // grows, and with where the steps went about once a second.
        if done > start + 1 || done == train.steps {
            let mut usage = state.memory(&plan, done_passes.activations.max(run.memory.activations));
            usage.device_used = device_used;
            usage.device_peak = device_peak;
            let grew = run.memory == MemoryUsage::default()
                || usage.activations > run.memory.activations * 21 / 20
                || usage.device_peak > run.memory.device_peak * 21 / 20;
            if grew {
                metrics.held(&usage);
                run.memory = usage;
            }
            if grew || last_report.elapsed() >= RANK_REPORT_EVERY || done == train.steps {
                let times = StepSplit::of(&run.steps[reported_steps..]);
                emit(TrainEvent::Rank { memory: run.memory, times });
                reported_steps = run.steps.len();
                last_report = Instant::now();
            }
        }
        tracing::debug!(
            step = done,
            passes_ms = ms(t_passes),
            comm_wait_ms = ms(comm_wait),
            total_ms = ms(wall),
            "step timing"
        );
        if a.rank == 0 {
            let step = StepRecord { step: done, loss, lr, grad_norm: verdict.grad_norm, took: wall, evaluated };
            record_step(a, &mut history, step, events.as_mut(), emit);
        }
        if verdict.all_shards_done {
            if let Some(saved) = saver.finish(a, &mut groups.world, &plan.layout, &history)? {
                emit(committed(&metrics, saved));
            }
        }
        let every = spec.checkpoint.every;
        let requested = verdict.checkpoint_requested;
        if ((every > 0 && done % every == 0) || requested) && done < train.steps {
            // One checkpoint in flight at a time: a slow upload holds the
            // next one (all ranks reach this at the same step).
            if let Some(saved) = saver.finish(a, &mut groups.world, &plan.layout, &history)? {
                emit(committed(&metrics, saved));
            }
            let buffers = saver.buffers();
            if !requested {
                // Copied beside the next step's passes; the update waits for it.
                state.weights.start_copy(copy_pieces.clone(), buffers, done, state.adam.step);
            } else {
                // A worker is leaving: this checkpoint is finished at once,
                // and the coordinator starts a new generation from it as
                // soon as it is committed. Wait for that rather than train
                // steps that would be redone.
                let c = state.weights.copy_now(&copy_pieces, buffers, done, state.adam.step);
                saver.start(a, &out, &plan.layout, held.clone(), c.snap, c.started, c.blocked);
                if let Some(saved) = saver.finish(a, &mut groups.world, &plan.layout, &history)? {
                    emit(committed(&metrics, saved));
                }
                wait_for_new_generation(cancel);
            }
        }
    }

    if let Some(c) = state.weights.finish_copy() {
        saver.start(a, &out, &plan.layout, held.clone(), c.snap, c.started, c.blocked);
    }
    if let Some(saved) = saver.finish(a, &mut groups.world, &plan.layout, &history)? {
        emit(committed(&metrics, saved));
    }
    if run.memory == MemoryUsage::default() {
        run.memory = state.memory(&plan, 0);
    }
    stats::write(a, &run);
    finish::hand_over(a, &plan, &mut state, &mut groups, &out, &history, emit)?;
    Ok(Outcome::Finished)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn committed(metrics: &RankMetrics, saved: Saved) -> TrainEvent {
    metrics.checkpoint(saved.blocked, saved.total);
    TrainEvent::Checkpoint {
        step: saved.step,
        location: saved.location,
        blocked_ms: ms(saved.blocked),
        total_ms: ms(saved.total),
    }
}

/// What rank 0 records of a step.
struct StepRecord {
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    /// How long the step took.
    took: Duration,
    evaluated: Option<eval::Evaluated>,
}

/// Rank 0's record of a step: into the metric history and to the
/// coordinator.
fn record_step(
    a: &Assignment,
    history: &mut Vec<MetricRecord>,
    s: StepRecord,
    events: Option<&mut EventWriter>,
    emit: &mut dyn FnMut(TrainEvent),
) {
    let samples_per_sec = a.spec.train.global_batch as f64 / s.took.as_secs_f64().max(1e-9);
    let time_ms = wall_ms();
    let eval_loss = s.evaluated.map(|e| e.loss);
    let eval_accuracy = s.evaluated.and_then(|e| e.accuracy);
    if let Some(w) = events {
        let mut scalars = vec![
            ("train/loss", s.loss),
            ("train/lr", s.lr),
            ("train/grad_norm", s.grad_norm),
            ("train/samples_per_sec", samples_per_sec),
        ];
        scalars.extend(eval_loss.map(|l| ("eval/loss", l)));
        scalars.extend(eval_accuracy.map(|acc| ("eval/accuracy", acc)));
        w.scalars(s.step, &scalars);
    }
    history.push(MetricRecord {
        step: s.step,
        loss: s.loss,
        lr: s.lr,
        samples_per_sec,
        grad_norm: s.grad_norm,
        generation: a.generation,
        world_size: a.world as u32,
        time_ms,
        eval_loss,
        eval_accuracy,
    });
    emit(TrainEvent::Progress {
        step: s.step,
        loss: s.loss,
        lr: s.lr,
        samples_per_sec,
        grad_norm: s.grad_norm,
        time_ms,
        eval_loss,
        eval_accuracy,
    });
}

/// Rank 0's TensorBoard event file for this generation, when the job asks
/// for one (a folder that cannot be made is logged, not fatal).
fn event_file(a: &Assignment) -> Option<EventWriter> {
    let dir = a.spec.metrics.tensorboard.as_deref().filter(|_| a.rank == 0)?;
    match EventWriter::create(std::path::Path::new(dir), &a.job, a.generation) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir, error = %e, "could not create the TensorBoard event file; training goes on without it");
            None
        }
    }
}

/// After a checkpoint the coordinator asked for (a worker is leaving): the
/// coordinator starts a new generation from it as soon as it is committed.
/// Waits for that rather than train steps that would be redone.
fn wait_for_new_generation(cancel: &AtomicBool) {
    let until = Instant::now() + REQUESTED_CHECKPOINT_WAIT;
    while !cancel.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}
