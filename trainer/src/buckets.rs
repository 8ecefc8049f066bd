//! Gradient buckets. The flat gradient buffer is cut into contiguous ranges
//! that a communication thread all-reduces one after another, so that while
//! one bucket is on the wire the train thread packs the next one and applies
//! (or measures) the previous one.

use std::ops::Range;
use std::sync::mpsc;

use flotilla_comm::{CommError, F32Collectives, ProcessGroup};

/// Contiguous ranges of at most `bucket_elems` elements covering `0..total`.
pub fn bucket_ranges(total: usize, bucket_elems: usize) -> Vec<Range<usize>> {
    let size = bucket_elems.max(1);
    let mut out: Vec<Range<usize>> = (0..total).step_by(size).map(|s| s..(s + size).min(total)).collect();
    if out.is_empty() {
        out.push(0..0);
    }
    out
}

/// Elements per bucket for a size in MiB of f32s.
pub fn bucket_elems(bucket_mb: f64) -> usize {
    ((bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
}

enum Request {
    Reduce(Vec<f32>),
    Gather(Vec<u8>, mpsc::Sender<Result<Vec<Vec<u8>>, CommError>>),
}

/// The process group on its own thread, driven in submission order.
pub struct CommThread {
    requests: Option<mpsc::Sender<Request>>,
    reduced: mpsc::Receiver<Result<Vec<f32>, CommError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CommThread {
    pub fn spawn(mut group: Box<dyn ProcessGroup>) -> CommThread {
        let (req_tx, req_rx) = mpsc::channel::<Request>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("comm".into())
            .spawn(move || {
                let mut broken: Option<String> = None;
                for req in req_rx {
                    match req {
                        Request::Reduce(mut buf) => {
                            let r = match &broken {
                                Some(m) => Err(CommError::Setup(m.clone())),
                                None => group.all_reduce_f32(&mut buf).map(|_| buf),
                            };
                            if let Err(e) = &r {
                                broken.get_or_insert_with(|| e.to_string());
                            }
                            if done_tx.send(r).is_err() {
                                return;
                            }
                        }
                        Request::Gather(bytes, reply) => {
                            let r = match &broken {
                                Some(m) => Err(CommError::Setup(m.clone())),
                                None => group.all_gather_bytes(&bytes),
                            };
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .expect("spawn the comm thread");
        CommThread { requests: Some(req_tx), reduced: done_rx, thread: Some(thread) }
    }

    fn send(&self, r: Request) {
        // The thread only ends when this handle drops.
        let _ = self.requests.as_ref().expect("open until drop").send(r);
    }

    /// Queues an in-place sum of `buf` over all ranks.
    pub fn submit(&self, buf: Vec<f32>) {
        self.send(Request::Reduce(buf));
    }

    /// The next reduced buffer, in submission order.
    pub fn next_reduced(&self) -> Result<Vec<f32>, CommError> {
        self.reduced.recv().unwrap_or_else(|_| Err(CommError::Setup("the comm thread ended".into())))
    }

    /// Every rank's bytes, in rank order (waits for queued reductions first).
    pub fn all_gather_bytes(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        let (tx, rx) = mpsc::channel();
        self.send(Request::Gather(bytes, tx));
        rx.recv().unwrap_or_else(|_| Err(CommError::Setup("the comm thread ended".into())))
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_comm::SingleProcess;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn buckets_tile_the_buffer_in_order(total in 0usize..5000, size in 1usize..700) {
            let r = bucket_ranges(total, size);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r.last().unwrap().end, total);
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            prop_assert!(r.iter().all(|b| b.len() <= size));
        }
    }

    #[test]
    fn the_comm_thread_answers_in_submission_order() {
        let comm = CommThread::spawn(Box::new(SingleProcess::new(1)));
        comm.submit(vec![1.0, 2.0]);
        comm.submit(vec![3.0]);
        assert_eq!(comm.next_reduced().unwrap(), vec![1.0, 2.0]);
        assert_eq!(comm.all_gather_bytes(vec![7]).unwrap(), vec![vec![7]]);
        assert_eq!(comm.next_reduced().unwrap(), vec![3.0]);
    }

    #[test]
    fn mib_to_elements() {
        assert_eq!(bucket_elems(1.0), 262_144);
        assert_eq!(bucket_elems(1e-9), 1);
    }
}
