//! A process group on a thread of its own, fed tensors. The engine queues a
//! collective on a tensor ([`Collectives::submit`]) and goes on computing;
//! it takes the tensor back, reduced or gathered in place, when it needs it
//! ([`Collectives::wait`]). Collectives run in the order they were queued,
//! which is the same on every rank because every rank runs the same
//! schedule. A queued tensor must not be touched until it comes back.
//!
//! After a failure every later collective fails with a copy of the first
//! error, which names the rank to blame.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_comm::{CommError, ProcessGroup};
use tch::Tensor;

use super::tensors::{self, Flow};

/// A collective on a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Sum over all ranks, in place.
    AllReduce,
    /// Sum over all ranks of this rank's chunk only (see `chunk_range`).
    ReduceScatter,
    /// Every rank's chunk to every rank.
    AllGather,
    /// To one rank, which receives it with `Recv` of this rank.
    Send(usize),
    /// From one rank, into the tensor given.
    Recv(usize),
}

impl Op {
    /// The op's name in metrics, and its slot in [`Traffic`].
    fn slot(self) -> usize {
        match self {
            Op::AllReduce => 0,
            Op::ReduceScatter => 1,
            Op::AllGather => 2,
            Op::Send(_) => 3,
            Op::Recv(_) => 4,
        }
    }
}

/// The names of [`Traffic`]'s slots, as the `op` label of the metrics.
pub const OP_NAMES: [&str; 6] = ["all_reduce", "reduce_scatter", "all_gather", "send", "recv", "all_gather_bytes"];
const BYTES_SLOT: usize = 5;

/// What a group's collectives moved and how long they ran, by op (slots
/// named by [`OP_NAMES`]), measured on the comm thread.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub bytes: [u64; 6],
    pub time: [Duration; 6],
}

impl Traffic {
    fn add(&mut self, slot: usize, bytes: u64, took: Duration) {
        self.bytes[slot] += bytes;
        self.time[slot] += took;
    }

    /// `bytes` moved by `op` in `took`.
    pub fn add_op(&mut self, op: Op, bytes: u64, took: Duration) {
        self.add(op.slot(), bytes, took);
    }

    /// Both added.
    pub fn merge(&mut self, other: &Traffic) {
        for i in 0..OP_NAMES.len() {
            self.bytes[i] += other.bytes[i];
            self.time[i] += other.time[i];
        }
    }
}

/// A queued collective, to wait for.
#[derive(Debug, PartialEq, Eq, Hash)]
#[must_use = "a queued collective must be waited for"]
pub struct Ticket(u64);

enum Job {
    Tensor(u64, Op, Tensor),
    Bytes(u64, Vec<u8>),
}

enum Done {
    Tensor(Result<(Tensor, Range<usize>), CommError>),
    Bytes(Result<Vec<Vec<u8>>, CommError>),
}

pub struct Collectives {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<(u64, Done)>,
    arrived: HashMap<u64, Done>,
    next: u64,
    rank: usize,
    world: usize,
    /// How long callers have waited for results since the last
    /// [`Collectives::take_waited`].
    waited: Duration,
    /// Filled by the comm thread, taken by [`Collectives::take_traffic`].
    traffic: Arc<Mutex<Traffic>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collectives {
    pub fn spawn(mut group: Box<dyn ProcessGroup>, name: &str) -> Collectives {
        let (rank, world) = (group.rank(), group.world());
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel();
        let traffic = Arc::new(Mutex::new(Traffic::default()));
        let counted = traffic.clone();
        let thread = std::thread::Builder::new()
            .name(format!("comm-{name}"))
            .spawn(move || {
                let mut broken: Option<CommError> = None;
                let mut staging = tensors::Staging::from_env();
                for job in job_rx {
                    let (id, done) = match job {
                        Job::Tensor(id, op, mut t) => {
                            let r = match &broken {
                                Some(e) => Err(e.duplicate()),
                                None => {
                                    let (since, bytes) =
                                        (Instant::now(), (t.numel() * t.kind().elt_size_in_bytes()) as u64);
                                    let r = run(group.as_mut(), op, &mut t, &mut staging);
                                    counted.lock().expect("traffic").add(op.slot(), bytes, since.elapsed());
                                    r.map(|own| (t, own))
                                }
                            };
                            if let Err(e) = &r {
                                broken.get_or_insert_with(|| e.duplicate());
                            }
                            (id, Done::Tensor(r))
                        }
                        Job::Bytes(id, bytes) => {
                            let r = match &broken {
                                Some(e) => Err(e.duplicate()),
                                None => {
                                    let since = Instant::now();
                                    let r = group.all_gather_bytes(&bytes);
                                    counted.lock().expect("traffic").add(
                                        BYTES_SLOT,
                                        bytes.len() as u64,
                                        since.elapsed(),
                                    );
                                    r
                                }
                            };
                            if let Err(e) = &r {
                                broken.get_or_insert_with(|| e.duplicate());
                            }
                            (id, Done::Bytes(r))
                        }
                    };
                    if done_tx.send((id, done)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn a comm thread");
        Collectives {
            jobs: Some(job_tx),
            done: done_rx,
            arrived: HashMap::new(),
            next: 0,
            rank,
            world,
            waited: Duration::ZERO,
            traffic,
            thread: Some(thread),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn queue(&mut self, job: impl FnOnce(u64) -> Job) -> Ticket {
        let id = self.next;
        self.next += 1;
        // The thread only ends when this handle drops.
        let _ = self.jobs.as_ref().expect("open until drop").send(job(id));
        Ticket(id)
    }

    /// Queues `op` on `t` (contiguous, f32 or bf16). `t` comes back from
    /// [`Collectives::wait`].
    pub fn submit(&mut self, op: Op, t: Tensor) -> Ticket {
        self.queue(|id| Job::Tensor(id, op, t))
    }

    fn arrival(&mut self, id: u64) -> Done {
        let since = Instant::now();
        let done = loop {
            if let Some(d) = self.arrived.remove(&id) {
                break d;
            }
            match self.done.recv() {
                Ok((got, d)) if got == id => break d,
                Ok((got, d)) => {
                    self.arrived.insert(got, d);
                }
                Err(_) => break Done::Bytes(Err(CommError::Setup("the comm thread ended".into()))),
            }
        };
        self.waited += since.elapsed();
        done
    }

    /// The tensor of a queued collective, done, and (for a reduce-scatter)
    /// the range of it this rank owns; for other ops the whole range.
    pub fn wait(&mut self, ticket: Ticket) -> Result<(Tensor, Range<usize>), CommError> {
        match self.arrival(ticket.0) {
            Done::Tensor(r) => r,
            Done::Bytes(Err(e)) => Err(e),
            Done::Bytes(Ok(_)) => unreachable!("a tensor ticket"),
        }
    }

    /// Runs `op` on `t` and waits for it.
    pub fn run(&mut self, op: Op, t: Tensor) -> Result<(Tensor, Range<usize>), CommError> {
        let ticket = self.submit(op, t);
        self.wait(ticket)
    }

    /// Every rank's bytes, in rank order, after everything queued before.
    pub fn all_gather_bytes(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        let Ticket(id) = self.queue(|id| Job::Bytes(id, bytes));
        match self.arrival(id) {
            Done::Bytes(r) => r,
            Done::Tensor(Err(e)) => Err(e),
            Done::Tensor(Ok(_)) => unreachable!("a bytes ticket"),
        }
    }

    /// How long callers waited for results since the last call.
    pub fn take_waited(&mut self) -> Duration {
        std::mem::take(&mut self.waited)
    }

    /// What the collectives moved since the last call.
    pub fn take_traffic(&mut self) -> Traffic {
        std::mem::take(&mut *self.traffic.lock().expect("traffic"))
    }
}

fn run(
    group: &mut dyn ProcessGroup,
    op: Op,
    t: &mut Tensor,
    staging: &mut tensors::Staging,
) -> Result<Range<usize>, CommError> {
    let len = t.numel();
    let flow = match op {
        Op::Send(_) => Flow::Read,
        Op::Recv(_) => Flow::Write,
        _ => Flow::ReadWrite,
    };
    let reaches = group.reaches(tensors::memory_of(t.device()));
    staging.lend(reaches, t, flow, |buf| match op {
        Op::AllReduce => group.all_reduce_sum(buf).map(|()| 0..len),
        Op::ReduceScatter => group.reduce_scatter_sum(buf),
        Op::AllGather => group.all_gather(buf).map(|()| 0..len),
        Op::Send(to) => group.send(to, buf).map(|()| 0..len),
        Op::Recv(from) => group.recv(from, buf).map(|()| 0..len),
    })
}

impl Drop for Collectives {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_comm::SingleProcess;
    use tch::Kind;

    #[test]
    fn results_come_back_by_ticket_whatever_the_order_of_waiting() {
        let mut c = Collectives::spawn(Box::new(SingleProcess::new(1)), "test");
        let a = c.submit(Op::AllReduce, Tensor::from_slice(&[1.0f32, 2.0]));
        let b = c.submit(Op::ReduceScatter, Tensor::from_slice(&[3.0f32, 4.0, 5.0]));
        assert_eq!(c.all_gather_bytes(vec![7]).unwrap(), vec![vec![7]]);
        let (tb, own) = c.wait(b).unwrap();
        assert_eq!((tb.numel(), own), (3, 0..3));
        let (ta, _) = c.wait(a).unwrap();
        assert_eq!(ta.double_value(&[1]), 2.0);
        let t = c.take_traffic();
        assert_eq!(t.bytes[Op::AllReduce.slot()], 8, "two f32");
        assert_eq!(t.bytes[Op::ReduceScatter.slot()], 12);
        assert_eq!(t.bytes[BYTES_SLOT], 1);
        assert_eq!(t.bytes[Op::AllGather.slot()], 0);
        assert_eq!(c.take_traffic(), Traffic::default(), "taken once");
    }

    #[test]
    fn a_tensor_collectives_cannot_move_fails_and_breaks_the_group() {
        let mut c = Collectives::spawn(Box::new(SingleProcess::new(1)), "test");
        let e = c.run(Op::AllReduce, Tensor::from_slice(&[1i64])).unwrap_err();
        assert!(matches!(e, CommError::Unsupported(_)), "{e}");
        let again = c.run(Op::AllGather, Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))).unwrap_err();
        assert!(matches!(again, CommError::Unsupported(_)), "later collectives repeat the first error: {again}");
    }
}
