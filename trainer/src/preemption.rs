//! Preemption watchers: ways a worker learns that its machine is about to go
//! away. SIGTERM (Kubernetes, Slurm, systemd), a configurable signal (Slurm's
//! `--signal=USR1@60`), the AWS spot `instance-action` notice read through
//! IMDSv2, and the GCE `preempted` flag. The first notice wins.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct PreemptionConfig {
    /// Base URL of the AWS instance metadata service, e.g.
    /// `http://169.254.169.254`; `None` disables the watcher.
    pub aws_metadata_url: Option<String>,
    /// Base URL of the GCE metadata server, e.g. `http://metadata.google.internal`.
    pub gce_metadata_url: Option<String>,
    /// How often the metadata endpoints are polled.
    pub poll: Duration,
    /// A signal that means "checkpoint and leave" (e.g. SIGUSR1 from Slurm).
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub source: &'static str,
    pub detail: String,
}

/// Starts every configured watcher; the receiver yields notices.
pub fn watch(cfg: &PreemptionConfig, stop: CancellationToken) -> std::io::Result<mpsc::Receiver<Notice>> {
    let (tx, rx) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate())?;
    spawn_until(stop.clone(), tx.clone(), async move {
        term.recv().await;
        Some(Notice { source: "sigterm", detail: "SIGTERM received".into() })
    });
    if let Some(sig) = cfg.signal {
        let mut s = signal(SignalKind::from_raw(sig))?;
        spawn_until(stop.clone(), tx.clone(), async move {
            s.recv().await;
            Some(Notice { source: "signal", detail: format!("signal {sig} received") })
        });
    }
    if let Some(base) = cfg.aws_metadata_url.clone() {
        let poll = cfg.poll;
        spawn_until(stop.clone(), tx.clone(), async move { poll_until(poll, || aws_notice(&base)).await });
    }
    if let Some(base) = cfg.gce_metadata_url.clone() {
        let poll = cfg.poll;
        spawn_until(stop, tx, async move { poll_until(poll, || gce_notice(&base)).await });
    }
    Ok(rx)
}

fn spawn_until(
    stop: CancellationToken,
    tx: mpsc::Sender<Notice>,
    watcher: impl std::future::Future<Output = Option<Notice>> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            n = watcher => if let Some(n) = n { let _ = tx.send(n).await; },
        }
    });
}

async fn poll_until<F, Fut>(every: Duration, mut check: F) -> Option<Notice>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Notice>, String>>,
{
    let mut warned = false;
    loop {
        match check().await {
            Ok(Some(n)) => return Some(n),
            Ok(None) => {}
            Err(e) if !warned => {
                tracing::warn!(error = %e, "preemption watcher cannot reach its metadata endpoint");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(every).await;
    }
}

/// AWS: IMDSv2 token (PUT), then the spot `instance-action` document, which
/// exists (200) only once an interruption is scheduled.
pub async fn aws_notice(base: &str) -> Result<Option<Notice>, String> {
    let base = base.trim_end_matches('/');
    let (status, token) =
        http(base, "PUT", "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")]).await?;
    if status != 200 {
        return Err(format!("IMDSv2 token request answered {status}"));
    }
    let token = token.trim().to_string();
    let (status, body) =
        http(base, "GET", "/latest/meta-data/spot/instance-action", &[("X-aws-ec2-metadata-token", &token)]).await?;
    match status {
        200 => Ok(Some(Notice { source: "aws", detail: body.trim().to_string() })),
        404 => Ok(None),
        other => Err(format!("instance-action answered {other}")),
    }
}

/// GCE: the instance's `preempted` flag turns TRUE when it is being preempted.
pub async fn gce_notice(base: &str) -> Result<Option<Notice>, String> {
    let base = base.trim_end_matches('/');
    let (status, body) =
        http(base, "GET", "/computeMetadata/v1/instance/preempted", &[("Metadata-Flavor", "Google")]).await?;
    match (status, body.trim()) {
        (200, "TRUE") => Ok(Some(Notice { source: "gce", detail: "instance/preempted is TRUE".into() })),
        (200, _) => Ok(None),
        (other, _) => Err(format!("preempted flag answered {other}")),
    }
}

/// A minimal HTTP/1.1 exchange with a metadata server (plain http, small
/// bodies): returns the status code and the body.
async fn http(base: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
    let hostport = base.strip_prefix("http://").ok_or_else(|| format!("{base}: only http:// metadata URLs"))?;
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let addr = if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:80") };
    let exchange = async {
        let mut s = TcpStream::connect(&addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: 0\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| format!("{addr}: no answer within 2 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line {:?}", head.lines().next()))?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nTRUE\r\n0\r\n\r\n"), "TRUE");
        assert_eq!(dechunk("2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"), "abcde");
    }
}
