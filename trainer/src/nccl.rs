//! NCCL collectives on CUDA tensors (feature `cuda`), as a [`ProcessGroup`]
//! the engine drives like the TCP backend. NCCL and the CUDA runtime are
//! loaded when first used, so this builds on machines without CUDA. The
//! group's first member creates the communicator's unique id and shares it
//! through the coordinator's rendezvous board.
//!
//! Streams: libtorch computes on the device's default (legacy) stream. Each
//! group runs its operations on a non-blocking stream of its own, after an
//! event recorded on the default stream when the operation is issued, so it
//! starts once the kernels that produced its tensor are done and overlaps
//! the kernels queued after them (the backward pass goes on while gradients
//! are reduced). The group's thread then waits for the operation's own
//! event before it hands the tensor back.
//!
//! Watchdog: that wait has the group's deadline. It also ends when the
//! worker aborts the rank (the coordinator moved on, for instance because
//! a peer was reported gone), when NCCL reports an asynchronous error, or
//! when a peer's data port refuses connections (its process is gone). In
//! every case the communicator is aborted (`ncclCommAbort`, which also
//! ends the kernels waiting on it) and the error names the rank when one is
//! known; every later call fails at once.

use std::ffi::c_void;
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::nccl::{result, sys};
use cudarc::runtime::result as rt;
use cudarc::runtime::sys as rts;
use flotilla_comm::chunk::chunk_range;
use flotilla_comm::{Buf, CommError, DType, Memory, ProcessGroup};
use tch::{Device, Kind, Tensor};

use crate::rendezvous::Rendezvous;

/// How long an operation runs before the watchdog starts probing the
/// peers' data ports, and how often it probes after that.
const PROBE_AFTER: Duration = Duration::from_secs(1);

/// Whether NCCL and the CUDA runtime can be loaded in this process, or why
/// not (the loader panics on a missing library, so ask first).
/// Asked once per process: every step's memory sample goes through here.
pub fn available() -> Result<(), String> {
    static ANSWER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            // SAFETY: only tries to open the libraries.
            if !unsafe { rts::is_culib_present() } {
                return Err("the CUDA runtime (libcudart.so.13) is not on the library path".into());
            }
            // SAFETY: as above.
            if !unsafe { sys::is_culib_present() } {
                return Err("NCCL (libnccl.so) is not on the library path; the nvidia-nccl wheel ships libnccl.so.2 \
                            only: link libnccl.so to it in a folder on LD_LIBRARY_PATH"
                    .into());
            }
            Ok(())
        })
        .clone()
}

/// NCCL's version code (e.g. 22703 for 2.27.3), once it loads.
pub fn version() -> Option<i32> {
    available().ok()?;
    result::get_nccl_version().ok()
}

/// The PCI address of CUDA device `device` as libtorch numbers them (within
/// `CUDA_VISIBLE_DEVICES`): which physical GPU a rank computes on.
pub fn pci_bus_id(device: usize) -> Result<String, String> {
    available()?;
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: `buf` holds `len` bytes; the call writes a NUL-terminated string.
    let r = unsafe { rts::cudaDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device as i32) };
    if r != rts::cudaError::cudaSuccess {
        return Err(format!("cudaDeviceGetPCIBusId({device}): {r:?}"));
    }
    // SAFETY: NUL-terminated within `buf`.
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

fn nccl_type(dtype: DType) -> sys::ncclDataType_t {
    match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

/// Unique ids travel as their 128 raw bytes.
fn id_to_bytes(id: &sys::ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|c| *c as u8).collect()
}

fn id_from_bytes(bytes: &[u8]) -> Result<sys::ncclUniqueId, String> {
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    if bytes.len() != id.internal.len() {
        return Err(format!("a unique id has 128 bytes, got {}", bytes.len()));
    }
    for (d, s) in id.internal.iter_mut().zip(bytes) {
        *d = *s as _;
    }
    Ok(id)
}

fn setup(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Setup(format!("nccl: {what}: {e:?}"))
}

/// Where a group's members are, to name a rank in errors and to probe.
#[derive(Debug, Clone)]
pub struct Members {
    /// The members' ranks in the world, in group order.
    pub world_ranks: Vec<usize>,
    /// Their data ports (a live worker accepts connections there).
    pub data_addrs: Vec<SocketAddr>,
}

pub struct NcclGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    generation: u64,
    device: usize,
    stream: rts::cudaStream_t,
    /// Recorded on the default stream when an operation is issued.
    ready: rts::cudaEvent_t,
    /// Recorded on the group's stream after the operation.
    done: rts::cudaEvent_t,
    deadline: Duration,
    abort: Arc<AtomicBool>,
    members: Members,
    broken: Option<CommError>,
}

// SAFETY: a communicator, stream and events may be used from any one thread
// at a time; the group is not Sync and its methods take &mut self.
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Joins the communicator `key` of this generation on CUDA device
    /// `device` as member `rank` of `members`: member 0 publishes the
    /// unique id under `key`, the others wait for it (up to `timeout`).
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        rendezvous: &Rendezvous,
        key: &str,
        rank: usize,
        members: Members,
        generation: u64,
        device: usize,
        timeout: Duration,
        abort: Arc<AtomicBool>,
    ) -> Result<NcclGroup, CommError> {
        available().map_err(CommError::Setup)?;
        let world = members.world_ranks.len();
        rt::device::set(device as i32).map_err(|e| setup("select the device", e))?;
        let id = if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| setup("make a unique id", e))?;
            rendezvous.publish(key, id_to_bytes(&id)).map_err(|e| CommError::Setup(e.to_string()))?;
            id
        } else {
            let bytes = rendezvous.wait(key, timeout).map_err(|e| CommError::Setup(e.to_string()))?;
            id_from_bytes(&bytes).map_err(CommError::Setup)?
        };
        // Joining blocks until every member has joined: on a thread of its
        // own, so that a member that never comes fails this one at the
        // deadline instead of holding it for ever.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nccl-init".into())
            .spawn(move || {
                let _ = rt::device::set(device as i32);
                let mut comm = std::ptr::null_mut();
                // SAFETY: `comm` is a valid out pointer; every member passes the same id.
                let r = unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) };
                let _ = tx.send(r.map(|_| comm as usize));
            })
            .map_err(|e| setup("spawn the init thread", e))?;
        let deadline = Instant::now() + timeout;
        let comm = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(comm)) => break comm as sys::ncclComm_t,
                Ok(Err(e)) => return Err(setup("ncclCommInitRank", e)),
                Err(_) if abort.load(Ordering::Relaxed) => {
                    return Err(CommError::Setup(format!("nccl: joining {key}: this rank was stopped")))
                }
                Err(_) if Instant::now() >= deadline => {
                    return Err(CommError::Setup(format!(
                        "nccl: the communicator {key} was not complete within {timeout:?} (a member never joined)"
                    )))
                }
                Err(_) => {}
            }
        };
        let stream =
            rt::stream::create(rt::stream::StreamKind::NonBlocking).map_err(|e| setup("create a stream", e))?;
        let ready = rt::event::create(rts::cudaEventDisableTiming).map_err(|e| setup("create an event", e))?;
        let done = rt::event::create(rts::cudaEventDisableTiming).map_err(|e| setup("create an event", e))?;
        Ok(NcclGroup {
            comm,
            rank,
            world,
            generation,
            device,
            stream,
            ready,
            done,
            deadline: timeout,
            abort,
            members,
            broken: None,
        })
    }

    fn check(&self, buf: &Buf<'_>) -> Result<(), CommError> {
        if let Some(e) = &self.broken {
            return Err(e.duplicate());
        }
        if buf.memory() != Memory::Cuda(self.device) {
            return Err(CommError::Unsupported(format!(
                "the NCCL group of cuda:{} got a buffer in {:?}",
                self.device,
                buf.memory()
            )));
        }
        Ok(())
    }

    /// Issues `launch` on the group's stream after the default stream's
    /// work so far, then waits for it under the watchdog.
    fn run(
        &mut self,
        op: &'static str,
        launch: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<(), result::NcclError>,
    ) -> Result<(), CommError> {
        if let Some(e) = &self.broken {
            return Err(e.duplicate());
        }
        let issued = (|| {
            rt::device::set(self.device as i32).map_err(|e| setup("select the device", e))?;
            // SAFETY: the events and stream are this group's, alive until drop.
            unsafe {
                rt::event::record(self.ready, std::ptr::null_mut()).map_err(|e| setup("record an event", e))?;
                rt::stream::wait_event(self.stream, self.ready, 0).map_err(|e| setup("order the streams", e))?;
            }
            launch(self.comm, self.stream.cast()).map_err(|e| CommError::Setup(format!("nccl: {op}: {e:?}")))?;
            // SAFETY: as above.
            unsafe { rt::event::record(self.done, self.stream) }.map_err(|e| setup("record an event", e))
        })();
        let r = issued.and_then(|()| self.watch(op));
        if let Err(e) = &r {
            self.fail(e.duplicate());
        }
        r
    }

    /// Waits for the last issued operation's event: done, or an abort,
    /// an asynchronous error, a peer gone, or the deadline.
    fn watch(&mut self, op: &'static str) -> Result<(), CommError> {
        let started = Instant::now();
        let mut next_probe = started + PROBE_AFTER;
        let mut spins = 0u32;
        loop {
            // SAFETY: the event is this group's.
            match unsafe { rts::cudaEventQuery(self.done) } {
                rts::cudaError::cudaSuccess => return Ok(()),
                rts::cudaError::cudaErrorNotReady => {}
                other => return Err(CommError::Setup(format!("nccl: {op}: CUDA reported {other:?}"))),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if async_err != sys::ncclResult_t::ncclSuccess && async_err != sys::ncclResult_t::ncclInProgress {
                return Err(CommError::Setup(format!("nccl: {op}: {async_err:?}")));
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(CommError::Setup(format!("nccl: {op}: this rank was stopped")));
            }
            let now = Instant::now();
            if now >= next_probe {
                if let Some(gone) = self.peer_gone() {
                    return Err(CommError::PeerClosed { rank: gone, op });
                }
                next_probe = now + PROBE_AFTER;
            }
            if now.duration_since(started) >= self.deadline {
                return Err(CommError::Setup(format!(
                    "nccl: {op} did not finish within {:?}; the communicator was aborted",
                    self.deadline
                )));
            }
            spins += 1;
            if spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// The first peer (by group rank) whose data port refuses connections.
    fn peer_gone(&self) -> Option<usize> {
        self.members.data_addrs.iter().enumerate().filter(|(r, _)| *r != self.rank).find_map(|(r, addr)| {
            match TcpStream::connect_timeout(addr, Duration::from_millis(300)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(r),
                _ => None,
            }
        })
    }

    /// Aborts the communicator (its kernels end) and keeps the error.
    fn fail(&mut self, e: CommError) {
        if self.broken.is_none() {
            // SAFETY: the communicator is live; it is not used after this
            // except to be destroyed by the abort itself.
            unsafe {
                let _ = result::comm_abort(self.comm);
            }
            self.comm = std::ptr::null_mut();
            self.broken = Some(e);
        }
    }

    /// Element size and device address of `buf`.
    fn raw(buf: &mut Buf<'_>) -> (*mut c_void, usize, sys::ncclDataType_t) {
        (buf.as_mut_ptr().cast::<c_void>(), buf.dtype().size(), nccl_type(buf.dtype()))
    }

    fn scratch(&self, kind: Kind, len: usize) -> Tensor {
        Tensor::zeros([len as i64], (kind, Device::Cuda(self.device)))
    }
}

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn reaches(&self, memory: Memory) -> bool {
        memory == Memory::Cuda(self.device)
    }

    fn all_reduce_sum(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError> {
        self.check(buf)?;
        let (ptr, _, dtype) = Self::raw(buf);
        let n = buf.len();
        self.run("all_reduce", |comm, stream| {
            // SAFETY: `ptr` addresses `n` elements of `dtype` on this device,
            // alive for the call (the caller holds the buffer); in place.
            unsafe { result::all_reduce(ptr, ptr, n, dtype, sys::ncclRedOp_t::ncclSum, comm, stream) }.map(|_| ())
        })
    }

    fn reduce_scatter_sum(&mut self, buf: &mut Buf<'_>) -> Result<Range<usize>, CommError> {
        self.check(buf)?;
        let (ptr, size, dtype) = Self::raw(buf);
        let (n, world, rank) = (buf.len(), self.world, self.rank);
        let own = chunk_range(n, world, rank);
        self.run("reduce_scatter", |comm, stream| {
            // SAFETY: every chunk lies within the buffer's `n` elements.
            unsafe {
                if n % world == 0 {
                    // In place: this rank's chunk is its receive buffer.
                    let chunk = n / world;
                    let recv = ptr.cast::<u8>().add(rank * chunk * size).cast::<c_void>();
                    result::reduce_scatter(ptr, recv, chunk, dtype, sys::ncclRedOp_t::ncclSum, comm, stream)?;
                } else {
                    // Uneven chunks: one reduction to each chunk's owner.
                    result::group_start()?;
                    for r in 0..world {
                        let c = chunk_range(n, world, r);
                        let at = ptr.cast::<u8>().add(c.start * size).cast::<c_void>();
                        result::reduce(at, at, c.len(), dtype, sys::ncclRedOp_t::ncclSum, r as i32, comm, stream)?;
                    }
                    result::group_end()?;
                }
            }
            Ok(())
        })?;
        Ok(own)
    }

    fn all_gather(&mut self, buf: &mut Buf<'_>) -> Result<(), CommError> {
        self.check(buf)?;
        let (ptr, size, dtype) = Self::raw(buf);
        let (n, world, rank) = (buf.len(), self.world, self.rank);
        self.run("all_gather", |comm, stream| {
            // SAFETY: every chunk lies within the buffer's `n` elements.
            unsafe {
                if n % world == 0 {
                    let chunk = n / world;
                    let mine = ptr.cast::<u8>().add(rank * chunk * size).cast::<c_void>();
                    result::all_gather(mine, ptr, chunk, dtype, comm, stream)?;
                } else {
                    result::group_start()?;
                    for r in 0..world {
                        let c = chunk_range(n, world, r);
                        let at = ptr.cast::<u8>().add(c.start * size).cast::<c_void>();
                        result::broadcast(at, at, c.len(), dtype, r as i32, comm, stream)?;
                    }
                    result::group_end()?;
                }
            }
            Ok(())
        })
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        // Lengths first (as f32 counts would lose precision: i64 as two f32
        // words is not needed; messages here are small), then the padded
        // messages, both through device tensors.
        let world = self.world;
        if mine.len() >= 1 << 24 {
            return Err(CommError::Unsupported("the NCCL group gathers messages under 16 MiB".into()));
        }
        let mut lens = self.scratch(Kind::Float, world);
        let _ = lens.narrow(0, self.rank as i64, 1).fill_(mine.len() as f64);
        {
            let mut b = crate::engine::tensors::buf(&mut lens)?;
            self.all_reduce_sum(&mut b)?;
        }
        let lens: Vec<usize> = Vec::<f32>::try_from(lens.to_device(Device::Cpu))
            .map_err(|e| CommError::Setup(format!("nccl: read lengths: {e}")))?
            .into_iter()
            .map(|x| x as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        // Bytes as f32 values (exact for 0..=255): collectives move f32/bf16.
        let host: Vec<f32> = mine.iter().map(|b| f32::from(*b)).chain(std::iter::repeat(0.0)).take(max).collect();
        let mut all = self.scratch(Kind::Float, max * world);
        if max > 0 {
            let mut mine = all.narrow(0, (self.rank * max) as i64, max as i64);
            mine.copy_(&Tensor::from_slice(&host));
        }
        {
            let mut b = crate::engine::tensors::buf(&mut all)?;
            self.all_reduce_sum(&mut b)?;
        }
        let all = Vec::<f32>::try_from(all.to_device(Device::Cpu))
            .map_err(|e| CommError::Setup(format!("nccl: read messages: {e}")))?;
        Ok((0..world).map(|r| all[r * max..r * max + lens[r]].iter().map(|x| *x as u8).collect()).collect())
    }

    fn broadcast(&mut self, buf: &mut Buf<'_>, root: usize) -> Result<(), CommError> {
        self.check(buf)?;
        if root >= self.world {
            return Err(CommError::Protocol {
                rank: self.rank,
                message: format!("broadcast root {root} out of range"),
            });
        }
        let (ptr, _, dtype) = Self::raw(buf);
        let n = buf.len();
        self.run("broadcast", |comm, stream| {
            // SAFETY: as for all_reduce.
            unsafe { result::broadcast(ptr, ptr, n, dtype, root as i32, comm, stream) }.map(|_| ())
        })
    }

    fn send(&mut self, to: usize, buf: &Buf<'_>) -> Result<(), CommError> {
        self.check(buf)?;
        let (ptr, dtype, n) = (buf.as_ptr().cast::<c_void>().cast_mut(), nccl_type(buf.dtype()), buf.len());
        self.run("send", |comm, stream| {
            // SAFETY: `ptr` addresses `n` elements on this device, alive for the call.
            unsafe { result::send(ptr, n, dtype, to as i32, comm, stream) }.map(|_| ())
        })
        .map_err(|e| e.map_rank(|r| if r == self.rank { to } else { r }))
    }

    fn recv(&mut self, from: usize, buf: &mut Buf<'_>) -> Result<(), CommError> {
        self.check(buf)?;
        let (ptr, _, dtype) = Self::raw(buf);
        let n = buf.len();
        self.run("recv", |comm, stream| {
            // SAFETY: as for all_reduce.
            unsafe { result::recv(ptr, n, dtype, from as i32, comm, stream) }.map(|_| ())
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let mut one = self.scratch(Kind::Float, 1);
        let mut b = crate::engine::tensors::buf(&mut one)?;
        self.all_reduce_sum(&mut b)
    }
}

impl NcclGroup {
    /// The world rank of group member `r`, for errors the engine reports.
    pub fn world_rank(&self, r: usize) -> usize {
        self.members.world_ranks.get(r).copied().unwrap_or(r)
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: everything here is this group's and unused after this.
        unsafe {
            if !self.comm.is_null() {
                let _ = rts::cudaStreamSynchronize(self.stream);
                let _ = result::comm_destroy(self.comm);
            }
            let _ = rt::event::destroy(self.ready);
            let _ = rt::event::destroy(self.done);
            let _ = rt::stream::destroy(self.stream);
        }
    }
}

/// Whether the watchdog ends an operation that can never finish: a receive
/// from this member with no matching send, under a `deadline`. Returns how
/// long the failure took to surface and the error. The group is aborted
/// afterwards (run it last).
pub fn check_watchdog(group: &mut NcclGroup, deadline: Duration) -> Result<(Duration, String), String> {
    group.deadline = deadline;
    let mut t = Tensor::zeros([1024], (Kind::Float, Device::Cuda(group.device)));
    let started = Instant::now();
    let me = group.rank;
    let r = crate::engine::tensors::buf(&mut t)
        .map_err(|e| e.to_string())
        .and_then(|mut b| group.recv(me, &mut b).map_err(|e| e.to_string()));
    match r {
        Ok(()) => Err("a receive with no sender finished".into()),
        Err(e) => Ok((started.elapsed(), e)),
    }
}

/// One collective checked against a CPU reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// Largest difference from the reference, or what went wrong.
    pub detail: String,
}

/// Runs every collective of `group` (on its device) on inputs each member
/// computes from its rank, and compares the results with the same
/// collective computed on the CPU from every member's inputs. Every member
/// of the group must call it at once.
pub fn check_collectives(group: &mut NcclGroup) -> Vec<Check> {
    let (rank, world, dev) = (group.rank, group.world, Device::Cuda(group.device));
    // Member r's input of length n: distinct, exactly representable values.
    let input = |r: usize, n: usize| -> Tensor {
        (Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * 0.25 + (r as f64 + 1.0) * 1000.0).remainder(4096.0)
    };
    let mut out = Vec::new();
    // f32 sums of these inputs are exact; bf16 sums of more than two
    // members may round in another order than the reference.
    let mut check = |name: String, r: Result<Tensor, CommError>, want: Tensor| {
        let tolerance = if want.kind() == Kind::BFloat16 { 2f64.powi(-7) } else { 0.0 };
        let (ok, detail) = match r {
            Err(e) => (false, e.to_string()),
            Ok(got) => {
                let got = got.to_device(Device::Cpu).to_kind(Kind::Float);
                let want = want.to_kind(Kind::Float);
                let diff = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]).max(1.0);
                (diff <= tolerance * scale, format!("max |difference| {diff} (allowed {})", tolerance * scale))
            }
        };
        out.push(Check { name, ok, detail });
    };
    for (kind, kname) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        // Lengths that split evenly over the group and lengths that do not.
        for n in [world * 4096, world * 4096 + 3] {
            let sum: Tensor = (0..world).map(|r| input(r, n).to_kind(kind).to_kind(Kind::Float)).sum::<Tensor>();
            let mine = || input(rank, n).to_kind(kind).to_device(dev);

            let mut t = mine();
            let r = crate::engine::tensors::buf(&mut t).and_then(|mut b| group.all_reduce_sum(&mut b)).map(|()| t);
            check(format!("all_reduce {kname} n={n}"), r, sum.to_kind(kind));

            let mut t = mine();
            let own = chunk_range(n, world, rank);
            let r = crate::engine::tensors::buf(&mut t).and_then(|mut b| group.reduce_scatter_sum(&mut b));
            let r = r.and_then(|got| {
                if got != own {
                    return Err(CommError::Setup(format!("owned {got:?}, expected {own:?}")));
                }
                Ok(t.narrow(0, own.start as i64, own.len() as i64))
            });
            check(
                format!("reduce_scatter {kname} n={n}"),
                r,
                sum.narrow(0, own.start as i64, own.len() as i64).to_kind(kind),
            );

            // Each member fills its own chunk; the rest holds garbage.
            let mut t = Tensor::full([n as i64], -7.0, (kind, dev));
            let whole = Tensor::zeros([n as i64], (Kind::Float, Device::Cpu));
            for r in 0..world {
                let c = chunk_range(n, world, r);
                let mut dst = whole.narrow(0, c.start as i64, c.len() as i64);
                dst.copy_(&input(r, n).narrow(0, c.start as i64, c.len() as i64).to_kind(kind).to_kind(Kind::Float));
            }
            let own = chunk_range(n, world, rank);
            let mut dst = t.narrow(0, own.start as i64, own.len() as i64);
            dst.copy_(&input(rank, n).narrow(0, own.start as i64, own.len() as i64).to_kind(kind).to_device(dev));
            let r = crate::engine::tensors::buf(&mut t).and_then(|mut b| group.all_gather(&mut b)).map(|()| t);
            check(format!("all_gather {kname} n={n}"), r, whole.to_kind(kind));

            let root = world - 1;
            let mut t = mine();
            let r = crate::engine::tensors::buf(&mut t).and_then(|mut b| group.broadcast(&mut b, root)).map(|()| t);
            check(format!("broadcast {kname} n={n} root={root}"), r, input(root, n).to_kind(kind));
        }
    }
    if world > 1 {
        // A ring: each member sends to the next and receives from the
        // previous, sends first on even members (so no two wait on each other).
        let n = 10_000;
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let mut send = input(rank, n).to_device(dev);
        let mut recv = Tensor::zeros([n as i64], (Kind::Float, dev));
        let mut go = |first_send: bool| -> Result<(), CommError> {
            for step in 0..2 {
                if (step == 0) == first_send {
                    let b = crate::engine::tensors::buf(&mut send)?;
                    group.send(next, &b)?;
                } else {
                    let mut b = crate::engine::tensors::buf(&mut recv)?;
                    group.recv(prev, &mut b)?;
                }
            }
            Ok(())
        };
        let r = go(rank % 2 == 0).map(|()| recv);
        check(format!("send/recv ring n={n}"), r, input(prev, n));
    }
    let barrier = group.barrier();
    out.push(Check { name: "barrier".into(), ok: barrier.is_ok(), detail: format!("{barrier:?}") });
    let msg = format!("rank {rank} says hello").into_bytes();
    let (ok, detail) = match group.all_gather_bytes(&msg) {
        Ok(all) => {
            let want: Vec<Vec<u8>> = (0..world).map(|r| format!("rank {r} says hello").into_bytes()).collect();
            (all == want, format!("{} messages", all.len()))
        }
        Err(e) => (false, e.to_string()),
    };
    out.push(Check { name: "all_gather_bytes".into(), ok, detail });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_survive_the_trip_through_bytes() {
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (i, c) in id.internal.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37) as _;
        }
        let back = id_from_bytes(&id_to_bytes(&id)).unwrap();
        assert_eq!(back.internal, id.internal);
        assert!(id_from_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn collectives_move_f32_and_bf16_as_nccl_types() {
        assert_eq!(nccl_type(DType::F32), sys::ncclDataType_t::ncclFloat32);
        assert_eq!(nccl_type(DType::BF16), sys::ncclDataType_t::ncclBfloat16);
    }

    #[test]
    fn a_missing_runtime_is_an_error_not_a_panic() {
        // On a machine without CUDA both checks answer; with CUDA they pass.
        match available() {
            Ok(()) => assert!(pci_bus_id(0).is_ok() || tch::Cuda::device_count() == 0),
            Err(why) => assert!(why.contains("not on the library path"), "{why}"),
        }
    }
}
