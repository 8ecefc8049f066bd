//! The coordinator's configuration file: mistakes are refused before
//! anything starts, with the file, line and field; a good file starts a
//! replica on the store it names.

mod support;

use std::process::Command;

use support::*;

fn refused(dir: &std::path::Path, yaml: &str, extra: &[&str]) -> String {
    let path = dir.join("coordinator.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(bin())
        .args(["coordinator", "--config", path.to_str().unwrap()])
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{yaml}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_coordinator_configs_name_the_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let e = refused(dir.path(), "listen: 127.0.0.1:0\nstore:\n  raft:\n    idd: 2\n", &[]);
    assert!(e.contains("coordinator.yaml:4:") && e.contains("idd"), "{e}");
    let e = refused(dir.path(), "lease_ms: soon\n", &[]);
    assert!(e.contains("coordinator.yaml:1:") && e.contains("lease_ms"), "{e}");
    let e = refused(dir.path(), "store:\n  raft:\n    id: 4\n    peers: {1: a:1, 2: b:1}\n", &[]);
    assert!(e.contains("store.raft.peers") && e.contains("id 4 is not among the peers (1, 2)"), "{e}");
    let e = refused(dir.path(), "store:\n  raft: {id: 1}\n", &["--etcd", "127.0.0.1:2379"]);
    assert!(e.contains("choose one of raft, etcd and memory"), "{e}");
    let e = refused(dir.path(), "store:\n  etcd: {endpoints: [127.0.0.1:1], prefix: flotilla}\n", &[]);
    assert!(e.contains("store.etcd.prefix") && e.contains("must start with '/'"), "{e}");
    // Nothing was created for a refused configuration.
    assert!(!dir.path().join("flotilla-coordinator").exists());
}

#[test]
fn a_config_file_starts_a_raft_replica_that_keeps_its_jobs_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "listen: 127.0.0.1:0\nstore:\n  raft:\n    id: 7\n    data_dir: log\n").unwrap();
    let start = || spawn_coordinator(&dir.path().join("coordinator.log"), &["--config", path.to_str().unwrap()]);
    let (mut first, url) = start();
    // data_dir is relative to the configuration file.
    assert!(dir.path().join("log").is_dir());
    let job = job_file(
        dir.path(),
        "job",
        "name: kept\nmodel: {kind: mlp, layers: [4, 3]}\ndata: {kind: synthetic}\ntrain: {steps: 5, global_batch: 4}\n",
    );
    let out = flotilla(dir.path(), &["submit", job.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    first.kill9();

    let (_second, url) = start();
    let out = flotilla(dir.path(), &["status", "--coordinator", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("kept-1"), "the job survived kill -9: {text}");
    let out = flotilla(dir.path(), &["coordinator", "members", "--coordinator", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("leader: 7") && text.contains("voter"), "{text}");
}

/// A second replica started with `--join` becomes a voter through
/// `flotilla coordinator add`, and leaves through `remove`.
#[test]
fn a_joining_replica_is_added_and_removed_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let start = |id: &str, extra: &[&str]| {
        let data = dir.path().join(format!("r{id}"));
        let args = [&["--listen", "127.0.0.1:0", "--id", id, "--data-dir", data.to_str().unwrap()][..], extra].concat();
        spawn_coordinator(&dir.path().join(format!("coordinator-{id}.log")), &args)
    };
    let (_one, first) = start("1", &[]);
    let (_two, second) = start("2", &["--join"]);
    let list = format!("{first},{second}");
    let members = |args: &[&str]| {
        let out = flotilla(dir.path(), &[&["coordinator"], args, &["--coordinator", &list]].concat());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let voters = |text: &str| text.lines().filter(|l| l.contains(" voter ")).count();
    assert_eq!(voters(&members(&["members"])), 1, "the joining replica founded no cluster of its own");
    let text = members(&["add", "2", &second]);
    assert_eq!(voters(&text), 2, "{text}");
    assert!(text.contains("leader: 1"), "{text}");
    let text = members(&["remove", "2"]);
    assert_eq!(voters(&text), 1, "{text}");
    // Clients given both addresses still find the leader.
    let out = flotilla(dir.path(), &["status", "--coordinator", &list]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
