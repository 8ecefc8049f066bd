//! A rank's connections for one generation: the whole world (the step's
//! control exchange, checkpoints, the final hand-over), its stage's
//! data-parallel group (gradient reductions, ZeRO's gathers), and its
//! pipeline neighbours (activations forward, their gradients back, each
//! direction on a connection of its own, sent from a thread of its own so
//! that two stages sending each other large messages never wait on each
//! other).

use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use flotilla_comm::{Buf, CommError, CommListener, Memory, ProcessGroup, RingConfig, SingleProcess, TcpRing};
use tch::{Device, Kind, Tensor};

use super::collective::{Collectives, Op, Ticket, Traffic};
use super::plan::Plan;
use super::tensors::{self, Flow, Staging};
use crate::types::{Assignment, TrainOptions};

/// The stage's data-parallel group.
pub(crate) enum Dp {
    /// One replica: nothing to reduce or gather.
    Alone,
    /// One stage: the world is the group.
    World,
    Own(Collectives),
}

pub(crate) struct Groups {
    pub world: Collectives,
    dp: Dp,
    to_next: Option<SendThread>,
    from_prev: Option<Box<dyn ProcessGroup>>,
    to_prev: Option<SendThread>,
    from_next: Option<Box<dyn ProcessGroup>>,
    /// What the pipeline links moved (sends counted on their threads).
    pipe: Arc<Mutex<Traffic>>,
    /// The rank's device, where received tensors go.
    device: Device,
    /// Host copies for receiving device tensors over host-memory links.
    staging: Staging,
}

/// A collective queued on the data-parallel group, or (without one) its
/// result already.
pub(crate) enum InFlight {
    Queued(Ticket),
    Ready(Tensor, Range<usize>),
}

impl Groups {
    /// Connects every group of this rank, in one order on every rank (the
    /// world, the stage groups, then the pipeline links stage by stage), so
    /// that no two ranks wait on each other's next connection.
    pub fn connect(
        a: &Assignment,
        plan: &Plan,
        listener: &CommListener,
        opts: &TrainOptions,
    ) -> Result<Groups, CommError> {
        let (pp, dp) = (plan.pp, plan.dp);
        let at = |stage: usize, replica: usize| replica * pp + stage;
        let world: Box<dyn ProcessGroup> = if a.world == 1 {
            Box::new(SingleProcess::new(a.generation))
        } else {
            ring(a, listener, opts, a.job.clone(), (0..a.world).collect())?
        };
        let mut world = Collectives::spawn(world, "world");
        let nccl = backend(a, plan, &mut world)? == Backend::Nccl;
        // With NCCL the world stays on TCP for its small messages and the
        // final hand-over; the stage's reductions get a communicator.
        let link = |name: String, members: Vec<usize>| -> Result<Box<dyn ProcessGroup>, CommError> {
            if nccl {
                gpu_link(a, plan, opts, name, members)
            } else {
                ring(a, listener, opts, name, members)
            }
        };
        let dp_group = if dp == 1 {
            Dp::Alone
        } else if pp == 1 && !nccl {
            Dp::World
        } else {
            let members = (0..dp).map(|r| at(a.stage, r)).collect();
            Dp::Own(Collectives::spawn(link(format!("{}#dp{}", a.job, a.stage), members)?, "dp"))
        };
        let pipe = Arc::new(Mutex::new(Traffic::default()));
        let mut g = Groups {
            world,
            dp: dp_group,
            to_next: None,
            from_prev: None,
            to_prev: None,
            from_next: None,
            pipe,
            device: plan.device,
            staging: Staging::from_env(),
        };
        for s in 0..pp.saturating_sub(1) {
            if a.stage != s && a.stage != s + 1 {
                continue;
            }
            let pair = vec![at(s, a.replica), at(s + 1, a.replica)];
            let fwd = link(format!("{}#fwd{}.{}", a.job, a.replica, s), pair.clone())?;
            let bwd = link(format!("{}#bwd{}.{}", a.job, a.replica, s), pair)?;
            if a.stage == s {
                g.to_next = Some(SendThread::spawn(fwd, 1, g.pipe.clone()));
                g.from_next = Some(bwd);
            } else {
                g.from_prev = Some(fwd);
                g.to_prev = Some(SendThread::spawn(bwd, 0, g.pipe.clone()));
            }
        }
        Ok(g)
    }

    /// The data-parallel group's collectives, if it has more than one rank.
    pub fn dp(&mut self) -> Option<&mut Collectives> {
        match &mut self.dp {
            Dp::Alone => None,
            Dp::World => Some(&mut self.world),
            Dp::Own(c) => Some(c),
        }
    }

    /// Queues `op` on `t` in the data-parallel group.
    pub fn dp_submit(&mut self, op: Op, t: Tensor) -> InFlight {
        match self.dp() {
            Some(c) => InFlight::Queued(c.submit(op, t)),
            None => {
                let n = t.numel();
                InFlight::Ready(t, 0..n)
            }
        }
    }

    pub fn dp_wait(&mut self, f: InFlight) -> Result<(Tensor, Range<usize>), CommError> {
        match f {
            InFlight::Ready(t, own) => Ok((t, own)),
            InFlight::Queued(ticket) => self.dp().expect("queued on a group").wait(ticket),
        }
    }

    /// Time spent waiting on the world and data-parallel groups since the
    /// last call.
    pub fn take_waited(&mut self) -> std::time::Duration {
        let mut w = self.world.take_waited();
        if let Dp::Own(c) = &mut self.dp {
            w += c.take_waited();
        }
        w
    }

    /// What the world's and the data-parallel group's collectives and the
    /// pipeline links moved since the last call.
    pub fn take_traffic(&mut self) -> Traffic {
        let mut t = self.world.take_traffic();
        if let Dp::Own(c) = &mut self.dp {
            t.merge(&c.take_traffic());
        }
        t.merge(&std::mem::take(&mut *self.pipe.lock().expect("pipeline traffic")));
        t
    }

    /// The next activation from the previous stage, of `shape` and `kind`.
    pub fn recv_from_prev(&mut self, shape: &[i64], kind: Kind) -> Result<Tensor, CommError> {
        let link = self.from_prev.as_mut().expect("a previous stage");
        recv(link, 0, shape, (kind, self.device), &mut self.staging, &self.pipe)
    }

    /// The next gradient from the next stage, of `shape` and `kind`.
    pub fn recv_from_next(&mut self, shape: &[i64], kind: Kind) -> Result<Tensor, CommError> {
        let link = self.from_next.as_mut().expect("a next stage");
        recv(link, 1, shape, (kind, self.device), &mut self.staging, &self.pipe)
    }

    /// Queues `t` for the next stage; it must not be written meanwhile.
    pub fn send_to_next(&self, t: Tensor) {
        self.to_next.as_ref().expect("a next stage").send(t);
    }

    /// Queues `t` for the previous stage; it must not be written meanwhile.
    pub fn send_to_prev(&self, t: Tensor) {
        self.to_prev.as_ref().expect("a previous stage").send(t);
    }

    /// Waits until every queued pipeline message is written.
    pub fn flush_sends(&self) -> Result<(), CommError> {
        for s in [&self.to_next, &self.to_prev].into_iter().flatten() {
            s.flush()?;
        }
        Ok(())
    }
}

/// The next message from rank `from` of a pipeline pair (0: the earlier
/// stage, 1: the later).
fn recv(
    group: &mut Box<dyn ProcessGroup>,
    from: usize,
    shape: &[i64],
    (kind, device): (Kind, Device),
    staging: &mut Staging,
    pipe: &Mutex<Traffic>,
) -> Result<Tensor, CommError> {
    let mut t = Tensor::empty(shape, (kind, device));
    let since = Instant::now();
    let reaches = group.reaches(tensors::memory_of(device));
    staging.lend(reaches, &mut t, Flow::Write, |b| group.recv(from, b))?;
    let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    pipe.lock().expect("pipeline traffic").add_op(Op::Recv(from), bytes, since.elapsed());
    Ok(t)
}

/// What carries a generation's tensor collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The TCP ring (CUDA tensors staged through pinned host memory).
    Tcp,
    /// NCCL communicators on the GPUs.
    Nccl,
}

/// The backend every rank of the generation agrees on: NCCL when every
/// rank computes on a GPU of its own (NCCL refuses two ranks on one device)
/// and can load NCCL; else TCP. Decided from every rank's answer, one small
/// exchange over the world.
fn backend(a: &Assignment, plan: &Plan, world: &mut Collectives) -> Result<Backend, CommError> {
    if a.world == 1 {
        return Ok(Backend::Tcp);
    }
    let mine = gpu_identity(a, plan);
    let all = world.all_gather_bytes(mine.clone().unwrap_or_default().into_bytes())?;
    let (chosen, why) = choose(&all);
    if plan.device.is_cuda() {
        // This rank's own reason first, if it has one.
        let why = mine.err().unwrap_or_else(|| why.to_string());
        tracing::info!(job = %a.job, generation = a.generation, rank = a.rank, backend = ?chosen, %why,
            "collective backend for CUDA tensors");
    }
    Ok(chosen)
}

/// NCCL when every rank named a GPU (`host|PCI address`; empty: none it
/// can use) and no two named the same one; and why.
fn choose(identities: &[Vec<u8>]) -> (Backend, &'static str) {
    let distinct: std::collections::HashSet<&Vec<u8>> = identities.iter().collect();
    if identities.iter().any(|d| d.is_empty()) {
        (Backend::Tcp, "a rank has no GPU or no NCCL")
    } else if distinct.len() < identities.len() {
        (Backend::Tcp, "two ranks share a GPU (NCCL refuses that)")
    } else {
        (Backend::Nccl, "every rank has a GPU of its own")
    }
}

/// This rank's GPU as `host|PCI address` when it can join an NCCL
/// communicator, else why not.
fn gpu_identity(a: &Assignment, plan: &Plan) -> Result<String, String> {
    let tch::Device::Cuda(d) = plan.device else {
        return Err("the rank computes on the CPU".into());
    };
    if a.rendezvous.is_none() {
        return Err("no rendezvous board to share NCCL's unique id".into());
    }
    gpu_pci(d).map(|pci| format!("{}|{pci}", a.peers[a.rank].ip()))
}

#[cfg(feature = "cuda")]
fn gpu_pci(device: usize) -> Result<String, String> {
    crate::nccl::pci_bus_id(device)
}

#[cfg(not(feature = "cuda"))]
fn gpu_pci(_device: usize) -> Result<String, String> {
    Err("this worker was built without the `cuda` feature (no NCCL)".into())
}

/// An NCCL communicator of `members` (world ranks) on this rank's GPU,
/// whose errors name peers by world rank.
#[cfg(feature = "cuda")]
fn gpu_link(
    a: &Assignment,
    plan: &Plan,
    opts: &TrainOptions,
    name: String,
    members: Vec<usize>,
) -> Result<Box<dyn ProcessGroup>, CommError> {
    use crate::nccl::{Members, NcclGroup};
    let rank = members.iter().position(|r| *r == a.rank).expect("a member of its own group");
    let tch::Device::Cuda(device) = plan.device else { unreachable!("NCCL is chosen for CUDA ranks only") };
    let rendezvous = a.rendezvous.as_ref().expect("NCCL is chosen with a rendezvous board only");
    let group = NcclGroup::connect(
        rendezvous,
        &format!("nccl/{name}"),
        rank,
        Members { world_ranks: members.clone(), data_addrs: members.iter().map(|r| a.peers[*r]).collect() },
        a.generation,
        device,
        opts.op_timeout.max(opts.connect_timeout),
        a.abort.clone(),
    )?;
    Ok(Box::new(Subgroup { inner: Box::new(group), members }))
}

#[cfg(not(feature = "cuda"))]
fn gpu_link(
    _a: &Assignment,
    _plan: &Plan,
    _opts: &TrainOptions,
    _name: String,
    _members: Vec<usize>,
) -> Result<Box<dyn ProcessGroup>, CommError> {
    unreachable!("NCCL is chosen only in builds with the `cuda` feature")
}

/// A ring of `members` (world ranks), whose errors name peers by world rank.
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
        secret: a.secret.clone(),
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
    fn reaches(&self, memory: Memory) -> bool {
        self.inner.reaches(memory)
    }
}

/// Point-to-point messages written on their own thread, in order.
struct SendThread {
    tx: Option<mpsc::Sender<SendJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum SendJob {
    Send(Tensor),
    Flush(mpsc::Sender<Result<(), CommError>>),
}

impl SendThread {
    /// Sends to rank `to` of `group`.
    fn spawn(mut group: Box<dyn ProcessGroup>, to: usize, pipe: Arc<Mutex<Traffic>>) -> SendThread {
        let (tx, rx) = mpsc::channel::<SendJob>();
        let thread = std::thread::Builder::new()
            .name("pipeline-send".into())
            .spawn(move || {
                // The first error is handed over once, with the peer it
                // names; later messages are skipped.
                let (mut failed, mut broken): (Option<CommError>, Option<String>) = (None, None);
                let mut staging = tensors::Staging::from_env();
                for job in rx {
                    match job {
                        SendJob::Send(mut t) => {
                            if failed.is_none() && broken.is_none() {
                                let (since, bytes) =
                                    (Instant::now(), (t.numel() * t.kind().elt_size_in_bytes()) as u64);
                                let reaches = group.reaches(tensors::memory_of(t.device()));
                                let sent = staging.lend(reaches, &mut t, Flow::Read, |b| group.send(to, b));
                                pipe.lock().expect("pipeline traffic").add_op(Op::Send(to), bytes, since.elapsed());
                                if let Err(e) = sent {
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

    fn send(&self, t: Tensor) {
        let _ = self.tx.as_ref().expect("open until drop").send(SendJob::Send(t));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<Vec<u8>> {
        names.iter().map(|n| n.as_bytes().to_vec()).collect()
    }

    #[test]
    fn nccl_only_when_every_rank_has_a_gpu_of_its_own() {
        assert_eq!(choose(&ids(&["10.0.0.1|0000:18:00.0", "10.0.0.1|0000:2a:00.0"])).0, Backend::Nccl);
        assert_eq!(choose(&ids(&["10.0.0.1|0000:18:00.0", "10.0.0.2|0000:18:00.0"])).0, Backend::Nccl, "two hosts");
        // Two ranks on one GPU: NCCL refuses that.
        assert_eq!(
            choose(&ids(&["10.0.0.1|0000:18:00.0", "10.0.0.1|0000:18:00.0"])),
            (Backend::Tcp, "two ranks share a GPU (NCCL refuses that)")
        );
        // A rank on a CPU (or without NCCL) answers nothing.
        assert_eq!(choose(&ids(&["10.0.0.1|0000:18:00.0", ""])).0, Backend::Tcp);
        assert_eq!(choose(&ids(&["", ""])).0, Backend::Tcp);
    }
}
