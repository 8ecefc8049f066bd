//! A real MLflow tracking server (PyPI `mlflow`, in `.deps/mlflow-venv`,
//! installed by `scripts/bootstrap --mlflow`) on loopback, checks made with
//! MLflow's own Python client, and a slow TCP proxy that stretches a
//! hand-off over seconds so that a test can kill a coordinator in the middle.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{repo, Proc};

pub fn venv_bin(name: &str) -> PathBuf {
    let exe = repo().join(".deps/mlflow-venv/bin").join(name);
    assert!(exe.exists(), "{} is missing: run ./scripts/bootstrap --mlflow", exe.display());
    exe
}

/// `mlflow server` with a SQLite store and a proxied artifact folder in
/// `dir`; stopping and starting it again keeps both.
pub struct MlflowServer {
    pub dir: PathBuf,
    pub port: u16,
    proc: Option<Proc>,
}

impl MlflowServer {
    pub fn start(dir: &Path) -> MlflowServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = MlflowServer { dir: dir.to_path_buf(), port, proc: None };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port, and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "already running");
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = self.dir.join(format!("mlflow-{}.log", std::fs::read_dir(&self.dir).unwrap().count()));
        let store = format!("sqlite:///{}", self.dir.join("mlflow.db").display());
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(venv_bin("mlflow"))
            .args(["server", "--host", "127.0.0.1", "--port", &self.port.to_string(), "--workers", "1"])
            .args(["--backend-store-uri", &store, "--artifacts-destination"])
            .arg(self.dir.join("artifacts"))
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .current_dir(&self.dir)
            // Its own process group: stopping it stops the web workers too.
            .process_group(0)
            // Its request log goes to stdout: keep it with the rest.
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start mlflow server");
        let proc = Proc { child, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        while http_get(self.port, "/health").as_deref() != Some("OK") {
            assert!(Instant::now() < deadline, "MLflow did not start: {}", proc.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        self.proc = Some(proc);
    }

    /// SIGKILL to the server's whole process group.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            unsafe { libc::killpg(p.pid(), libc::SIGKILL) };
            p.kill9();
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Requests the server has logged so far whose line holds `needle`.
    pub fn requests(&self, needle: &str) -> usize {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("mlflow-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().matches(needle).count())
            .sum()
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The body of `GET path`, if the server answers 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.trim().to_string())
}

/// What MLflow's own client reads about `model`: every version with its
/// run's tags, status and loss history, the version `alias` names, and that
/// version's artifacts downloaded into `out`.
pub fn inspect(url: &str, model: &str, alias: &str, out: &Path) -> serde_json::Value {
    let script = repo().join("tests/support/mlflow_inspect.py");
    let o = Command::new(venv_bin("python"))
        .arg(script)
        .args([url, model, alias])
        .arg(out)
        .env("MLFLOW_TRACKING_URI", url)
        .output()
        .expect("run mlflow_inspect.py");
    assert!(o.status.success(), "mlflow_inspect.py failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// A TCP proxy to `upstream_port` that holds every chunk from the client
/// for `delay` before passing it on, and counts them.
pub struct SlowProxy {
    pub port: u16,
    pub chunks: Arc<AtomicUsize>,
}

impl SlowProxy {
    pub fn start(upstream_port: u16, delay: Duration) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let chunks = Arc::new(AtomicUsize::new(0));
        let counter = chunks.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let counter = counter.clone();
                std::thread::spawn(move || pipe(client, server, Some((delay, counter))));
                std::thread::spawn(move || pipe(s2, c2, None));
            }
        });
        SlowProxy { port, chunks }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn count(&self) -> usize {
        self.chunks.load(Ordering::SeqCst)
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, slow: Option<(Duration, Arc<AtomicUsize>)>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((delay, count)) = &slow {
            std::thread::sleep(*delay);
            count.fetch_add(1, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
