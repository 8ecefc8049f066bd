//! An in-memory Raft network for tests: delivers each message by calling
//! the target's `Raft` handle directly, and can partition the replicas,
//! drop requests or replies, duplicate and delay messages, all decided by
//! a seeded RNG.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_coordinator::raft::{NodeId, Raft, TypeConfig};
use openraft::error::{Infallible, InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What may go wrong with each message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Probability that a request is lost.
    pub drop: f64,
    /// Probability that the reply of a delivered request is lost.
    pub lose_reply: f64,
    /// Probability that a request is delivered twice.
    pub duplicate: f64,
    /// Upper bound of the random delay of each message.
    pub max_delay: Duration,
}

pub struct Router {
    nodes: Mutex<BTreeMap<NodeId, Raft>>,
    /// Partition group of each replica; replicas not listed are in group 0.
    groups: Mutex<BTreeMap<NodeId, u32>>,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
}

/// What happens to one message.
struct Fate {
    delay: Duration,
    duplicate: bool,
    lose_reply: bool,
}

fn unreachable(why: &str) -> Unreachable {
    Unreachable::new(&std::io::Error::other(why.to_string()))
}

impl Router {
    pub fn new(seed: u64) -> Arc<Router> {
        Arc::new(Router {
            nodes: Mutex::new(BTreeMap::new()),
            groups: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    pub fn register(&self, id: NodeId, raft: Raft) {
        self.nodes.lock().unwrap().insert(id, raft);
    }

    pub fn unregister(&self, id: NodeId) {
        self.nodes.lock().unwrap().remove(&id);
    }

    /// The network factory of replica `from`.
    pub fn network(self: &Arc<Self>, from: NodeId) -> RouterNetwork {
        RouterNetwork { router: self.clone(), from }
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    /// Cuts `side` off from every other replica (both directions).
    pub fn isolate(&self, side: &[NodeId]) {
        let mut groups = self.groups.lock().unwrap();
        groups.clear();
        for id in side {
            groups.insert(*id, 1);
        }
    }

    pub fn heal(&self) {
        self.groups.lock().unwrap().clear();
    }

    /// A random number from the router's RNG (for the test's own choices).
    pub fn random<T, R: rand::distributions::uniform::SampleRange<T>>(&self, range: R) -> T
    where
        T: rand::distributions::uniform::SampleUniform,
    {
        self.rng.lock().unwrap().gen_range(range)
    }

    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        let groups = self.groups.lock().unwrap();
        groups.get(&a).copied().unwrap_or(0) == groups.get(&b).copied().unwrap_or(0)
    }

    /// Decides the fate of a message from `from` to `to`, or refuses it.
    fn fate(&self, from: NodeId, to: NodeId) -> Result<Fate, Unreachable> {
        if !self.connected(from, to) {
            return Err(unreachable("partitioned"));
        }
        let faults = *self.faults.lock().unwrap();
        let mut rng = self.rng.lock().unwrap();
        if rng.gen_bool(faults.drop) {
            return Err(unreachable("request dropped"));
        }
        let max = faults.max_delay.as_micros() as u64;
        Ok(Fate {
            delay: Duration::from_micros(if max == 0 { 0 } else { rng.gen_range(0..max) }),
            duplicate: rng.gen_bool(faults.duplicate),
            lose_reply: rng.gen_bool(faults.lose_reply),
        })
    }

    /// The target's handle, after the message's delay, if it is still
    /// reachable then.
    async fn target(&self, from: NodeId, to: NodeId, fate: &Fate) -> Result<Raft, Unreachable> {
        tokio::time::sleep(fate.delay).await;
        if !self.connected(from, to) {
            return Err(unreachable("partitioned in flight"));
        }
        self.nodes.lock().unwrap().get(&to).cloned().ok_or_else(|| unreachable("replica down"))
    }
}

pub struct RouterNetwork {
    router: Arc<Router>,
    from: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for RouterNetwork {
    type Network = RouterPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> RouterPeer {
        RouterPeer { router: self.router.clone(), from: self.from, to: target }
    }
}

pub struct RouterPeer {
    router: Arc<Router>,
    from: NodeId,
    to: NodeId,
}

type RpcErr<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl RouterPeer {
    // The error type is openraft's, as in `RaftNetwork` itself.
    #[allow(clippy::result_large_err)]
    fn finish<T, E: std::error::Error>(
        &self,
        fate: &Fate,
        result: Result<T, RaftError<NodeId, E>>,
    ) -> Result<T, RpcErr<E>> {
        let reply = result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))?;
        if fate.lose_reply {
            return Err(RPCError::Unreachable(unreachable("reply dropped")));
        }
        Ok(reply)
    }
}

impl RaftNetwork<TypeConfig> for RouterPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<Infallible>> {
        let fate = self.router.fate(self.from, self.to)?;
        let raft = self.router.target(self.from, self.to, &fate).await?;
        if fate.duplicate {
            let _ = raft.append_entries(rpc.clone()).await;
        }
        let result = raft.append_entries(rpc).await;
        self.finish(&fate, result)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let fate = self.router.fate(self.from, self.to)?;
        let raft = self.router.target(self.from, self.to, &fate).await?;
        let result = raft.install_snapshot(rpc).await;
        self.finish(&fate, result)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<Infallible>> {
        let fate = self.router.fate(self.from, self.to)?;
        let raft = self.router.target(self.from, self.to, &fate).await?;
        if fate.duplicate {
            let _ = raft.vote(rpc.clone()).await;
        }
        let result = raft.vote(rpc).await;
        self.finish(&fate, result)
    }

    fn backoff(&self) -> Backoff {
        // Faults are frequent here: retry soon.
        Backoff::new(std::iter::repeat(Duration::from_millis(50)))
    }
}
