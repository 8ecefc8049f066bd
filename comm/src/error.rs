//! The one error type of every collective and of ring setup. Each variant that
//! is about a peer names its rank, so that a failed step can be reported to the
//! coordinator with the worker to blame.

use std::io;
use std::time::Duration;

/// Why a collective or the building of a ring failed.
///
/// After any error a [`TcpRing`](crate::TcpRing) is broken: every later call
/// returns a copy of the first error at once.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer did not send (or did not read) within the op deadline.
    #[error("timed out after {after:?} waiting for rank {rank} ({op})")]
    Timeout { rank: usize, op: &'static str, after: Duration },
    /// A peer closed or reset its connection.
    #[error("rank {rank} closed the connection ({op})")]
    PeerClosed { rank: usize, op: &'static str },
    /// A peer sent something this rank did not expect: another op, another
    /// sequence number, another length, or bytes that are not our protocol.
    #[error("protocol error with rank {rank}: {message}")]
    Protocol { rank: usize, message: String },
    /// Any other socket error.
    #[error("io error with rank {rank}: {source}")]
    Io {
        rank: usize,
        #[source]
        source: io::Error,
    },
    /// The ring could not be built (bad config, a peer never connected, a
    /// connection refused as stale, the listener shut down).
    #[error("could not build the ring: {0}")]
    Setup(String),
    /// A call this group cannot serve, such as a buffer in device memory
    /// handed to a group that moves host memory. Nothing was sent.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl CommError {
    /// The rank to blame, when one is known.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::Timeout { rank, .. }
            | CommError::PeerClosed { rank, .. }
            | CommError::Protocol { rank, .. }
            | CommError::Io { rank, .. } => Some(*rank),
            CommError::Setup(_) | CommError::Unsupported(_) => None,
        }
    }

    /// The same error with the rank it names mapped by `f`: for a group
    /// whose ranks are a subset of a larger one, to name the peer by its
    /// rank in the larger group.
    pub fn map_rank(self, f: impl Fn(usize) -> usize) -> CommError {
        match self {
            CommError::Timeout { rank, op, after } => CommError::Timeout { rank: f(rank), op, after },
            CommError::PeerClosed { rank, op } => CommError::PeerClosed { rank: f(rank), op },
            CommError::Protocol { rank, message } => CommError::Protocol { rank: f(rank), message },
            CommError::Io { rank, source } => CommError::Io { rank: f(rank), source },
            CommError::Setup(message) => CommError::Setup(message),
            CommError::Unsupported(message) => CommError::Unsupported(message),
        }
    }

    /// An equal error, for repeating the error that broke a ring. `io::Error`
    /// is not `Clone`, so an `Io` copy keeps the kind and the message.
    pub fn duplicate(&self) -> CommError {
        match self {
            CommError::Timeout { rank, op, after } => CommError::Timeout { rank: *rank, op, after: *after },
            CommError::PeerClosed { rank, op } => CommError::PeerClosed { rank: *rank, op },
            CommError::Protocol { rank, message } => CommError::Protocol { rank: *rank, message: message.clone() },
            CommError::Io { rank, source } => {
                CommError::Io { rank: *rank, source: io::Error::new(source.kind(), source.to_string()) }
            }
            CommError::Setup(message) => CommError::Setup(message.clone()),
            CommError::Unsupported(message) => CommError::Unsupported(message.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_the_rank_except_for_setup() {
        let timeout = CommError::Timeout { rank: 3, op: "all_reduce", after: Duration::from_millis(300) };
        assert_eq!(timeout.peer(), Some(3));
        assert_eq!(timeout.to_string(), "timed out after 300ms waiting for rank 3 (all_reduce)");
        let io = CommError::Io { rank: 1, source: io::Error::other("boom") };
        assert_eq!(io.duplicate().to_string(), io.to_string());
        assert_eq!(CommError::Setup("x".into()).peer(), None);
        assert_eq!(timeout.map_rank(|r| r * 10).peer(), Some(30));
    }
}
