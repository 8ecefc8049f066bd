//! Starts real etcd servers (`etcd` on PATH; `scripts/bootstrap --etcd`
//! installs it) on loopback with free ports and a scratch data folder, waits
//! until they are healthy, and kills them when dropped, panics included.
//! Each etcd runs under a small `sh` that kills it with SIGKILL as soon as
//! its stdin closes, so that no etcd outlives the test process, even one
//! killed by a signal. Self-contained (std and tokio only) so that tests and
//! benches elsewhere can include it with `#[path]`.
#![allow(dead_code)]

use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one answers healthy.
    pub async fn start(n: usize) -> io::Result<EtcdCluster> {
        let dir = scratch_dir()?;
        // Hold every port until all are chosen so that none is picked twice.
        let listeners: Vec<TcpListener> =
            (0..2 * n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
        let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?;
        drop(listeners);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("n{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { members, dir };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        for i in 0..n {
            cluster.wait_healthy(i, Duration::from_secs(20)).await?;
        }
        Ok(cluster)
    }

    fn initial_cluster(&self) -> String {
        let peers: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        peers.join(",")
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let initial = self.initial_cluster();
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{}.log", m.name)))?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        // sh exits when etcd does; the reader in the background kills etcd
        // when our end of stdin closes (dropped, or this process died).
        // (Background jobs of sh read /dev/null unless told otherwise: the
        // reader gets stdin through fd 3.)
        let guard =
            r#"exec 3<&0; etcd "$@" </dev/null 3<&- & pid=$!; (read _x <&3; kill -9 $pid 2>/dev/null) & wait $pid"#;
        let child = Command::new("sh")
            .args(["-c", guard, "etcd"])
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "flotilla-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("start etcd (is it installed? scripts/bootstrap --etcd): {e}"))
            })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Client URLs of every member, killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Kills member `i` with SIGKILL and waits until it is gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data folder and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(i, Duration::from_secs(20)).await
    }

    /// Waits until member `i` answers `/health` with `"health":"true"`.
    pub async fn wait_healthy(&mut self, i: usize, within: Duration) -> io::Result<()> {
        let deadline = Instant::now() + within;
        let port = self.members[i].client_port;
        loop {
            if let Some(child) = self.members[i].child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(io::Error::other(format!(
                        "etcd {} exited ({status}): {}",
                        self.members[i].name,
                        self.log_tail(i)
                    )));
                }
            }
            if health(port).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd {} not healthy in {within:?}: {}",
                    self.members[i].name,
                    self.log_tail(i)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines member `i` logged.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{}.log", self.members[i].name))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn health(port: u16) -> bool {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        io::Result::Ok(body)
    };
    match tokio::time::timeout(Duration::from_secs(1), ask).await {
        Ok(Ok(body)) => body.contains("\"health\":\"true\""),
        _ => false,
    }
}

fn scratch_dir() -> io::Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "flotilla-etcd-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
