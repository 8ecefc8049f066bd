//! The Python SDK (`python/`) against real coordinators and workers, with
//! mutual TLS and tokens on: `python/tests`, run with pytest by the
//! repository's Python (`.deps/venv`, made by `scripts/bootstrap --python`)
//! with the package on its path. Jobs and sweeps against one coordinator and
//! four workers; a sweep through the `kill -9` of the leading replica of
//! three (`test_sweep_failover.py`, alone).

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use support::cluster::start_replicas;
use support::*;

/// The failover test file, run by its own test against three replicas.
const FAILOVER: &str = "python/tests/test_sweep_failover.py";

/// pytest with `args` against the coordinator(s) at `url`, in `dir`.
fn pytest(dir: &Path, url: &str, args: &[String], env: &[(&str, &str)]) -> Output {
    Command::new(oracle_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .args(args)
        .env("PYTHONPATH", repo().join("python"))
        .env("FLOTILLA_COORDINATOR", url)
        .env("FLOTILLA_TOKEN", admin_token())
        .env_remove("FLOTILLA_TOKEN_FILE")
        .env("FLOTILLA_TLS_DIR", tls_dir())
        .env("FLOTILLA_TEST_DIR", dir)
        .envs(env.iter().copied())
        .output()
        .expect("run python")
}

#[test]
fn the_python_sdk_drives_a_real_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coord, url) = coordinator(d);
    let _workers: Vec<Proc> = (0..4).map(|i| worker(d, &url, &format!("w{i}"))).collect();
    let tests = repo().join("python/tests").display().to_string();
    let ignore = format!("--ignore={}", repo().join(FAILOVER).display());
    let out = pytest(d, &url, &[tests, ignore], &[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("7 passed"), "{stdout}");

    // The sweep example, shortened: two learning rates, ranked by the
    // coordinator.
    let out = Command::new(oracle_python())
        .arg(repo().join("examples/sweep.py"))
        .args(["--coordinator", &url, "--steps", "8", "--lrs", "0.001,0.01"])
        .env("PYTHONPATH", repo().join("python"))
        .env("FLOTILLA_TOKEN", admin_token())
        .env_remove("FLOTILLA_TOKEN_FILE")
        .env("FLOTILLA_TLS_DIR", tls_dir())
        .current_dir(d)
        .output()
        .expect("run the sweep example");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let ranked: Vec<&str> = stdout.lines().filter(|l| l.contains("(succeeded)")).collect();
    assert_eq!(ranked.len(), 2, "{stdout}");
    assert!(ranked[0].trim_start().starts_with('1') && ranked[1].trim_start().starts_with('2'), "{stdout}");
}

#[test]
fn the_python_sdk_rides_out_a_leader_kill_mid_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut replicas, addrs) = start_replicas(d, 3);
    let list = addrs.join(",");
    let _workers: Vec<Proc> = (0..3).map(|i| worker(d, &list, &format!("w{i}"))).collect();
    // The test kills the leader itself: it is told each replica's pid.
    let pids: Vec<String> = replicas.iter().zip(&addrs).map(|(r, a)| format!("{}={a}", r.pid())).collect();
    let pids = pids.join(",");
    let out = pytest(d, &list, &[repo().join(FAILOVER).display().to_string()], &[("FLOTILLA_TEST_REPLICAS", &pids)]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    // The kill was real: one replica died of SIGKILL, two still run.
    let exits: Vec<_> = replicas.iter_mut().map(|r| r.child.try_wait().unwrap()).collect();
    let killed = exits.iter().filter(|e| e.is_some_and(|s| s.signal() == Some(9))).count();
    assert!(killed == 1 && exits.iter().filter(|e| e.is_none()).count() == 2, "{exits:?}");
}
