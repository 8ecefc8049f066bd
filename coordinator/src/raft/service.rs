//! The gRPC face of a replica: the `Raft` service (peer messages handed to
//! openraft) and the `Cluster` admin service (membership changes). Handlers
//! decode, call, encode; errors map through `convert::status`.

use flotilla_proto::raft::v1 as pb;
use flotilla_proto::raft::v1::cluster_server::Cluster;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::store::{ClusterInfo, RaftStore};
use super::types::Raft;
use crate::convert;

/// Hands peers' Raft messages to the local Raft node.
pub struct RaftApi(pub Raft);

fn decode<T: DeserializeOwned>(req: Request<pb::RaftRequest>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().payload)
        .map_err(|e| Status::invalid_argument(format!("decode raft message: {e}")))
}

fn reply<T: Serialize>(result: &T) -> Result<Response<pb::RaftReply>, Status> {
    let payload = serde_json::to_vec(result).map_err(|e| Status::internal(format!("encode raft reply: {e}")))?;
    Ok(Response::new(pb::RaftReply { payload }))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftApi {
    async fn append_entries(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(&self.0.append_entries(decode(req)?).await)
    }

    async fn vote(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(&self.0.vote(decode(req)?).await)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(&self.0.install_snapshot(decode(req)?).await)
    }
}

/// Membership administration, served by the leader.
pub struct ClusterApi(pub RaftStore);

fn members_reply(info: ClusterInfo) -> pb::MembersReply {
    pb::MembersReply {
        members: info
            .members
            .into_iter()
            .map(|m| pb::Member { id: m.id, addr: m.addr, voter: m.voter, matched_index: m.matched_index })
            .collect(),
        leader: info.leader,
        leader_addr: info.leader_addr.unwrap_or_default(),
        last_log_index: info.last_log_index,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Result<Response<pb::MembersReply>, Status> {
        let req = req.into_inner();
        let info = self.0.add_member(req.id, req.addr).await.map_err(convert::status)?;
        Ok(Response::new(members_reply(info)))
    }

    async fn remove_member(&self, req: Request<pb::RemoveMemberRequest>) -> Result<Response<pb::MembersReply>, Status> {
        let info = self.0.remove_member(req.into_inner().id).await.map_err(convert::status)?;
        Ok(Response::new(members_reply(info)))
    }

    async fn members(&self, _req: Request<pb::MembersRequest>) -> Result<Response<pb::MembersReply>, Status> {
        let info = self.0.members_on_leader().map_err(convert::status)?;
        Ok(Response::new(members_reply(info)))
    }
}
