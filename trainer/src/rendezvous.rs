//! A blocking client of the coordinator's rendezvous board, for the train
//! thread: ranks of one generation share what a collective backend needs
//! before it can connect (NCCL's unique id).

use std::time::{Duration, Instant};

use flotilla_proto::auth::AuthChannel;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;

#[derive(Clone)]
pub struct Rendezvous {
    runtime: tokio::runtime::Handle,
    client: WorkerServiceClient<AuthChannel>,
    /// This worker (it must be assigned to the job).
    worker: String,
    job: String,
    generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("rendezvous {key}: {status}")]
    Rpc { key: String, status: tonic::Status },
    #[error("rendezvous {key}: nothing published within {after:?}")]
    Timeout { key: String, after: Duration },
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous").field("job", &self.job).field("generation", &self.generation).finish()
    }
}

impl Rendezvous {
    /// `runtime` must be a runtime other than the calling thread's (the
    /// train thread has none; it borrows the agent's).
    pub fn new(
        runtime: tokio::runtime::Handle,
        client: WorkerServiceClient<AuthChannel>,
        worker: &str,
        job: &str,
        generation: u64,
    ) -> Self {
        Rendezvous { runtime, client, worker: worker.to_string(), job: job.to_string(), generation }
    }

    pub fn publish(&self, key: &str, value: Vec<u8>) -> Result<(), RendezvousError> {
        let mut c = self.client.clone();
        let req = pb::RendezvousPut {
            job_id: self.job.clone(),
            generation: self.generation,
            key: key.into(),
            value,
            worker_id: self.worker.clone(),
        };
        self.runtime
            .block_on(c.publish_rendezvous(req))
            .map(|_| ())
            .map_err(|status| RendezvousError::Rpc { key: key.into(), status })
    }

    /// Waits until `key` is published in this generation.
    pub fn wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, RendezvousError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.client.clone();
        loop {
            let req = pb::RendezvousGet {
                job_id: self.job.clone(),
                generation: self.generation,
                key: key.into(),
                worker_id: self.worker.clone(),
            };
            match self.runtime.block_on(c.lookup_rendezvous(req)) {
                Ok(v) => return Ok(v.into_inner().value),
                Err(s) if s.code() == Code::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(s) if s.code() == Code::NotFound => {
                    return Err(RendezvousError::Timeout { key: key.into(), after: timeout });
                }
                Err(status) => return Err(RendezvousError::Rpc { key: key.into(), status }),
            }
        }
    }
}
