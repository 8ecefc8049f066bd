//! TLS on the coordinator's port, with real processes: `flotilla certs
//! init`, the material a coordinator makes on first start, mutual TLS that
//! refuses plaintext clients, clients and replicas from another CA, and the
//! explicit `--insecure` mode.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla::proto::raft::v1 as rpb;
use flotilla::proto::tls::{Role, Tls, TlsPaths};
use flotilla::proto::v1 as pb;
use flotilla::proto::v1::job_service_client::JobServiceClient;
use support::cluster::*;
use support::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const JOB: &str =
    "name: tiny\nmodel: {kind: mlp, layers: [16, 32, 4]}\ndata: {kind: synthetic, seed: 1, samples: 256}\n\
                   train: {steps: 5, global_batch: 32}\nworkers: {min: 1, max: 1}\ncheckpoint: {url: runs, every: 0}\n";

fn text(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `flotilla certs init DIR`, which must succeed.
fn certs_init(cwd: &Path, dir: &Path) {
    let out = flotilla(cwd, &["certs", "init", dir.to_str().unwrap()]);
    assert!(out.status.success(), "certs init: {}", text(&out).1);
}

/// One call on a channel built by `endpoint`: Ok, or the error with its causes.
async fn get_leader(endpoint: Result<Endpoint, tonic::transport::Error>) -> Result<(), String> {
    let chain = |e: &dyn std::error::Error| flotilla::proto::leader::error_chain(e);
    let ch = endpoint.map_err(|e| chain(&e))?.connect_timeout(Duration::from_secs(5)).connect().await;
    let mut c = JobServiceClient::new(ch.map_err(|e| chain(&e))?);
    c.get_leader(pb::GetLeaderRequest {}).await.map(|_| ()).map_err(|s| chain(&s))
}

#[test]
fn certs_init_makes_private_keys_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    certs_init(dir.path(), &tls);
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca.key", "coordinator.key", "client.key"] {
        let mode = std::fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let ca = std::fs::read(tls.join("ca.pem")).unwrap();
    let out = flotilla(dir.path(), &["certs", "init", tls.to_str().unwrap()]);
    let (_, err) = text(&out);
    assert!(!out.status.success(), "a second init succeeded");
    assert!(err.contains("not overwritten") && err.contains("ca.pem"), "{err}");
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca, "ca.pem changed");
    let out =
        flotilla(dir.path(), &["certs", "init", tls.to_str().unwrap(), "--force", "--hosts", "10.1.2.3,coord.test"]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_ne!(std::fs::read(tls.join("ca.pem")).unwrap(), ca, "--force made no new CA");
    let out = flotilla(dir.path(), &["certs", "init", dir.path().join("x").to_str().unwrap(), "--hosts", "a b"]);
    assert!(!out.status.success() && text(&out).1.contains("not a host name"), "{}", text(&out).1);
}

#[test]
fn a_coordinator_without_material_makes_it_once_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let bare = || {
        let mut c = Command::new(bin());
        c.env_remove("FLOTILLA_TLS_DIR");
        c
    };
    let (mut first, url) = spawn_coordinator_from(bare(), &dir.path().join("first.log"), &args);
    let own = data.join("tls");
    let log = wait_log(&first, "the TLS note", Duration::from_secs(30), |l| l.contains("FLOTILLA_TLS_DIR"));
    assert!(log.contains("made a new CA") && log.contains(own.to_str().unwrap()), "{log}");
    let ca = std::fs::read(own.join("ca.pem")).unwrap();
    let fingerprint = Tls::load(&TlsPaths::in_dir(&own, Role::Client)).unwrap().ca_fingerprint();
    assert!(log.contains(&fingerprint), "{log}");
    // A client given that folder gets in; this test binary's CA does not.
    let status = |tls: &Path| {
        let out = flotilla(dir.path(), &["status", "--coordinator", &url, "--tls-dir", tls.to_str().unwrap()]);
        (out.status.success(), text(&out).1)
    };
    let (ok, err) = status(&own);
    assert!(ok, "status with the coordinator's own folder: {err}");
    first.kill9();

    let (second, url) = spawn_coordinator_from(bare(), &dir.path().join("second.log"), &args);
    let log = wait_log(&second, "the TLS note", Duration::from_secs(30), |l| l.contains("FLOTILLA_TLS_DIR"));
    assert!(log.contains("reusing the CA") && log.contains(&fingerprint), "{log}");
    assert_eq!(std::fs::read(own.join("ca.pem")).unwrap(), ca, "the CA changed on restart");
    let out = flotilla(dir.path(), &["status", "--coordinator", &url, "--tls-dir", own.to_str().unwrap()]);
    assert!(out.status.success(), "status after the restart: {}", text(&out).1);
}

#[test]
fn plaintext_clients_and_clients_of_another_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(dir.path());
    let rt = runtime();
    // This test binary's client certificate gets in.
    rt.block_on(async { client(&url).await });
    let addr = url.strip_prefix("https://").unwrap();
    let ca = std::fs::read(tls_dir().join("ca.pem")).unwrap();
    rt.block_on(async {
        // Plaintext: no TLS at all.
        let plain = get_leader(Endpoint::from_shared(format!("http://{addr}"))).await;
        assert!(plain.is_err(), "a plaintext call was answered");
        // TLS that trusts the CA but presents no client certificate.
        let anonymous = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
        let e = get_leader(Endpoint::from_shared(url.clone()).and_then(|e| e.tls_config(anonymous))).await;
        assert!(e.is_err(), "a call without a client certificate was answered");
    });
    // The CLI with a certificate from another CA: its server check fails,
    // and so would the server's check of its certificate.
    let other = dir.path().join("other-ca");
    certs_init(dir.path(), &other);
    let out = flotilla(dir.path(), &["status", "--coordinator", &url, "--tls-dir", other.to_str().unwrap()]);
    let (_, err) = text(&out);
    assert!(!out.status.success(), "a client of another CA got in");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // The server refuses that client certificate even when the client
    // trusts the server.
    let foreign = Tls::load(&TlsPaths::in_dir(&other, Role::Client)).unwrap();
    let mixed = foreign.client_config().ca_certificate(Certificate::from_pem(&ca));
    let e = rt.block_on(get_leader(Endpoint::from_shared(url.clone()).and_then(|e| e.tls_config(mixed))));
    assert!(e.is_err(), "a client certificate of another CA was accepted");
}

#[test]
fn a_replica_of_another_ca_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let _first = replica(dir.path(), 1, &ports[..1]);
    let addrs = vec![format!("https://127.0.0.1:{}", ports[0])];
    let rt = runtime();
    rt.block_on(leader_client(&addrs));
    let other = dir.path().join("other-ca");
    certs_init(dir.path(), &other);
    let listen = format!("127.0.0.1:{}", ports[1]);
    let data = dir.path().join("replica-2");
    let args = [
        &["--listen", &listen, "--id", "2", "--join", "--data-dir", data.to_str().unwrap()][..],
        &["--tls-dir", other.to_str().unwrap()],
        &TIMINGS,
    ]
    .concat();
    let (stranger, _) = spawn_coordinator(&dir.path().join("coordinator-2.log"), &args);
    let out =
        flotilla(dir.path(), &["coordinator", "add", "2", &format!("http://{listen}"), "--coordinator", &addrs[0]]);
    let (_, err) = text(&out);
    assert!(!out.status.success(), "a replica of another CA was added");
    assert!(err.contains("was not added"), "{err}");
    // The membership is as before: replica 1 alone.
    let members = rt.block_on(async {
        let (leader, _) = leader_client(&addrs).await;
        let mut c = rpb::cluster_client::ClusterClient::new(channel(&leader).await.unwrap());
        c.members(rpb::MembersRequest {}).await.unwrap().into_inner()
    });
    let ids: Vec<(u64, bool)> = members.members.iter().map(|m| (m.id, m.voter)).collect();
    assert_eq!(ids, vec![(1, true)], "{members:?}");
    drop(stranger);
}

#[test]
fn insecure_serves_plaintext_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) = coordinator_with(dir.path(), &["--insecure"]);
    let log = wait_log(&coord, "the warning", Duration::from_secs(30), |l| l.contains("serving plaintext"));
    assert!(log.contains("WARN"), "{log}");
    assert!(url.starts_with("http://"), "{url}");
    let plain = url.clone();
    let job = job_file(dir.path(), "tiny", JOB);
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &plain, "--insecure"]);
    assert!(out.status.success(), "plaintext submit: {}", text(&out).1);
    let out = flotilla(dir.path(), &["status", "--coordinator", &plain, "--insecure", "--json"]);
    let (stdout, err) = text(&out);
    assert!(out.status.success() && stdout.contains("tiny-1"), "{stdout}{err}");
    // A TLS client cannot talk to it.
    let addr = plain.strip_prefix("http://").unwrap();
    let tls = Tls::load(&TlsPaths::in_dir(tls_dir(), Role::Client)).unwrap();
    let e = runtime().block_on(get_leader(
        Endpoint::from_shared(format!("https://{addr}")).and_then(|e| e.tls_config(tls.client_config())),
    ));
    assert!(e.is_err(), "a TLS call to a plaintext coordinator was answered");
}
