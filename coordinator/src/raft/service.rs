//! The gRPC face of a replica: the `Raft` service (peer messages handed to
//! openraft) and the `Cluster` admin service (membership changes). Handlers
//! decode, check the sender, call, encode; errors map through
//! `convert::status`.
//!
//! A Raft message is accepted only from a member (voter or learner) of the
//! membership this replica knows, by the id the message claims (the
//! leader's or candidate's id in its vote); before this replica knows any
//! membership, only from the initial peers it was opened with, or from
//! anyone when it was opened to join (no peers). The id is claimed, not
//! proven: this stops a stranger or a misconfigured replica, not a forger,
//! until mutual TLS authenticates the peer.

use std::collections::BTreeSet;

use flotilla_proto::raft::v1 as pb;
use flotilla_proto::raft::v1::cluster_server::Cluster;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::Vote;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::store::{ClusterInfo, RaftStore};
use super::types::{NodeId, Raft, TypeConfig};
use crate::{convert, limits};

/// Hands members' Raft messages to the local Raft node.
pub struct RaftApi {
    raft: Raft,
    /// The senders accepted before any membership is known.
    bootstrap: BTreeSet<NodeId>,
}

impl RaftApi {
    /// The service of `raft`, opened with `bootstrap` as its initial voters
    /// (empty for a replica that waits to be added).
    pub fn new(raft: Raft, bootstrap: BTreeSet<NodeId>) -> Self {
        RaftApi { raft, bootstrap }
    }

    /// Refuses a message whose sender is not a member of this replica's
    /// membership (see the module's doc).
    fn admit(&self, rpc: &str, vote: &Vote<NodeId>) -> Result<(), Status> {
        let sender = vote.leader_id().voted_for();
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let known = membership.nodes().next().is_some();
        let member = match sender {
            Some(id) if known => membership.get_node(&id).is_some(),
            Some(id) => self.bootstrap.is_empty() || self.bootstrap.contains(&id),
            None => false,
        };
        if member {
            return Ok(());
        }
        let sender = sender.map_or_else(|| "no one".to_string(), |id| id.to_string());
        tracing::warn!(rpc, %sender, term = vote.leader_id().term, "raft message from a non-member refused");
        Err(Status::permission_denied(format!(
            "{rpc} from replica {sender}, which is not a member of this replica's cluster"
        )))
    }
}

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
        let req: AppendEntriesRequest<TypeConfig> = decode(req)?;
        self.admit("AppendEntries", &req.vote)?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let req: VoteRequest<NodeId> = decode(req)?;
        self.admit("Vote", &req.vote)?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        self.admit("InstallSnapshot", &req.vote)?;
        reply(&self.raft.install_snapshot(req).await)
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
        if let Some(problem) = limits::url_problem(&req.addr) {
            return Err(Status::invalid_argument(format!("replica {}: {problem}", req.id)));
        }
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

#[cfg(test)]
mod fuzz {
    //! Whatever bytes a peer sends as a Raft payload, `decode` answers with
    //! a message or an `InvalidArgument` status, never a panic. Cases:
    //! `PROPTEST_CASES` (default 2048).

    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use proptest::prelude::*;

    use super::*;
    use crate::raft::Proposal;
    use crate::state::Command;

    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
        ProptestConfig { cases, ..ProptestConfig::default() }
    }

    fn request(payload: Vec<u8>) -> Request<pb::RaftRequest> {
        Request::new(pb::RaftRequest { payload })
    }

    /// Decodes `payload` as each of the three messages; a refusal is an
    /// `InvalidArgument` with a message, an acceptance survives re-encoding.
    fn decode_all(payload: &[u8]) -> Result<(), TestCaseError> {
        fn one<T: DeserializeOwned + Serialize>(payload: &[u8]) -> Result<(), TestCaseError> {
            match decode::<T>(request(payload.to_vec())) {
                Ok(msg) => {
                    let again = serde_json::to_vec(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(decode::<T>(request(again)).is_ok());
                }
                Err(status) => {
                    prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    prop_assert!(status.message().starts_with("decode raft message: "), "{}", status.message());
                }
            }
            Ok(())
        }
        one::<AppendEntriesRequest<TypeConfig>>(payload)?;
        one::<VoteRequest<NodeId>>(payload)?;
        one::<InstallSnapshotRequest<TypeConfig>>(payload)
    }

    /// Real messages, encoded as a peer encodes them.
    fn samples() -> Vec<Vec<u8>> {
        let vote = Vote::new_committed(3, 1);
        let log_id = |index| LogId::new(CommittedLeaderId::new(3, 1), index);
        let command = Command::PreemptWorker { worker: "w-1".into(), reason: "spot".into(), at_ms: 7 };
        let append = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id(4)),
            entries: vec![
                Entry { log_id: log_id(5), payload: EntryPayload::Blank },
                Entry { log_id: log_id(6), payload: EntryPayload::Normal(Proposal::One(command.clone())) },
                Entry { log_id: log_id(7), payload: EntryPayload::Normal(Proposal::Batch(vec![command; 2])) },
            ],
            leader_commit: Some(log_id(5)),
        };
        let ask = VoteRequest::new(Vote::new(4, 2), Some(log_id(7)));
        vec![serde_json::to_vec(&append).unwrap(), serde_json::to_vec(&ask).unwrap()]
    }

    #[test]
    fn the_samples_decode() {
        for sample in samples() {
            let text = String::from_utf8(sample).unwrap();
            assert_eq!(tokenize(&text).concat(), text);
        }
        let [append, ask] = <[Vec<u8>; 2]>::try_from(samples()).unwrap();
        assert!(decode::<AppendEntriesRequest<TypeConfig>>(request(append)).is_ok());
        assert!(decode::<VoteRequest<NodeId>>(request(ask)).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused() {
        for open in ["[", "{\"vote\":", "{\"entries\":[{\"payload\":{\"Normal\":"] {
            let payload = open.repeat(100_000).into_bytes();
            decode_all(&payload).unwrap();
            assert!(decode::<AppendEntriesRequest<TypeConfig>>(request(payload)).is_err());
        }
    }

    /// `text` (JSON) cut into strings, numbers and punctuation.
    fn tokenize(text: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let len = match c {
                '"' => rest[1..].find('"').map_or(rest.len(), |i| i + 2),
                '{' | '}' | '[' | ']' | ',' | ':' => 1,
                _ => rest.find(['{', '}', '[', ']', ',', ':', '"']).unwrap_or(rest.len()),
            };
            tokens.push(rest[..len].to_owned());
            rest = &rest[len..];
        }
        tokens
    }

    proptest! {
        #![proptest_config(config())]

        /// The samples' own tokens replaced, removed and inserted: the
        /// messages keep their shape, so decoding gets deep into them.
        #[test]
        fn recombined_tokens_never_panic(
            sample in 0usize..2,
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 0u8..3), 1..8),
        ) {
            let texts: Vec<String> = samples().into_iter().map(|b| String::from_utf8(b).unwrap()).collect();
            let mut pool: Vec<String> =
                ["18446744073709551616", "-1", "1e999", "null", "\"\\ud800\"", "{}", "[]"].map(String::from).to_vec();
            pool.extend(texts.iter().flat_map(|t| tokenize(t)));
            let mut message = tokenize(&texts[sample]);
            for (at, with, how) in edits {
                let i = at.index(message.len() + 1);
                match how {
                    0 if i < message.len() => message[i] = with.get(&pool).clone(),
                    1 if i < message.len() => drop(message.remove(i)),
                    _ => message.insert(i, with.get(&pool).clone()),
                }
            }
            decode_all(message.concat().as_bytes())?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(payload in prop::collection::vec(any::<u8>(), 0..512)) {
            decode_all(&payload)?;
        }

        #[test]
        fn mutated_messages_never_panic(
            sample in 0usize..2,
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..8),
        ) {
            let mut payload = samples().swap_remove(sample);
            for (at, byte, how) in edits {
                let at = at % (payload.len() + 1);
                match how {
                    0 if at < payload.len() => payload[at] = byte,
                    1 => payload.truncate(at),
                    2 => payload.insert(at, byte),
                    // A number a peer could not have sent.
                    _ => payload.splice(at..at, b"18446744073709551616".iter().copied()).for_each(drop),
                }
            }
            decode_all(&payload)?;
        }
    }
}
