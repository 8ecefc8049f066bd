//! The messages the coordinator takes from the network, decoded from
//! arbitrary bytes: decoding answers a message or an error, never a panic;
//! a decoded message goes through the services' bounds checks
//! (`limits::Bounded`) and what those let through through the conversions
//! the handlers apply (job-file parsing and path resolution, free-text
//! truncation, replica URLs); every field over its bound is refused with a
//! short `InvalidArgument`.
//!
//! Cases per property: `PROPTEST_CASES` (default 2048); run longer by hand
//! with `PROPTEST_CASES=100000 cargo test -p flotilla-coordinator --test fuzz_proto`.

use std::path::Path;

use flotilla_coordinator::limits::{self, Bounded};
use flotilla_proto::raft::v1 as raft_pb;
use flotilla_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// A refusal's message quotes at most `limits::QUOTE` characters, each
/// escaped in at most 10 bytes, plus the field's name and the sizes.
const MAX_REFUSAL: usize = 200 + 10 * limits::QUOTE;

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Decodes `bytes` as `T`; a decoded message is checked, and one the check
/// passes is handed to `then` (what the handler does next) and must survive
/// re-encoding.
fn probe<T: Message + Default + Bounded>(
    bytes: &[u8],
    then: fn(T) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let Ok(msg) = T::decode(bytes) else { return Ok(()) };
    match msg.check() {
        Err(status) => {
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            prop_assert!(!status.message().is_empty());
            prop_assert!(status.message().len() <= MAX_REFUSAL, "{}", status.message());
        }
        Ok(()) => {
            // Compared encoded: a float field may hold NaN, unequal to itself.
            let again = T::decode(msg.encode_to_vec().as_slice()).map_err(fail)?;
            prop_assert_eq!(again.encode_to_vec(), msg.encode_to_vec());
            then(msg)?;
        }
    }
    Ok(())
}

fn nothing<T>(_: T) -> Result<(), TestCaseError> {
    Ok(())
}

/// What `SubmitJob` does with a checked request before it proposes it.
fn submit(req: pb::SubmitJobRequest) -> Result<(), TestCaseError> {
    let origin = if req.origin.is_empty() { "job.yaml" } else { &req.origin };
    match flotilla_jobspec::parse(&req.spec_yaml, origin) {
        Ok(mut spec) => {
            let base = Path::new(&req.base_dir);
            if base.is_absolute() {
                spec.resolve_paths(base);
                let _ = spec.to_json();
            }
        }
        Err(e) => prop_assert!(!e.message.is_empty() && !e.path.is_empty()),
    }
    Ok(())
}

/// What the failure and preemption handlers do with free text.
fn failure(r: pb::FailureReport) -> Result<(), TestCaseError> {
    let cut = limits::truncate(r.message.clone(), limits::MAX_MESSAGE);
    prop_assert!(cut.len() <= limits::MAX_MESSAGE + '…'.len_utf8());
    prop_assert!(r.message.starts_with(cut.trim_end_matches('…')));
    let _ = pb::FailureKind::try_from(r.kind).unwrap_or(pb::FailureKind::Unspecified);
    Ok(())
}

fn preemption(r: pb::PreemptionNotice) -> Result<(), TestCaseError> {
    for text in [r.source, r.detail] {
        prop_assert!(limits::truncate(text, limits::MAX_MESSAGE).len() <= limits::MAX_MESSAGE + '…'.len_utf8());
    }
    Ok(())
}

/// `AddMember` checks the new replica's URL before anything else.
fn add_member(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(req) = raft_pb::AddMemberRequest::decode(bytes) {
        if limits::url_problem(&req.addr).is_none() {
            prop_assert!(req.addr.len() <= limits::MAX_ADDR);
            // Schemes are case-insensitive (`Http://` is `http://`).
            let scheme = req.addr.split("://").next().unwrap_or_default().to_ascii_lowercase();
            prop_assert!(scheme == "http" || scheme == "https", "{}", req.addr);
        }
    }
    Ok(())
}

/// Every request message of the coordinator's services, by name.
/// Decodes bytes as one message and checks what comes out.
type Probe = fn(&[u8]) -> Result<(), TestCaseError>;

const PROBES: &[(&str, Probe)] = &[
    ("SubmitJobRequest", |b| probe::<pb::SubmitJobRequest>(b, submit)),
    ("GetJobRequest", |b| probe::<pb::GetJobRequest>(b, nothing)),
    ("CancelJobRequest", |b| probe::<pb::CancelJobRequest>(b, nothing)),
    ("WatchJobRequest", |b| probe::<pb::WatchJobRequest>(b, nothing)),
    ("GetMetricsRequest", |b| probe::<pb::GetMetricsRequest>(b, nothing)),
    ("RegisterModelRequest", |b| probe::<pb::RegisterModelRequest>(b, nothing)),
    ("RegisterRequest", |b| probe::<pb::RegisterRequest>(b, nothing)),
    ("HeartbeatRequest", |b| probe::<pb::HeartbeatRequest>(b, nothing)),
    ("AssignmentsRequest", |b| probe::<pb::AssignmentsRequest>(b, nothing)),
    ("ProgressReport", |b| probe::<pb::ProgressReport>(b, nothing)),
    ("MemoryReport", |b| probe::<pb::MemoryReport>(b, nothing)),
    ("CheckpointCommit", |b| probe::<pb::CheckpointCommit>(b, nothing)),
    ("FailureReport", |b| probe::<pb::FailureReport>(b, failure)),
    ("FinishReport", |b| probe::<pb::FinishReport>(b, nothing)),
    ("PreemptionNotice", |b| probe::<pb::PreemptionNotice>(b, preemption)),
    ("RendezvousPut", |b| probe::<pb::RendezvousPut>(b, nothing)),
    ("RendezvousGet", |b| probe::<pb::RendezvousGet>(b, nothing)),
    ("ListJobsRequest", |b| pb::ListJobsRequest::decode(b).map(drop).or(Ok(()))),
    ("GetLeaderRequest", |b| pb::GetLeaderRequest::decode(b).map(drop).or(Ok(()))),
    ("RaftRequest", |b| raft_pb::RaftRequest::decode(b).map(drop).or(Ok(()))),
    ("AddMemberRequest", add_member),
    ("RemoveMemberRequest", |b| raft_pb::RemoveMemberRequest::decode(b).map(drop).or(Ok(()))),
    ("MembersRequest", |b| raft_pb::MembersRequest::decode(b).map(drop).or(Ok(()))),
];

fn probe_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    for (name, probe) in PROBES {
        probe(bytes).map_err(|e| fail(format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Real requests, encoded as clients and workers encode them: the seeds of
/// the mutations, so that most mutants still decode.
fn samples() -> Vec<Vec<u8>> {
    vec![
        pb::SubmitJobRequest {
            spec_yaml: include_str!("../../configs/quickstart.yaml").into(),
            origin: "configs/quickstart.yaml".into(),
            base_dir: "/work/runs".into(),
            submission_id: "s-1".into(),
        }
        .encode_to_vec(),
        pb::RegisterRequest {
            data_addr: "127.0.0.1:9000".into(),
            hostname: "node-1".into(),
            worker_id: "w-1".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::CheckpointCommit {
            worker_id: "w-1".into(),
            job_id: "j-1".into(),
            step: 50,
            location: "runs/j-1/step-50".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::FailureReport {
            worker_id: "w-1".into(),
            job_id: "j-1".into(),
            message: "peer closed".into(),
            peer_rank: Some(1),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::RendezvousPut {
            job_id: "j-1".into(),
            generation: 2,
            key: "rank-0".into(),
            value: vec![7; 40],
            worker_id: "w-1".into(),
        }
        .encode_to_vec(),
        pb::ProgressReport { worker_id: "w-1".into(), job_id: "j-1".into(), step: 3, loss: 0.5, ..Default::default() }
            .encode_to_vec(),
        raft_pb::AddMemberRequest { id: 4, addr: "http://127.0.0.1:7074".into() }.encode_to_vec(),
    ]
}

/// One field set to a value of a given length, encoded, decoded and checked:
/// refused exactly when the value is over the field's bound.
fn sized<T: Message + Default + Bounded>(set: fn(&mut T, String), max: usize, len: usize) -> Result<(), TestCaseError> {
    let mut msg = T::default();
    set(&mut msg, "x".repeat(len));
    let msg = T::decode(msg.encode_to_vec().as_slice()).map_err(fail)?;
    match msg.check() {
        Ok(()) => prop_assert!(len <= max, "{} bytes passed a bound of {}", len, max),
        Err(status) => {
            prop_assert!(len > max, "{} bytes refused under a bound of {}: {}", len, max, status.message());
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            prop_assert!(status.message().len() <= MAX_REFUSAL, "{}", status.message());
            prop_assert!(status.message().contains(&len.to_string()), "{}", status.message());
        }
    }
    Ok(())
}

/// Each bounded field of each request, with its bound.
/// Sets one field to a value of the given length and checks the request.
type Sized = fn(usize) -> Result<(), TestCaseError>;

const FIELDS: &[(&str, usize, Sized)] = &[
    ("SubmitJobRequest.spec_yaml", limits::MAX_JOB_FILE, |n| {
        sized::<pb::SubmitJobRequest>(|m, s| m.spec_yaml = s, limits::MAX_JOB_FILE, n)
    }),
    ("SubmitJobRequest.origin", limits::MAX_ORIGIN, |n| {
        sized::<pb::SubmitJobRequest>(|m, s| m.origin = s, limits::MAX_ORIGIN, n)
    }),
    ("SubmitJobRequest.base_dir", limits::MAX_PATH, |n| {
        sized::<pb::SubmitJobRequest>(|m, s| m.base_dir = s, limits::MAX_PATH, n)
    }),
    ("SubmitJobRequest.submission_id", limits::MAX_ID, |n| {
        sized::<pb::SubmitJobRequest>(|m, s| m.submission_id = s, limits::MAX_ID, n)
    }),
    ("GetJobRequest.job_id", limits::MAX_ID, |n| sized::<pb::GetJobRequest>(|m, s| m.job_id = s, limits::MAX_ID, n)),
    ("CancelJobRequest.job_id", limits::MAX_ID, |n| {
        sized::<pb::CancelJobRequest>(|m, s| m.job_id = s, limits::MAX_ID, n)
    }),
    ("WatchJobRequest.job_id", limits::MAX_ID, |n| {
        sized::<pb::WatchJobRequest>(|m, s| m.job_id = s, limits::MAX_ID, n)
    }),
    ("GetMetricsRequest.job_id", limits::MAX_ID, |n| {
        sized::<pb::GetMetricsRequest>(|m, s| m.job_id = s, limits::MAX_ID, n)
    }),
    ("RegisterModelRequest.job_id", limits::MAX_ID, |n| {
        sized::<pb::RegisterModelRequest>(|m, s| m.job_id = s, limits::MAX_ID, n)
    }),
    ("RegisterRequest.data_addr", limits::MAX_ADDR, |n| {
        sized::<pb::RegisterRequest>(|m, s| m.data_addr = s, limits::MAX_ADDR, n)
    }),
    ("RegisterRequest.hostname", limits::MAX_HOSTNAME, |n| {
        sized::<pb::RegisterRequest>(|m, s| m.hostname = s, limits::MAX_HOSTNAME, n)
    }),
    ("RegisterRequest.worker_id", limits::MAX_ID, |n| {
        sized::<pb::RegisterRequest>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("HeartbeatRequest.worker_id", limits::MAX_ID, |n| {
        sized::<pb::HeartbeatRequest>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("AssignmentsRequest.worker_id", limits::MAX_ID, |n| {
        sized::<pb::AssignmentsRequest>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("PreemptionNotice.worker_id", limits::MAX_ID, |n| {
        sized::<pb::PreemptionNotice>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("ProgressReport.worker_id", limits::MAX_ID, |n| {
        sized::<pb::ProgressReport>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("ProgressReport.job_id", limits::MAX_ID, |n| sized::<pb::ProgressReport>(|m, s| m.job_id = s, limits::MAX_ID, n)),
    ("MemoryReport.job_id", limits::MAX_ID, |n| sized::<pb::MemoryReport>(|m, s| m.job_id = s, limits::MAX_ID, n)),
    ("FailureReport.worker_id", limits::MAX_ID, |n| {
        sized::<pb::FailureReport>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("CheckpointCommit.location", limits::MAX_PATH, |n| {
        sized::<pb::CheckpointCommit>(|m, s| m.location = s, limits::MAX_PATH, n)
    }),
    ("CheckpointCommit.job_id", limits::MAX_ID, |n| {
        sized::<pb::CheckpointCommit>(|m, s| m.job_id = s, limits::MAX_ID, n)
    }),
    ("FinishReport.final_model", limits::MAX_PATH, |n| {
        sized::<pb::FinishReport>(|m, s| m.final_model = s, limits::MAX_PATH, n)
    }),
    ("FinishReport.worker_id", limits::MAX_ID, |n| {
        sized::<pb::FinishReport>(|m, s| m.worker_id = s, limits::MAX_ID, n)
    }),
    ("RendezvousPut.key", limits::MAX_RENDEZVOUS_KEY, |n| {
        sized::<pb::RendezvousPut>(|m, s| m.key = s, limits::MAX_RENDEZVOUS_KEY, n)
    }),
    ("RendezvousPut.value", limits::MAX_RENDEZVOUS_VALUE, |n| {
        sized::<pb::RendezvousPut>(|m, s| m.value = s.into_bytes(), limits::MAX_RENDEZVOUS_VALUE, n)
    }),
    ("RendezvousGet.key", limits::MAX_RENDEZVOUS_KEY, |n| {
        sized::<pb::RendezvousGet>(|m, s| m.key = s, limits::MAX_RENDEZVOUS_KEY, n)
    }),
    ("RendezvousGet.job_id", limits::MAX_ID, |n| sized::<pb::RendezvousGet>(|m, s| m.job_id = s, limits::MAX_ID, n)),
];

#[derive(Debug, Clone)]
enum Edit {
    Set {
        at: usize,
        byte: u8,
    },
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A length prefix or varint of the largest size a varint holds.
    HugeVarint {
        at: usize,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        any::<usize>().prop_map(|at| Edit::HugeVarint { at }),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    let n = bytes.len();
    match edit {
        Edit::Set { at, byte } if n > 0 => bytes[at % n] = *byte,
        Edit::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
        Edit::Truncate { at } => bytes.truncate(at % (n + 1)),
        Edit::Insert { at, bytes: new } => {
            bytes.splice(at % (n + 1)..at % (n + 1), new.iter().copied());
        }
        Edit::HugeVarint { at } => {
            let at = at % (n + 1);
            bytes.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        }
        _ => {}
    }
}

#[test]
fn the_samples_pass_their_checks() {
    for bytes in samples() {
        probe_all(&bytes).unwrap();
    }
    let submit = pb::SubmitJobRequest::decode(samples()[0].as_slice()).unwrap();
    submit.check().unwrap();
    flotilla_jobspec::parse(&submit.spec_yaml, &submit.origin).unwrap();
}

#[test]
fn deep_and_huge_inputs_are_errors_not_crashes() {
    // Nested length-delimited fields (a MemoryReport's usage) far past
    // prost's recursion limit, and a length prefix far past the input.
    let mut nested = Vec::new();
    for _ in 0..10_000 {
        let mut outer = vec![0x3a];
        prost::encoding::encode_varint(nested.len() as u64, &mut outer);
        outer.extend_from_slice(&nested);
        nested = outer;
    }
    probe_all(&nested).unwrap();
    probe_all(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap();
    assert!(pb::SubmitJobRequest::decode([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f].as_slice()).is_err());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        probe_all(&bytes)?;
    }

    #[test]
    fn mutated_requests_never_panic(sample in 0usize..7, edits in prop::collection::vec(edit(), 1..6)) {
        let mut bytes = samples().swap_remove(sample);
        for e in &edits {
            apply(&mut bytes, e);
        }
        probe_all(&bytes)?;
    }

    #[test]
    fn oversize_fields_are_refused(field in 0..FIELDS.len(), delta in -2i64..=2, far in any::<bool>()) {
        let (_, max, check) = FIELDS[field];
        let len = if far { 4 * max } else { (max as i64 + delta) as usize };
        check(len)?;
    }
}
