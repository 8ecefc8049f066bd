//! The client side of API tokens: what a CLI, a script or a worker sends
//! with every call. A token travels as `authorization: Bearer TOKEN`; a
//! worker also sends the key its registration gave it
//! ([`WORKER_KEY_METADATA`]). The coordinator's side is
//! `flotilla_coordinator::auth`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Request metadata key of the API token (`Bearer TOKEN`).
pub const AUTHORIZATION: &str = "authorization";
/// Request metadata key of a worker's key.
pub const WORKER_KEY_METADATA: &str = "flotilla-worker-key";
/// Environment variable holding a token.
pub const TOKEN_ENV: &str = "FLOTILLA_TOKEN";
/// Environment variable naming a file that holds a token.
pub const TOKEN_FILE_ENV: &str = "FLOTILLA_TOKEN_FILE";

/// A channel whose every request carries [`Credentials`].
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// What a client proves itself with: an API token (or none, for a
/// coordinator running with `--insecure`) and, for a worker, the key its
/// registration handed out. Clones share the worker key.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
    worker_key: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints a secret.
        f.debug_struct("Credentials").field("token", &self.bearer.is_some()).finish_non_exhaustive()
    }
}

static DEFAULT: OnceLock<Credentials> = OnceLock::new();

impl Credentials {
    /// No token: only a coordinator running with `--insecure` answers.
    pub fn none() -> Self {
        Credentials::default()
    }

    /// The token `token` (surrounding white space ignored).
    pub fn token(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the API token is empty".into());
        }
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "the API token has characters that cannot be sent (printable ASCII only)".to_string())?;
        Ok(Credentials { bearer: Some(bearer), ..Default::default() })
    }

    /// The token in `path` (its first line).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or_default();
        Self::token(line).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// From, in this order: `file` (a `--token-file` flag), `FLOTILLA_TOKEN`,
    /// `FLOTILLA_TOKEN_FILE`; none of them: no token.
    pub fn resolve(file: Option<&Path>) -> Result<Self, String> {
        if let Some(file) = file {
            return Self::from_file(file);
        }
        if let Some(token) = std::env::var_os(TOKEN_ENV) {
            let token = token.into_string().map_err(|_| format!("{TOKEN_ENV} is not valid text"))?;
            return Self::token(&token).map_err(|e| format!("{TOKEN_ENV}: {e}"));
        }
        if let Some(file) = std::env::var_os(TOKEN_FILE_ENV).filter(|f| !f.is_empty()) {
            return Self::from_file(&PathBuf::from(file));
        }
        Ok(Self::none())
    }

    /// Sets what [`Credentials::current`] returns for this process (the
    /// CLI does so once, from its flags). Later calls change nothing.
    pub fn set_current(c: Credentials) {
        let _ = DEFAULT.set(c);
    }

    /// This process's credentials: those set by [`Credentials::set_current`],
    /// else resolved from the environment (an unreadable token file: none).
    pub fn current() -> Credentials {
        DEFAULT
            .get_or_init(|| {
                Self::resolve(None).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "no API token");
                    Self::none()
                })
            })
            .clone()
    }

    /// A copy with a worker-key slot of its own (for one worker agent).
    pub fn for_worker(&self) -> Credentials {
        Credentials { bearer: self.bearer.clone(), worker_key: Arc::default() }
    }

    /// Whether a token is sent.
    pub fn has_token(&self) -> bool {
        self.bearer.is_some()
    }

    /// Sends `key` as the worker key from now on (every clone sharing the
    /// slot); an empty key sends none.
    pub fn set_worker_key(&self, key: &str) {
        let value = (!key.is_empty()).then(|| MetadataValue::try_from(key).ok()).flatten();
        *self.worker_key.write().expect("worker key lock") = value;
    }

    /// `channel` with these credentials on every request.
    pub fn wrap(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(b) = &self.bearer {
            req.metadata_mut().insert(AUTHORIZATION, b.clone());
        }
        if let Some(k) = self.worker_key.read().expect("worker key lock").as_ref() {
            req.metadata_mut().insert(WORKER_KEY_METADATA, k.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_and_a_worker_key_travel_as_metadata() {
        let mut c = Credentials::token("  flt_abc\n").unwrap();
        let worker = c.for_worker();
        worker.set_worker_key("k1");
        let req = c.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get(AUTHORIZATION).unwrap(), "Bearer flt_abc");
        assert!(req.metadata().get(WORKER_KEY_METADATA).is_none(), "the worker's key stays with the worker");
        let mut w2 = worker.clone();
        let req = w2.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get(WORKER_KEY_METADATA).unwrap(), "k1");
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        assert!(Credentials::token("   ").unwrap_err().contains("empty"));
        assert!(Credentials::token("a\u{7}b").unwrap_err().contains("ASCII"));
        let e = Credentials::from_file(Path::new("/nonexistent/token")).unwrap_err();
        assert!(e.contains("/nonexistent/token"), "{e}");
    }
}
