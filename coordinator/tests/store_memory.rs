//! The shared meta-store suite on [`MemStore`]: one replica, no restarts.

mod store_suite;

use std::sync::Arc;

use async_trait::async_trait;
use flotilla_coordinator::state::{State, DEFAULT_MAX_RESTARTS};
use flotilla_coordinator::{MemStore, MetaStore};
use store_suite::*;

struct Memory(Arc<MemStore>);

impl Memory {
    fn new() -> Self {
        Memory(Arc::new(MemStore::new(State::new(DEFAULT_MAX_RESTARTS))))
    }
}

#[async_trait]
impl TestCluster for Memory {
    fn size(&self) -> usize {
        1
    }
    fn replica(&self, i: usize) -> Option<Arc<dyn MetaStore>> {
        (i == 0).then(|| self.0.clone() as Arc<dyn MetaStore>)
    }
    async fn stop(&mut self, _: usize) {
        panic!("an in-memory store cannot be stopped and started again");
    }
    async fn start(&mut self, _: usize) {
        panic!("an in-memory store cannot be stopped and started again");
    }
    async fn compact(&mut self) -> bool {
        false
    }
}

macro_rules! suite_tests {
    ($($name:ident: $suite:ident;)*) => {$(
        #[tokio::test]
        async fn $name() {
            $suite(&mut Memory::new()).await;
        }
    )*};
}

suite_tests! {
    memory_propose_returns_events: suite_propose_returns_events;
    memory_state_on_every_replica: suite_state_on_every_replica;
    memory_single_leader: suite_followers_redirect;
    memory_concurrent_proposals: suite_concurrent_proposals;
    memory_snapshot: suite_snapshot_then_new_replica;
}
