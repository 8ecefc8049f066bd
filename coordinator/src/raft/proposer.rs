//! Group commit on the leader: commands proposed while earlier batches are
//! being committed wait and are then proposed together, as one log entry.
//! openraft 0.9 appends (and fsyncs) each client write on its own, one at a
//! time; a batch costs one append, one fsync and one replication round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::types::{ApplyResult, NodeId, Proposal, Raft};
use crate::state::Command;

/// Commands in one log entry at most.
const MAX_BATCH: usize = 256;
/// Batches proposed and not yet answered at once: the next batch is
/// appended while the one before it is replicated and applied.
const MAX_IN_FLIGHT: usize = 2;

pub(crate) type WriteError = RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>;

/// What a proposal is answered with: what applying it returned, or why
/// its batch was not committed.
pub(crate) type Outcome = Result<ApplyResult, WriteError>;

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Outcome>,
}

/// The handle on the batching task.
pub(crate) struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
    shutdown: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Proposer {
    /// Starts the task; a batch not committed within `timeout` is given up
    /// (its entry may still commit later, like any timed-out write).
    pub(crate) fn start(raft: Raft, timeout: Duration) -> Proposer {
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(raft, rx, timeout, shutdown.clone()));
        Proposer { tx, shutdown, task: Mutex::new(Some(task)) }
    }

    /// Queues `cmd`; the receiver is answered once its batch is applied,
    /// and closed if the task has stopped.
    pub(crate) fn propose(&self, cmd: Command) -> oneshot::Receiver<Outcome> {
        let (reply, rx) = oneshot::channel();
        // A stopped task drops the command, and with it `reply`.
        let _ = self.tx.send(Pending { cmd, reply });
        rx
    }

    /// Stops the task and waits for it; queued proposals are dropped.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.cancel();
        let task = self.task.lock().expect("proposer task lock").take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "proposer task failed");
            }
        }
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Pending>, timeout: Duration, shutdown: CancellationToken) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut batches = JoinSet::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = in_flight.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            first = rx.recv() => match first {
                Some(p) => p,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        batches.spawn(commit(raft.clone(), batch, timeout, permit));
        while batches.try_join_next().is_some() {}
    }
    batches.shutdown().await;
}

/// Proposes `batch` as one entry and answers each command.
async fn commit(raft: Raft, batch: Vec<Pending>, timeout: Duration, _permit: OwnedSemaphorePermit) {
    let (cmds, replies): (Vec<Command>, Vec<oneshot::Sender<Outcome>>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let proposal =
        if cmds.len() == 1 { Proposal::One(cmds.into_iter().next().expect("one")) } else { Proposal::Batch(cmds) };
    // On a timeout the replies are dropped: the callers time out themselves.
    let Ok(written) = tokio::time::timeout(timeout, raft.client_write(proposal)).await else { return };
    match written {
        Ok(response) => {
            for (reply, result) in replies.into_iter().zip(response.data) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
