//! Keys of the data plane. The leader mints a random key for each job when
//! it is submitted; the state machine derives each generation's secret from
//! it when it plans the generation (HMAC-SHA256 of the job id and the
//! generation number), so the secret is replicated with the plan and a new
//! leader hands out the same one. Workers of a generation get its secret
//! with their assignment and prove it to each other on every data
//! connection; a worker of an older generation cannot derive a newer one.
//! Neither is ever logged or shown in a job's status.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// 32 secret bytes. `Debug` shows none of them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A fresh key from the operating system's random source.
    pub fn random() -> std::io::Result<DataKey> {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| std::io::Error::other(format!("the random source failed: {e}")))?;
        Ok(DataKey(key))
    }

    /// The secret of `job`'s `generation`, derived from this (the job's) key.
    pub fn generation_secret(&self, job: &str, generation: u64) -> DataKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(b"flotilla data-plane generation secret");
        mac.update(&(job.len() as u64).to_le_bytes());
        mac.update(job.as_bytes());
        mac.update(&generation.to_le_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(&mac.finalize().into_bytes());
        DataKey(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_generation_and_job_gets_its_own_secret() {
        let key = DataKey::random().unwrap();
        let g1 = key.generation_secret("j-1", 1);
        assert_eq!(g1, key.generation_secret("j-1", 1), "derived, so every replica agrees");
        assert_ne!(g1, key.generation_secret("j-1", 2));
        assert_ne!(g1, key.generation_secret("j-2", 1));
        assert_ne!(g1, DataKey::random().unwrap().generation_secret("j-1", 1));
        assert_ne!(key, DataKey::random().unwrap());
    }

    #[test]
    fn a_key_never_shows_and_survives_the_replicated_state() {
        let key = DataKey::random().unwrap();
        assert_eq!(format!("{key:?}"), "DataKey(..)");
        let back: DataKey = serde_json::from_str(&serde_json::to_string(&key).unwrap()).unwrap();
        assert_eq!(back, key);
    }
}
