//! The Python SDK (`python/`) against a real coordinator and four workers,
//! with mutual TLS and tokens on: `python/tests` (jobs and sweeps), run with
//! pytest by the repository's Python (`.deps/venv`, made by
//! `scripts/bootstrap --python`) with the package on its path.

mod support;

use std::process::Command;

use support::*;

#[test]
fn the_python_sdk_drives_a_real_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coord, url) = coordinator(d);
    let _workers: Vec<Proc> = (0..4).map(|i| worker(d, &url, &format!("w{i}"))).collect();
    let out = Command::new(oracle_python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(repo().join("python/tests"))
        .env("PYTHONPATH", repo().join("python"))
        .env("FLOTILLA_COORDINATOR", &url)
        .env("FLOTILLA_TOKEN", admin_token())
        .env_remove("FLOTILLA_TOKEN_FILE")
        .env("FLOTILLA_TLS_DIR", tls_dir())
        .env("FLOTILLA_TEST_DIR", d)
        .output()
        .expect("run python");
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
