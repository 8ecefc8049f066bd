//! A Raft cluster of real `flotilla coordinator` replicas on loopback, and
//! clients that find and follow its leader.

use std::time::{Duration, Instant};

use flotilla::proto::leader;
use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;

use super::{spawn_coordinator, Proc};

/// Free loopback ports (bound and released; the replicas bind them next).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Starts replica `id` of the cluster whose replicas listen on `ports`.
pub fn replica(dir: &std::path::Path, id: usize, ports: &[u16]) -> Proc {
    replica_with(dir, id, ports, &[])
}

/// [`replica`] with `extra` arguments.
pub fn replica_with(dir: &std::path::Path, id: usize, ports: &[u16], extra: &[&str]) -> Proc {
    let (listen, id_arg) = (format!("127.0.0.1:{}", ports[id - 1]), id.to_string());
    let data = dir.join(format!("replica-{id}"));
    let mut args = vec!["--listen".to_string(), listen, "--id".into(), id_arg, "--data-dir".into()];
    args.push(data.to_str().unwrap().into());
    args.extend(TIMINGS.map(String::from));
    for (i, port) in ports.iter().enumerate() {
        args.extend(["--peer".to_string(), format!("{}=http://127.0.0.1:{port}", i + 1)]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_coordinator(&dir.join(format!("coordinator-{id}.log")), &args).0
}

/// Replicas 1 to `n` of a cluster on free loopback ports: their processes
/// and addresses (`https://127.0.0.1:PORT`), in replica order.
pub fn start_replicas(dir: &std::path::Path, n: usize) -> (Vec<Proc>, Vec<String>) {
    start_replicas_with(dir, n, &[])
}

/// [`start_replicas`] with `extra` arguments for every replica.
pub fn start_replicas_with(dir: &std::path::Path, n: usize, extra: &[&str]) -> (Vec<Proc>, Vec<String>) {
    let ports = free_ports(n);
    let replicas = (1..=n).map(|id| replica_with(dir, id, &ports, extra)).collect();
    (replicas, ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect())
}

/// Short leases and grace periods, as the other real-process tests use.
pub const TIMINGS: [&str; 6] = ["--lease-ms", "1500", "--heartbeat-ms", "200", "--start-grace-ms", "300"];

/// The leader's client, found among `addrs` (waits through an election).
pub async fn leader_client(addrs: &[String]) -> (String, JobServiceClient<flotilla::proto::auth::AuthChannel>) {
    super::tls_dir();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match leader::find_leader(addrs, None).await {
            Ok((addr, ch)) => return (addr, JobServiceClient::new(super::authed(ch))),
            Err(e) if Instant::now() > deadline => panic!("no leader: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The job's status from whichever replica leads.
pub async fn job(addrs: &[String], id: &str) -> pb::JobStatus {
    loop {
        let (_, mut c) = leader_client(addrs).await;
        if let Ok(s) = c.get_job(pb::GetJobRequest { job_id: id.into() }).await {
            return s.into_inner();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_job(
    addrs: &[String],
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = job(addrs, id).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
