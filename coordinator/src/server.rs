//! Runs a coordinator: the gRPC services and the HTTP/JSON API (`http`) on
//! one listener, and the driver task, until its shutdown token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::job_service_server::JobServiceServer;
use flotilla_proto::v1::token_service_server::TokenServiceServer;
use flotilla_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

use crate::auth::AuthLayer;
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::service::{JobApi, TokenApi, WorkerApi};
use crate::state::{State, DEFAULT_MAX_RESTARTS};
use crate::store::{MemStore, MetaStore};

/// A running coordinator.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ServerHandle {
    /// Stops serving and waits for the services and the driver to end.
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        self.shutdown.cancel();
        self.task.await.unwrap_or(Ok(()))
    }

    /// Waits until the server ends by itself (its token was cancelled elsewhere).
    pub async fn wait(self) -> Result<(), tonic::transport::Error> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Starts a single-node coordinator with an in-memory log on `listener`.
pub async fn serve(
    listener: TcpListener,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
) -> std::io::Result<ServerHandle> {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::new(State::new(DEFAULT_MAX_RESTARTS)));
    serve_with_store(listener, store, cfg, shutdown).await
}

/// Starts a coordinator on `store`, serving the client services.
pub async fn serve_with_store(
    listener: TcpListener,
    store: Arc<dyn MetaStore>,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
) -> std::io::Result<ServerHandle> {
    serve_with_routes(listener, store, cfg, shutdown, Routes::default()).await
}

/// Starts a coordinator on `store`, serving `extra` (for example a Raft
/// replica's own services, `RaftStore::routes`) on the same port as the
/// client services, in plaintext.
pub async fn serve_with_routes(
    listener: TcpListener,
    store: Arc<dyn MetaStore>,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
    extra: Routes,
) -> std::io::Result<ServerHandle> {
    serve_with_tls(listener, store, cfg, shutdown, extra, None).await
}

/// The connections of `listener`, each after its TLS handshake with
/// `config` (in a task of its own, bounded in time, so that a slow or
/// failing client holds up no other); ends at `shutdown`. Handshakes are
/// done here rather than by tonic so that ALPN can offer HTTP/1.1 beside
/// HTTP/2, for the HTTP API's clients.
fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Replies (Raft acks, heartbeats) are small: without TCP_NODELAY
            // they can wait for a delayed ACK (40 ms on Linux).
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(flotilla_proto::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// [`serve_with_routes`], serving TLS when `tls` is given (see
/// `flotilla_proto::tls::Tls::rustls_server_config`).
pub async fn serve_with_tls(
    listener: TcpListener,
    store: Arc<dyn MetaStore>,
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
    extra: Routes,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    // Before anything is counted: what happens before the first scrape counts too.
    crate::telemetry::coordinator_started();
    // HTTP/1.1 for the HTTP API's clients (gRPC needs HTTP/2).
    let server = tonic::transport::Server::builder().accept_http1(true);
    let coordinator = Coordinator::new(store, cfg, shutdown.clone());
    let driver = tokio::spawn(coordinator.clone().drive());
    let registry = tokio::spawn(coordinator.clone().run_registry());
    let grpc = extra
        .add_service(JobServiceServer::new(JobApi(coordinator.clone())))
        .add_service(WorkerServiceServer::new(WorkerApi(coordinator.clone())))
        .add_service(TokenServiceServer::new(TokenApi(coordinator.clone())));
    let routes = Routes::from(grpc.into_axum_router().merge(crate::http::router(coordinator.clone())));
    let auth = AuthLayer::new(coordinator.clone());
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        // Layers added first are outermost: the RPC metrics see admitted calls.
        let router = server.layer(auth).layer(crate::telemetry::rpc::RpcMetricsLayer).add_routes(routes);
        let result = match tls {
            Some(config) => {
                let incoming = tls_incoming(listener, config, token.clone());
                router.serve_with_incoming_shutdown(incoming, token.cancelled()).await
            }
            // Replies (Raft acks, heartbeats) are small: without TCP_NODELAY
            // they can wait for a delayed ACK (40 ms on Linux).
            None => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, token.cancelled()).await
            }
        };
        let _ = driver.await;
        let _ = registry.await;
        result
    });
    tracing::info!(%addr, "coordinator listening");
    Ok(ServerHandle { addr, coordinator, shutdown, task })
}
