//! The rank's weights (its f32 parameters and AdamW moments, flat tensors on
//! the job's device) and the copy a checkpoint takes of them. The copy runs
//! on a thread of its own beside the next step's passes, which only read
//! the weights; [`WeightsSlot`] hands out the weights for writing only after
//! that copy is done, so the update never races it. The copying thread
//! holds its own handles to the tensors, so their memory lives as long as it
//! needs it.

use std::ops::Range;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use crate::checkpoint::{Dtype, Snapshot};

pub struct Weights {
    pub params: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

/// One piece a checkpoint copies: its range in the parameter tensor and in
/// the moment tensors, and where it goes in the snapshot (elements).
#[derive(Debug, Clone)]
pub struct CopyPiece {
    pub params: Range<usize>,
    pub moments: Range<usize>,
    pub local: usize,
}

/// A finished copy: the snapshot, when the copy started, and how long
/// training stood still for it.
pub struct Copied {
    pub snap: Snapshot,
    pub started: Instant,
    pub blocked: Duration,
}

struct Copying {
    handle: std::thread::JoinHandle<Snapshot>,
    started: Instant,
    /// Time the train thread spent starting it.
    spawn: Duration,
}

pub struct WeightsSlot {
    weights: Weights,
    copying: Option<Copying>,
}

pub(crate) fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        other => panic!("the state is f32 or bf16, not {other:?}"),
    }
}

/// Elements a GPU's checkpoint copy moves at a time through its pinned
/// host buffer (16 MiB of f32).
const PINNED_ELEMS: i64 = 4 << 20;

/// Copies `len` elements of `t` from `start` into `dst` (host bytes). From
/// a GPU the copy goes through a page-locked buffer, `pinned`, made on
/// first use and reused, so that the device copies at the bus's speed.
fn copy_out(t: &Tensor, start: usize, len: usize, dst: &mut [u8], pinned: &mut Option<Tensor>) {
    let size = t.kind().elt_size_in_bytes();
    if !t.device().is_cuda() {
        t.narrow(0, start as i64, len as i64).copy_data_u8(dst, len);
        return;
    }
    let mut done = 0i64;
    while done < len as i64 {
        let n = (len as i64 - done).min(PINNED_ELEMS);
        let buf = match pinned {
            Some(b) if b.kind() == t.kind() => b,
            _ => pinned.insert(Tensor::empty([PINNED_ELEMS], (t.kind(), tch::Device::Cpu)).pin_memory(t.device())),
        };
        let mut part = buf.narrow(0, 0, n);
        tch::no_grad(|| part.copy_(&t.narrow(0, start as i64 + done, n)));
        let at = done as usize * size;
        part.copy_data_u8(&mut dst[at..at + n as usize * size], n as usize);
        done += n;
    }
}

/// Copies `pieces` of `w` into `snap`, reusing its buffers.
fn fill(w: &Weights, pieces: &[CopyPiece], mut snap: Snapshot, step: u64, optimizer_step: u64) -> Snapshot {
    snap.step = step;
    snap.optimizer_step = optimizer_step;
    let total: usize = pieces.iter().map(|p| p.params.len()).sum();
    let mut pinned = None;
    for (array, t, moments) in
        [(&mut snap.params, &w.params, false), (&mut snap.m, &w.m, true), (&mut snap.v, &w.v, true)]
    {
        let dtype = dtype_of(t.kind());
        array.dtype = dtype;
        array.bytes.resize(total * dtype.size(), 0);
        for p in pieces {
            let r = if moments { &p.moments } else { &p.params };
            let at = p.local * dtype.size();
            let dst = &mut array.bytes[at..at + r.len() * dtype.size()];
            copy_out(t, r.start, r.len(), dst, &mut pinned);
        }
    }
    snap
}

impl WeightsSlot {
    pub fn new(weights: Weights) -> WeightsSlot {
        WeightsSlot { weights, copying: None }
    }

    /// The weights, to read (a copy may be running).
    pub fn read(&self) -> &Weights {
        &self.weights
    }

    /// Starts copying `pieces` into `snap` (whose buffers are reused) on a
    /// thread of its own. One copy at a time.
    pub fn start_copy(&mut self, pieces: Vec<CopyPiece>, snap: Snapshot, step: u64, optimizer_step: u64) {
        assert!(self.copying.is_none(), "one checkpoint copy at a time");
        let started = Instant::now();
        let w = Weights {
            params: self.weights.params.shallow_clone(),
            m: self.weights.m.shallow_clone(),
            v: self.weights.v.shallow_clone(),
        };
        let handle = std::thread::Builder::new()
            .name("checkpoint-copy".into())
            .spawn(move || fill(&w, &pieces, snap, step, optimizer_step))
            .expect("spawn the checkpoint copy thread");
        self.copying = Some(Copying { handle, started, spawn: started.elapsed() });
    }

    /// Waits for a running copy, if any.
    pub fn finish_copy(&mut self) -> Option<Copied> {
        let c = self.copying.take()?;
        let t = Instant::now();
        let snap = c.handle.join().expect("the checkpoint copy thread panicked");
        Some(Copied { snap, started: c.started, blocked: c.spawn + t.elapsed() })
    }

    /// The weights, to write: waits for a running copy first and hands back
    /// what it copied.
    pub fn write(&mut self) -> (&mut Weights, Option<Copied>) {
        let copied = self.finish_copy();
        (&mut self.weights, copied)
    }

    /// Copies `pieces` into `snap` now, on this thread.
    pub fn copy_now(&mut self, pieces: &[CopyPiece], snap: Snapshot, step: u64, optimizer_step: u64) -> Copied {
        assert!(self.copying.is_none(), "one checkpoint copy at a time");
        let started = Instant::now();
        let snap = fill(&self.weights, pieces, snap, step, optimizer_step);
        Copied { snap, started, blocked: started.elapsed() }
    }
}

impl Drop for WeightsSlot {
    fn drop(&mut self) {
        let _ = self.finish_copy();
    }
}

/// The parameters' bytes in `r` (host memory), for digests and the final model.
pub(crate) fn host_bytes(t: &Tensor, r: Range<usize>) -> Vec<u8> {
    let size = dtype_of(t.kind()).size();
    let mut out = vec![0u8; r.len() * size];
    t.narrow(0, r.start as i64, r.len() as i64).copy_data_u8(&mut out, r.len());
    out
}
