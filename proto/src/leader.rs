//! Following the leading coordinator replica: clients (the CLI, worker
//! agents) take a list of replica addresses, ask which one leads, and go
//! where a refusing replica points them.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::v1::job_service_client::JobServiceClient;
use crate::v1::GetLeaderRequest;

/// Response metadata key carrying the leader's address on a refusal.
pub const LEADER_METADATA: &str = "flotilla-leader";

/// Splits a comma-separated list of coordinator addresses; `host:port`
/// gets `http://` in front (dialing uses the process's scheme, see
/// [`crate::tls::with_scheme`]).
pub fn parse_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| if a.contains("://") { a.trim_end_matches('/').to_string() } else { format!("http://{a}") })
        .collect()
}

/// The refusal of a replica that does not lead: UNAVAILABLE, with the
/// leader's address (if known) in the message and in the metadata.
pub fn not_leader(leader: Option<&str>) -> Status {
    let message = match leader {
        Some(l) => format!("this coordinator replica is not the leader; the leader is {l}"),
        None => "this coordinator replica is not the leader and no leader is known yet (election under way)".into(),
    };
    let mut status = Status::unavailable(message);
    // Present (empty while no leader is known) so that a not-leader refusal
    // tells itself apart from other UNAVAILABLE errors.
    let value = leader.and_then(|l| MetadataValue::try_from(l).ok()).unwrap_or_else(|| MetadataValue::from_static(""));
    status.metadata_mut().insert(LEADER_METADATA, value);
    status
}

/// Whether `status` is a replica's refusal because it does not lead.
pub fn is_not_leader(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.metadata().contains_key(LEADER_METADATA)
}

/// The leader a refusal points to.
pub fn leader_hint(status: &Status) -> Option<String> {
    let v = status.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    (!v.is_empty()).then(|| v.to_string())
}

/// Connects to `addr` with a short connect timeout, in this process's
/// dialing mode (TLS or plaintext, see [`crate::tls::set_dialing`]).
pub async fn channel(addr: &str, connect_timeout: Duration) -> Result<Channel, String> {
    crate::tls::endpoint(addr)?
        .connect_timeout(connect_timeout)
        .connect()
        .await
        .map_err(|e| format!("{addr}: {}", error_chain(&e)))
}

/// An error and its sources, `: `-separated (tonic's transport error says
/// only "transport error"; the TLS or connect failure is in its sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Finds the replica that leads now: tries `hint` first, then each of
/// `addrs`, following the leader each replica names. Returns its address and
/// a connected channel, or what each address answered.
pub async fn find_leader(addrs: &[String], hint: Option<&str>) -> Result<(String, Channel), String> {
    // In the process's scheme, so that an address and the same replica
    // named in a refusal compare equal.
    let mut queue: Vec<String> = hint.into_iter().map(crate::tls::with_scheme).collect();
    queue.extend(addrs.iter().map(|a| crate::tls::with_scheme(a)));
    let mut tried: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
        if tried.contains(&addr) {
            continue;
        }
        tried.push(addr.clone());
        let ch = match channel(&addr, Duration::from_secs(2)).await {
            Ok(ch) => ch,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let mut req = Request::new(GetLeaderRequest {});
        req.set_timeout(Duration::from_secs(3));
        match JobServiceClient::new(ch.clone()).get_leader(req).await {
            Ok(info) => {
                let info = info.into_inner();
                if info.is_leader {
                    return Ok((addr, ch));
                }
                if info.leader.is_empty() {
                    failures.push(format!("{addr}: not the leader, no leader known yet"));
                } else {
                    failures.push(format!("{addr}: not the leader, points to {}", info.leader));
                    queue.insert(0, crate::tls::with_scheme(&info.leader));
                }
            }
            Err(s) => failures.push(format!("{addr}: {}", s.message())),
        }
    }
    Err(if failures.is_empty() { "no coordinator address given".into() } else { failures.join("; ") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_split_and_given_a_scheme() {
        assert_eq!(
            parse_addrs("10.0.0.1:7070, http://b:7070/,https://c:1 ,"),
            vec!["http://10.0.0.1:7070", "http://b:7070", "https://c:1"]
        );
    }

    #[test]
    fn a_refusal_carries_the_leader() {
        let s = not_leader(Some("http://10.0.0.2:7070"));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(leader_hint(&s).as_deref(), Some("http://10.0.0.2:7070"));
        assert!(s.message().contains("10.0.0.2"));
        assert_eq!(leader_hint(&not_leader(None)), None);
    }
}
