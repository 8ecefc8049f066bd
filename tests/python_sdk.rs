//! The Python SDK (`python/`) against a real coordinator and worker, with
//! mutual TLS and tokens on: `python/tests/test_client.py`, run by the
//! repository's Python (`.deps/venv`) with the package on its path.

mod support;

use std::process::Command;

use support::*;

#[test]
fn the_python_sdk_drives_a_real_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_coord, url) = coordinator(d);
    let _worker = worker(d, &url, "w0");
    let out = Command::new(oracle_python())
        .arg(repo().join("python/tests/test_client.py"))
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
    assert!(stdout.contains("3 passed"), "{stdout}");
}
