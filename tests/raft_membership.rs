//! Membership changes and Raft messages that must not lose the cluster,
//! against three real `flotilla coordinator` replicas on loopback: adding
//! an unreachable or malformed replica is refused and the cluster keeps its
//! quorum; Raft messages from a replica that is not a member (a stranger's
//! AppendEntries carrying CancelJob or a membership of its own, a Vote with
//! a higher term) are refused and change nothing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla::coordinator::raft::{Entry, Proposal, TypeConfig};
use flotilla::coordinator::Command;
use flotilla::proto::raft::v1 as rpb;
use flotilla::proto::raft::v1::raft_client::RaftClient;
use flotilla::proto::v1 as pb;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, Vote};
use support::cluster::*;
use support::*;

const JOB: &str = "
name: quorum
model: {kind: mlp, layers: [4, 8, 2]}
data: {kind: synthetic, seed: 1, samples: 64}
train: {steps: 10, global_batch: 8, micro_batch: 8, seed: 1}
workers: {min: 1, max: 1}
checkpoint: {url: runs, every: 5, keep: 2}
";

/// Three replicas on free ports; their URLs and the comma-joined list.
fn three_replicas(dir: &Path) -> (Vec<Proc>, Vec<u16>, Vec<String>, String) {
    let ports = free_ports(3);
    let replicas = (1..=3).map(|id| replica(dir, id, &ports)).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let list = addrs.join(",");
    (replicas, ports, addrs, list)
}

/// `flotilla submit` of the test job through `list`; the job's id.
fn submit(dir: &Path, list: &str) -> String {
    let job = job_file(dir, "job", JOB);
    let out = flotilla(dir, &["submit", job.to_str().unwrap(), "--coordinator", list]);
    assert!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The membership as the leader reports it.
async fn members(addrs: &[String]) -> rpb::MembersReply {
    let (leader, _) = leader_client(addrs).await;
    let mut c = rpb::cluster_client::ClusterClient::new(channel(&leader).await.unwrap());
    c.members(rpb::MembersRequest {}).await.unwrap().into_inner()
}

fn voters(m: &rpb::MembersReply) -> BTreeSet<u64> {
    m.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

fn ids(m: &rpb::MembersReply) -> BTreeSet<u64> {
    m.members.iter().map(|m| m.id).collect()
}

/// `flotilla coordinator ARGS --coordinator list`: exit status and stderr.
fn admin(dir: &Path, args: &[&str], list: &str) -> (bool, String, String) {
    let out = flotilla(dir, &[&["coordinator"], args, &["--coordinator", list]].concat());
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn adding_an_unreachable_or_malformed_replica_is_refused_and_the_cluster_keeps_its_quorum() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (_replicas, _ports, addrs, list) = three_replicas(dir.path());
    rt.block_on(leader_client(&addrs));

    // Nothing listens on port 9: the replica never answers and is left out.
    let (ok, _, err) = admin(dir.path(), &["add", "99", "http://127.0.0.1:9"], &list);
    assert!(!ok, "adding an unreachable replica succeeded");
    assert!(err.contains("FailedPrecondition") && err.contains("did not answer"), "{err}");
    assert!(err.contains("removed again"), "{err}");

    // Malformed addresses are refused before anything changes.
    for (id, bad, why) in [("98", "", "empty"), ("97", "http://127.0.0.1", "port"), ("96", "ftp://h:1", "http")] {
        let (ok, _, err) = admin(dir.path(), &["add", id, bad], &list);
        assert!(!ok, "adding {bad:?} succeeded");
        assert!(err.contains("InvalidArgument") && err.contains(why), "{bad:?}: {err}");
    }

    let m = rt.block_on(members(&addrs));
    assert_eq!(ids(&m), BTreeSet::from([1, 2, 3]), "{m:?}");
    assert_eq!(voters(&m), BTreeSet::from([1, 2, 3]), "{m:?}");

    // The cluster still takes writes and membership changes: a real replica
    // joins (caught up, then a voter), and `remove` works.
    let job = submit(dir.path(), &list);
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("replica-4");
    let args =
        [&["--listen", &listen, "--id", "4", "--join", "--data-dir", data.to_str().unwrap()][..], &TIMINGS].concat();
    let _fourth = spawn_coordinator(&dir.path().join("coordinator-4.log"), &args).0;
    let (ok, out, err) = admin(dir.path(), &["add", "4", &format!("http://{listen}")], &list);
    assert!(ok, "adding a live replica failed: {err}");
    assert!(out.lines().any(|l| l.split_whitespace().take(2).eq(["4", "voter"])), "{out}");
    let (ok, _, err) = admin(dir.path(), &["remove", "4"], &list);
    assert!(ok, "remove 4: {err}");
    // A follower goes (removing the leader works too, but elects anew).
    let leader = rt.block_on(members(&addrs)).leader.expect("a leader");
    let victim = (1..=3u64).find(|id| *id != leader).unwrap();
    let (ok, _, err) = admin(dir.path(), &["remove", &victim.to_string()], &list);
    assert!(ok, "remove {victim}: {err}");
    let m = rt.block_on(members(&addrs));
    let rest: BTreeSet<u64> = (1..=3).filter(|id| *id != victim).collect();
    assert_eq!(voters(&m), rest, "{m:?}");
    assert_eq!(ids(&m), rest, "{m:?}");
    let second = submit(dir.path(), &list);
    assert_ne!(job, second);
    // Removing a replica that is not a member is refused, not a crash.
    let (ok, _, err) = admin(dir.path(), &["remove", "99"], &list);
    assert!(!ok && err.contains("not a member"), "{err}");
}

/// The vote of replica 99, a stranger, claiming to lead in `term`.
fn stranger_vote(term: u64) -> Vote<u64> {
    Vote::new_committed(term, 99)
}

/// Sends `payload` as `rpc` to the replica at `addr`; the refusal's code
/// (or OK) and its message.
async fn send(addr: &str, rpc: &str, payload: Vec<u8>) -> (tonic::Code, String) {
    let mut c = RaftClient::connect(addr.to_string()).await.unwrap();
    let req = rpb::RaftRequest { payload };
    let result = match rpc {
        "append" => c.append_entries(req).await.map(|_| ()),
        _ => c.vote(req).await.map(|_| ()),
    };
    match result {
        Ok(()) => (tonic::Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[test]
fn raft_messages_from_a_non_member_change_nothing() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (replicas, _ports, addrs, list) = three_replicas(dir.path());
    rt.block_on(async {
        let (leader_before, _) = leader_client(&addrs).await;
        let job = submit(dir.path(), &list);
        let before = members(&addrs).await;
        let last = before.last_log_index.expect("the leader knows its log");
        let term = 1_000;

        // An AppendEntries from replica 99 carrying CancelJob, following the
        // log's end and committing itself.
        let cancel = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 99), last + 1),
            payload: EntryPayload::Normal(Proposal::One(Command::CancelJob { job: job.clone(), at_ms: 0 })),
        };
        // One carrying a membership of [99] at an unreachable address.
        let nodes = BTreeMap::from([(99u64, BasicNode { addr: "http://127.0.0.1:9".into() })]);
        let takeover = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 99), last + 1),
            payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([99u64])], nodes)),
        };
        for entry in [cancel, takeover] {
            let req: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
                vote: stranger_vote(term),
                prev_log_id: None,
                leader_commit: Some(entry.log_id),
                entries: vec![entry],
            };
            let payload = serde_json::to_vec(&req).unwrap();
            for addr in &addrs {
                let (code, message) = send(addr, "append", payload.clone()).await;
                assert_eq!(code, tonic::Code::PermissionDenied, "{addr}: {message}");
                assert!(message.contains("not a member"), "{message}");
            }
        }

        // A Vote from replica 99 with a far higher term and a longer log.
        let vote = VoteRequest {
            vote: Vote::new(term, 99),
            last_log_id: Some(LogId::new(CommittedLeaderId::new(term, 99), last + 100)),
        };
        let payload = serde_json::to_vec(&vote).unwrap();
        for addr in &addrs {
            let (code, message) = send(addr, "vote", payload.clone()).await;
            assert_eq!(code, tonic::Code::PermissionDenied, "{addr}: {message}");
        }

        // Give a wrongly accepted message time to show, then check that the
        // job, the membership and the leader are as they were.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (leader_after, mut c) = leader_client(&addrs).await;
        assert_eq!(leader_after, leader_before);
        let status = c.get_job(pb::GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
        assert!(!is_phase(&status, pb::JobPhase::Cancelled), "{status:#?}");
        let after = members(&addrs).await;
        assert_eq!(ids(&after), BTreeSet::from([1, 2, 3]), "{after:?}");
        assert_eq!(voters(&after), BTreeSet::from([1, 2, 3]), "{after:?}");
        assert_eq!(after.leader, before.leader);
        // Writes still go through.
        let second = submit(dir.path(), &list);
        assert_ne!(second, job);
    });
    // Each replica logged the refusals.
    let deadline = Instant::now() + Duration::from_secs(5);
    for r in &replicas {
        while !r.log_text().contains("raft message from a non-member refused") {
            assert!(Instant::now() < deadline, "{} does not log the refusal", r.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
