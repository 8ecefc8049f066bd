//! TLS on the control plane: loading a TLS folder's PEM files into the
//! server's rustls configuration and tonic's client configuration, and the process-wide dialing mode that
//! every channel to a coordinator replica goes through ([`endpoint`]).
//!
//! A TLS folder (made by `flotilla certs init`) holds `ca.pem` (the CA every
//! party trusts), `coordinator.pem`/`coordinator.key` (the replicas' server
//! certificate, also presented when a replica dials a peer) and
//! `client.pem`/`client.key` (workers and the CLI). The server requires a
//! client certificate signed by the CA on every connection (mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The CA certificate's file name in a TLS folder.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (only `flotilla certs init` and a coordinator that
/// makes its own material read it).
pub const CA_KEY: &str = "ca.key";
/// The coordinator replicas' certificate and key.
pub const SERVER_CERT: &str = "coordinator.pem";
pub const SERVER_KEY: &str = "coordinator.key";
/// The certificate and key of workers and the CLI.
pub const CLIENT_CERT: &str = "client.pem";
pub const CLIENT_KEY: &str = "client.key";

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which certificate of a TLS folder a process presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A coordinator replica: serves with it and dials peers with it.
    Coordinator,
    /// A worker or the CLI.
    Client,
}

/// Where one party's PEM files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// The files of `role` in a folder laid out by `flotilla certs init`.
    pub fn in_dir(dir: &Path, role: Role) -> Self {
        let (cert, key) = match role {
            Role::Coordinator => (SERVER_CERT, SERVER_KEY),
            Role::Client => (CLIENT_CERT, CLIENT_KEY),
        };
        TlsPaths { ca: dir.join(CA_CERT), cert: dir.join(cert), key: dir.join(key) }
    }
}

/// One party's TLS material, read and checked.
#[derive(Clone)]
pub struct Tls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// Makes ring rustls's process-wide crypto provider. The server side of
/// tonic takes the process default, which rustls cannot choose by itself
/// when, as here, other dependencies enable its aws-lc-rs backend too.
fn install_crypto_provider() {
    // An error means one is installed already: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Tls {
    /// Reads the three files; fails with a message naming the file that is
    /// missing or holds no PEM of the expected kind.
    pub fn load(paths: &TlsPaths) -> Result<Self, String> {
        install_crypto_provider();
        let ca = read(&paths.ca, "CA certificate")?;
        let cert = read(&paths.cert, "certificate")?;
        let key = read(&paths.key, "private key")?;
        for (bytes, path) in [(&ca, &paths.ca), (&cert, &paths.cert)] {
            CertificateDer::from_pem_slice(bytes)
                .map_err(|e| format!("{} holds no PEM certificate: {e}", path.display()))?;
        }
        rustls_pki_types::PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| format!("{} holds no PEM private key: {e}", paths.key.display()))?;
        Ok(Tls { ca, cert, key })
    }

    /// The SHA-256 fingerprint of the CA certificate (hex, colon-separated),
    /// as `openssl x509 -fingerprint -sha256` prints it.
    pub fn ca_fingerprint(&self) -> String {
        fingerprint(&self.ca).unwrap_or_default()
    }

    /// Serving with rustls directly (`coordinator::serve_with_tls`): this
    /// certificate, a client certificate signed by the CA required, and
    /// ALPN offering HTTP/2 (gRPC, the HTTP API) and HTTP/1.1 (the HTTP
    /// API's clients that speak only that).
    pub fn rustls_server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        self.server_config(false)
    }

    /// [`Tls::rustls_server_config`], but a connection may also come
    /// without a client certificate (a browser's): one that presents a
    /// certificate must still present one of the CA. The coordinator's auth
    /// layer lets connections without one reach only the dashboard and the
    /// HTTP API, with an API token as always.
    pub fn rustls_server_config_for_browsers(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        self.server_config(true)
    }

    fn server_config(&self, browsers: bool) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        let certs = |pem: &[u8], what: &str| {
            CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the {what} holds no PEM certificate: {e}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&self.ca, "CA certificate")? {
            roots.add(ca).map_err(|e| format!("the CA certificate: {e}"))?;
        }
        let mut verifier = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots));
        if browsers {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier.build().map_err(|e| format!("the CA certificate: {e}"))?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| format!("the private key holds no PEM private key: {e}"))?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert, "certificate")?, key)
            .map_err(|e| format!("the certificate and its key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    /// Dialing: the server must be signed by the CA; this certificate is presented.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// The SHA-256 fingerprint of the first certificate in `pem`.
pub fn fingerprint(pem: &[u8]) -> Option<String> {
    let der = CertificateDer::from_pem_slice(pem).ok()?;
    let digest = Sha256::digest(der.as_ref());
    Some(digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"))
}

/// How this process dials coordinator replicas: `None` is plaintext.
static DIALING: OnceLock<Option<ClientTlsConfig>> = OnceLock::new();

/// Sets how this process dials coordinator replicas, once, before the first
/// channel: with `tls` (mutual TLS, `https://`) or, given `None`, in
/// plaintext (`http://`). A process that never calls it dials in plaintext
/// (libraries and in-process tests). Returns false if it was already set
/// to something else.
pub fn set_dialing(tls: Option<&Tls>) -> bool {
    let wanted = tls.map(Tls::client_config);
    let on = wanted.is_some();
    DIALING.set(wanted).is_ok() || dialing_tls() == on
}

/// Whether this process dials with TLS.
pub fn dialing_tls() -> bool {
    matches!(DIALING.get(), Some(Some(_)))
}

/// `addr` with the scheme this process dials with: `https://` under TLS,
/// `http://` otherwise; `host:port` gets one. Replica addresses may be
/// written either way in flags and config files: the mode decides. Any
/// other scheme is left as it is, for the address checks to refuse.
pub fn with_scheme(addr: &str) -> String {
    let addr = addr.trim();
    if addr.is_empty() {
        return String::new();
    }
    let rest = match addr.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => rest,
        Some(_) => return addr.to_string(),
        None => addr,
    };
    let scheme = if dialing_tls() { "https" } else { "http" };
    format!("{scheme}://{}", rest.trim_end_matches('/'))
}

/// An endpoint for a coordinator replica at `addr`, in this process's
/// dialing mode (see [`set_dialing`]).
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let url = with_scheme(addr);
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| format!("{addr}: bad address: {e}"))?;
    match DIALING.get() {
        Some(Some(tls)) => endpoint.tls_config(tls.clone()).map_err(|e| format!("{url}: TLS set-up: {e}")),
        _ => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_names_each_roles_files() {
        let p = TlsPaths::in_dir(Path::new("/t"), Role::Client);
        assert_eq!(p.ca, Path::new("/t/ca.pem"));
        assert_eq!(p.cert, Path::new("/t/client.pem"));
        assert_eq!(p.key, Path::new("/t/client.key"));
        assert_eq!(TlsPaths::in_dir(Path::new("/t"), Role::Coordinator).key, Path::new("/t/coordinator.key"));
    }

    #[test]
    fn missing_or_wrong_files_are_named() {
        let dir = std::env::temp_dir().join(format!("flotilla-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = TlsPaths::in_dir(&dir, Role::Client);
        let e = Tls::load(&paths).err().unwrap();
        assert!(e.contains("ca.pem"), "{e}");
        for f in [CA_CERT, CLIENT_CERT, CLIENT_KEY] {
            std::fs::write(dir.join(f), "not pem").unwrap();
        }
        let e = Tls::load(&paths).err().unwrap();
        assert!(e.contains("ca.pem") && e.contains("no PEM certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plaintext_by_default_and_the_scheme_follows_the_mode() {
        // Nothing in this test binary sets the mode.
        assert!(!dialing_tls());
        assert_eq!(with_scheme("10.0.0.1:7070"), "http://10.0.0.1:7070");
        assert_eq!(with_scheme("https://h:1/"), "http://h:1");
        assert_eq!(with_scheme("HTTPS://h:1"), "http://h:1");
        assert_eq!(with_scheme("ftp://h:1"), "ftp://h:1");
        assert_eq!(with_scheme(" "), "");
        assert!(endpoint("not a url at all").is_err());
    }
}
