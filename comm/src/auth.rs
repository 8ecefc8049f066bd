//! The secret the ranks of one generation share, and the proofs of it that
//! the two ends of a data connection exchange in its handshake: HMAC-SHA256
//! keyed by the secret over the connector's hello (job, generation, ranks,
//! world, lane and the connector's nonce) and the listener's nonce, with a
//! label per direction. Nonces from both ends make a replayed handshake fail;
//! proofs are compared in constant time.

use std::fmt;
use std::io;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a [`Secret`].
pub const SECRET_LEN: usize = 32;
pub(crate) const NONCE_LEN: usize = 32;
pub(crate) const PROOF_LEN: usize = 32;

pub(crate) type Nonce = [u8; NONCE_LEN];
pub(crate) type Proof = [u8; PROOF_LEN];

/// The secret the ranks of one generation of a job share (the coordinator
/// hands it out with the assignment). A data connection is accepted only
/// from a peer that proves it knows the secret, and only to one that does.
/// Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct Secret([u8; SECRET_LEN]);

impl Secret {
    /// The secret of exactly [`SECRET_LEN`] bytes; `None` for any other length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Secret> {
        Some(Secret(bytes.try_into().ok()?))
    }

    /// A fresh secret from the operating system's random source.
    pub fn random() -> io::Result<Secret> {
        let mut bytes = [0u8; SECRET_LEN];
        fill_random(&mut bytes)?;
        Ok(Secret(bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Which end of a connection a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The rank that accepted the connection (answers the hello).
    Listener,
    /// The rank that dialed (sent the hello).
    Connector,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Listener => b"flotilla-comm/3 listener proof",
            Role::Connector => b"flotilla-comm/3 connector proof",
        }
    }
}

/// A fresh nonce from the operating system's random source.
pub(crate) fn nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n)?;
    Ok(n)
}

fn fill_random(out: &mut [u8]) -> io::Result<()> {
    getrandom::getrandom(out).map_err(|e| io::Error::other(format!("the random source failed: {e}")))
}

fn keyed(secret: &Secret, role: Role, hello: &[u8], listener_nonce: &Nonce) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
    mac.update(role.label());
    mac.update(&(hello.len() as u64).to_le_bytes());
    mac.update(hello);
    mac.update(listener_nonce);
    mac
}

/// `role`'s proof that it knows `secret`, for the connection whose hello
/// was `hello` (its bytes on the wire) and whose listener chose
/// `listener_nonce`.
pub(crate) fn prove(secret: &Secret, role: Role, hello: &[u8], listener_nonce: &Nonce) -> Proof {
    let mut out = [0u8; PROOF_LEN];
    out.copy_from_slice(&keyed(secret, role, hello, listener_nonce).finalize().into_bytes());
    out
}

/// Whether `proof` is `role`'s proof for this connection (constant time).
pub(crate) fn verify(secret: &Secret, role: Role, hello: &[u8], listener_nonce: &Nonce, proof: &[u8]) -> bool {
    keyed(secret, role, hello, listener_nonce).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_secret_role_hello_and_nonce() {
        let (s, other) = (Secret::random().unwrap(), Secret::random().unwrap());
        let (hello, n) = (b"hello bytes".to_vec(), nonce().unwrap());
        let p = prove(&s, Role::Connector, &hello, &n);
        assert!(verify(&s, Role::Connector, &hello, &n, &p));
        assert!(!verify(&other, Role::Connector, &hello, &n, &p), "another secret");
        assert!(!verify(&s, Role::Listener, &hello, &n, &p), "the other direction");
        assert!(!verify(&s, Role::Connector, b"hello bytez", &n, &p), "another hello");
        assert!(!verify(&s, Role::Connector, &hello, &nonce().unwrap(), &p), "another nonce");
        assert!(!verify(&s, Role::Connector, &hello, &n, &p[..31]), "a short proof");
    }

    #[test]
    fn secrets_have_one_length_and_never_show() {
        assert!(Secret::from_bytes(&[7; 31]).is_none());
        assert!(Secret::from_bytes(&[7; 33]).is_none());
        let s = Secret::from_bytes(&[7; 32]).unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
