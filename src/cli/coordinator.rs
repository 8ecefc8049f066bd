//! `flotilla coordinator`: one coordinator replica, configured by a YAML file
//! (and a few flags), on the meta store it names: embedded Raft (the
//! default), an existing etcd cluster, or memory (tests and throw-away runs).
//!
//! ```yaml
//! listen: 0.0.0.0:7070
//! advertise: http://10.0.0.1:7070     # how clients and peers reach this replica
//! store:
//!   raft:
//!     id: 1
//!     data_dir: /var/lib/flotilla/coordinator
//!     peers: {1: http://10.0.0.1:7070, 2: http://10.0.0.2:7070, 3: http://10.0.0.3:7070}
//! # or
//! #  etcd: {endpoints: [http://10.0.0.9:2379], prefix: /flotilla}
//! tls:                                # default: DATA_DIR/tls, made on first start
//!   dir: /etc/flotilla/tls            # from `flotilla certs init`
//! # or  ca: ca.pem, cert: coordinator.pem, key: coordinator.key
//! # or  insecure: true                # plaintext, no TLS
//! browsers: true                      # the dashboard without a client certificate
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_coordinator::state::DEFAULT_MAX_RESTARTS;
use flotilla_coordinator::{
    AuthMode, CoordinatorConfig, EtcdOptions, EtcdStore, MemStore, MetaStore, RaftOptions, RaftStore, State,
};
use flotilla_proto::leader;
use flotilla_proto::raft::v1 as rpb;
use flotilla_proto::raft::v1::cluster_client::ClusterClient;
use flotilla_proto::tls::{Role, Tls, TlsPaths};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The coordinator's configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    /// Address to serve the gRPC API (clients, workers and peers) on.
    pub listen: Option<SocketAddr>,
    /// The URL clients and peer replicas reach this replica at; default
    /// `http://<listen>`.
    pub advertise: Option<String>,
    pub lease_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub start_grace_ms: Option<u64>,
    /// A failed registry hand-off is retried after 2 s, doubled per failure
    /// up to this (default 60000).
    pub handoff_retry_max_ms: Option<u64>,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub tls: TlsFile,
    /// The admin token file this replica accepts, made with a new token
    /// when missing (default: `admin.token` in the Raft data directory,
    /// relative to the configuration file).
    pub admin_token_file: Option<PathBuf>,
    /// `insecure: true`: calls need no API token. Trusted networks only.
    #[serde(default)]
    pub insecure: bool,
    /// `browsers: true`: the dashboard and the HTTP API also take TLS
    /// connections without a client certificate (tokens still needed).
    #[serde(default)]
    pub browsers: bool,
}

/// The `tls:` section: a folder, or the three files (plaintext is the
/// top-level `insecure: true`). Relative paths are relative to the
/// configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// A folder laid out by `flotilla certs init`.
    pub dir: Option<PathBuf>,
    /// Or the CA certificate, this replica's certificate and its key.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How a replica serves, once the file and the flags are read.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext.
    Insecure,
    /// The named files.
    Files(TlsPaths),
    /// Its own material in this folder, made on first start.
    Auto(PathBuf),
}

impl TlsFile {
    /// The mode this section asks for (plaintext when `insecure`); `home`
    /// is the replica's data directory (its own material goes in `home/tls`).
    fn mode(&self, insecure: bool, origin: &str, base: &Path, home: &Path) -> Result<TlsMode, String> {
        let paths = [&self.ca, &self.cert, &self.key];
        let given = paths.iter().filter(|p| p.is_some()).count();
        if insecure {
            return Ok(TlsMode::Insecure);
        }
        match (&self.dir, &self.ca, &self.cert, &self.key) {
            (Some(_), ..) if given > 0 => Err(format!("{origin}: tls: give either dir or ca, cert and key")),
            (Some(dir), ..) => Ok(TlsMode::Files(TlsPaths::in_dir(&base.join(dir), Role::Coordinator))),
            (None, Some(ca), Some(cert), Some(key)) => {
                Ok(TlsMode::Files(TlsPaths { ca: base.join(ca), cert: base.join(cert), key: base.join(key) }))
            }
            (None, None, None, None) => Ok(TlsMode::Auto(home.join("tls"))),
            _ => Err(format!("{origin}: tls: ca, cert and key go together; give all three (or dir)")),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub raft: Option<RaftFile>,
    pub etcd: Option<EtcdFile>,
    /// `memory: true`: the log in memory, lost with the process.
    #[serde(default)]
    pub memory: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftFile {
    /// This replica's id, unique in the cluster (default 1).
    pub id: Option<u64>,
    /// Where the log, vote and snapshots are kept (default
    /// `./flotilla-coordinator`, relative to the configuration file).
    pub data_dir: Option<PathBuf>,
    /// The initial members, id → URL, this replica included (default: this
    /// replica alone). Used only when the data directory is new; later
    /// changes go through `flotilla coordinator add/remove`.
    #[serde(default)]
    pub peers: BTreeMap<u64, String>,
    /// Start without a cluster and wait to be added to one with
    /// `flotilla coordinator add` (only on a new data directory).
    #[serde(default)]
    pub join: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "/flotilla".into()
}

/// What the command line says, on top of the file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub lease_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub start_grace_ms: Option<u64>,
    pub handoff_retry_max_ms: Option<u64>,
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub peers: Vec<(u64, String)>,
    pub join: bool,
    pub etcd: Option<String>,
    pub memory: bool,
    pub tls_dir: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub insecure: bool,
    pub browsers: bool,
}

/// Reads the configuration file (if any) and applies the flags.
pub fn load(file: Option<&Path>, o: Overrides) -> Result<(CoordinatorFile, PathBuf), String> {
    let (mut cfg, base) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let cfg: CoordinatorFile = if text.trim().is_empty() {
                CoordinatorFile::default()
            } else {
                flotilla_jobspec::read_yaml(&text, &path.display().to_string()).map_err(|e| e.to_string())?
            };
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (cfg, base)
        }
        None => (CoordinatorFile::default(), PathBuf::new()),
    };
    let origin = file.map_or_else(|| "command line".to_string(), |p| p.display().to_string());
    let tls_given = [&cfg.tls.dir, &cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key].iter().any(|p| p.is_some());
    if cfg.insecure && tls_given {
        return Err(format!("{origin}: insecure: true serves plaintext; drop the tls section"));
    }
    cfg.listen = o.listen.or(cfg.listen);
    cfg.advertise = o.advertise.or(cfg.advertise);
    cfg.lease_ms = o.lease_ms.or(cfg.lease_ms);
    cfg.heartbeat_ms = o.heartbeat_ms.or(cfg.heartbeat_ms);
    cfg.start_grace_ms = o.start_grace_ms.or(cfg.start_grace_ms);
    cfg.handoff_retry_max_ms = o.handoff_retry_max_ms.or(cfg.handoff_retry_max_ms);
    if let Some(list) = o.etcd {
        let endpoints = flotilla_proto::leader::parse_addrs(&list);
        let prefix = cfg.store.etcd.take().map_or_else(default_prefix, |e| e.prefix);
        cfg.store.etcd = Some(EtcdFile { endpoints, prefix });
    }
    cfg.store.memory |= o.memory;
    cfg.admin_token_file = o.admin_token_file.or(cfg.admin_token_file);
    cfg.insecure |= o.insecure;
    cfg.browsers |= o.browsers;
    if let Some(dir) = o.tls_dir {
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        cfg.tls = TlsFile { dir: Some(dir), ..TlsFile::default() };
    }
    if o.id.is_some() || o.data_dir.is_some() || !o.peers.is_empty() || o.join {
        let raft = cfg.store.raft.get_or_insert_with(RaftFile::default);
        raft.id = o.id.or(raft.id);
        raft.data_dir = o.data_dir.or(raft.data_dir.take());
        if !o.peers.is_empty() {
            raft.peers = o.peers.into_iter().map(|(id, url)| (id, url_of(&url))).collect();
        }
        raft.join |= o.join;
    }
    let chosen = [cfg.store.raft.is_some(), cfg.store.etcd.is_some(), cfg.store.memory];
    if chosen.iter().filter(|c| **c).count() > 1 {
        return Err(format!("{origin}: store: choose one of raft, etcd and memory"));
    }
    if let Some(etcd) = &cfg.store.etcd {
        if etcd.endpoints.is_empty() {
            return Err(format!("{origin}: store.etcd.endpoints: give at least one etcd endpoint"));
        }
        if !etcd.prefix.starts_with('/') {
            return Err(format!("{origin}: store.etcd.prefix: must start with '/', got {:?}", etcd.prefix));
        }
    }
    if let Some(raft) = &cfg.store.raft {
        let id = raft.id.unwrap_or(1);
        if id == 0 {
            return Err(format!("{origin}: store.raft.id: replica ids start at 1"));
        }
        if raft.join && !raft.peers.is_empty() {
            return Err(format!(
                "{origin}: store.raft.join: a joining replica has no initial peers; it is added with \
                 `flotilla coordinator add`"
            ));
        }
        if !raft.peers.is_empty() && !raft.peers.contains_key(&id) {
            let ids: Vec<String> = raft.peers.keys().map(u64::to_string).collect();
            return Err(format!(
                "{origin}: store.raft.peers: this replica's id {id} is not among the peers ({}); a replica that \
                 joins later starts with `join: true` (`--join`) and is added with `flotilla coordinator add`",
                ids.join(", ")
            ));
        }
    }
    cfg.tls.mode(cfg.insecure, &origin, &base, Path::new(""))?;
    Ok((cfg, base))
}

/// `host:port` gets `http://`.
fn url_of(addr: &str) -> String {
    flotilla_proto::leader::parse_addrs(addr).pop().unwrap_or_default()
}

/// Parses `ID=URL` for `--peer`.
pub fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, url) = s.split_once('=').ok_or_else(|| format!("expected ID=URL, got {s:?}"))?;
    let id = id.trim().parse().map_err(|_| format!("replica id {id:?} is not a number"))?;
    Ok((id, url.trim().to_string()))
}

/// Where a replica keeps its Raft log and its admin token file, relative
/// to the configuration file's folder.
const DEFAULT_DATA_DIR: &str = "flotilla-coordinator";

/// The hash of the admin token in `file`; a missing file is made, with a
/// new token, readable by its owner only. Tells where it is.
fn admin_token(file: &Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let made = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file) {
        Ok(mut f) => {
            let (token, _) = flotilla_coordinator::auth::new_token().context("mint the admin token")?;
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("write the admin token to {}", file.display()))?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e).with_context(|| format!("create the admin token file {}", file.display())),
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("read the admin token file {}", file.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    anyhow::ensure!(!token.is_empty(), "the admin token file {} is empty", file.display());
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    eprintln!(
        "flotilla: {} admin token in {path}: clients use it with `--token-file {path}` or FLOTILLA_TOKEN_FILE; \
         `flotilla token create --role worker|submit|read --name NAME` makes tokens for workers and people",
        if made { "wrote a new" } else { "the" },
        path = file.display()
    );
    Ok(flotilla_coordinator::auth::hash_token(token))
}

/// Runs one replica until SIGINT/SIGTERM.
pub async fn run(cfg: CoordinatorFile, base: PathBuf, token: CancellationToken) -> anyhow::Result<()> {
    let listen = cfg.listen.unwrap_or_else(|| "127.0.0.1:7070".parse().expect("a socket address"));
    let lease_ms = cfg.lease_ms.unwrap_or(5000);
    let coordinator_cfg = CoordinatorConfig {
        lease: Duration::from_millis(lease_ms),
        heartbeat_interval: Duration::from_millis(cfg.heartbeat_ms.unwrap_or(1000)),
        start_grace: Duration::from_millis(cfg.start_grace_ms.unwrap_or(3000)),
        comm_grace: Duration::from_millis(lease_ms + 3000),
        handoff_retry_max: Duration::from_millis(cfg.handoff_retry_max_ms.unwrap_or(60_000)),
        ..Default::default()
    };
    let data_dir = base.join(
        cfg.store.raft.as_ref().and_then(|r| r.data_dir.clone()).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
    );
    let coordinator_cfg = CoordinatorConfig {
        auth: if cfg.insecure {
            tracing::warn!(
                "running with --insecure: no TLS and calls need no API token; anyone who reaches this port can \
                 submit, cancel and change anything"
            );
            AuthMode::Open
        } else {
            let file = cfg.admin_token_file.as_ref().map_or_else(|| data_dir.join("admin.token"), |f| base.join(f));
            let hash = admin_token(&file)?;
            AuthMode::Tokens { bootstrap: vec![("admin-file".into(), hash)] }
        },
        ..coordinator_cfg
    };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    let bound = listener.local_addr()?;
    let advertise = cfg.advertise.clone().map(|a| url_of(&a)).unwrap_or_else(|| format!("http://{bound}"));
    let mode = cfg.tls.mode(cfg.insecure, "the configuration", &base, &data_dir).map_err(anyhow::Error::msg)?;
    let tls = serving_tls(mode, &[host_of(&advertise), bound.ip().to_string()])?;
    // Peers are dialed, and clients pointed, in the mode this replica serves in.
    flotilla_proto::tls::set_dialing(tls.as_ref());
    let advertise = flotilla_proto::tls::with_scheme(&advertise);
    let initial = State::new(DEFAULT_MAX_RESTARTS);
    let mut raft_store: Option<RaftStore> = None;
    let mut etcd_store: Option<Arc<EtcdStore>> = None;
    let (store, routes, what): (Arc<dyn MetaStore>, _, String) = if cfg.store.memory {
        (Arc::new(MemStore::new(initial)), tonic::service::Routes::default(), "memory".into())
    } else if let Some(etcd) = cfg.store.etcd {
        let mut opts = EtcdOptions::new(etcd.endpoints.clone(), advertise.clone());
        opts.prefix = etcd.prefix.clone();
        opts.initial = initial;
        let store = EtcdStore::connect(opts)
            .await
            .with_context(|| format!("connect to etcd at {}", etcd.endpoints.join(",")))?;
        etcd_store = Some(store.clone());
        (store, tonic::service::Routes::default(), format!("etcd {} under {}", etcd.endpoints.join(","), etcd.prefix))
    } else {
        let raft = cfg.store.raft.unwrap_or_default();
        let id = raft.id.unwrap_or(1);
        let mut peers: BTreeMap<u64, String> =
            raft.peers.into_iter().map(|(id, url)| (id, flotilla_proto::tls::with_scheme(&url))).collect();
        if peers.is_empty() && !raft.join {
            peers.insert(id, advertise.clone());
        }
        let mut opts = RaftOptions::new(id, &data_dir, advertise.clone());
        opts.peers = peers;
        opts.initial_state = initial;
        let store = RaftStore::open(opts)
            .await
            .with_context(|| format!("open the Raft replica {id} in {}", data_dir.display()))?;
        let routes = store.routes();
        raft_store = Some(store.clone());
        (Arc::new(store), routes, format!("raft replica {id} in {}", data_dir.display()))
    };
    let server_config = if cfg.browsers { Tls::rustls_server_config_for_browsers } else { Tls::rustls_server_config };
    let server_tls = tls.as_ref().map(server_config).transpose().map_err(anyhow::Error::msg)?;
    let server =
        flotilla_coordinator::serve_with_tls(listener, store, coordinator_cfg, token, routes, server_tls).await?;
    // The first line of standard output is for scripts and tests: keep its form.
    println!("coordinator listening on {}", server.addr);
    tracing::info!(store = %what, %advertise, "coordinator replica serving");
    let served = server.wait().await;
    if let Some(raft) = raft_store {
        raft.shutdown().await;
    }
    if let Some(etcd) = etcd_store {
        etcd.shutdown().await;
    }
    served?;
    Ok(())
}

/// The host part of a URL (`http://h:1` → `h`; `[::1]` → `::1`).
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// Loads (or, on first start, makes) the TLS material a replica serves
/// with, and says on standard error where it is and how workers and
/// clients get it. `None`: plaintext, with a warning.
fn serving_tls(mode: TlsMode, hosts: &[String]) -> anyhow::Result<Option<Tls>> {
    let (paths, dir) = match mode {
        TlsMode::Insecure => {
            tracing::warn!(
                "serving plaintext (--insecure): no TLS, no client certificates; anyone who reaches this port can \
                 call it and read its traffic"
            );
            return Ok(None);
        }
        TlsMode::Files(paths) => (paths, None),
        TlsMode::Auto(dir) => {
            let hosts: Vec<String> = hosts
                .iter()
                .filter(|h| !h.is_empty() && h.as_str() != "0.0.0.0" && h.as_str() != "::")
                .cloned()
                .collect();
            let made = super::certs::ensure(&dir, &hosts)
                .with_context(|| format!("make this coordinator's TLS material in {}", dir.display()))?;
            (TlsPaths::in_dir(&dir, Role::Coordinator), Some((dir, made)))
        }
    };
    let tls = Tls::load(&paths).map_err(anyhow::Error::msg)?;
    let fingerprint = tls.ca_fingerprint();
    match dir {
        Some((dir, made)) => {
            let what = if made { "made a new CA and certificates" } else { "reusing the CA and certificates" };
            eprintln!("flotilla: TLS: {what} in {} (CA SHA-256 fingerprint {fingerprint})", dir.display());
            eprintln!(
                "flotilla: TLS: workers and clients need ca.pem, client.pem and client.key from there: \
                 --tls-dir {0} or FLOTILLA_TLS_DIR={0} (copy the three files to other machines); more replicas \
                 need this same folder (--tls-dir), a replica with another CA cannot join",
                dir.display()
            );
        }
        None => {
            eprintln!("flotilla: TLS: serving with {} (CA SHA-256 fingerprint {fingerprint})", paths.cert.display())
        }
    }
    tracing::info!(ca_fingerprint = %fingerprint, "serving TLS; clients must present a certificate signed by the CA");
    Ok(Some(tls))
}

/// The embedded coordinator of `flotilla run`: a one-replica Raft cluster
/// with its log in `data_dir`, on `listener`.
pub async fn embedded(
    listener: tokio::net::TcpListener,
    cfg: CoordinatorConfig,
    token: CancellationToken,
    data_dir: &Path,
    tls: Option<&Tls>,
) -> anyhow::Result<(flotilla_coordinator::ServerHandle, RaftStore)> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let addr = format!("{scheme}://{}", listener.local_addr()?);
    let mut opts = RaftOptions::new(1, data_dir, addr.clone());
    opts.peers = BTreeMap::from([(1, addr)]);
    opts.initial_state = State::new(DEFAULT_MAX_RESTARTS);
    let store =
        RaftStore::open(opts).await.with_context(|| format!("open the coordinator's log in {}", data_dir.display()))?;
    let routes = store.routes();
    // A local run serves the dashboard to the browser of whoever runs it.
    let server_tls = tls.map(Tls::rustls_server_config_for_browsers).transpose().map_err(anyhow::Error::msg)?;
    let server =
        flotilla_coordinator::serve_with_tls(listener, Arc::new(store.clone()), cfg, token, routes, server_tls).await?;
    Ok((server, store))
}

/// Runs `f` on the leader's Cluster service, following refusals.
async fn on_leader<T, F, Fut>(list: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut(ClusterClient<flotilla_proto::auth::AuthChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let addrs = leader::parse_addrs(list);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut hint = None;
    loop {
        let error = match leader::find_leader(&addrs, hint.as_deref()).await {
            Ok((_, channel)) => {
                match f(ClusterClient::new(flotilla_proto::auth::Credentials::current().wrap(channel))).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        anyhow::bail!("this coordinator keeps no Raft log (it runs on etcd or in memory)")
                    }
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        hint = leader::leader_hint(&s);
                        s.message().to_string()
                    }
                    Err(s) => anyhow::bail!("refused ({:?}): {}", s.code(), s.message()),
                }
            }
            Err(e) => e,
        };
        if std::time::Instant::now() > deadline {
            anyhow::bail!("no leading coordinator among {addrs:?}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_members(m: &rpb::MembersReply) {
    match m.leader {
        Some(id) => println!("leader: {id} ({})", m.leader_addr),
        None => println!("leader: none"),
    }
    if let Some(last) = m.last_log_index {
        println!("last log index: {last}");
    }
    println!("{:<6} {:<8} {:<32} {:>10}", "ID", "ROLE", "ADDRESS", "MATCHED");
    for r in &m.members {
        let matched = r.matched_index.map_or_else(|| "-".to_string(), |i| i.to_string());
        println!("{:<6} {:<8} {:<32} {:>10}", r.id, if r.voter { "voter" } else { "learner" }, r.addr, matched);
    }
}

/// `flotilla coordinator members|add|remove`.
pub async fn admin(cmd: super::AdminCommand) -> anyhow::Result<i32> {
    use super::AdminCommand as A;
    let (A::Members { coordinator } | A::Add { coordinator, .. } | A::Remove { coordinator, .. }) = &cmd;
    super::certs::dial_as_client(&coordinator.tls)?;
    let reply = match cmd {
        A::Members { coordinator } => {
            on_leader(&coordinator.coordinator, |mut c| async move { c.members(rpb::MembersRequest {}).await }).await
        }
        A::Add { id, url, coordinator } => {
            let addr = flotilla_proto::tls::with_scheme(&url);
            on_leader(&coordinator.coordinator, |mut c| {
                let req = rpb::AddMemberRequest { id, addr: addr.clone() };
                async move { c.add_member(req).await }
            })
            .await
        }
        A::Remove { id, coordinator } => {
            on_leader(&coordinator.coordinator, |mut c| async move {
                c.remove_member(rpb::RemoveMemberRequest { id }).await
            })
            .await
        }
    };
    match reply {
        Ok(m) => {
            print_members(&m);
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(1)
        }
    }
}
